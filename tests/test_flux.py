"""diffusers' Flux transformer end to end: double- and single-stream blocks, the packed latent, position ids,
distilled guidance and the dynamically shifted flow-matching schedule, exported by the dynamo exporter (the
legacy one has no `rms_norm`)."""

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
from runtimes.sampler import SampleRequest, sample, unpack_latents
from runtimes.schedulers import scheduler_from_config
from tests.conftest import RecordingDenoiser, forced_compute_error
from tools.export_diffusers import export_family, pipeline_image_ids

NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance")
TOKENS, CAPTION = 16, 5  # a 4x4 grid of 2x2 patches of an 8x8 latent


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    e = export_family("flux", "tiny", tmp_path_factory.mktemp("flux") / "flux.onnx")
    return {"model": e.model, "onnx": e.path, "feeds": e.feeds, "sched": e.scheduler, "captions": e.captions,
            "pooled": e.pooled}


def run(argv: list[object]) -> int:
    return main([str(a) for a in argv])


def test_roles_blocks_and_the_forced_compute_invariant(flux: dict[str, object], tmp_path: Path) -> None:
    model = onnx.load(str(flux["onnx"]))
    roles = infer_roles(model)
    assert {k: v for k, v in roles.names().items() if v} == {
        "latent": "hidden_states", "timestep": "timestep", "prompt_embeds": "encoder_hidden_states",
        "pooled_embeds": "pooled_projections", "img_ids": "img_ids", "txt_ids": "txt_ids", "guidance": "guidance"}
    blocks = discover_blocks(model, "hidden_states")
    assert [b.scope.rsplit(".", 2)[-2:] for b in blocks.blocks] == [
        ["transformer_blocks", "0"], ["transformer_blocks", "1"],
        ["single_transformer_blocks", "0"], ["single_transformer_blocks", "1"], ["single_transformer_blocks", "2"]]
    fc = tmp_path / "flux.fc.onnx"
    assert run(["optimize", flux["onnx"], "-o", fc, "--taylor"]) == 0
    assert check_graph(onnx.load(str(fc))) == []  # TensorRT's static rules
    feeds = flux["feeds"]
    with torch.no_grad():
        assert np.abs(flux["model"](*(torch.from_numpy(feeds[n]) for n in NAMES)).numpy()).max() > 1e-2  # not trivial
    assert forced_compute_error(fc, flux["onnx"], feeds) <= 1e-5


def test_the_sampler_feeds_what_flux_pipeline_feeds(flux: dict[str, object]) -> None:
    """Position ids, the timestep over 1000 and the guidance scale as FluxPipeline passes them: the graph's
    output on the sampler's feeds equals diffusers' transformer on the pipeline's inputs."""
    den = RecordingDenoiser(flux["onnx"])
    captions, pooled = np.load(flux["captions"])[:1], np.load(flux["pooled"])[:1]
    scheduler = scheduler_from_config(flux["sched"])
    result = sample(den, scheduler, SampleRequest(prompt_embeds=captions, pooled_embeds=pooled, steps=3,
                                                  guidance_scale=3.5), progress=False)
    assert len(den.feeds) == 3 and result.images.shape == (1, 4, 8, 8)  # one call a step: no unconditional half
    for i, feeds in enumerate(den.feeds):
        assert feeds["timestep"] == pytest.approx(scheduler.timesteps[i] / 1000)
        np.testing.assert_array_equal(feeds["img_ids"], pipeline_image_ids(4, 4).numpy())
        np.testing.assert_array_equal(feeds["guidance"], [3.5])
        with torch.no_grad():
            ref = flux["model"](torch.from_numpy(feeds["hidden_states"]), torch.from_numpy(captions),
                                torch.from_numpy(pooled), torch.tensor([float(scheduler.timesteps[i]) / 1000]),
                                pipeline_image_ids(4, 4), torch.zeros(CAPTION, 3), torch.tensor([3.5])).numpy()
        # fp32 through rotary embeddings at O(1) activations: ONNX Runtime and PyTorch differ by up to a few 1e-5
        np.testing.assert_allclose(den.session.run(["noise_pred"], feeds)[0], ref, rtol=1e-4, atol=1e-4)
    latents = torch.randn(2, 4, 8, 8)
    np.testing.assert_array_equal(unpack_latents(_pack(latents).numpy(), (4, 4)), latents.numpy())


def test_sample_optimize_calibrate_and_cache(flux: dict[str, object], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--scheduler-config", flux["sched"], "--prompt-embeds", flux["captions"], "--pooled-embeds", flux["pooled"],
              "--steps", "8", "--guidance-scale", "3.5"]
    a, b, c = (tmp_path / f"{x}.npy" for x in "abc")
    assert run(["sample", flux["onnx"], *common, "--out-npy", a, "--out", tmp_path / "grid.png"]) == 0
    plain = np.load(a)
    assert plain.shape == (3, 4, 8, 8) and np.isfinite(plain).all()
    assert run(["sample", flux["onnx"], *common, "--resolution", "64x64", "--out-npy", b]) == 0
    np.testing.assert_array_equal(np.load(b), plain)  # the size the latent has, said out loud
    capsys.readouterr()
    assert run(["sample", flux["onnx"], *common, "--resolution", "32x64"]) == 2
    assert "--resolution 32x64 makes 2x4 latent patches, but the graph's latent holds 16 tokens" in capsys.readouterr().err

    fc = tmp_path / "flux.fc.onnx"
    assert run(["optimize", flux["onnx"], "-o", fc, "--calibrate", "2", *common[:6], "--steps", "8",
                "--guidance-scale", "3.5", "--threads", "1", "--calib-eps", "0.5"]) == 0  # random weights: loose fits
    assert run(["sample", fc, "--policy", "none", *common, "--out-npy", c]) == 0
    np.testing.assert_allclose(np.load(c), plain, atol=1e-5)
    report = tmp_path / "r.json"
    assert run(["sample", fc, "--policy", "fastcache", "--sigma-scale", "50", *common, "--out-npy", c,
                "--report", report]) == 0
    records = json.loads(report.read_text())["records"]
    assert any(1 in r["skip"] for r in records) and np.isfinite(np.load(c)).all()

    # The If-free lowering runs the same steps: segments chosen by the host instead of Ifs in one graph.
    segments = tmp_path / "flux.fc"
    assert run(["optimize", fc, "-o", segments, "--lowering", "segments"]) == 0
    for model, npy in ((fc, b), (segments, c)):
        assert run(["sample", model, "--policy", "fora:interval=2", *common, "--out-npy", npy]) == 0
    np.testing.assert_allclose(np.load(c), np.load(b), atol=1e-6)


def test_true_guidance_on_top_of_the_distilled_one(flux: dict[str, object], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--true-cfg-scale runs an unconditional half against the negative embeddings: at the batch-1 graph, a
    call each. With the captions as their own negatives the halves agree, and the samples are the plain ones."""
    common = ["--scheduler-config", flux["sched"], "--prompt-embeds", flux["captions"], "--pooled-embeds", flux["pooled"],
              "--steps", "4", "--guidance-scale", "3.5"]
    out = {k: tmp_path / f"{k}.npy" for k in ("plain", "self", "zeros", "cached")}
    self_negative = ["--negative-embeds", flux["captions"], "--negative-pooled-embeds", flux["pooled"]]
    assert run(["sample", flux["onnx"], *common, "--out-npy", out["plain"]]) == 0
    assert run(["sample", flux["onnx"], *common, "--true-cfg-scale", "4", *self_negative, "--out-npy", out["self"]]) == 0
    assert run(["sample", flux["onnx"], *common, "--true-cfg-scale", "4", "--out-npy", out["zeros"]]) == 0
    np.testing.assert_allclose(np.load(out["self"]), np.load(out["plain"]), atol=1e-6)
    assert np.abs(np.load(out["zeros"]) - np.load(out["plain"])).max() > 1e-3

    fc = tmp_path / "flux.fc.onnx"
    assert run(["optimize", flux["onnx"], "-o", fc]) == 0
    assert run(["sample", fc, "--policy", "none", *common, "--true-cfg-scale", "4", "--out-npy", out["cached"]]) == 0
    np.testing.assert_allclose(np.load(out["cached"]), np.load(out["zeros"]), atol=1e-5)
    # One step is affine in the scale: x(s) = x0 + dt (u + s (c - u)), so x(4) - x(2) = 2 (x(2) - x(1)), x(1) the plain.
    one = [*common[:6], "--steps", "1", "--guidance-scale", "3.5"]
    x = {}
    for scale in ("1", "2", "4"):
        assert run(["sample", flux["onnx"], *one, "--true-cfg-scale", scale, "--out-npy", out["zeros"]]) == 0
        x[scale] = np.load(out["zeros"]).astype(np.float64)
    np.testing.assert_allclose(x["4"] - x["2"], 2 * (x["2"] - x["1"]), atol=1e-4)
    assert np.abs(x["2"] - x["1"]).max() > 1e-3
    capsys.readouterr()
    assert run(["sample", "--true-cfg-scale", "2", "--steps", "2"]) == 2  # the bundled DiT guides with --guidance-scale
    assert "--true-cfg-scale 2 is for graphs that take the guidance scale as an input" in capsys.readouterr().err
