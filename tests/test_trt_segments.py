"""TensorRT on a segments folder, without a GPU.

`fcpass build` of a segments folder runs against the fake builder of tests.helpers.fake_trt_build (its engine bytes name
the segment they were built from); the engines then run on the fake runtime of tests/helpers/fake_trt.py, whose
`execute_async_v3` runs that segment on ONNX Runtime CPU through a numpy "device", and whose CUDA
graphs replay the launches they recorded with the addresses of their capture. Sampling through them
must give exactly what the ONNX Runtime segments backend gives: that checks the program, every value's
buffer, the per-state double buffering, the forced branches and the keys of the captured graphs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from fcpass.cli import main
from fcpass.contract.engines import ENGINES_INDEX, engine_file
from fcpass.contract.errors import FcpassError
from fcpass.contract.manifest import read_manifest, segment_files
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import load_denoiser
from runtimes import trt_backend
from runtimes.trt_segments import TrtSegmentsBackend, TrtSegmentsState
from tests.conftest import calibration_setup
from tests.helpers import fake_trt as runtime_fake
from tests.helpers import fake_trt_build as build_fake

POLICIES = {
    "fora": {"interval": 2},  # every region forced: no condition is read back
    "fastcache": {"regions": "stack,blocks", "approx": "residual", "sigma_scale": 30.0},  # the graph decides
}


class SegmentEngine(build_fake.FakeState):
    """The fake builder's engine names the segment it parsed, which the fake runtime then runs."""

    @property
    def engine(self) -> bytes:
        return runtime_fake.MAGIC + str(self.parsed).encode()

    @engine.setter
    def engine(self, value: bytes) -> None:
        pass


@pytest.fixture(scope="module")
def folders(calibrated: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated graph with every region set (and --taylor) lowered to segments, and a stack-only one."""
    src, _ = calibrated
    d = tmp_path_factory.mktemp("trt-segments")
    out = {}
    for name, regions in (("all", ("blocks", "tail", "stack")), ("stack", ("stack",))):
        fc = d / f"{name}.fc.onnx"
        optimize(src, fc, OptimizeOptions(regions=regions, calibrate=2, calib_steps=6, calib_eps=0.5), calibration_setup([1, 2]))
        optimize(fc, d / f"{name}.fc", OptimizeOptions(lowering="segments"), None)
        out[name] = d / f"{name}.fc"
    return out


def build(monkeypatch: pytest.MonkeyPatch, segments: Path, engines: Path, state: build_fake.FakeState | None = None) -> int:
    monkeypatch.setitem(sys.modules, "tensorrt", build_fake.make_fake_trt(state or SegmentEngine()))
    return main(["build", str(segments), "-o", str(engines)])


@pytest.fixture()
def device(monkeypatch: pytest.MonkeyPatch) -> runtime_fake.Fake:
    """The fake runtime in sys.modules; TensorRT backends get its numpy device."""
    fake = runtime_fake.Fake()
    monkeypatch.setitem(sys.modules, "tensorrt", runtime_fake.make_fake_trt(fake.device, fake.executed))
    monkeypatch.setattr(trt_backend, "TorchCudaDevice", lambda: fake.device)
    monkeypatch.setattr("runtimes.trt_segments.TorchCudaDevice", lambda: fake.device)
    return fake


@pytest.fixture(scope="module")
def engines(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("engines")
        out = {}
        for name, seg in folders.items():
            assert build(mp, seg, d / f"{name}.engines") == 0
            out[name] = d / f"{name}.engines"
    return out


def _sample(den: Any) -> Any:
    return runtime_fake.sample_fixed(den)


def test_build_writes_one_engine_per_segment(folders: dict[str, Path], engines: dict[str, Path]) -> None:
    seg, eng = folders["all"], engines["all"]
    files = segment_files(read_manifest(seg))
    index = json.loads((eng / ENGINES_INDEX).read_text())
    assert index["engines"] == {f: engine_file(f) for f in files}
    assert sorted(p.name for p in eng.iterdir()) == sorted([ENGINES_INDEX, *map(engine_file, files)])
    for f in files:  # each engine was built from its own segment
        assert (eng / engine_file(f)).read_bytes() == runtime_fake.MAGIC + str(seg / f).encode()
    assert not [p for p in eng.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_sampling_equals_onnx_runtime_segments(folders: dict[str, Path], engines: dict[str, Path],
                                               device: runtime_fake.Fake, policy: str) -> None:
    seg, eng = folders["all"], engines["all"]
    ref_den = load_denoiser(seg, policy, POLICIES[policy])
    den = load_denoiser(seg, policy, POLICIES[policy], engine=eng)
    assert isinstance(den.backend, TrtSegmentsBackend) and isinstance(den.binding, TrtSegmentsState)
    ref, got = _sample(ref_den), _sample(den)

    np.testing.assert_array_equal(got.images, ref.images)
    assert [r["skip"] for r in got.records] == [r["skip"] for r in ref.records]
    assert [r["stat"] for r in got.records] == [r["stat"] for r in ref.records]
    skips = np.array([r["skip"] for r in got.records])
    assert (skips == 1).any() and (skips == 0).any()  # both branches ran
    ref_state, state = ref_den.state, den.state
    assert set(state) == set(ref_state)
    for name in ref_state:
        np.testing.assert_array_equal(state[name], ref_state[name])

    # One synchronisation per step (+ the state() read), and one per region reached that the graph
    # decided: a forced region's branch is known on the host.
    counts, calls = device.device.counts, got.calls
    decided = sum(c >= 2 and k != -1 for r in got.records for c, k in zip(r["ctl"], r["skip"]))
    assert counts["synchronize"] == calls + 1 + decided
    assert (decided == 0) == (policy == "fora")
    # Every launch after the first with a given set of addresses is a replay of its CUDA graph.
    assert counts["capture"] == den.backend.captures and counts.get("replay", 0) > counts["capture"]
    launched = sum(len(s.graphs) for s in den.backend.segments.values())
    assert launched == counts["capture"] <= 8 * len(den.backend.segments)


def test_without_cuda_graphs_every_segment_is_launched(folders: dict[str, Path], engines: dict[str, Path],
                                                       device: runtime_fake.Fake) -> None:
    ref = _sample(load_denoiser(folders["all"], "fora", POLICIES["fora"], engine=engines["all"]))
    replays = device.device.counts["replay"]
    launches = len(device.executed)
    got = _sample(load_denoiser(folders["all"], "fora", POLICIES["fora"], engine=engines["all"], cuda_graphs=False))
    np.testing.assert_array_equal(got.images, ref.images)
    assert device.device.counts["replay"] == replays  # no graph replayed the second time
    assert len(device.executed) - launches == launches  # the same launches, each one direct


def test_graphs_keyed_by_segment_alone_would_replay_stale_addresses(folders: dict[str, Path], engines: dict[str, Path],
                                                                    device: runtime_fake.Fake,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The equality above can fail: a graph replayed with the state buffers of its capture reads stale state."""
    seg, eng = folders["all"], engines["all"]
    policy, options = "fastcache", POLICIES["fastcache"]  # residual approximations: stale state shows
    ref = _sample(load_denoiser(seg, policy, options, engine=eng, cuda_graphs=False))

    class OneKey(dict):
        def get(self, key: Any, default: Any = None) -> Any:
            return next(iter(self.values()), default)

    den = load_denoiser(seg, policy, options, engine=eng)
    for s in den.backend.segments.values():
        s.graphs = OneKey()
    got = _sample(den)
    assert np.abs(got.images - ref.images).max() > 1e-3


def test_stack_only_folder_and_plain_run(folders: dict[str, Path], engines: dict[str, Path], device: runtime_fake.Fake) -> None:
    seg, eng = folders["stack"], engines["stack"]
    options = {"regions": "stack", "approx": "residual", "sigma_scale": 30.0}
    ref = _sample(load_denoiser(seg, "fastcache", options))
    den = load_denoiser(seg, "fastcache", options, engine=eng)
    np.testing.assert_array_equal(_sample(den).images, ref.images)
    # `run`: the state as host feeds, every output back, as the ONNX Runtime backend gives them.
    from runtimes.segments_backend import SegmentsBackend

    host = SegmentsBackend(seg)
    rng = np.random.default_rng(3)
    feeds = {s.name: (rng.integers(0, 3, [int(d) for d in s.shape]) if np.issubdtype(s.dtype, np.integer)
                      else rng.standard_normal([int(d) for d in s.shape])).astype(s.dtype) for s in host.inputs}
    feeds["fc_ctl"] = np.full_like(feeds["fc_ctl"], 2)
    want, have = host.run(feeds), den.backend.run(feeds)
    assert set(have) == set(want)
    for name in want:
        np.testing.assert_array_equal(have[name], want[name])


def test_engines_must_come_from_this_folder(folders: dict[str, Path], engines: dict[str, Path], device: runtime_fake.Fake,
                                            tmp_path: Path) -> None:
    with pytest.raises(FcpassError, match="were not built from .*rebuild them with fcpass build"):
        load_denoiser(folders["all"], "fora", {}, engine=engines["stack"])
    with pytest.raises(FcpassError, match="not a folder of engines built from a segments folder"):
        load_denoiser(folders["all"], "fora", {}, engine=tmp_path / "model.engine")
    with pytest.raises(FcpassError, match="holds the engines of a segments folder"):
        load_denoiser(folders["all"].parent / "all.fc.onnx", "fora", {}, engine=engines["all"])
    broken = tmp_path / "broken.engines"
    broken.mkdir()
    for p in engines["all"].iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    victim = sorted(broken.glob("*.engine"))[3]
    victim.unlink()
    with pytest.raises(FcpassError, match=f"has no engine for segment {victim.stem}.onnx"):
        load_denoiser(folders["all"], "fora", {}, engine=broken)


def test_failed_build_leaves_nothing(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = SegmentEngine()
    state.build_fails = True
    out = tmp_path / "m.engines"
    assert build(monkeypatch, folders["stack"], out, state) == 2
    err = capsys.readouterr().err
    assert err.count("fcpass: error:") == 1 and "could not build an engine" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # An existing folder that is not an engines folder is refused before any build.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert build(monkeypatch, folders["stack"], other) == 2
    assert "not a folder of fcpass engines" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_check_and_build_name_the_segment_that_breaks_a_rule(folders: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    seg = tmp_path / "m.fc"
    seg.mkdir()
    for p in folders["stack"].iterdir():
        (seg / p.name).write_bytes(p.read_bytes())
    assert main(["check", str(seg)]) == 0
    assert f"in any of its {len(segment_files(read_manifest(seg)))} segments" in capsys.readouterr().out
    victim = segment_files(read_manifest(seg))[-1]
    model = onnx.load(str(seg / victim))
    out = model.graph.output[0]
    model.graph.node.append(helper.make_node("ScatterND", [out.name, "idx", "upd"], ["never"], name="bad_scatter",
                                             reduction="add"))
    onnx.save(model, str(seg / victim))
    assert main(["check", str(seg)]) == 2
    assert f"{victim} > bad_scatter" in capsys.readouterr().out
    assert build(monkeypatch, seg, tmp_path / "m.engines") == 2
    err = capsys.readouterr().err
    assert err.count("fcpass: error:") == 1 and "Traceback" not in err
    assert victim in err and f"fcpass check {seg}" in err
    assert not (tmp_path / "m.engines").exists()
