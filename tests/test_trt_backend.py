"""`runtimes.trt_backend` without a GPU: what can be checked honestly here is the host-side logic.

(a) an engine without the cache plan's tensors is refused; (b) the whole TensorRT path through
    `CachedDenoiser` against a fake `tensorrt` module (only the documented TensorRT 10.x names
    `runtimes.trt_backend` calls) whose `execute_async_v3` runs the real compiled graph on ONNX Runtime CPU, reading its inputs from and
    writing its outputs to a numpy "device" by the addresses the backend set: sampling gives exactly
    the ONNX Runtime path's samples and decisions, which proves the state's buffer moves and the
    binding order;
    (c) a missing tensorrt, PyTorch or CUDA is one FcpassError line. What runs only on a GPU (real
    engines, torch CUDA buffers, the stream) is `tools/gpu_smoke.sh`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fcpass.cli import main
from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import load_model
from fcpass.contract.plan import read_plan
from fcpass.contract.roles import graph_inputs, graph_outputs
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import load_denoiser
from runtimes.state import Commit
from runtimes.trt_backend import TrtBackend, TrtBoundState, check_state_io, engine_mismatch, numpy_dtype
from tests.conftest import SCHEDULER_CONFIG, export_tiny_dit
from tests.helpers.fake_trt import (
    REQUEST,
    Fake,
    NumpyDevice,
    fake_engine_file,
    install_fake_trt,
    make_fake_trt,
    sample_fixed,
)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny DiT and its compiled graph (uncalibrated: FORA needs no calibration)."""
    d = tmp_path_factory.mktemp("trt")
    src = export_tiny_dit(d / "tiny.onnx", "legacy", seed=5)
    fc = d / "tiny.fc.onnx"
    optimize(src, fc, OptimizeOptions(), None)
    return src, fc


# --- (a) the state's buffers ---------------------------------------------------------------

def test_engine_without_the_state_is_refused(graphs: tuple[Path, Path]) -> None:
    _, fc = graphs
    model = load_model(fc, load_weights=False)
    plan = read_plan(model)
    inputs = [s.name for s in graph_inputs(model)]
    outputs = [s.name for s in graph_outputs(model)]
    check_state_io(inputs, outputs, plan)
    taken = next(s.next for s in plan.states if s.next in outputs)
    with pytest.raises(FcpassError, match=f"no I/O tensor {re.escape(taken)} of the cache plan.*rebuild"):
        check_state_io(inputs, [o for o in outputs if o != taken], plan)
    with pytest.raises(FcpassError, match=f"no I/O tensor {plan.states[0].name} "):
        check_state_io(inputs[:0], outputs, plan)


def test_dtype_mapping_and_engine_mismatch(graphs: tuple[Path, Path]) -> None:
    from fcpass.contract.engines import IOTensor

    assert numpy_dtype("FLOAT") == np.float32 and numpy_dtype("HALF") == np.float16
    assert numpy_dtype("INT64") == np.int64 and numpy_dtype("INT32") == np.int32 and numpy_dtype("BOOL") == np.bool_
    with pytest.raises(FcpassError, match="BF16 has no numpy equivalent"):
        numpy_dtype("BF16")
    src, fc = graphs
    ins, outs = graph_inputs(load_model(fc, load_weights=False)), graph_outputs(load_model(fc, load_weights=False))
    io = [IOTensor(s.name, "INPUT", "FLOAT", tuple(s.shape)) for s in ins]
    io += [IOTensor(s.name, "OUTPUT", "FLOAT", tuple(s.shape)) for s in outs]
    assert engine_mismatch(io, ins, outs) is None
    dyn = [IOTensor(t.name, t.mode, t.dtype, (-1, *t.shape[1:]) if t.shape else ()) for t in io]
    assert engine_mismatch(dyn, ins, outs) is None  # a dynamic batch fits a static graph
    bad = [IOTensor(t.name, t.mode, t.dtype, (3, *t.shape[1:])) if t.name == "latent" else t for t in io]
    assert "latent has shape [3, 4, 8, 8]" in (engine_mismatch(bad, ins, outs) or "")
    assert "not an engine output" in (engine_mismatch(io[:-1], ins, outs) or "")
    plain = graph_inputs(load_model(src, load_weights=False)), graph_outputs(load_model(src, load_weights=False))
    assert "fc_ctl" in (engine_mismatch(io, *plain) or "")  # the compiled graph's engine is not the original's


# --- (b) a fake tensorrt and a numpy "device" ------------------------------------------------

@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Fake:
    return install_fake_trt(monkeypatch)


def test_tensorrt_path_samples_exactly_like_onnx_runtime(graphs: tuple[Path, Path], fake: Fake,
                                                        tmp_path: Path) -> None:
    _, fc = graphs
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.engine")
    ref_den = load_denoiser(fc, "fora", {"interval": 2})
    trt_den = load_denoiser(fc, "fora", {"interval": 2}, engine=engine)
    assert isinstance(trt_den.backend, TrtBackend) and isinstance(trt_den.binding, TrtBoundState)
    assert trt_den.backend.provider == "TensorRT"
    ref, got = sample_fixed(ref_den), sample_fixed(trt_den)

    np.testing.assert_array_equal(got.images, ref.images)
    assert [r["skip"] for r in got.records] == [r["skip"] for r in ref.records]
    assert [r["stat"] for r in got.records] == [r["stat"] for r in ref.records]
    assert got.macs_executed == ref.macs_executed < got.macs_uncached  # FORA really skipped
    assert any(1 in r["skip"] for r in got.records)
    ref_state, got_state = ref_den.state, trt_den.state
    assert set(got_state) == set(ref_state)
    for name in ref_state:
        np.testing.assert_array_equal(got_state[name], ref_state[name])

    # The binding: each step reads the buffers the states took after the last one (a written output,
    # or the output state's old buffer for the previous output) and writes into buffers no state
    # holds; everything else stays put, the state of the regions FORA never skips (tail, stack) too.
    plan = trt_den.plan
    steps = fake.executed
    n, chunks = got.calls, got.calls // REQUEST["steps"]  # guidance: one sample per call, so two trajectories
    assert len(steps) == n and chunks == 2 and plan.states
    live = trt_den.policy.live
    assert live == {r.index for r in plan.block_regions()} and len(plan.regions) > len(live)
    commit = Commit(plan, live)
    states = [s.name for s in plan.states]
    moving = set(states) | {s.next for s in plan.states}
    for i, addr in enumerate(steps):
        assert not {addr[s] for s in states} & {addr[s.next] for s in plan.states if s.next not in states}
        if i % REQUEST["steps"]:
            prev = steps[i - 1]
            expected = commit({s: prev[s] for s in states}, prev, np.array(got.records[i - 1]["skip"]))
            assert {s: addr[s] for s in states} == expected
            assert {k: v for k, v in addr.items() if k not in moving} == {k: v for k, v in prev.items() if k not in moving}
    # Per step: the six small inputs in, three outputs back, one synchronisation; nothing else crosses.
    counts = fake.device.counts
    assert counts["copy_in"] == 6 * n
    assert counts["copy_out"] == 3 * n + len(plan.states)  # + the one state() read above
    assert counts["synchronize"] == n + 1
    assert counts["zero"] == chunks * len(plan.states) and "copy" not in counts  # the state is never copied
    pools = trt_den.binding.pools.pools
    assert counts["empty"] == sum(map(len, pools.values())) + 6 + 3  # the state's pools, inputs, fetched outputs
    assert sum(map(len, pools.values())) < 2 * len(plan.states)  # fewer than two buffers per state
    # reset: every state on a zeroed buffer of its own (fresh device buffers hold garbage, NaN in NumpyDevice).
    trt_den.binding.reset()
    held = trt_den.binding.pools.current
    assert len({id(b) for b in held.values()}) == len(held)
    assert all(not v.any() for v in trt_den.state.values())


def test_a_binding_that_never_advances_is_caught(graphs: tuple[Path, Path], fake: Fake, tmp_path: Path) -> None:
    """The comparison above can fail: with the state never taking its new buffers, FORA reuses a stale (zero) state."""
    _, fc = graphs
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.engine")
    ref = sample_fixed(load_denoiser(fc, "fora", {"interval": 2}))
    den = load_denoiser(fc, "fora", {"interval": 2}, engine=engine)

    class Stuck(TrtBoundState):
        def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
            held = dict(self.pools.current)
            out = super().step(feeds, fetch)
            self.pools.current = held
            return out

    den.binding = Stuck(den.backend, den.plan)
    got = sample_fixed(den)
    assert np.abs(got.images - ref.images).max() > 1e-3


def test_plain_engine_runs_like_onnx_runtime(graphs: tuple[Path, Path], fake: Fake, tmp_path: Path) -> None:
    src, _ = graphs
    engine = fake_engine_file(src, tmp_path / "tiny.engine")
    ref = sample_fixed(load_denoiser(src, None, {}))
    got = sample_fixed(load_denoiser(src, None, {}, engine=engine))
    np.testing.assert_array_equal(got.images, ref.images)
    assert fake.device.counts["synchronize"] == got.calls == 2 * REQUEST["steps"]


def test_engine_from_another_graph_is_refused(graphs: tuple[Path, Path], fake: Fake, tmp_path: Path) -> None:
    src, fc = graphs
    engine = fake_engine_file(src, tmp_path / "tiny.engine")  # the original's engine with the compiled graph
    with pytest.raises(FcpassError, match=r"was not built from .*tiny\.fc\.onnx: the graph.s output fc\..*\.next "
                                          r"is not an engine output; rebuild it"):
        TrtBackend(engine, fc)
    garbage = tmp_path / "garbage.plan"
    garbage.write_bytes(b"not an engine")
    with pytest.raises(FcpassError, match="cannot load engine .*rebuild it here"):
        TrtBackend(garbage, fc)
    with pytest.raises(FcpassError, match="does not exist; build it with: fcpass build"):
        TrtBackend(tmp_path / "missing.plan", fc)


# --- (c) what is missing, in one line --------------------------------------------------------

def _one_line(exc: pytest.ExceptionInfo[FcpassError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_without_tensorrt_is_one_line(graphs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, fc = graphs
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.engine")
    with pytest.raises(FcpassError) as exc:
        TrtBackend(engine, fc)
    assert "TensorRT is not installed" in _one_line(exc) and "fcpass[trt]" in str(exc.value)
    argv = ["sample", str(fc), "--engine", str(engine), "--policy", "fora", "--steps", "2", "--class", "1",
            "--uncond-class", "10", "--scheduler-config", str(SCHEDULER_CONFIG)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not installed" in err[0]


def test_without_cuda_or_torch_is_one_line(graphs: tuple[Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    _, fc = graphs
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(NumpyDevice(), []))
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.engine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FcpassError) as exc:
        TrtBackend(engine, fc)
    assert "torch.cuda.is_available() is False" in _one_line(exc) and "pip install torch" in str(exc.value)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(FcpassError) as exc:
        TrtBackend(engine, fc)
    assert "PyTorch is not installed" in _one_line(exc) and "NVIDIA GPU" in str(exc.value)
