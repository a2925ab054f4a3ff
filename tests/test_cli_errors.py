"""Bad input to the `fcpass` CLI: one line `fcpass: error: ...` on stderr, exit code 2, no traceback.

And a failing `export` or `optimize` leaves nothing behind: neither the output nor a `.*.tmp` file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fcpass.cli import main
from models.digits import DIGITS_DIR, DIGITS_DIT, ONNX
from tests.conftest import SCHEDULER_CONFIG
from tests.helpers.cli import user_error


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits DiT exported through the CLI (legacy exporter: ~1 s), un-optimized."""
    path = tmp_path_factory.mktemp("plain") / "digits.onnx"
    assert main(["export", "--arch", "digits", "--exporter", "legacy", "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def cached(plain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`plain` rewritten into a cache-aware graph (no calibration)."""
    path = tmp_path_factory.mktemp("cached") / "digits.fc.onnx"
    assert main(["optimize", str(plain), "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def rank2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid ONNX graph whose only input is rank-2, so nothing can be the latent."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "rank2", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("rank2") / "rank2.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty output folder; a failing command must leave it empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# --- unreadable models ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "optimize", "sample"])
def test_missing_model_file(capsys, tmp_path: Path, out: Path, command: str) -> None:
    argv = [command, tmp_path / "nope.onnx"] + (["-o", out / "x.onnx"] if command == "optimize" else [])
    user_error(capsys, argv, "model file not found", "nope.onnx")
    assert leftovers(out) == []


@pytest.mark.parametrize("command", ["inspect", "optimize", "sample"])
def test_file_that_is_not_onnx(capsys, tmp_path: Path, out: Path, command: str) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf\x08\x96\x01" * 17)
    argv = [command, junk] + (["-o", out / "x.onnx"] if command == "optimize" else [])
    user_error(capsys, argv, "not a readable ONNX model")
    assert leftovers(out) == []


@pytest.mark.parametrize("command", ["inspect", "optimize", "sample"])
def test_graph_without_a_latent_input(capsys, rank2: Path, out: Path, command: str) -> None:
    argv: list = [command, rank2]
    if command == "optimize":
        argv += ["-o", out / "x.onnx"]
    if command != "inspect":
        argv += ["--scheduler-config", SCHEDULER_CONFIG]
    user_error(capsys, argv, "no latent input", "--inputs latent=")
    assert leftovers(out) == []


def test_optimize_refuses_a_graph_that_contradicts_its_types(capsys, out: Path) -> None:
    """onnxconverter-common's plain fp16 conversion of the tiny DiT's legacy export types its timestep
    Cast's output fp16 and leaves the Cast at float: no runtime loads that graph, so nor could its rewrite."""
    from onnxconverter_common import float16

    from tests.conftest import export_tiny_dit

    broken = out.parent / "broken16.onnx"
    fp32 = onnx.load(str(export_tiny_dit(out.parent / "tiny.onnx", "legacy")))
    onnx.save(float16.convert_float_to_float16(fp32, keep_io_types=False), str(broken))
    user_error(capsys, ["optimize", broken, "-o", out / "x.onnx"],
               "broken16.onnx does not load", "computes FLOAT where the graph stores FLOAT16", "node_block_list")
    assert leftovers(out) == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--calibrate", "-1"], "--calibrate -1 must be at least 1 trajectory"),
    (["--calibrate", "1", "--calib-steps", "0"], "--calib-steps 0 must be at least 1"),
    (["--calibrate", "1", "--threads", "0"], "--threads 0 must be at least 1"),
    (["--provider", "cuda"], "--provider and --threads set the calibration runs; add --calibrate N, or drop them"),
])
def test_calibration_settings_are_checked_first(capsys, plain: Path, out: Path, flags: list[str], message: str) -> None:
    user_error(capsys, ["optimize", plain, "-o", out / "x.onnx", "--scheduler-config", SCHEDULER_CONFIG, *flags], message)
    assert leftovers(out) == []


def test_calibrating_on_a_provider_this_onnx_runtime_lacks(capsys, plain: Path, cached: Path, out: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    missing = "ONNX Runtime provider CUDAExecutionProvider is not available here"
    user_error(capsys, ["optimize", plain, "-o", out / "x.onnx", "--scheduler-config", SCHEDULER_CONFIG, "--calibrate", "1",
                        "--provider", "cuda"], missing)
    user_error(capsys, ["calibrate", cached, "-o", out / "y.onnx", "--for", "magcache", "--calibrate", "1",
                        "--provider", "cuda"], missing)
    assert leftovers(out) == []


def test_calibrating_a_model_without_its_scheduler_config(capsys, tiny_dit: Path, out: Path) -> None:
    """Calibration samples, so it needs the scheduler; optimizing alone does not."""
    user_error(capsys, ["optimize", tiny_dit, "-o", out / "x.onnx", "--calibrate", "1"],
               "is not the bundled model and has no scheduler_config.json beside it", "--scheduler-config")
    assert leftovers(out) == []


def test_a_scheduler_config_beside_the_model_is_the_default(tiny_dit: Path, tmp_path: Path) -> None:
    """Where tools/export_diffusers.py writes it: `fcpass sample model.onnx` needs no --scheduler-config then."""
    import shutil

    model = tmp_path / tiny_dit.name
    for part in tiny_dit.parent.glob(tiny_dit.name + "*"):  # the graph, and its weights where kept beside it
        shutil.copy(part, tmp_path)
    shutil.copy(DIGITS_DIR / "schedulers" / "dpmsolver.json", tmp_path / "scheduler_config.json")
    common = ["sample", str(model), "--steps", "3", "--class", "3", "--uncond-class", "10"]
    assert main([*common, "--out-npy", str(tmp_path / "a.npy")]) == 0
    assert main([*common, "--scheduler-config", str(DIGITS_DIR / "schedulers" / "dpmsolver.json"),
                 "--out-npy", str(tmp_path / "b.npy")]) == 0
    assert main([*common, "--scheduler-config", str(SCHEDULER_CONFIG), "--out-npy", str(tmp_path / "c.npy")]) == 0
    a, b, c = (np.load(tmp_path / f"{k}.npy") for k in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)  # the flag still wins


@pytest.mark.parametrize("command", ["sample", "optimize", "tune"])
def test_a_bad_scheduler_config_fails_before_the_model_loads(capsys, tiny_dit: Path, out: Path,
                                                            monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """A deployment model takes minutes to load; a scheduler config it cannot sample with is refused first."""
    import onnxruntime

    def no_session(*args: object, **kwargs: object) -> None:
        raise AssertionError("an ONNX Runtime session was made before the scheduler config was read")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    config = out / "scheduler_config.json"
    config.write_text('{"_class_name": "UniPCMultistepScheduler", "solver_order": 5}')
    argv = {"sample": ["sample", tiny_dit], "optimize": ["optimize", tiny_dit, "-o", out / "x.onnx", "--calibrate", "1"],
            "tune": ["tune", tiny_dit]}[command]
    user_error(capsys, [*argv, "--scheduler-config", config], "'solver_order': found 5; supported: 1, 2 or 3")
    assert leftovers(out) == [config.name]


# --- export ---------------------------------------------------------------------------------


def test_unknown_architecture(capsys, out: Path) -> None:
    user_error(
        capsys, ["export", "--arch", "dit-q-2", "-o", out / "m.onnx"], "unknown architecture 'dit-q-2'", "dit-s-2"
    )
    assert leftovers(out) == []


def _dit_checkpoint(path: Path, **overrides: object) -> Path:
    from models.dit import DiT, DiTConfig

    torch.save(DiT(DiTConfig(**{**DIGITS_DIT, **overrides})).state_dict(), path)
    return path


def _pixart_checkpoint(path: Path) -> Path:
    from dataclasses import replace

    from models.pixart import PixArt, pixart_config

    torch.save(PixArt(replace(pixart_config("pixart-tiny"), hidden_size=32)).state_dict(), path)
    return path


@pytest.mark.parametrize("arch", ["digits", "pixart-tiny"])
def test_weights_of_another_width(capsys, tmp_path: Path, out: Path, arch: str) -> None:
    if arch == "digits":
        weights = _dit_checkpoint(tmp_path / "w64.pt", hidden_size=64)
    else:
        weights = _pixart_checkpoint(tmp_path / "p32.pt")
    msg = user_error(capsys, ["export", "--arch", arch, "--weights", weights, "-o", out / "m.onnx"], "not match")
    assert ("width 64" if arch == "digits" else "(1, 16, 32)") in msg  # names what the file holds
    assert leftovers(out) == []


@pytest.mark.parametrize("arch", ["digits", "pixart-tiny"])
def test_weights_file_that_is_not_a_checkpoint(capsys, tmp_path: Path, out: Path, arch: str) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(64))
    user_error(capsys, ["export", "--arch", arch, "--weights", junk, "-o", out / "m.onnx"], "could not be read")
    assert leftovers(out) == []
    # An ONNX file passed as weights: torch.load's weights-only refusal runs to a paragraph; one clause is kept.
    msg = user_error(capsys, ["export", "--arch", arch, "--weights", ONNX, "-o", out / "m.onnx"],
                     "could not be read", "Weights only load failed", "pass a torch.save state dict")
    assert len(msg) < 300, msg


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--arch", "digits", "--batch", "0"], "--batch 0"),  # crashed with SIGFPE before
        (["--arch", "dit-s-2", "--image-size", "264"], "patch size 2"),  # silently exported a 32x32 output
        (["--arch", "digits", "--opset", "23"], "--opset 23"),
    ],
)
def test_bad_export_settings(capsys, out: Path, flags: list[str], fragment: str) -> None:
    user_error(capsys, ["export", *flags, "--exporter", "legacy", "-o", out / "m.onnx"], fragment)
    assert leftovers(out) == []


def test_export_that_fails_verification_leaves_nothing(capsys, monkeypatch, out: Path) -> None:
    import fcpass.export

    monkeypatch.setattr(fcpass.export, "_max_abs_diff", lambda *a: 0.5)
    argv = ["export", "--arch", "pixart-tiny", "--exporter", "legacy", "-o", out / "m.onnx"]
    user_error(capsys, argv, "disagrees with PyTorch")
    assert leftovers(out) == []


def _failing_save(model, path, *args, **kwargs) -> None:
    """Stand-in for onnx.save_model: half-writes the file, then the disk fills up."""
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_export_that_fails_while_writing_leaves_nothing(capsys, monkeypatch, out: Path) -> None:
    monkeypatch.setattr(onnx, "save_model", _failing_save)
    argv = ["export", "--arch", "pixart-tiny", "--exporter", "legacy", "--no-verify", "-o", out / "m.onnx"]
    user_error(capsys, argv, "No space left on device")
    assert leftovers(out) == []


# --- optimize -------------------------------------------------------------------------------


def test_optimize_refuses_to_overwrite_its_input(capsys, monkeypatch, plain: Path) -> None:
    before = plain.read_bytes()
    user_error(capsys, ["optimize", plain, "-o", plain], "is the input model")
    monkeypatch.chdir(plain.parent)  # the same file spelled differently
    user_error(capsys, ["optimize", plain, "-o", plain.name], "is the input model")
    assert plain.read_bytes() == before
    assert leftovers(plain.parent) == [plain.name]


def test_optimize_that_fails_while_writing_leaves_nothing(capsys, monkeypatch, plain: Path, out: Path) -> None:
    monkeypatch.setattr(onnx, "save_model", _failing_save)
    user_error(capsys, ["optimize", plain, "-o", out / "m.fc.onnx"], "No space left on device")
    assert leftovers(out) == []


def test_output_path_that_is_a_directory(capsys, plain: Path, out: Path) -> None:
    user_error(capsys, ["optimize", plain, "-o", out], "is a directory")
    assert leftovers(out) == []


def test_output_path_under_a_file(capsys, plain: Path, out: Path) -> None:
    blocker = out / "file"
    blocker.write_text("x")
    user_error(capsys, ["optimize", plain, "-o", blocker / "m.fc.onnx"], "cannot write")
    assert leftovers(out) == ["file"]


# --- sample / compare -----------------------------------------------------------------------


def test_cache_policy_on_a_plain_graph(capsys, plain: Path) -> None:
    user_error(
        capsys, ["sample", plain, "--policy", "fastcache", "--steps", "2"], "cache-aware graph", "fcpass optimize"
    )


@pytest.mark.parametrize(("command", "flag"), [("sample", "--report"), ("sample", "--out"), ("sample", "--out-npy"),
                                             ("tune", "--plot"), ("tune", "--json"), ("optimize", "-o")])
@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_an_unwritable_output_is_refused_before_the_work(capsys, monkeypatch, cached: Path, plain: Path, out: Path,
                                                          command: str, flag: str, where: str) -> None:
    """Not after sampling, tuning or calibrating, when the work would be lost."""
    import fcpass.optimize
    import fcpass.sampling

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started before the output was checked")
    monkeypatch.setattr(fcpass.sampling, "load_denoiser", no_work)
    monkeypatch.setattr(fcpass.optimize, "calibrate", no_work)
    (out / "file").write_text("x")
    target = out if where == "a folder" else out / "file" / "x.out"
    argv = [command, plain if command == "optimize" else cached, flag, target]
    if command == "optimize":
        argv += ["--calibrate", "1", "--scheduler-config", SCHEDULER_CONFIG]
    user_error(capsys, argv, "is a directory" if where == "a folder" else "part of the path is a file")
    assert leftovers(out) == ["file"]


def test_tune_repeats_below_one(capsys, cached: Path) -> None:
    user_error(capsys, ["tune", cached, "--repeats", "0", "--samples", "1"], "--repeats 0 must be at least 1")


@pytest.mark.parametrize("command", ["sample", "tune"])
def test_threads_below_one(capsys, cached: Path, command: str) -> None:
    user_error(capsys, [command, cached, "--threads", "0", "--steps", "2"], "--threads 0 must be at least 1")


@pytest.mark.parametrize("graph", ["plain", "cached"])
def test_unknown_policy(capsys, request: pytest.FixtureRequest, graph: str) -> None:
    path = request.getfixturevalue(graph)
    msg = user_error(capsys, ["sample", path, "--policy", "bogus", "--steps", "2"], "bogus")
    if graph == "cached":
        assert "unknown policy" in msg and "fastcache" in msg


@pytest.mark.parametrize(("flag", "value"), [("--class", "12"), ("--uncond-class", "11")])
def test_label_out_of_range(capsys, plain: Path, flag: str, value: str) -> None:
    # Reached ONNX Runtime before and died there with an INVALID_ARGUMENT traceback.
    user_error(capsys, ["sample", plain, "--steps", "2", flag, value], f"{flag} {value} is out of range")


@pytest.mark.parametrize(("flag", "value"), [("--class", "12"), ("--uncond-class", "11")])
def test_label_out_of_range_of_a_graph_without_export_metadata(capsys, tiny_dit: Path, flag: str, value: str) -> None:
    """An export fcpass did not write says nothing of its classes: its label table does (11 rows)."""
    argv = ["sample", tiny_dit, "--steps", "2", "--scheduler-config", SCHEDULER_CONFIG, "--class", "3", "--uncond-class",
            "10", flag, value]
    user_error(capsys, argv, f"{flag} {value} is out of range", "label table has 11 rows; use 0..10")


def test_compare_shapes_that_differ(capsys, tmp_path: Path) -> None:
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros((2, 1, 16, 16), np.float32))
    np.save(b, np.zeros((2, 1, 8, 8), np.float32))
    user_error(capsys, ["compare", a, b], "(2, 1, 16, 16)", "(2, 1, 8, 8)")


def test_inputs_that_contradict_a_compiled_graphs_roles(capsys, cached: Path) -> None:
    """The roles were fixed when the graph was optimized; --inputs naming the same ones is fine."""
    user_error(capsys, ["sample", cached, "--inputs", "latent=x", "--steps", "2"],
               "--inputs latent=x:", "was optimized with latent=", "optimize the original export again")
    assert main(["sample", str(cached), "--inputs", "latent=latent", "--steps", "1", "--class", "1"]) == 0


def test_negative_seed(capsys, cached: Path) -> None:
    user_error(capsys, ["sample", cached, "--seed", "-1", "--steps", "2"], "--seed -1 must be 0 or more")


def test_prompt_embeddings_file_missing(capsys, plain: Path, tmp_path: Path) -> None:
    user_error(capsys, ["sample", plain, "--prompt-embeds", tmp_path / "none.npy"],
               "prompt embeddings file not found", "none.npy", "numpy.save")


def test_compare_missing_file(capsys, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 1, 8, 8), np.float32))
    user_error(capsys, ["compare", tmp_path / "a.npy", tmp_path / "b.npy"], "not found")


def test_motion_token_flags(capsys: pytest.CaptureFixture[str], plain: Path, cached: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.fc.onnx"
    user_error(capsys, ["optimize", plain, "-o", out, "--token-merge"], "token merging needs --motion-ratio")
    user_error(capsys, ["optimize", plain, "-o", out, "--motion-ratio", "1.5"], "--motion-ratio 1.5 must be in (0, 1]")
    user_error(capsys, ["optimize", plain, "-o", out, "--motion-ratio", "0.5", "--regions", "blocks"], "--regions including stack")
    user_error(capsys, ["optimize", plain, "-o", out, "--motion-ratio", "0.5", "--token-merge", "--regions", "stack"],
               "--no-probes")
    assert leftovers(tmp_path) == []
    assert main(["optimize", str(plain), "-o", str(out), "--motion-ratio", "0.5", "--token-merge", "--merge-neighbours", "3",
                 "--no-probes", "--regions", "stack"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "motion tokens in stack: k = 32 of 64 (ratio 0.5), merged by k-NN (K = 3, lambda = 1.0)" in capsys.readouterr().out
    user_error(capsys, ["sample", cached, "--policy", "fastcache:motion=1,regions=stack", "--steps", "2"], "--motion-ratio")
