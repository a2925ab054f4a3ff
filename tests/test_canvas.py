"""The canvas model: 256 tokens of digits placed on a 32x32 canvas.

Its layout, its export against PyTorch, its compiled graph with every region computing, each token
mechanism's exact equalities on it, its classifier and a few steps of its training. The graph is exported
here from the shipped checkpoint, as `fcpass export --arch canvas` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fcpass.optimize import OptimizeOptions, optimize
from fcpass.quality import DigitClassifier
from fcpass.sampling import SamplingSetup, classifier_for
from models import bundled, canvas
from runtimes.sampler import SampleRequest
from tests.conftest import forced_compute_error
from tests.helpers.compiled import Tok

ROOT = Path(__file__).resolve().parent.parent


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"latent": rng.standard_normal((2, 1, canvas.IMAGE_SIZE, canvas.IMAGE_SIZE)).astype(np.float32),
            "timestep": np.full((2,), 400.0 + seed, np.float32),
            "class_labels": np.array([3, canvas.NUM_CLASSES], np.int64)}


def test_placed_digits_lie_whole_inside_a_blank_frame() -> None:
    images, labels = canvas.load_canvas(200, seed=3)
    assert images.shape == (200, 1, 32, 32) and images.dtype == np.float32 and labels.shape == (200,)
    assert images.min() == -1.0 and images.max() <= 1.0
    lit = images[:, 0] > -1.0
    rows, cols = lit.any(axis=2), lit.any(axis=1)
    heights = rows.shape[1] - rows[:, ::-1].argmax(1) - rows.argmax(1)
    widths = cols.shape[1] - cols[:, ::-1].argmax(1) - cols.argmax(1)
    assert heights.max() <= canvas.MAX_SIDE and widths.max() <= canvas.MAX_SIDE
    assert 0.05 < lit.mean() < 0.3  # most tokens are background
    # positions spread over the frame, not one spot
    assert np.ptp(rows.argmax(1)) >= 10 and np.ptp(cols.argmax(1)) >= 10
    again, _ = canvas.load_canvas(200, seed=3)
    np.testing.assert_array_equal(images, again)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from fcpass.export import ExportSpec, export

    out = tmp_path_factory.mktemp("canvas") / "dit_canvas.onnx"
    export(ExportSpec("canvas", batch=2), out, weights=canvas.WEIGHTS)
    return out


def test_export_equals_pytorch(exported: Path) -> None:
    import torch

    from models.dit import DiT, DiTConfig

    model = DiT(DiTConfig(**canvas.CANVAS_DIT)).eval()
    model.load_state_dict(torch.load(canvas.WEIGHTS, weights_only=True))
    f = feeds(1)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(f[k]) for k in ("latent", "timestep", "class_labels"))).numpy()
    (got,) = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(None, f)
    assert got.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.fixture(scope="module")
def compiled(exported: Path) -> Path:
    out = exported.with_name("canvas.fc.onnx")
    optimize(exported, out, OptimizeOptions(taylor=True), None)
    return out


def test_every_region_computing_equals_the_exported_graph(compiled: Path, exported: Path) -> None:
    assert forced_compute_error(compiled, exported, feeds(2)) <= 1e-5


@pytest.fixture(scope="module")
def tok(exported: Path) -> Tok:
    return Tok(exported, k=64, regions=("stack",))


def test_token_caching_all_full_equals_the_exported_graph(tok: Tok) -> None:
    out = tok.run(feeds(0), tok=0)
    (ref,) = tok.ref.run(None, feeds(0))
    assert tok.plan.tokens["blocks"][0]["tokens"] == 256
    np.testing.assert_allclose(out["noise_pred"], ref, atol=1e-5)


def test_a_conservative_step_at_the_same_input_reproduces_the_full_step(tok: Tok) -> None:
    full = tok.run(feeds(0), tok=0)
    cons = tok.run(feeds(0), tok=1)
    np.testing.assert_allclose(cons["noise_pred"], full["noise_pred"], atol=1e-5)
    local = tok.run(feeds(0), tok=2)
    np.testing.assert_allclose(local["noise_pred"], full["noise_pred"], atol=1e-5)


def test_a_conservative_step_recomputes_only_its_top_k_tokens(tok: Tok) -> None:
    """At a new input the conservative step's MLP output changes on k tokens of each block and keeps
    the full step's cache on the rest."""
    tok.run(feeds(0), tok=0)
    before = {k: v.copy() for k, v in tok.state.items()}
    tok.run(feeds(1), tok=1)
    for pos in range(len(tok.plan.tokens["blocks"])):
        name = f"fc.tok{pos}.b1.out"
        changed = np.abs(tok.state[name] - before[name]).max(axis=-1) > 0  # (batch, tokens)
        assert (changed.sum(axis=1) == 64).all(), pos


def test_the_classifier_reads_its_canvas_and_scores_held_out_digits() -> None:
    meta = json.loads(canvas.CLASSIFIER.with_suffix(".json").read_text())
    _, _, x_ho, y_ho = canvas.heldout_split(meta["seed"], meta["heldout_fraction"])
    classifier = DigitClassifier(canvas.CLASSIFIER)
    assert classifier.image_size == 32
    accuracy = classifier.accuracy(x_ho, y_ho)
    assert accuracy == pytest.approx(meta["heldout_accuracy"], abs=1e-6)
    assert accuracy >= 0.97
    assert classifier_for(SamplingSetup({}, SampleRequest(), arch="canvas")).path == canvas.CLASSIFIER
    assert bundled("canvas").scheduler_config == canvas.SCHEDULER_CONFIG


def test_training_runs_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    cmd = [sys.executable, "tools/train_digits.py", "--model", "canvas", "--batch", "4", "--save-every", "1",
           "--threads", "1", "--out", str(tmp_path), "--resume", str(tmp_path / "state.pt")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for steps in ("2", "3"):
        done = subprocess.run([*cmd, "--steps", steps], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "step 3 loss" in done.stderr and "step 1 loss" not in done.stderr  # the second run resumed at step 3
    import torch

    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["step"] == 3
    weights = torch.load(tmp_path / "dit_canvas.pt", weights_only=True)
    assert weights["pos_embed"].shape == (1, 256, canvas.CANVAS_DIT["hidden_size"])
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["clip_sample"] is False
