"""A segments folder on TensorRT: one engine per segment; the host loop picks each region's branch.

`fcpass build MODEL.fc -o MODEL.engines` (MODEL.fc from `fcpass optimize --lowering segments`) builds
one engine per segment (`fcpass.compiler.trt_build.build_segments`); `fcpass sample MODEL.fc --engine
MODEL.engines` runs them here. The step program is the manifest's, interpreted as in
`runtimes.segments_backend`; what differs is where the values live:

- every value has one device buffer of its own for the whole run (allocated the first time it is
  written, again only if its shape changes): the per-step inputs are copied into theirs, a segment
  writes its outputs into theirs, an alias points a name at another name's buffer (no copy);
- each cache state has two buffers. A step reads the current one, and the value it takes
  (`runtimes.state.Commit`: only where its region computed) lands in the other: a segment that
  outputs it writes it there directly; a value another state's buffer holds (a block's output is the
  next block's input; the previous output is the output state's old value) is copied there, device
  to device, at the end of the step. A state that keeps its value (its region skipped, or passed it
  through) stays where it is: which buffer is current is kept per state;
- a branch reads its condition back (one small device-to-host copy and a stream synchronisation, what
  TensorRT pays for an If) unless the host knows it: a region the policy forced, or a token If
  (`runtimes.segments_backend.forced_branch`);
- with `cuda_graphs` (the default), each segment's `execute_async_v3` is captured into a CUDA graph
  the first time it runs with a given set of buffer addresses and replayed after that. Fixed buffers
  keep the number of address sets small: one per combination of current buffers of the states the
  segment reads or writes. The launch before a capture (which TensorRT asks for) is that step's run.
  A buffer reallocated for a new shape drops every graph.

Only the values the caller fetches (the model output, fc_stat, fc_skip) come back to the host, after
one stream synchronisation at the end of the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.contract.engines import IOTensor, import_tensorrt, read_engines_index
from fcpass.contract.errors import FcpassError
from fcpass.contract.manifest import interface_model, read_manifest
from fcpass.contract.onnx_io import load_model
from fcpass.contract.plan import CTL_INPUT, SKIP_OUTPUT, TOK_INPUT, CachePlan
from fcpass.contract.roles import graph_inputs, graph_outputs
from runtimes.segments_backend import compile_program, host_conditions, interpret, region_indices
from runtimes.state import Commit, with_decisions
from runtimes.trt_backend import Device, TorchCudaDevice, load_engine, numpy_dtype

log = logging.getLogger(__name__)

Place = Callable[[str, tuple[int, ...], np.dtype], Any]


@dataclass
class TrtSegment:
    """One segment's engine and execution context, and what was last set on the context."""

    file: str
    engine: Any
    context: Any
    io: dict[str, IOTensor]
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)
    graphs: dict[tuple[int, ...], Any] = field(default_factory=dict)  # CUDA graphs by their buffer addresses


class TrtSegmentsBackend:
    """The engines of a segments folder, run by its step program on one stream."""

    name = "tensorrt-segments"

    def __init__(self, engines: str | Path, segments: str | Path, device: Device | None = None,
                 cuda_graphs: bool = True) -> None:
        self.engines_path, self.path = Path(engines), Path(segments)
        self.manifest = read_manifest(self.path)
        self._index = read_engines_index(self.engines_path, self.path)
        self.model = interface_model(self.manifest)
        self.inputs = graph_inputs(self.model)
        self.outputs = graph_outputs(self.model)
        self._feed_dtypes = {s.name: np.dtype(s.dtype) for s in self.inputs}
        trt = import_tensorrt()
        self.device: Device = device if device is not None else TorchCudaDevice()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.cuda_graphs = cuda_graphs
        self.segments: dict[str, TrtSegment] = {}
        self.program = compile_program(self.manifest["steps"], self._segment, region_indices(self.model), self.path,
                                       host_conditions(self.model))
        self.buffers: dict[str, Any] = {}  # every value's own buffer
        self._dtypes: dict[str, np.dtype] = {}
        self.captures = 0
        log.info("TensorRT segments %s: %d engines%s", self.engines_path, len(self.segments),
                 ", CUDA graphs" if cuda_graphs else "")

    def _segment(self, file: str) -> TrtSegment:
        if file not in self.segments:
            rebuild = f"fcpass build {self.path} -o {self.engines_path}"
            plan = self._index.get(file)
            if plan is None or not (self.engines_path / plan).is_file():
                raise FcpassError(f"{self.engines_path} has no engine for segment {file}; rebuild them with {rebuild}")
            source = self.path / file
            model = load_model(source, load_weights=False)
            engine, context, io = load_engine(self.runtime, self.engines_path / plan, source,
                                              graph_inputs(model), graph_outputs(model), rebuild)
            self.segments[file] = TrtSegment(
                file, engine, context, {t.name: t for t in io},
                [t.name for t in io if t.mode == "INPUT"], [t.name for t in io if t.mode == "OUTPUT"],
                {t.name: numpy_dtype(t.dtype) for t in io})
        return self.segments[file]

    @property
    def provider(self) -> str:
        return "TensorRT"

    # values and their buffers

    def own(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """`name`'s own buffer, (re)allocated when it is new or its shape or type changed."""
        buf = self.buffers.get(name)
        if buf is None or tuple(buf.shape) != shape or self._dtypes[name] != dtype:
            if buf is not None:
                for seg in self.segments.values():  # a freed address may come back for another buffer
                    seg.graphs.clear()
            buf = self.buffers[name] = self.device.empty(shape, dtype)
            self._dtypes[name] = dtype
        return buf

    def upload(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        env: dict[str, Any] = {}
        for name, value in feeds.items():
            value = np.ascontiguousarray(value, dtype=self._feed_dtypes.get(name))
            env[name] = self.own(name, tuple(value.shape), value.dtype)
            self.device.copy_in(env[name], value)
        return env

    # one step

    def execute(self, env: dict[str, Any], place: Place, ctl: np.ndarray | None, tok: np.ndarray | None) -> None:
        """One step of the program over `env`; `place` gives each segment output its buffer."""
        interpret(self.program, env, ctl, tok, lambda op, e: self._launch(op.runner, e, place), self._read)

    def _read(self, cond: Any) -> bool:
        host = self.device.copy_out(cond)
        self.device.synchronize()
        return bool(np.asarray(host))

    def _launch(self, seg: TrtSegment, env: dict[str, Any], place: Place) -> None:
        ctx = seg.context
        addresses: list[int] = []
        for name in seg.inputs:
            buf = env[name]
            shape = tuple(buf.shape)
            if any(d < 0 for d in seg.io[name].shape) and seg.shapes.get(name) != shape:
                if not ctx.set_input_shape(name, shape):
                    raise FcpassError(f"the engine of {seg.file} rejects shape {list(shape)} for {name}: outside its "
                                      f"optimization profile; rebuild the engines with a larger --batch")
                seg.shapes[name] = shape
            addresses.append(self.device.address(buf))
        for name in seg.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            env[name] = place(name, shape, seg.dtypes[name])
            addresses.append(self.device.address(env[name]))
        key = tuple(addresses)
        graph = seg.graphs.get(key)
        if graph is not None:
            self.device.replay(graph)
            return
        for name, address in zip(seg.inputs + seg.outputs, key):
            if seg.addresses.get(name) != address:
                if not ctx.set_tensor_address(name, address):
                    raise FcpassError(f"TensorRT refused the device address of {name} in {seg.file}")
                seg.addresses[name] = address
        stream = self.device.stream_handle
        if not ctx.execute_async_v3(stream):
            raise FcpassError(f"TensorRT failed to run the engine of {seg.file} (see its log above)")
        if self.cuda_graphs:
            seg.graphs[key] = self.device.capture(lambda: ctx.execute_async_v3(stream))
            self.captures += 1

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Host feeds in (the state too), `outputs` (default all) back (plain use, and `HostState`)."""
        env = self.upload(feeds)
        self.execute(env, self.own, feeds.get(CTL_INPUT), feeds.get(TOK_INPUT))
        pending = {name: self.device.copy_out(env[name]) for name in outputs or [o.name for o in self.outputs]}
        self.device.synchronize()
        return {name: np.array(value) for name, value in pending.items()}

    def state_binding(self, plan: CachePlan) -> TrtSegmentsState:
        return TrtSegmentsState(self, plan)


class TrtSegmentsState:
    """The cache state in two device buffers per state, the current one chosen per state (see the module)."""

    def __init__(self, backend: TrtSegmentsBackend, plan: CachePlan) -> None:
        self.backend = backend
        self.plan = plan
        self.device = backend.device
        self.shapes = {s.name: tuple(int(d) for d in s.shape) for s in plan.states}
        self.slots = {s.name: (self.device.empty(self.shapes[s.name], np.dtype(s.dtype)),
                               self.device.empty(self.shapes[s.name], np.dtype(s.dtype))) for s in plan.states}
        self.of_next = {s.next: s.name for s in plan.states}
        self.current = {s.name: 0 for s in plan.states}
        self.commit = Commit(plan)

    def reset(self, live: Collection[int] | None = None) -> None:
        self.commit = Commit(self.plan, live)
        for name, (first, _) in self.slots.items():
            self.device.zero(first)
            self.current[name] = 0

    def _place(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        state = self.of_next.get(name)
        if state is None:
            return self.backend.own(name, shape, dtype)
        if shape != self.shapes[state]:
            raise FcpassError(f"the engines write {name} with shape {list(shape)}, but the cache plan holds "
                              f"{list(self.shapes[state])}; rebuild the engines from this segments folder")
        return self.slots[state][1 - self.current[state]]

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        env = self.backend.upload(feeds)
        env.update({name: pair[self.current[name]] for name, pair in self.slots.items()})
        self.backend.execute(env, self._place, feeds.get(CTL_INPUT), feeds.get(TOK_INPUT))
        wanted = with_decisions(fetch)
        pending = {name: self.device.copy_out(env[name]) for name in wanted}
        self.device.synchronize()
        got = {name: np.array(value) for name, value in pending.items()}
        held = {name: pair[self.current[name]] for name, pair in self.slots.items()}
        for name, value in self.commit(held, env, got[SKIP_OUTPUT], feeds.get(TOK_INPUT)).items():
            cur, pair = self.current[name], self.slots[name]
            if value is pair[cur]:
                continue  # kept (its region did not compute), or passed through
            if value is not pair[1 - cur]:
                self.device.copy(pair[1 - cur], value)  # ordered on the stream before the next step's writes
            self.current[name] = 1 - cur
        return {name: got[name] for name in fetch}

    def state(self) -> dict[str, np.ndarray]:
        pending = {name: self.device.copy_out(pair[self.current[name]]) for name, pair in self.slots.items()}
        self.device.synchronize()
        return {name: np.array(value) for name, value in pending.items()}
