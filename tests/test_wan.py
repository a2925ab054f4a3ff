"""A video DiT end to end: diffusers' Wan transformer, its latent (B, C, frames, H, W), exported by the dynamo
exporter (the legacy one has no `rms_norm`): discovery, the forced-compute invariant, sampling, calibration,
caching, quality over frames and a grid of frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

from fcpass.cli import main
from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.trt_check import check_graph
from fcpass.contract.roles import infer_roles
from fcpass.quality import compare_batches
from tests.conftest import as_its_pipeline, forced_compute_error
from tools.export_diffusers import export_family

LATENT = (4, 3, 8, 8)  # channels, frames, height, width


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    e = export_family("wan", "tiny", tmp_path_factory.mktemp("wan") / "wan.onnx", samples=2)
    with torch.no_grad():
        assert np.abs(e.model(*(torch.from_numpy(v) for v in e.feeds.values())).numpy()).max() > 1e-2  # not trivial
    return {"onnx": e.path, "feeds": e.feeds, "sched": e.scheduler, "captions": e.captions, "exported": e}


def run(argv: list[object]) -> int:
    return main([str(a) for a in argv])


def test_roles_blocks_and_the_forced_compute_invariant(wan: dict[str, object], tmp_path: Path) -> None:
    model = onnx.load(str(wan["onnx"]))
    assert {k: v for k, v in infer_roles(model).names().items() if v} == {
        "latent": "hidden_states", "timestep": "timestep", "prompt_embeds": "encoder_hidden_states"}
    assert [b.scope.rsplit(".", 2)[-2:] for b in discover_blocks(model, "hidden_states").blocks] == [["blocks", "0"], ["blocks", "1"]]
    # The exporter spells out ScatterND's default reduction="none" in the rotary embeddings, which
    # TensorRT's parser up to 10.7 refuses; the compiled graph drops it.
    assert {v.rule for v in check_graph(model)} == {"scatternd-reduction"}
    fc = tmp_path / "wan.fc.onnx"
    assert run(["optimize", wan["onnx"], "-o", fc, "--taylor"]) == 0
    assert check_graph(onnx.load(str(fc))) == []  # TensorRT's static rules
    assert forced_compute_error(fc, wan["onnx"], wan["feeds"]) <= 1e-5


def test_sample_optimize_calibrate_cache_and_score_over_frames(wan: dict[str, object], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--scheduler-config", wan["sched"], "--prompt-embeds", wan["captions"], "--steps", "8",
              "--guidance-scale", "5"]
    plain, cached, grid = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "grid.png"
    assert run(["sample", wan["onnx"], *common, "--out-npy", plain]) == 0
    videos = np.load(plain)
    assert videos.shape == (2, *LATENT) and np.isfinite(videos).all()

    fc = tmp_path / "wan.fc.onnx"
    assert run(["optimize", wan["onnx"], "-o", fc, "--calibrate", "2", *common[:4], "--steps", "8",
                "--guidance-scale", "5"]) == 0
    assert run(["sample", fc, "--policy", "none", *common, "--out-npy", cached]) == 0
    np.testing.assert_allclose(np.load(cached), videos, atol=1e-5)
    capsys.readouterr()
    assert run(["sample", fc, "--policy", "fora:interval=2,regions=stack", *common, "--baseline", "--out", grid,
                "--out-npy", cached]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "SSIM" in out
    assert grid.stat().st_size > 0
    import matplotlib.image

    # two samples, one to a row, three frames each, upscaled 4x with a 1-pixel border
    assert matplotlib.image.imread(grid).shape[:2] == (4 * (2 * 9 + 1), 4 * (3 * 9 + 1))
    q = compare_batches(videos, np.load(cached))
    assert q["n"] == 2 and 0 < q["psnr_mean"] < 100 and 0 < q["ssim_mean"] < 1


def test_token_caching_reaches_the_video_blocks(wan: dict[str, object], tmp_path: Path) -> None:
    """DuCa's conservative steps run each block's token-local branches on the top-k of the clip's tokens."""
    common = ["--scheduler-config", wan["sched"], "--prompt-embeds", wan["captions"], "--steps", "8",
              "--guidance-scale", "5"]
    fc, plain, got, report = tmp_path / "wan.tok.fc.onnx", tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "r.json"
    assert run(["optimize", wan["onnx"], "-o", fc, "--tokens", "duca"]) == 0
    assert check_graph(onnx.load(str(fc))) == []
    assert run(["sample", wan["onnx"], *common, "--out-npy", plain]) == 0
    assert run(["sample", fc, "--policy", "none", *common, "--out-npy", got]) == 0
    np.testing.assert_allclose(np.load(got), np.load(plain), atol=1e-5)
    assert run(["sample", fc, "--policy", "duca", *common, "--out-npy", got, "--report", report]) == 0
    modes = {m for r in json.loads(report.read_text())["records"] for m in r["tok"]}
    assert modes >= {0, 1} and np.isfinite(np.load(got)).all()  # full and conservative steps both ran


def test_samples_as_wan_s_pipeline_does_with_its_unipc_scheduler(wan: dict[str, object], tmp_path: Path) -> None:
    """Wan's own scheduler (UniPC on flow sigmas): `fcpass sample` on the ONNX graph draws what diffusers' UniPC
    draws from the PyTorch transformer, guidance included; two samples on a batch-2 graph are two trajectories."""
    config = json.loads(Path(wan["sched"]).read_text())
    assert config["_class_name"] == "UniPCMultistepScheduler" and config["use_flow_sigmas"]
    got = tmp_path / "a.npy"
    assert run(["sample", wan["onnx"], "--scheduler-config", wan["sched"], "--prompt-embeds", wan["captions"],
                "--steps", "6", "--guidance-scale", "5", "--out-npy", got]) == 0

    want = as_its_pipeline(wan["exported"], diffusers.UniPCMultistepScheduler, steps=6, guidance=5.0)
    np.testing.assert_allclose(np.load(got), want, atol=1e-4)
