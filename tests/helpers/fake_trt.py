"""A fake `tensorrt` and a numpy "device": TensorRT's host path (engines, contexts, bindings) run on ONNX
Runtime, so the TensorRT backends are tested on machines without a GPU."""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from runtimes import trt_backend
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import SCHEDULER_CONFIG

MAGIC = b"FAKE-TRT-PLAN\n"


def fake_engine_file(onnx_path: Path, where: Path) -> Path:
    """What the fake `deserialize_cuda_engine` accepts: a marker and the graph it "was built from"."""
    where.write_bytes(MAGIC + str(onnx_path).encode())
    return where


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


def install_fake_trt(monkeypatch: pytest.MonkeyPatch) -> Fake:
    """Fake tensorrt in sys.modules; TrtBackend's default device is the numpy one."""
    f = Fake()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(f.device, f.executed))
    monkeypatch.setattr(trt_backend, "TorchCudaDevice", lambda: f.device)
    return f


REQUEST = {"classes": [1, 2], "steps": 8, "guidance_scale": 1.5, "uncond_class": 10}


def sample_fixed(den: Any) -> Any:
    """Two samples of the bundled model's scheduler at a fixed request, for comparing backends."""
    return sample(den, scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(**REQUEST), progress=False)
