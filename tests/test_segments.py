"""`--lowering segments`: no If anywhere, and the same outputs as the If lowering for every policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fcpass.cli import main
from fcpass.compiler.passes.inline_gates import inline_gates
from fcpass.contract.manifest import MANIFEST, is_segments_artefact, read_manifest, segment_files
from fcpass.contract.plan import MIX_WIDTH, STAT_OUTPUT, read_plan
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import load_denoiser
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from runtimes.segments_backend import SegmentsBackend, SegmentsBoundState
from runtimes.state import Commit
from tests.conftest import SCHEDULER_CONFIG, calibration_setup, tiny_feeds

ALL = ("blocks", "tail", "stack")


def _lower(src: Path, out: Path, **options: Any) -> tuple[Path, Path]:
    """The If graph of `src` and its segments folder, both from one optimize run each."""
    fc = out / "m.fc.onnx"
    optimize(src, fc, OptimizeOptions(**options), None)
    seg = out / "m.fc"
    optimize(fc, seg, OptimizeOptions(lowering="segments"), None)
    return fc, seg


def _all_ops(graph: onnx.GraphProto) -> list[str]:
    ops = []
    for n in graph.node:
        ops.append(n.op_type)
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                ops += _all_ops(g)
    return ops


def _regions_in(steps: list[dict[str, Any]]) -> list[str]:
    out = []
    for s in steps:
        if s["kind"] == "branch":
            out += [s["region"], *_regions_in(s["then"]["steps"]), *_regions_in(s["else"]["steps"])]
    return out


@pytest.mark.parametrize("regions", [ALL, ("stack",), ("blocks",)], ids=lambda r: ",".join(r))
def test_no_if_in_any_segment_and_every_segment_checks(tiny_dit: Path, tmp_path: Path, regions: tuple[str, ...]) -> None:
    fc, seg = _lower(tiny_dit, tmp_path, regions=regions, taylor=True)
    assert is_segments_artefact(seg)
    manifest = read_manifest(seg)
    files = sorted(p.name for p in seg.iterdir())
    assert files == sorted([MANIFEST, *segment_files(manifest)])
    for name in files:
        if name.endswith(".onnx"):
            model = onnx.load(str(seg / name))
            onnx.checker.check_model(model, full_check=True)
            assert "If" not in _all_ops(model.graph), name
    plan = read_plan(onnx.load(str(fc)))
    assert sorted(_regions_in(manifest["steps"])) == sorted(r.name for r in plan.regions)  # a branch per region
    assert manifest["plan"] == json.loads(plan.to_json())
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def _assert_same(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], names: list[str] | None = None) -> None:
    for k in names or list(ref):
        a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
        if k == STAT_OUTPUT:  # the If graph's gates leave forced regions unmeasured (NaN); the segments measure them
            b = np.where(np.isnan(a).all(axis=1, keepdims=True), np.nan, b)
        assert a.shape == b.shape, k
        assert (np.isnan(a) == np.isnan(b)).all(), f"{k}: NaN positions differ"
        assert (np.isinf(a) == np.isinf(b)).all() and (a[np.isinf(a)] == b[np.isinf(b)]).all(), f"{k}: Inf differs"
        finite = np.isfinite(a)
        assert np.abs(a[finite] - b[finite]).max(initial=0.0) <= 1e-5, k


@pytest.mark.parametrize("regions", [ALL, ("stack",)], ids=lambda r: ",".join(r))
@pytest.mark.parametrize("ctl", [0, 1, 2, 3])
def test_every_branch_forced_gives_the_if_graphs_outputs(tiny_dit: Path, tmp_path: Path, regions: tuple[str, ...], ctl: int) -> None:
    """All compute (0), all skip (1), and the graph deciding on the statistic (2) or the probes (3)
    with some regions passing, some not."""
    fc, seg = _lower(tiny_dit, tmp_path, regions=regions, taylor=True)
    model = onnx.load(str(fc))
    plan = read_plan(model)
    # The lowering measures every region (its gates are inlined), so it equals the inlined If graph.
    sess = ort.InferenceSession(inline_gates(model).model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(7)
    r = len(plan.regions)
    state = {s.name: rng.standard_normal([int(d) for d in s.shape]).astype(np.float32) for s in plan.states}
    thr = np.where(np.arange(r) % 2 == 1, np.inf, 0.0).astype(np.float32)  # odd regions pass the test, even fail
    feeds = {**tiny_feeds(1), **state, "fc_ctl": np.full(r, ctl, np.int64), "fc_thr": thr,
             "fc_mix": rng.uniform(0, 1, (r, MIX_WIDTH)).astype(np.float32)}
    ref = dict(zip(names, sess.run(None, feeds)))
    skip = ref["fc_skip"].tolist()
    # Region 0 is the outermost: skipped, it leaves every other region unreached (-1).
    assert skip == {0: [0.0] * r, 1: [1.0] + [-1.0] * (r - 1)}.get(ctl, [float(k % 2) for k in range(r)])
    host = SegmentsBackend(seg)
    _assert_same(ref, host.run(feeds))
    # The I/O-binding runtime (the CUDA path) on the CPU: the same values through OrtValues.
    bound = SegmentsBoundState(SegmentsBackend(seg, iobinding=True), plan, device="cpu")
    bound.values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in state.items()}
    control = {k: v for k, v in feeds.items() if not k.startswith("fc.")}
    _assert_same(ref, bound.step(control, names))
    _assert_same(Commit(plan)(state, ref, ref["fc_skip"]), bound.state())


def _trajectory(path: Path, policy: str, options: dict[str, Any], iobinding: bool = False) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    denoiser = load_denoiser(path, policy, options)
    if iobinding:
        assert isinstance(denoiser.backend, SegmentsBackend)
        denoiser.binding = SegmentsBoundState(denoiser.backend, denoiser.plan, device="cpu")
    steps: list[dict[str, np.ndarray]] = []
    inner = denoiser.binding.step

    def recording(feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        out = inner(feeds, fetch)
        steps.append({k: np.array(v) for k, v in out.items()})
        return out

    denoiser.binding.step = recording
    request = SampleRequest(classes=[1, 2], steps=10, guidance_scale=1.5, uncond_class=10)
    result = sample(denoiser, scheduler_from_config(SCHEDULER_CONFIG), request, progress=False)
    return result.images, steps


@pytest.fixture(scope="module")
def graphs(calibrated: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Calibrated If graphs and their lowerings: all region sets, the stack alone, all with --taylor."""
    src, fc_all = calibrated
    d = tmp_path_factory.mktemp("segments")
    out = {}
    for name, options in (("all", None), ("stack", OptimizeOptions(regions=("stack",), calibrate=2, calib_steps=6, calib_eps=0.5)),
                          ("taylor", OptimizeOptions(calibrate=2, calib_steps=6, calib_eps=0.5, taylor=True))):
        fc = fc_all if options is None else d / f"{name}.fc.onnx"
        if options is not None:
            optimize(src, fc, options, calibration_setup([1, 2]))
        seg = d / f"{name}.fc"
        optimize(fc, seg, OptimizeOptions(lowering="segments"), None)
        out[name] = (fc, seg)
    return out


CASES = [
    ("all", "none", {}),
    ("all", "fora", {}),
    ("all", "fora", {"regions": "stack"}),
    ("all", "fastcache", {"sigma_scale": 30.0}),
    ("all", "fastcache", {"regions": "stack,blocks", "approx": "residual", "sigma_scale": 30.0}),
    ("stack", "none", {}),
    ("stack", "fora", {"regions": "stack"}),
    ("stack", "fastcache", {"regions": "stack", "approx": "residual", "sigma_scale": 30.0}),
    ("taylor", "taylorseer", {"interval": 3, "warmup": 2}),
    ("taylor", "taylorseer", {"interval": 3, "warmup": 2, "regions": "stack"}),
]


@pytest.mark.parametrize(("graph", "policy", "options"), CASES, ids=[f"{g}-{p}-{','.join(o)}" for g, p, o in CASES])
def test_trajectories_equal_the_if_lowering(graphs: dict[str, tuple[Path, Path]], graph: str, policy: str, options: dict[str, Any]) -> None:
    fc, seg = graphs[graph]
    ref_images, ref_steps = _trajectory(fc, policy, options)
    images, steps = _trajectory(seg, policy, options)
    assert np.abs(images - ref_images).max() <= 1e-5
    assert len(steps) == len(ref_steps)
    for ref, got in zip(ref_steps, steps):
        _assert_same(ref, got, ["fc_skip", STAT_OUTPUT])
    skips = np.array([s["fc_skip"] for s in ref_steps])
    assert (skips == 1).any() == (policy != "none")  # the comparison covers skipped branches
    if "stack" in options.get("regions", ""):
        assert graph == "stack" or (skips == -1).any()  # and regions nested in a skipped one


def test_trajectory_with_io_binding_equals_the_if_lowering(graphs: dict[str, tuple[Path, Path]]) -> None:
    fc, seg = graphs["all"]
    options = {"regions": "stack,blocks", "approx": "residual", "sigma_scale": 30.0}
    ref_images, ref_steps = _trajectory(fc, "fastcache", options)
    images, steps = _trajectory(seg, "fastcache", options, iobinding=True)
    assert np.abs(images - ref_images).max() <= 1e-5
    for ref, got in zip(ref_steps, steps):
        _assert_same(ref, got, ["fc_skip", STAT_OUTPUT])


# --- the command line -----------------------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[Any], *fragments: str) -> None:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcpass: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_optimize_lower_sample_inspect(calibrated: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, fc = calibrated
    out = tmp_path / "tiny.fc"
    common = ["--scheduler-config", SCHEDULER_CONFIG]
    assert main([str(a) for a in ["optimize", src, "-o", out, "--lowering", "segments", "--regions", "stack", *common]]) == 0
    assert is_segments_artefact(out)
    sample_args = ["sample", out, "--policy", "fora", "--regions", "stack", "--interval", "2", "--steps", "4",
                   "--class", "1", "2", "--uncond-class", "10", "--out-npy", tmp_path / "x.npy", *common]
    assert main([str(a) for a in sample_args]) == 0
    assert np.isfinite(np.load(tmp_path / "x.npy")).all()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "stack.compute" in capsys.readouterr().out
    # A previous artefact is replaced: lower the calibrated If graph (all regions) over it.
    assert main([str(a) for a in ["optimize", fc, "-o", out, "--lowering", "segments", *common]]) == 0
    assert len(read_manifest(out)["plan"]["regions"]) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.fc", "x.npy"]


def test_cli_bad_lowering_and_existing_file_output(calibrated: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src, fc = calibrated
    out = tmp_path / "out"
    out.mkdir()
    common = ["--scheduler-config", SCHEDULER_CONFIG]
    _one_line_error(capsys, ["optimize", src, "-o", out / "m.fc", "--lowering", "cuda", *common],
                    "--lowering 'cuda' is unknown", "if, segments")
    assert sorted(out.iterdir()) == []
    existing = out / "m.fc"
    existing.write_text("keep me")
    _one_line_error(capsys, ["optimize", src, "-o", existing, "--lowering", "segments", *common],
                    "is an existing file", "choose a new -o path")
    assert existing.read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["m.fc"]
    # A folder that holds something else is not overwritten either.
    other = out / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    _one_line_error(capsys, ["optimize", src, "-o", other, "--lowering", "segments", *common], "not an fcpass segments")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # Lowering an already compiled graph cannot recalibrate it.
    _one_line_error(capsys, ["optimize", fc, "-o", out / "new.fc", "--lowering", "segments", "--calibrate", "2", *common],
                    "already cache-aware", "--calibrate")
    assert sorted(p.name for p in out.iterdir()) == ["m.fc", "other"]
