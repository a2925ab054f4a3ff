"""diffusers' SD3 transformer sampled end to end: caption and pooled caption embeddings, flow matching,
guidance, a calibrated cache; and an input the sampler has no role for is named before any call."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fcpass.cli import main
from tests.helpers.diffusers_models import SPECS, _randomize_, _sd3


def export_sd3(path: Path, names: tuple[str, ...]) -> Path:
    """The tiny SD3 transformer, the same weights at every call, with these input names."""
    torch.manual_seed(0)  # diffusers draws the initial weights from the global generator
    model = _sd3().eval()
    _randomize_(model, 0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, SPECS["sd3"].inputs(torch.Generator().manual_seed(0), [500.0, 500.0]), str(path),
                          dynamo=False, opset_version=18, input_names=list(names), output_names=["noise_pred"])
    return path


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sd3")
    export_sd3(d / "sd3.onnx", SPECS["sd3"].names)
    (d / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    rng = np.random.default_rng(0)
    np.save(d / "captions.npy", rng.standard_normal((3, 5, 12)).astype(np.float32))
    np.save(d / "pooled.npy", rng.standard_normal((3, 6)).astype(np.float32))
    np.save(d / "pooled2.npy", rng.standard_normal((3, 6)).astype(np.float32))
    return {name: d / f for name, f in [("onnx", "sd3.onnx"), ("sched", "scheduler_config.json"),
                                        ("captions", "captions.npy"), ("pooled", "pooled.npy"), ("pooled2", "pooled2.npy")]}


def run(argv: list[object]) -> int:
    return main([str(a) for a in argv])


def test_pooled_embeddings_are_fed_and_the_cache_samples_what_the_graph_does(sd3: dict[str, Path], tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--scheduler-config", sd3["sched"], "--prompt-embeds", sd3["captions"], "--steps", "6"]
    a, b, c = (tmp_path / f"{x}.npy" for x in "abc")
    capsys.readouterr()
    assert run(["sample", sd3["onnx"], *common]) == 2
    assert "takes pooled caption embeddings (pooled_projections [2, 6]); pass --pooled-embeds" in capsys.readouterr().err
    assert run(["sample", sd3["onnx"], *common, "--pooled-embeds", sd3["pooled"], "--out-npy", a]) == 0
    assert run(["sample", sd3["onnx"], *common, "--pooled-embeds", sd3["pooled2"], "--out-npy", b]) == 0
    plain, other = np.load(a), np.load(b)
    assert plain.shape == (3, 4, 8, 8) and np.isfinite(plain).all()
    assert np.abs(plain - other).max() > 1e-3  # the pooled embeddings reach the model

    fc = tmp_path / "sd3.fc.onnx"
    assert run(["optimize", sd3["onnx"], "-o", fc, "--calibrate", "2", "--calib-steps", "6", *common,
                "--pooled-embeds", sd3["pooled"]]) == 0
    assert run(["sample", fc, "--policy", "none", *common, "--pooled-embeds", sd3["pooled"], "--out-npy", c]) == 0
    np.testing.assert_allclose(np.load(c), plain, atol=1e-5)
    assert run(["sample", fc, "--policy", "fora:interval=2,regions=stack", *common, "--pooled-embeds", sd3["pooled"],
                "--out-npy", c]) == 0
    cached = np.load(c)
    assert np.isfinite(cached).all() and np.abs(cached - plain).max() > 0

    few = tmp_path / "few.npy"
    np.save(few, np.load(sd3["pooled"])[:2])
    capsys.readouterr()
    assert run(["sample", sd3["onnx"], *common, "--pooled-embeds", few]) == 2
    assert "--pooled-embeds has 2 rows for 3 captions" in capsys.readouterr().err
    long = tmp_path / "long.npy"
    np.save(long, np.zeros((3, 7, 12), np.float32))
    assert run(["sample", sd3["onnx"], *common[:2], "--prompt-embeds", long, "--pooled-embeds", sd3["pooled"]]) == 2
    assert ("--prompt-embeds rows are (7, 12) but the graph takes (5, 12) per sample (encoder_hidden_states [2, 5, 12])"
            in capsys.readouterr().err)


def test_an_input_without_a_role_is_named_before_any_call_and_takes_one_from_inputs(
        sd3: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rank-2 float input is taken for pooled embeddings only when its name says so (PixArt's resolution
    condition is one too): named otherwise, the sampler names it, and --inputs gives it its role."""
    other = export_sd3(tmp_path / "sd3.onnx", ("latent", "timestep", "encoder_hidden_states", "extra_cond"))
    common = ["--scheduler-config", sd3["sched"], "--prompt-embeds", sd3["captions"], "--steps", "3"]
    capsys.readouterr()
    assert run(["sample", other, *common]) == 2
    assert "input extra_cond float32[2, 6] has no role the sampler feeds" in capsys.readouterr().err
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert run(["sample", other, *common, "--pooled-embeds", sd3["pooled"], "--inputs", "pooled_embeds=extra_cond",
                "--out-npy", a]) == 0
    assert run(["sample", sd3["onnx"], *common, "--pooled-embeds", sd3["pooled"], "--out-npy", b]) == 0
    np.testing.assert_array_equal(np.load(a), np.load(b))


def test_negative_embeddings_are_guidance_s_unconditional_half(sd3: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Zeros when none are given; one row serves every caption; they reach the model; calibration takes them."""
    common = ["--scheduler-config", sd3["sched"], "--prompt-embeds", sd3["captions"], "--pooled-embeds", sd3["pooled"],
              "--steps", "4"]
    rng = np.random.default_rng(1)
    zeros, one, three, pooled = (tmp_path / f"{x}.npy" for x in ("zeros", "one", "three", "pooled"))
    np.save(zeros, np.zeros((1, 5, 12), np.float32))
    np.save(one, rng.standard_normal((1, 5, 12)).astype(np.float32))
    np.save(three, np.repeat(np.load(one), 3, axis=0))
    np.save(pooled, rng.standard_normal((1, 6)).astype(np.float32))
    out = {k: tmp_path / f"{k}.out.npy" for k in ("default", "zeros", "one", "three", "pooled")}
    for key, extra in (("default", []), ("zeros", ["--negative-embeds", zeros]), ("one", ["--negative-embeds", one]),
                       ("three", ["--negative-embeds", three]),
                       ("pooled", ["--negative-embeds", one, "--negative-pooled-embeds", pooled])):
        assert run(["sample", sd3["onnx"], *common, *extra, "--out-npy", out[key]]) == 0
    got = {k: np.load(v) for k, v in out.items()}
    np.testing.assert_array_equal(got["zeros"], got["default"])
    np.testing.assert_array_equal(got["three"], got["one"])
    assert np.abs(got["one"] - got["default"]).max() > 1e-3 and np.abs(got["pooled"] - got["one"]).max() > 1e-3

    fc = tmp_path / "sd3.fc.onnx"
    assert run(["optimize", sd3["onnx"], "-o", fc, "--calibrate", "2", *common[:6], "--steps", "4",
                "--negative-embeds", three]) == 0
    assert run(["sample", fc, "--policy", "none", *common, "--negative-embeds", one, "--out-npy", out["one"]]) == 0
    np.testing.assert_allclose(np.load(out["one"]), got["one"], atol=1e-5)

    two = tmp_path / "two.npy"
    np.save(two, np.zeros((2, 5, 12), np.float32))
    for extra, message in ((["--negative-embeds", two], "--negative-embeds has 2 rows for 3 captions"),
                           (["--negative-embeds", one, "--guidance-scale", "1"],
                            "--negative-embeds is guidance's unconditional half, and this run has none"),
                           (["--negative-pooled-embeds", sd3["captions"]], "negative pooled embeddings of shape (3, 5, 12); they must have 2 axes")):
        capsys.readouterr()
        assert run(["sample", sd3["onnx"], *common, *extra]) == 2
        assert message in capsys.readouterr().err
