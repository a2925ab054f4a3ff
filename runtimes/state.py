"""Where the cache state lives between steps, and how one step is run with it.

A state takes its next value only where its region computed (fc_skip 0; the modulated-input probe
at every step) and keeps its value elsewhere (`Commit`). Only the states of the regions a policy
may skip are kept (its `live` regions, given to `reset`): the others always compute, nothing reads
their state, and their buffers stay where they are. Its `.next` names a graph output (a value
the graph computes anyway, such as a block's output, which the next block's input state shares),
or another state (the previous output takes the output state's old value): nothing is copied to
keep a state, and a value several states take is written once.

`HostState` keeps numpy arrays and feeds them with every call (any backend). `BoundState` uses
ONNX Runtime's I/O binding: the state lives in `OrtValue`s on the session's device (CPU memory, or
GPU memory with the CUDA provider), in `StatePools`: each step writes every next value into a buffer
no state holds, and the states that take it point at that buffer, so the state is never copied
through the host. Only the outputs the host needs (the model output, the statistics and the
decisions) are fetched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from fcpass.contract.errors import FcpassError, first_clause
from fcpass.contract.plan import SKIP_OUTPUT, TOK_INPUT, CachePlan, StateSpec


class StateBinding(Protocol):
    def reset(self, live: Collection[int] | None = None) -> None: ...

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, np.ndarray]: ...


class Commit:
    """The state after a step: each state whose region computed takes its next value, the others keep theirs.

    A token state also keeps its value where its block's fc_tok mode leaves it as it is
    (`StateSpec.token_block`, `token_keep`), so the caller passes the step's fc_tok for token graphs.
    Works on any value type (numpy arrays, `OrtValue`s, device buffers): values move, never copy.
    """

    def __init__(self, plan: CachePlan, live: Collection[int] | None = None) -> None:
        index = {r.name: r.index for r in plan.regions}
        # (state, where its next value comes from, its region's index in fc_skip or -1 for every step,
        #  its block's index in fc_tok if some token modes keep it, else -1, those modes)
        self.rules = [(s.name, s.next, -1 if s.kind == "mod" else index[s.region],
                       -1 if s.token_block is None else s.token_block, frozenset(s.token_keep))
                      for s in live_states(plan, live)]
        self.needs_tok = any(block >= 0 for _, _, _, block, _ in self.rules)

    def __call__(self, current: Mapping[str, Any], produced: Mapping[str, Any], skip: np.ndarray,
                 tok: np.ndarray | None = None) -> dict[str, Any]:
        new = dict(current)
        if not self.rules:
            return new
        computed = [v == 0 for v in skip.tolist()]  # plain bools: indexing numpy per rule costs more than the step's bindings
        if self.needs_tok and tok is None:
            raise FcpassError(f"this graph caches tokens: each step must feed {TOK_INPUT}, and the state needs it "
                              "to know which caches the step reused")
        modes = tok.tolist() if self.needs_tok else []
        for name, source, region, block, keep in self.rules:
            if (region < 0 or computed[region]) and (block < 0 or modes[block] not in keep):
                new[name] = current[source] if source in current else produced[source]
        return new


def with_decisions(fetch: list[str]) -> list[str]:
    """`fetch` and fc_skip, which the host needs to know which states take their next value."""
    return list(dict.fromkeys([*fetch, SKIP_OUTPUT]))


def live_states(plan: CachePlan, live: Collection[int] | None = None) -> list[StateSpec]:
    """The states of the `live` regions (default all)."""
    index = {r.name: r.index for r in plan.regions}
    return [s for s in plan.states if live is None or index[s.region] in live]


def written_outputs(plan: CachePlan, live: Collection[int] | None = None) -> list[str]:
    """The graph outputs the state (of the `live` regions; default all) takes its next values from, once each."""
    names = {s.name for s in plan.states}
    return list(dict.fromkeys(s.next for s in live_states(plan, live) if s.next not in names))


class HostState:
    """State as numpy arrays, fed with every call; the states that take a next value point at it (no copies)."""

    def __init__(self, backend: Any, plan: CachePlan) -> None:
        self.backend = backend
        self.plan = plan
        self.commit = Commit(plan)
        self.written = written_outputs(plan)
        self.values: dict[str, np.ndarray] = {}

    def reset(self, live: Collection[int] | None = None) -> None:
        self.values = {s.name: np.zeros([int(d) for d in s.shape], dtype=s.dtype) for s in self.plan.states}
        self.commit = Commit(self.plan, live)
        self.written = written_outputs(self.plan, live)

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        out = self.backend.run({**feeds, **self.values}, list(dict.fromkeys([*with_decisions(fetch), *self.written])))
        self.values = self.commit(self.values, out, out[SKIP_OUTPUT], feeds.get(TOK_INPUT))
        return {k: out[k] for k in fetch}

    def state(self) -> dict[str, np.ndarray]:
        return self.values


class StatePools:
    """Device buffers for the state: per graph output a state takes, one buffer per state that can hold
    one of them plus one more, so a step always has a buffer no state holds to write that output into.

    `alloc(spec)` makes a buffer shaped like the state `spec`; buffers are told apart by identity.
    Only the `moving` states (those of the live regions) change buffers; the outputs no moving state
    takes are written into a `fixed` buffer each, so a binding sets those once per trajectory.
    """

    def __init__(self, plan: CachePlan, alloc: Callable[[StateSpec], Any]) -> None:
        self.plan = plan
        self.commit = Commit(plan)
        by_name = {s.name: s for s in plan.states}

        def pool_of(s: StateSpec) -> str:
            seen = {s.name}
            while s.next in by_name:  # the previous output holds what the output state held
                s = by_name[s.next]
                if s.name in seen:
                    raise FcpassError(f"the cache plan's states take each other's values in a cycle at {s.name}; "
                                      "re-run fcpass optimize")
                seen.add(s.name)
            return s.next

        self.pool_of = {s.name: pool_of(s) for s in plan.states}
        holders = Counter(self.pool_of.values())
        shaped = {self.pool_of[s.name]: s for s in reversed(plan.states)}
        self.pools = {key: [alloc(shaped[key]) for _ in range(n + 1)] for key, n in holders.items()}
        self.current: dict[str, Any] = {}
        self.moving: list[str] = []
        self.fixed: dict[str, Any] = {}
        self._live_pools: list[tuple[str, list[Any]]] = []
        self._still: set[int] = set()  # the buffers the states that never move hold

    def reset(self, zero: Callable[[Any, StateSpec], None], live: Collection[int] | None = None) -> None:
        """Every state on a buffer of its pool, no two on one, zeroed by `zero(buffer, state)`; from now on
        only the states of the `live` regions (default all) move."""
        self.commit = Commit(self.plan, live)
        used: Counter[str] = Counter()
        self.current = {}
        for s in self.plan.states:
            key = self.pool_of[s.name]
            buf = self.pools[key][used[key]]
            used[key] += 1
            zero(buf, s)
            self.current[s.name] = buf
        self.moving = [name for name, *_ in self.commit.rules]
        live_keys = {self.pool_of[name] for name in self.moving}
        self._live_pools = [(key, pool) for key, pool in self.pools.items() if key in live_keys]
        moving = set(self.moving)
        self._still = {id(buf) for name, buf in self.current.items() if name not in moving}
        self.fixed = _free(((k, p) for k, p in self.pools.items() if k not in live_keys), self._still)

    def targets(self) -> dict[str, Any]:
        """Per output a moving state takes, a buffer of its pool that no state holds: where this step writes it."""
        return _free(self._live_pools, self._still | {id(self.current[name]) for name in self.moving})

    def advance(self, written: Mapping[str, Any], skip: np.ndarray, tok: np.ndarray | None = None) -> None:
        self.current = self.commit(self.current, written, skip, tok)


def _free(pools: Iterable[tuple[str, list[Any]]], held: set[int]) -> dict[str, Any]:
    """Per pool, its first buffer not in `held`."""
    out = {}
    for key, pool in pools:
        out[key] = next(buf for buf in pool if id(buf) not in held)
    return out


class BoundCall:
    """Calls of one session through ONNX Runtime's I/O binding, bound once and reused.

    The per-step inputs are copied into buffers bound once per shape, and the fetched outputs land in
    host arrays bound once per fetch list and input shapes; the caller gets copies. This is how the
    cached graph is called (`BoundState` extends it), and the uncached graph is called the same way
    so that a speedup compares graphs, not two ways of calling ONNX Runtime (`run` converts every
    input and output, a few percent of a small model's step).
    """

    def __init__(self, session: Any, device: str = "cpu", device_id: int = 0) -> None:
        import onnxruntime as ort

        self.session = session
        self.device, self.device_id = device, device_id
        self._ort = ort.OrtValue
        self.binding = session.io_binding()
        self._staged: dict[str, tuple[np.ndarray, Any]] = {}  # per-step input -> (host array, its bound buffer)
        self._fetch_key: tuple[str, ...] | None = None  # the fetch the outputs are bound for (None: input shapes changed)
        self._wanted: list[str] = []  # the outputs ONNX Runtime sizes and the host reads back
        self._fetched: dict[str, np.ndarray] = {}  # fetched output -> the host array it lands in

    def _host_value(self, array: np.ndarray) -> Any:
        """An `OrtValue` on the host that shares `array`'s memory (ONNX Runtime copies only for devices)."""
        return self._ort.ortvalue_from_numpy(array)

    def _stage(self, feeds: Mapping[str, np.ndarray]) -> None:
        for name, value in feeds.items():
            held = self._staged.get(name)
            if held is None or held[0].shape != value.shape or held[0].dtype != value.dtype:
                host = np.empty(value.shape, value.dtype)
                buf = (self._host_value(host) if self.device == "cpu" else
                       self._ort.ortvalue_from_shape_and_type(list(value.shape), value.dtype, self.device, self.device_id))
                self.binding.bind_ortvalue_input(name, buf)
                held = self._staged[name] = (host, buf)
                self._fetch_key = None  # new input shapes may mean new output shapes
            np.copyto(held[0], value)
            if self.device != "cpu":
                held[1].update_inplace(held[0])

    def _bind_fetch(self, key: tuple[str, ...], wanted: list[str]) -> bool:
        """Bind `wanted` for ONNX Runtime to size on the next call, if `key` changed; whether it did."""
        if key == self._fetch_key:
            return False
        self.binding.clear_binding_outputs()
        self._wanted = wanted
        for name in wanted:
            self.binding.bind_output(name, "cpu")
        self._fetch_key, self._fetched = key, {}
        return True

    def _run(self) -> dict[str, np.ndarray]:
        """One call; copies of the wanted outputs (their arrays are rewritten by the next call)."""
        b = self.binding
        try:
            self.session.run_with_iobinding(b)
        except RuntimeError as exc:  # ONNX Runtime's refusal of the feeds (a graph whose inputs disagree on sizes)
            raise FcpassError(f"ONNX Runtime could not run the graph: {first_clause(exc, 140)}; check that its inputs' "
                              "declared shapes agree with each other, or re-export the model") from None
        if not self._fetched:
            first = [v.numpy() for v in b.get_outputs()[:len(self._wanted)]]
            self._fetched = {name: np.empty_like(v) for name, v in zip(self._wanted, first)}
            for (name, host), v in zip(self._fetched.items(), first):
                np.copyto(host, v)
                b.bind_ortvalue_output(name, self._host_value(host))
        return {name: host.copy() for name, host in self._fetched.items()}

    def __call__(self, feeds: Mapping[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        self._stage(feeds)
        self._bind_fetch(tuple(fetch), list(dict.fromkeys(fetch)))
        return self._run()


class BoundState(BoundCall):
    """State in `StatePools` of `OrtValue`s on the session's device, bound by address, with one I/O binding.

    Nothing is rebound that did not change (`BoundCall` for the per-step inputs and the fetched
    outputs), and of the state only the buffers that moved since the last step are rebound. The
    state itself is never copied.
    """

    def __init__(self, session: Any, plan: CachePlan, device: str = "cpu", device_id: int = 0) -> None:
        super().__init__(session, device, device_id)
        self.plan = plan

        def alloc(s: StateSpec) -> Any:
            return self._ort.ortvalue_from_shape_and_type([int(d) for d in s.shape], np.dtype(s.dtype), device, device_id)

        self.pools = StatePools(plan, alloc)
        self._bound: dict[str, Any] = {}  # state input or written output -> the OrtValue it is bound to

    def reset(self, live: Collection[int] | None = None) -> None:
        self.pools.reset(lambda buf, s: buf.update_inplace(np.zeros([int(d) for d in s.shape], dtype=s.dtype)), live)
        self._rebind(self.pools.current, self.binding.bind_ortvalue_input)
        self._rebind(self.pools.fixed, self.binding.bind_ortvalue_output)

    def _rebind(self, values: Mapping[str, Any], bind: Callable[[str, Any], None]) -> None:
        bound = self._bound
        for name, buf in values.items():
            if bound.get(name) is not buf:
                bind(name, buf)
                bound[name] = buf

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        b, pools = self.binding, self.pools
        self._stage(feeds)
        current = pools.current
        self._rebind({name: current[name] for name in pools.moving}, b.bind_ortvalue_input)
        targets = pools.targets()
        # Output sizes follow the input shapes: ONNX Runtime sizes the fetched ones on the first call.
        if self._bind_fetch(tuple(fetch), [name for name in with_decisions(fetch) if name not in pools.pools]):
            for name in pools.pools:
                self._bound.pop(name, None)
            self._rebind(pools.fixed, b.bind_ortvalue_output)
        self._rebind(targets, b.bind_ortvalue_output)
        got = self._run()
        for name in fetch:
            if name in pools.pools:  # a value the state takes: read it where it was written
                got[name] = (targets[name] if name in targets else pools.fixed[name]).numpy().copy()
        pools.advance(targets, got[SKIP_OUTPUT], feeds.get(TOK_INPUT))
        return {name: got[name] for name in fetch}

    def state(self) -> dict[str, np.ndarray]:
        return {name: value.numpy().copy() for name, value in self.pools.current.items()}
