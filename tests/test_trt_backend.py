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

import enum
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from fcpass.cli import main
from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import load_model
from fcpass.contract.plan import read_plan
from fcpass.contract.roles import graph_inputs, graph_outputs
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import load_denoiser
from models.digits import SCHEDULER_CONFIG
from runtimes import trt_backend
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from runtimes.state import Commit
from runtimes.trt_backend import TrtBackend, TrtBoundState, check_state_io, engine_mismatch, numpy_dtype
from tests.conftest import export_tiny_dit

MAGIC = b"FAKE-TRT-PLAN\n"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny DiT and its compiled graph (uncalibrated: FORA needs no calibration)."""
    d = tmp_path_factory.mktemp("trt")
    src = export_tiny_dit(d / "tiny.onnx", "legacy", seed=5)
    fc = d / "tiny.fc.onnx"
    optimize(src, fc, OptimizeOptions(), None)
    return src, fc


def fake_engine_file(onnx_path: Path, where: Path) -> Path:
    """What the fake `deserialize_cuda_engine` accepts: a marker and the graph it "was built from"."""
    where.write_bytes(MAGIC + str(onnx_path).encode())
    return where


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

class NumpyDevice:
    """`runtimes.trt_backend.Device` on host memory; addresses are handles only this device resolves."""

    stream_handle = 0x5EED

    def __init__(self) -> None:
        self.by_address: dict[int, np.ndarray] = {}
        self.counts = {"empty": 0, "copy_in": 0, "copy_out": 0, "zero": 0, "synchronize": 0}

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self.counts["empty"] += 1
        buf = np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.full(shape, 7, dtype)
        self.by_address[0x1000 + 0x100 * len(self.by_address)] = buf  # garbage until written, like cudaMalloc
        return buf

    def address(self, buf: np.ndarray) -> int:
        return next(a for a, b in self.by_address.items() if b is buf)

    def copy_in(self, buf: np.ndarray, value: np.ndarray) -> None:
        self.counts["copy_in"] += 1
        assert buf.shape == value.shape and buf.dtype == value.dtype
        np.copyto(buf, value)

    def copy_out(self, buf: np.ndarray) -> np.ndarray:
        self.counts["copy_out"] += 1
        return buf.copy()

    def zero(self, buf: np.ndarray) -> None:
        self.counts["zero"] += 1
        buf[...] = 0

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        self.counts["copy"] = self.counts.get("copy", 0) + 1
        assert dst is not src and dst.shape == src.shape and dst.dtype == src.dtype
        np.copyto(dst, src)

    def capture(self, work: Any) -> list[Any]:
        """A CUDA graph: the launches `work` makes, each with the addresses it was captured with, not run."""
        self.counts["capture"] = self.counts.get("capture", 0) + 1
        self.recording: list[Any] | None = []
        try:
            work()
            return self.recording
        finally:
            self.recording = None

    def replay(self, graph: list[Any]) -> None:
        self.counts["replay"] = self.counts.get("replay", 0) + 1
        for launch in graph:
            launch()

    def synchronize(self) -> None:
        self.counts["synchronize"] += 1


def make_fake_trt(device: NumpyDevice, executed: list[dict[str, int]]) -> types.ModuleType:
    """The runtime half of TensorRT's Python API; `execute_async_v3` runs the graph on ONNX Runtime CPU."""
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1"
    TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    DataType = enum.Enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "INT64", "BF16"])
    onnx_to_trt = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.INT64: DataType.INT64,
                   onnx.TensorProto.BOOL: DataType.BOOL, onnx.TensorProto.FLOAT16: DataType.HALF}

    class Logger:
        VERBOSE, INFO, WARNING, ERROR = "VERBOSE", "INFO", "WARNING", "ERROR"

        def __init__(self, severity: str) -> None:
            self.severity = severity

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            raise AssertionError("static engine: set_input_shape must not be called")

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.engine.get_tensor_shape(name)

        def set_tensor_address(self, name: str, memory: int) -> bool:
            assert name in self.engine.modes, name
            self.addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            assert stream_handle == device.stream_handle
            if getattr(device, "recording", None) is not None:  # inside capture: record, with today's addresses
                device.recording.append(lambda addresses=dict(self.addresses): self._run(addresses))
                return True
            return self._run(self.addresses)

        def _run(self, addresses: dict[str, int]) -> bool:
            modes = self.engine.modes
            assert set(addresses) == set(modes), "every I/O tensor needs an address"
            ins = {n: a for n, a in addresses.items() if modes[n] == TensorIOMode.INPUT}
            outs = {n: a for n, a in addresses.items() if modes[n] == TensorIOMode.OUTPUT}
            assert not set(ins.values()) & set(outs.values()), "a buffer is read and written in one step"
            assert len(set(outs.values())) == len(outs), "two outputs share a buffer"
            feeds = {n: device.by_address[a] for n, a in ins.items()}
            for name, value in zip(self.engine.output_names, self.engine.session.run(self.engine.output_names, feeds)):
                buf = device.by_address[outs[name]]
                assert buf.shape == value.shape and buf.dtype == value.dtype
                np.copyto(buf, value)
            executed.append(dict(addresses))
            return True

    class Engine:
        def __init__(self, onnx_path: str) -> None:
            model = onnx.load(onnx_path)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # as OrtBackend: same session options, bit-identical results
            self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            inits = {t.name for t in model.graph.initializer}
            values = [(v, TensorIOMode.INPUT) for v in model.graph.input if v.name not in inits]
            values += [(v, TensorIOMode.OUTPUT) for v in model.graph.output]
            self.names = [v.name for v, _ in values]
            self.modes = {v.name: m for v, m in values}
            self.shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v, _ in values}
            self.dtypes = {v.name: onnx_to_trt[v.type.tensor_type.elem_type] for v, _ in values}
            self.output_names = [v.name for v, m in values if m == TensorIOMode.OUTPUT]

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        def get_tensor_name(self, index: int) -> str:
            return self.names[index]

        def get_tensor_mode(self, name: str) -> Any:
            return self.modes[name]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shapes[name]

        def get_tensor_dtype(self, name: str) -> Any:
            return self.dtypes[name]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine | None:
            data = bytes(serialized_engine)
            return Engine(data[len(MAGIC):].decode()) if data.startswith(MAGIC) else None

    for name, value in {"Logger": Logger, "Runtime": Runtime, "TensorIOMode": TensorIOMode,
                        "DataType": DataType}.items():
        setattr(trt, name, value)
    return trt


class Fake:
    def __init__(self) -> None:
        self.device = NumpyDevice()
        self.executed: list[dict[str, int]] = []


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Fake:
    """Fake tensorrt in sys.modules; TrtBackend's default device is the numpy one."""
    f = Fake()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(f.device, f.executed))
    monkeypatch.setattr(trt_backend, "TorchCudaDevice", lambda: f.device)
    return f


REQUEST = {"classes": [1, 2], "steps": 8, "guidance_scale": 1.5, "uncond_class": 10}


def _sample(den: Any) -> Any:
    return sample(den, scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(**REQUEST), progress=False)


def test_tensorrt_path_samples_exactly_like_onnx_runtime(graphs: tuple[Path, Path], fake: Fake,
                                                        tmp_path: Path) -> None:
    _, fc = graphs
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.plan")
    ref_den = load_denoiser(fc, "fora", {"interval": 2})
    trt_den = load_denoiser(fc, "fora", {"interval": 2}, engine=engine)
    assert isinstance(trt_den.backend, TrtBackend) and isinstance(trt_den.binding, TrtBoundState)
    assert trt_den.backend.provider == "TensorRT"
    ref, got = _sample(ref_den), _sample(trt_den)

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
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.plan")
    ref = _sample(load_denoiser(fc, "fora", {"interval": 2}))
    den = load_denoiser(fc, "fora", {"interval": 2}, engine=engine)

    class Stuck(TrtBoundState):
        def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
            held = dict(self.pools.current)
            out = super().step(feeds, fetch)
            self.pools.current = held
            return out

    den.binding = Stuck(den.backend, den.plan)
    got = _sample(den)
    assert np.abs(got.images - ref.images).max() > 1e-3


def test_plain_engine_runs_like_onnx_runtime(graphs: tuple[Path, Path], fake: Fake, tmp_path: Path) -> None:
    src, _ = graphs
    engine = fake_engine_file(src, tmp_path / "tiny.plan")
    ref = _sample(load_denoiser(src, None, {}))
    got = _sample(load_denoiser(src, None, {}, engine=engine))
    np.testing.assert_array_equal(got.images, ref.images)
    assert fake.device.counts["synchronize"] == got.calls == 2 * REQUEST["steps"]


def test_engine_from_another_graph_is_refused(graphs: tuple[Path, Path], fake: Fake, tmp_path: Path) -> None:
    src, fc = graphs
    engine = fake_engine_file(src, tmp_path / "tiny.plan")  # the original's engine with the compiled graph
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
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.plan")
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
    engine = fake_engine_file(fc, tmp_path / "tiny.fc.plan")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FcpassError) as exc:
        TrtBackend(engine, fc)
    assert "torch.cuda.is_available() is False" in _one_line(exc) and "pip install torch" in str(exc.value)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(FcpassError) as exc:
        TrtBackend(engine, fc)
    assert "PyTorch is not installed" in _one_line(exc) and "NVIDIA GPU" in str(exc.value)
