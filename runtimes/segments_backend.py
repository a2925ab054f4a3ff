"""Run a segments artefact (`fcpass optimize --lowering segments`): the host picks each region's branch.

The artefact (see `fcpass.compiler.passes.lower_segments`) is a folder of If-free ONNX models and a manifest whose
step program says in which order to run them. `SegmentsBackend` loads every segment once (one ONNX
Runtime session each) and interprets the program over an environment of named values:

- a segment step feeds the values it reads and stores the values it exports;
- an alias step binds a name to an existing value (an Identity the If graph would run: a state
  passed through a skipped region, a branch output);
- a branch step reads its condition (the 0-d bool the segment before it computed: forced, or every
  sample's statistic <= threshold) on the host and runs the approximation's steps if it is true,
  the compute branch's steps if not. A region the policy forced (fc_ctl 0 or 1) needs no read: its
  condition is known from fc_ctl (`forced_branch`), which saves a device-to-host sync per region;
  nor does a token If, whose condition is a function of fc_tok (`fcpass.contract.plan.token_conditions`).

Outputs, including `fc_stat`, `fc_skip` and the values the state takes, are therefore the If graph's
(NaN statistic and -1 decision inside a skipped region). The backend offers
the same interface as `runtimes.backend.OrtBackend` (`model`, `inputs`, `outputs`, `provider`, `run`,
`state_binding`), so `runtimes.cache.CachedDenoiser` and every policy run on it unchanged.

State binding, as for the If graph: `HostState` (numpy arrays, the default on the CPU, where numpy
feeds are already zero-copy) or `SegmentsBoundState` (I/O binding; the default with the CUDA provider).
With I/O binding every value stays an `OrtValue` on the session's device: feeds are uploaded once per
step and bound to every segment that reads them, each segment's outputs are allocated on the device,
and only the conditions (one small device-to-host copy per branch step, the same sync TensorRT pays
for an If) and the values the caller fetches are bound to host memory. Outputs are rebound before
every run so that ONNX Runtime allocates fresh buffers: a value kept from an earlier step (the cache
state) is never overwritten in place.

CUDA graphs: ONNX Runtime can capture a session's run in a CUDA graph (CUDA provider option
`enable_cuda_graph`), but only when every input and output is bound to the same device address on every
run. Here outputs get fresh buffers every run, so `enable_cuda_graph` is not set. The TensorRT runtime
of the same folders (`runtimes.trt_segments`) gives every value a fixed buffer and captures each
segment's launch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.contract.errors import FcpassError, first_clause
from fcpass.contract.manifest import interface_model, read_manifest
from fcpass.contract.plan import CTL_INPUT, SKIP_OUTPUT, TOK_INPUT, CachePlan, has_plan, read_plan, token_conditions
from fcpass.contract.roles import graph_inputs, graph_outputs
from runtimes.backend import device_of, open_session, ort_errors, session_setup
from runtimes.state import Commit, HostState, with_decisions

log = logging.getLogger(__name__)


@dataclass
class _Run:
    runner: Any  # an ONNX Runtime session, or a TensorRT segment (runtimes.trt_segments)
    inputs: list[str]
    outputs: list[str]
    binding: Any = None  # an ONNX Runtime IOBinding, made on first use by SegmentsBoundState
    file: str = ""  # the segment's file in the folder, for errors


@dataclass
class _Alias:
    pairs: list[tuple[str, str]]


@dataclass
class _Choose:
    cond: str
    then: list[Any]
    orelse: list[Any]
    region: int | None = None  # the cache region's index in fc_ctl, when the branch is a region's If
    modes: Callable[[np.ndarray], bool] | None = None  # a token If's condition, from fc_tok


def compile_program(steps: list[dict[str, Any]], segment: Any, regions: dict[str, int], where: Path,
                    tokens: dict[str, Callable[[np.ndarray], bool]] | None = None) -> list[Any]:
    """The manifest's step program as `_Run` / `_Alias` / `_Choose` ops; `segment(file)` makes a step's runner
    (`_Run(runner, inputs, outputs)`), `regions` maps a region name to its index in fc_ctl, `tokens` a token
    If's condition to its function of fc_tok."""
    tokens = tokens or {}
    program: list[Any] = []
    for s in steps:
        kind = s["kind"]
        if kind == "segment":
            program.append(_Run(segment(s["file"]), list(s["inputs"]), list(s["outputs"]), file=s["file"]))
        elif kind == "alias":
            program.append(_Alias([(d, src) for d, src in s["pairs"]]))
        elif kind == "branch":
            region = s.get("region")
            index = regions.get(region) if region and s["cond"] == f"fc.{region}.cond" else None
            program.append(_Choose(s["cond"], compile_program(s["then"]["steps"], segment, regions, where, tokens),
                                   compile_program(s["else"]["steps"], segment, regions, where, tokens), index,
                                   tokens.get(s["cond"])))
        else:
            raise FcpassError(f"{where}: unknown step kind {kind!r}; re-run fcpass optimize --lowering segments")
    return program


def forced_branch(op: _Choose, ctl: np.ndarray | None, tok: np.ndarray | None = None) -> bool | None:
    """The condition of a region the policy forced (fc_ctl 1: skip, the approximation; 0: compute), or of a
    token If (from fc_tok), which the host knows without reading it back from the device; None where the
    graph decides (fc_ctl 2, 3).

    The graph computes the same: cond = (ctl == 1) or (ctl >= 2 and every sample passes its threshold).
    """
    if op.modes is not None and tok is not None:
        return op.modes(tok)
    if op.region is None or ctl is None:
        return None
    c = int(ctl[op.region])
    return True if c == 1 else False if c == 0 else None


def region_indices(model: Any) -> dict[str, int]:
    return {r.name: r.index for r in read_plan(model).regions} if has_plan(model) else {}


def host_conditions(model: Any) -> dict[str, Callable[[np.ndarray], bool]]:
    """The token Ifs' conditions of a graph with token caching, as functions of fc_tok."""
    tokens = read_plan(model).tokens if has_plan(model) else None
    return token_conditions(len(tokens["blocks"])) if tokens else {}


class SegmentsBackend:
    """ONNX Runtime sessions for every segment of a segments artefact, run by its step program."""

    name = "onnxruntime-segments"

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        iobinding: bool | None = None,
        device_id: int = 0,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.model = interface_model(self.manifest)
        self.inputs = graph_inputs(self.model)
        self.outputs = graph_outputs(self.model)
        self._output_names = [o.name for o in self.outputs]
        self.threads = threads  # intra-op threads of every segment's session; None: ONNX Runtime's default
        ort, opts, wanted = session_setup(providers, threads)
        opts.log_severity_level = 3
        if threads != 1:
            # Every session has its own intra-op pool; with spinning on, the pool of the segment that
            # just ran keeps spinning while the next segment's pool works, and they fight for the cores.
            # Measured on the bundled model, 2 shared cores, default threads, 10 samples x 50 steps,
            # `none`: 63.7 s with spinning (the If graph in the same run: 7.6 s), 7.5 s without.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._ort, self._opts, self._providers = ort, opts, wanted
        self.sessions: dict[str, Any] = {}
        self.program = compile_program(self.manifest["steps"], self._session, region_indices(self.model), self.path,
                                       host_conditions(self.model))
        if not self.sessions:
            raise FcpassError(f"{self.path} holds no segments; re-run fcpass optimize --lowering segments")
        _check_sessions(self.program, self.path)
        self.device_id = device_id
        # As for OrtBackend: device-resident state pays off on CUDA; on the CPU numpy feeds are zero-copy.
        self.iobinding = self.provider == "CUDAExecutionProvider" if iobinding is None else iobinding
        log.info("%d segment sessions on %s", len(self.sessions), self.provider)

    def _session(self, file: str) -> Any:
        if file not in self.sessions:
            p = self.path / file
            if not p.is_file():
                raise FcpassError(f"segment {p} is missing; re-run fcpass optimize --lowering segments")
            self.sessions[file] = open_session(self._ort, p, self._opts, self._providers, "re-run fcpass optimize")
        return self.sessions[file]

    @property
    def provider(self) -> str:
        return next(iter(self.sessions.values())).get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(feeds)
        interpret(self.program, env, feeds.get(CTL_INPUT), feeds.get(TOK_INPUT), _run_numpy, bool)
        return {name: env[name] for name in outputs or self._output_names}

    def state_binding(self, plan: CachePlan) -> Any:
        """Cache state as host arrays, or as OrtValues on the session's device with I/O binding."""
        if not self.iobinding:
            return HostState(self, plan)
        return SegmentsBoundState(self, plan, device_of(self.provider), self.device_id)


def interpret(program: list[Any], env: dict[str, Any], ctl: np.ndarray | None, tok: np.ndarray | None,
              launch: Callable[[_Run, dict[str, Any]], None], read: Callable[[Any], bool]) -> None:
    """Run the step program over `env`: `launch` runs a segment, an alias binds a name to a value, and a
    branch takes the decision the host knows (`forced_branch`) or else `read`s its condition (a
    device-to-host sync)."""
    for op in program:
        if isinstance(op, _Run):
            launch(op, env)
        elif isinstance(op, _Alias):
            for dst, src in op.pairs:
                env[dst] = env[src]
        else:
            cond = forced_branch(op, ctl, tok)
            if cond is None:
                try:
                    cond = read(env[op.cond])
                except (ValueError, TypeError):  # an array of many values, or of strings
                    raise FcpassError(f"branch condition {op.cond!r} is not one boolean; re-run fcpass optimize "
                                      "--lowering segments") from None
            interpret(op.then if cond else op.orelse, env, ctl, tok, launch, read)


def _runs(program: list[Any]) -> list[_Run]:
    """Every segment step of a compiled step program, those inside branches too."""
    out: list[_Run] = []
    for op in program:
        if isinstance(op, _Run):
            out.append(op)
        elif isinstance(op, _Choose):
            out += _runs(op.then) + _runs(op.orelse)
    return out


def _check_sessions(program: list[Any], where: Path) -> None:
    """Every segment step reads exactly its session's inputs and writes outputs its session has."""
    for op in _runs(program):
        takes = {i.name for i in op.runner.get_inputs()}
        gives = {o.name for o in op.runner.get_outputs()}
        wrong = [f"reads {n!r}, which it does not take" for n in op.inputs if n not in takes]
        wrong += [f"does not read {n!r}, which it takes" for n in sorted(takes - set(op.inputs))]
        wrong += [f"writes {n!r}, which it does not give" for n in op.outputs if n not in gives]
        if wrong:
            raise FcpassError(f"{where / op.file} does not match its step in the manifest (the step {wrong[0]}); "
                              "re-run fcpass optimize --lowering segments")


def _run_numpy(op: _Run, env: dict[str, Any]) -> None:
    """ONNX Runtime's plain `run` on numpy values."""
    try:
        got = op.runner.run(op.outputs, {name: env[name] for name in op.inputs})
    except ort_errors() as exc:  # values of another shape or type than the segment takes
        raise segment_failed(op, exc) from None
    env.update(zip(op.outputs, got))


def segment_failed(op: _Run, exc: BaseException) -> FcpassError:
    """ONNX Runtime's refusal to run a segment, as one line."""
    return FcpassError(f"ONNX Runtime could not run segment {op.file}: {first_clause(exc, 140)}; the folder's "
                       "segments disagree with each other or with its manifest: re-run fcpass optimize --lowering segments")


class SegmentsBoundState:
    """The cache state and every intermediate value as OrtValues on `device`, run with I/O binding."""

    def __init__(self, backend: SegmentsBackend, plan: CachePlan, device: str = "cuda", device_id: int = 0) -> None:
        import onnxruntime as ort

        self.backend = backend
        self.plan = plan
        self.device = device
        self.device_id = device_id
        self._ortvalue = ort.OrtValue
        self.values: dict[str, Any] = {}
        self._host: set[str] = set()
        self._host_for: list[str] | None = None
        self._conds = _conditions(backend.program)
        self.commit = Commit(plan)

    def _upload(self, value: np.ndarray) -> Any:
        return self._ortvalue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)

    def reset(self, live: Collection[int] | None = None) -> None:
        self.values = {s.name: self._upload(np.zeros([int(d) for d in s.shape], dtype=s.dtype)) for s in self.plan.states}
        self.commit = Commit(self.plan, live)

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        if fetch != self._host_for:
            # Conditions are read by the host, fetched values returned to it: bind those to host memory.
            self._host = self._conds | set(with_decisions(fetch))
            self._host_for = list(fetch)
        env: dict[str, Any] = {name: self._upload(value) for name, value in feeds.items()}
        env.update(self.values)
        interpret(self.backend.program, env, feeds.get(CTL_INPUT), feeds.get(TOK_INPUT), self._launch,
                  lambda cond: bool(cond.numpy()))
        got = {name: env[name].numpy() for name in with_decisions(fetch)}
        self.values = self.commit(self.values, env, got[SKIP_OUTPUT], feeds.get(TOK_INPUT))
        return {name: got[name] for name in fetch}

    def _launch(self, op: _Run, env: dict[str, Any]) -> None:
        if op.binding is None:
            op.binding = op.runner.io_binding()
        b = op.binding
        for name in op.inputs:
            b.bind_ortvalue_input(name, env[name])
        # Fresh output buffers every run: values from earlier steps (the state) stay intact.
        b.clear_binding_outputs()
        for name in op.outputs:
            b.bind_output(name, "cpu" if name in self._host else self.device, self.device_id)
        try:
            op.runner.run_with_iobinding(b)
        except ort_errors() as exc:
            raise segment_failed(op, exc) from None
        env.update(zip(op.outputs, b.get_outputs()))

    def state(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self.values.items()}


def _conditions(program: list[Any]) -> set[str]:
    out: set[str] = set()
    for op in program:
        if isinstance(op, _Choose):
            out |= {op.cond} | _conditions(op.then) | _conditions(op.orelse)
    return out
