"""More transformers nobody here wrote, compiled as they come from the dynamo exporter: SD3.5's (dual attention
in its first block, RMS-normalised queries and keys), Sana's (linear attention: ReLU kernels, no Softmax) and
CogVideoX's (a video latent (B, frames, C, H, W), the caption tokens carried through every block beside the
video's). Each compiles, passes TensorRT's static
rules, and with every region computing equals the original graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

from fcpass.cli import main
from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.graphinfo import frames_axis
from fcpass.compiler.trt_check import check_graph
from fcpass.contract.roles import infer_roles
from tests.conftest import as_its_pipeline, forced_compute_error
from tools.export_diffusers import export_family


@pytest.mark.parametrize("family", ["sd3.5", "sana", "cogvideox"])
def test_compiles_and_computes_what_the_original_does(family: str, tmp_path: Path) -> None:
    e = export_family(family, "tiny", tmp_path / "model.onnx")
    with torch.no_grad():
        assert np.abs(e.model(*(torch.from_numpy(v) for v in e.feeds.values())).numpy()).max() > 1e-2  # not trivial
    original = onnx.load(str(e.path))
    assert infer_roles(original).latent.name == "hidden_states"
    blocks = discover_blocks(original, "hidden_states").blocks
    assert [".".join(b.scope.rsplit(".", 2)[-2:]) for b in blocks] == ["transformer_blocks.0", "transformer_blocks.1"]
    fc = tmp_path / "model.fc.onnx"
    assert main(["optimize", str(e.path), "-o", str(fc), "--taylor"]) == 0
    assert check_graph(onnx.load(str(fc))) == []
    assert forced_compute_error(fc, e.path, e.feeds) <= 1e-5
    assert frames_axis(original, "hidden_states") == (1 if family == "cogvideox" else 2)


def test_cogvideox_samples_as_its_pipeline_does_and_lays_out_its_frames(tmp_path: Path) -> None:
    """CogVideoX's own scheduler (DDIM on an SNR-shifted, zero-terminal-SNR schedule, v-prediction): `fcpass sample`
    on the ONNX graph draws what diffusers' CogVideoXDDIMScheduler draws from the PyTorch transformer, guidance
    included. Its frames come before its channels: the grid still lays each clip's frames out in a row."""
    import diffusers
    import matplotlib.image

    e = export_family("cogvideox", "tiny", tmp_path / "cogvideox.onnx", samples=2)
    grid, npy = tmp_path / "grid.png", tmp_path / "x.npy"
    assert main(["sample", str(e.path), "--scheduler-config", str(e.scheduler), "--prompt-embeds", str(e.captions),
                 "--steps", "4", "--guidance-scale", "6", "--out", str(grid), "--out-npy", str(npy)]) == 0
    got = np.load(npy)
    assert got.shape == (2, 3, 4, 8, 8)  # the model's own layout: (N, frames, C, H, W)
    # two clips, one to a row, three frames each (not four channels), upscaled 4x with a 1-pixel border
    assert matplotlib.image.imread(grid).shape[:2] == (4 * (2 * 9 + 1), 4 * (3 * 9 + 1))

    want = as_its_pipeline(e, diffusers.CogVideoXDDIMScheduler, steps=4, guidance=6.0)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_sana_samples_as_its_pipeline_does(tmp_path: Path) -> None:
    """Sana's own scheduler, DPM-Solver++ on flow sigmas (its timesteps the integer part of sigma x 1000)."""
    import diffusers

    e = export_family("sana", "tiny", tmp_path / "sana.onnx", samples=2)
    npy = tmp_path / "x.npy"
    assert main(["sample", str(e.path), "--prompt-embeds", str(e.captions), "--steps", "5", "--guidance-scale", "4.5",
                 "--out-npy", str(npy)]) == 0  # its scheduler_config.json beside it
    np.testing.assert_allclose(np.load(npy), as_its_pipeline(e, diffusers.DPMSolverMultistepScheduler, steps=5,
                                                              guidance=4.5), atol=1e-4)
