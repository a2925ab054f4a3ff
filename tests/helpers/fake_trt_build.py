"""A minimal fake `tensorrt` for `fcpass build`: only the documented names `fcpass.compiler.trt_build` calls
(TensorRT 10.x Python API), so a misspelt call fails; `FakeState` records what a build asked of it."""

from __future__ import annotations

import enum
import types
from typing import Any

import onnx


class FakeState:
    """What the fake records, and how it should misbehave."""

    def __init__(self) -> None:
        self.parse_errors: list[tuple[str, int, str]] = []
        self.builder_fails = False
        self.build_fails = False
        self.flags: list[Any] = []
        self.pool_limits: list[tuple[Any, int]] = []
        self.profiles: list[dict[str, tuple]] = []
        self.timing_cache_in: bytes | None = None
        self.parsed: str | None = None
        self.parsed_model: onnx.ModelProto | None = None
        self.engine = b"PLAN\x00engine-bytes"


def make_fake_trt(state: FakeState, trt11: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.0.0" if trt11 else "10.15.1"

    class Logger:
        VERBOSE, INFO, WARNING, ERROR = "VERBOSE", "INFO", "WARNING", "ERROR"

        def __init__(self, severity: str) -> None:
            self.severity = severity

    MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    BuilderFlag = enum.Enum("BuilderFlag", ["TF32"] if trt11 else ["FP16", "BF16", "TF32"])
    TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BOOL", "INT64"])

    class Tensor:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name, self.shape = name, shape

    class Network:
        def __init__(self) -> None:
            self.inputs: list[Tensor] = []
            self.outputs: list[Tensor] = []
            self.num_layers = 0

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> Tensor:
            return self.inputs[index]

    class ParserError:
        def __init__(self, desc: str, node: int, node_name: str) -> None:
            self._desc, self._node, self._name = desc, node, node_name

        def desc(self) -> str:
            return self._desc

        def node(self) -> int:
            return self._node

        def node_name(self) -> str:
            return self._name

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors = [ParserError(*e) for e in state.parse_errors]

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

        def parse(self, model: bytes, path: str | None = None) -> bool:
            state.parsed = path
            m = onnx.load_from_string(model)
            state.parsed_model = m

            def tensor(v: onnx.ValueInfoProto) -> Tensor:
                dims = v.type.tensor_type.shape.dim
                return Tensor(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims))

            self.network.inputs = [tensor(v) for v in m.graph.input]
            self.network.outputs = [tensor(v) for v in m.graph.output]
            self.network.num_layers = len(m.graph.node)
            return not self.errors

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"+tuned"

    class BuilderConfig:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            state.pool_limits.append((pool, size))

        def set_flag(self, flag: Any) -> None:
            state.flags.append(flag)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            state.timing_cache_in = bytes(data)
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            assert self.cache is not None
            return self.cache

        def add_optimization_profile(self, profile: Profile) -> int:
            state.profiles.append(profile.shapes)
            return 0

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class Builder:
        def __init__(self, logger: Logger) -> None:
            if state.builder_fails:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            self.network: Network | None = None

        def create_network(self, flags: int = 0) -> Network:
            self.network = Network()
            return self.network

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
            return None if state.build_fails else state.engine

    class Engine:
        def __init__(self, network: Network) -> None:
            self.tensors = [(t, TensorIOMode.INPUT) for t in network.inputs]
            self.tensors += [(t, TensorIOMode.OUTPUT) for t in network.outputs]
            self.num_layers = network.num_layers

        @property
        def num_io_tensors(self) -> int:
            return len(self.tensors)

        def _find(self, name: str) -> tuple[Tensor, Any]:
            return next(x for x in self.tensors if x[0].name == name)

        def get_tensor_name(self, index: int) -> str:
            return self.tensors[index][0].name

        def get_tensor_mode(self, name: str) -> Any:
            return self._find(name)[1]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._find(name)[0].shape

        def get_tensor_dtype(self, name: str) -> Any:
            return DataType.FLOAT

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine:
            assert bytes(serialized_engine) == state.engine
            assert builders[-1].network is not None
            return Engine(builders[-1].network)

    builders: list[Builder] = []

    def make_builder(logger: Logger) -> Builder:
        b = Builder(logger)
        builders.append(b)
        return b

    names = {"Logger": Logger, "MemoryPoolType": MemoryPoolType, "BuilderFlag": BuilderFlag,
             "TensorIOMode": TensorIOMode, "DataType": DataType, "OnnxParser": OnnxParser,
             "Builder": make_builder, "Runtime": Runtime}
    for name, value in names.items():
        setattr(trt, name, value)
    return trt
