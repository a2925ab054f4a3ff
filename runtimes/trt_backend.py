"""A TensorRT engine as a `Backend`, with the cache state double-buffered on the device.

`TrtBackend(engine_path, onnx_path)` deserializes an engine built by `fcpass build` once
(`trt.Runtime(logger).deserialize_cuda_engine`), makes one execution context and runs it on one CUDA
stream. The ONNX graph the engine was built from supplies what the engine file does not: the cache
plan (in the graph's metadata) and the input roles. Written against TensorRT's documented Python API
(TensorRT 10.x; the names used here are unchanged in 11.x, which removed the weak-typing builder
flags and `ICudaEngine.device_memory_size`, neither used here):

- `engine.num_io_tensors`, `engine.get_tensor_name(i)`, `get_tensor_mode`, `get_tensor_shape`,
  `get_tensor_dtype` describe the I/O tensors (through `fcpass.compiler.trt_build.io_tensor`);
- `context.set_input_shape(name, shape)` only for axes the engine left dynamic (-1), then
  `context.get_tensor_shape(name)` for the output shapes;
- `context.set_tensor_address(name, ptr)` binds each I/O tensor to device memory;
- `context.execute_async_v3(stream_handle)` enqueues one step on the stream.

Device memory, copies and the stream come from PyTorch (`torch.empty(..., device="cuda")`, whose
`data_ptr()` is the address TensorRT gets); the `Device` object is injectable, so the host-side logic
runs in the tests against a numpy fake. Data types map by `DataType` name (what `trt.nptype` does,
with a clear error for types numpy has no equivalent for, such as BF16).

`TrtBoundState` is `runtimes.state.BoundState` for TensorRT: the cache state lives in pools of
device buffers (`runtimes.state.StatePools`); each step the state inputs point at the buffers the
states hold and the outputs they take at free ones (only addresses change from step to step, and
only those that did), so the state never crosses the bus and is never copied. The small
per-step inputs (latent, timestep, labels or caption embeddings, fc_ctl, fc_thr, fc_mix) are copied
into persistent device buffers; after `execute_async_v3` only the fetched outputs (the model output,
fc_stat, fc_skip: a few floats for the statistics) are copied back, and the stream is synchronised
once per step.

TensorRT reads an `If` layer's condition on the host: the engine synchronises with the device once
per conditional it reaches to learn which branch to run, so a compiled graph pays one host round trip
per region it evaluates in a step, on top of the one synchronisation per step above. That is why the
segments lowering exists: it takes those decisions out of the engine instead of stalling the stream
at every If.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fcpass.contract.engines import IOTensor, import_tensorrt, io_tensor
from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import load_model
from fcpass.contract.plan import SKIP_OUTPUT, TOK_INPUT, CachePlan
from fcpass.contract.roles import TensorSpec, graph_inputs, graph_outputs
from runtimes.state import StatePools, with_decisions, written_outputs

log = logging.getLogger(__name__)

NO_CUDA = ("TensorRT engines need PyTorch with CUDA for device memory: {why}; install a CUDA build of torch "
           "(pip install torch --index-url https://download.pytorch.org/whl/cu128) on a machine with an NVIDIA GPU")

# TensorRT DataType name -> numpy dtype (trt.nptype's table, by name so it needs no tensorrt import).
_NUMPY_DTYPES = {
    "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
    "BOOL": np.bool_, "UINT8": np.uint8,
}


# --- host-side logic, pure -----------------------------------------------------------------

def numpy_dtype(trt_dtype: str) -> np.dtype:
    """The numpy dtype of a TensorRT `DataType` name (FLOAT, HALF, INT64, BOOL, ...)."""
    try:
        return np.dtype(_NUMPY_DTYPES[trt_dtype])
    except KeyError:
        raise FcpassError(
            f"engine I/O tensor type {trt_dtype} has no numpy equivalent; build the engine from a graph whose inputs "
            "and outputs are float32/float16/int32/int64/bool (cast inside the graph)"
        ) from None


def check_state_io(inputs: list[str], outputs: list[str], plan: CachePlan) -> None:
    """The engine must take every state as an input and write every value the state takes as an output."""
    missing = [s.name for s in plan.states if s.name not in inputs] + [v for v in written_outputs(plan) if v not in outputs]
    if missing:
        raise FcpassError(
            f"the engine has no I/O tensor {missing[0]} of the cache plan ({len(missing)} missing): it was built from "
            "another graph; rebuild it with fcpass build MODEL.fc.onnx -o MODEL.fc.engine"
        )


def engine_mismatch(io: list[IOTensor], inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
    """Why an engine's I/O tensors cannot be the graph's (name, direction, static dims), or None."""
    graph = {s.name: ("INPUT", s) for s in inputs} | {s.name: ("OUTPUT", s) for s in outputs}
    for t in io:
        if t.name not in graph:
            return f"the engine's {t.mode.lower()} {t.name} is not in the graph"
        mode, spec = graph[t.name]
        if t.mode != mode:
            return f"{t.name} is an engine {t.mode.lower()} but a graph {mode.lower()}"
        if len(t.shape) != spec.rank or any(
            e >= 0 and g is not None and e != g for e, g in zip(t.shape, spec.shape)
        ):
            return f"{t.name} has shape {list(t.shape)} in the engine but {list(spec.shape)} in the graph"
    names = {t.name for t in io}
    lost = [s.name for s in outputs if s.name not in names]
    if lost:
        return f"the graph's output {lost[0]} is not an engine output"
    return None


def load_engine(runtime: Any, engine_path: Path, source: Path, inputs: list[TensorSpec],
                outputs: list[TensorSpec], rebuild: str | None = None) -> tuple[Any, Any, list[IOTensor]]:
    """Deserialize the engine at `engine_path`, built from the graph `source` (whose I/O it must have);
    returns the engine, one execution context and its I/O tensors. `rebuild`: the command that rebuilds it."""
    rebuild = rebuild or f"fcpass build {source} -o {engine_path}"
    try:
        data = engine_path.read_bytes()
    except OSError as exc:
        raise FcpassError(f"cannot read engine {engine_path}: {exc.strerror}; pass a readable file or rebuild it ({rebuild})") from None
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise FcpassError(
            f"TensorRT cannot load engine {engine_path} (see its log above): an engine only loads with the "
            f"TensorRT version and GPU it was built for; rebuild it here with {rebuild}"
        )
    context = engine.create_execution_context()
    if context is None:
        raise FcpassError(f"TensorRT cannot create an execution context for {engine_path} (out of GPU memory?)")
    io = [io_tensor(engine, i) for i in range(engine.num_io_tensors)]
    why = engine_mismatch(io, inputs, outputs)
    if why:
        raise FcpassError(f"engine {engine_path} was not built from {source}: {why}; rebuild it with {rebuild}")
    return engine, context, io


# --- device memory ---------------------------------------------------------------------------

class Device(Protocol):
    """Device buffers and copies, all ordered on one stream."""

    stream_handle: int

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any: ...

    def address(self, buf: Any) -> int: ...

    def copy_in(self, buf: Any, value: np.ndarray) -> None: ...

    def copy_out(self, buf: Any) -> np.ndarray:
        """Start a device -> host copy; the returned array holds the data after `synchronize()`."""
        ...

    def zero(self, buf: Any) -> None: ...

    def copy(self, dst: Any, src: Any) -> None:
        """Device -> device, ordered on the stream."""
        ...

    def capture(self, work: Callable[[], None]) -> Any:
        """Record `work` (kernels it enqueues on the stream) into a CUDA graph without running it."""
        ...

    def replay(self, graph: Any) -> None:
        """Launch a graph from `capture` on the stream."""
        ...

    def synchronize(self) -> None: ...


class TorchCudaDevice:
    """`Device` on PyTorch's CUDA allocator and one `torch.cuda.Stream`; host copies land in pinned memory."""

    def __init__(self, device_id: int = 0) -> None:
        try:
            import torch
        except ImportError:
            raise FcpassError(NO_CUDA.format(why="PyTorch is not installed")) from None
        if not torch.cuda.is_available():
            raise FcpassError(NO_CUDA.format(why="no CUDA GPU is visible (torch.cuda.is_available() is False)"))
        self.torch = torch
        self.device = torch.device("cuda", device_id)
        self.stream = torch.cuda.Stream(self.device)
        self.stream_handle = int(self.stream.cuda_stream)
        self._pinned: dict[tuple[int, tuple[int, ...]], Any] = {}

    def _dtype(self, dtype: np.dtype) -> Any:
        return self.torch.from_numpy(np.empty(0, dtype)).dtype

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        with self.torch.cuda.stream(self.stream):  # the buffer belongs to this stream in the caching allocator
            return self.torch.empty(tuple(shape), dtype=self._dtype(dtype), device=self.device)

    def address(self, buf: Any) -> int:
        return int(buf.data_ptr())

    def copy_in(self, buf: Any, value: np.ndarray) -> None:
        # From pageable memory the copy is staged before this returns, so `value` may change afterwards.
        with self.torch.cuda.stream(self.stream):
            buf.copy_(self.torch.from_numpy(np.ascontiguousarray(value)), non_blocking=True)

    def copy_out(self, buf: Any) -> np.ndarray:
        key = (self.address(buf), tuple(buf.shape))
        host = self._pinned.get(key)
        if host is None:
            host = self._pinned[key] = self.torch.empty(tuple(buf.shape), dtype=buf.dtype, pin_memory=True)
        with self.torch.cuda.stream(self.stream):
            host.copy_(buf, non_blocking=True)
        return host.numpy()

    def zero(self, buf: Any) -> None:
        with self.torch.cuda.stream(self.stream):
            buf.zero_()

    def copy(self, dst: Any, src: Any) -> None:
        with self.torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def capture(self, work: Callable[[], None]) -> Any:
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream):
            work()
        return graph

    def replay(self, graph: Any) -> None:
        with self.torch.cuda.stream(self.stream):
            graph.replay()

    def synchronize(self) -> None:
        self.stream.synchronize()


# --- the backend ---------------------------------------------------------------------------

class TrtBackend:
    """A deserialized TensorRT engine, one execution context and one stream; the ONNX graph for roles and plan."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, onnx_path: str | Path, device: Device | None = None) -> None:
        self.engine_path, self.path = Path(engine_path), Path(onnx_path)
        if not self.engine_path.is_file():
            raise FcpassError(
                f"engine {self.engine_path} does not exist; build it with: fcpass build {self.path} -o {self.engine_path}"
            )
        self.model = load_model(self.path, load_weights=False)
        self.inputs = graph_inputs(self.model)
        self.outputs = graph_outputs(self.model)
        trt = import_tensorrt()
        self.device: Device = device if device is not None else TorchCudaDevice()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine, self.context, self.io = load_engine(self.runtime, self.engine_path, self.path, self.inputs, self.outputs)
        self.tensors = {t.name: t for t in self.io}
        self.dtypes = {t.name: numpy_dtype(t.dtype) for t in self.io}
        self.input_names = [t.name for t in self.io if t.mode == "INPUT"]
        self.output_names = [t.name for t in self.io if t.mode == "OUTPUT"]
        self._io: dict[str, Any] = {}  # persistent buffers of the tensors not in a state set
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bound_by: object = None  # who set the addresses last: run() or a TrtBoundState
        unused = [s.name for s in self.inputs if s.name not in self.tensors]
        if unused:
            log.debug("inputs the engine does not take (unused, ignored): %s", ", ".join(unused))
        log.info("TensorRT engine %s: %d I/O tensors", self.engine_path, len(self.io))

    @property
    def provider(self) -> str:
        return "TensorRT"

    # one step: buffers, addresses, execution

    def _ensure(self, name: str, shape: tuple[int, ...]) -> bool:
        """Give `name` a buffer of `shape` (new only when the shape changes); True when its address changed."""
        if self._shapes.get(name) == shape:
            return False
        t = self.tensors[name]
        if t.mode == "INPUT":
            if len(shape) != len(t.shape) or any(e >= 0 and e != d for e, d in zip(t.shape, shape)):
                raise FcpassError(f"input {name} has shape {list(shape)} but the engine takes {list(t.shape)}; "
                                  f"rebuild the engine for this shape (fcpass build)")
            if any(e < 0 for e in t.shape) and not self.context.set_input_shape(name, shape):
                raise FcpassError(f"the engine rejects shape {list(shape)} for {name}: outside its optimization profile; "
                                  "rebuild it with a larger --batch")
        self._io[name] = self.device.empty(shape, self.dtypes[name])
        self._shapes[name] = shape
        return True

    def _prepare(self, feeds: dict[str, np.ndarray], owner: object, exclude: frozenset[str] = frozenset()) -> None:
        """Copy the feeds into their input buffers; every tensor outside `exclude` gets a buffer and its address."""
        changed = False
        for name in self.input_names:
            if name in exclude:
                continue
            if name not in feeds:
                raise FcpassError(f"the engine needs input {name}, which was not fed; name it with --inputs")
            value = np.asarray(feeds[name], dtype=self.dtypes[name])
            changed |= self._ensure(name, tuple(value.shape))
            self.device.copy_in(self._io[name], value)
        for name in self.output_names:
            if name in exclude:
                continue
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise FcpassError(f"TensorRT cannot infer the shape of output {name} from the inputs' shapes; "
                                  "rebuild the engine with static shapes")
            changed |= self._ensure(name, shape)
        if changed or self._bound_by is not owner:
            for name, buf in self._io.items():
                if name not in exclude:
                    self._set_address(name, buf)
            self._bound_by = owner

    def _set_address(self, name: str, buf: Any) -> None:
        if not self.context.set_tensor_address(name, self.device.address(buf)):
            raise FcpassError(f"TensorRT refused the device address of {name} (misaligned or wrong device?)")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.device.stream_handle):
            raise FcpassError(f"TensorRT failed to run {self.engine_path} (see its log above); rerun with -v")

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Host feeds in, `outputs` (default all) back (plain engines, and `HostState`)."""
        self._prepare(feeds, owner=self)
        self._execute()
        pending = {name: self.device.copy_out(self._io[name]) for name in outputs or self.output_names}
        self.device.synchronize()
        return {name: np.array(value) for name, value in pending.items()}

    def state_binding(self, plan: CachePlan) -> TrtBoundState:
        return TrtBoundState(self, plan)


class TrtBoundState:
    """`BoundState` on TensorRT: the state in `StatePools` of device buffers; each step points the state
    inputs at the buffers the states hold and the outputs they take at free ones (addresses only)."""

    def __init__(self, backend: TrtBackend, plan: CachePlan) -> None:
        self.backend = backend
        self.plan = plan
        self.device = backend.device
        check_state_io(backend.input_names, backend.output_names, plan)
        for s in plan.states:
            shape = tuple(int(d) for d in s.shape)
            t = backend.tensors[s.name]
            if len(shape) != len(t.shape) or any(e >= 0 and e != d for e, d in zip(t.shape, shape)):
                raise FcpassError(f"state {s.name} has shape {list(shape)} in the plan but {list(t.shape)} in the "
                                  f"engine; rebuild the engine from this graph (fcpass build)")
            if any(e < 0 for e in t.shape) and not backend.context.set_input_shape(s.name, shape):
                raise FcpassError(f"the engine rejects shape {list(shape)} for state {s.name}; rebuild it (fcpass build)")
        self.pools = StatePools(plan, lambda s: self.device.empty(tuple(int(d) for d in s.shape), np.dtype(s.dtype)))
        self.exclude = frozenset(s.name for s in plan.states) | frozenset(self.pools.pools)
        self._addresses: dict[str, int] = {}

    def reset(self, live: Collection[int] | None = None) -> None:
        self.pools.reset(lambda buf, _: self.device.zero(buf), live)

    def _point(self, name: str, buf: Any) -> None:
        address = self.device.address(buf)
        if self._addresses.get(name) != address:
            if not self.backend.context.set_tensor_address(name, address):
                raise FcpassError(f"TensorRT refused the device address of state tensor {name}")
            self._addresses[name] = address

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        backend = self.backend
        if backend._bound_by is not self:
            self._addresses.clear()  # run() or another binding pointed the context elsewhere
        backend._prepare(feeds, owner=self, exclude=self.exclude)
        targets = self.pools.targets()
        for name, buf in (*self.pools.current.items(), *targets.items(), *self.pools.fixed.items()):
            self._point(name, buf)
        backend._execute()
        wanted = with_decisions(fetch)
        written = {**self.pools.fixed, **targets}
        pending = {name: self.device.copy_out(written.get(name, backend._io.get(name))) for name in wanted}
        self.device.synchronize()
        got = {name: np.array(value) for name, value in pending.items()}
        self.pools.advance(targets, got[SKIP_OUTPUT], feeds.get(TOK_INPUT))
        return {name: got[name] for name in fetch}

    def state(self) -> dict[str, np.ndarray]:
        pending = {name: self.device.copy_out(buf) for name, buf in self.pools.current.items()}
        self.device.synchronize()
        return {name: np.array(value) for name, value in pending.items()}
