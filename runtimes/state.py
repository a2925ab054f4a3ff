"""Where the cache state lives between steps, and how one step is run with it.

A state takes its next value only where its region computed (fc_skip 0; the modulated-input probe
at every step) and keeps its value elsewhere (`Commit`). Its `.next` names a graph output (a value
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
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from fcpass.errors import FcpassError
from fcpass.plan import SKIP_OUTPUT, CachePlan, StateSpec


class StateBinding(Protocol):
    def reset(self) -> None: ...

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, np.ndarray]: ...


class Commit:
    """The state after a step: each state whose region computed takes its next value, the others keep theirs.

    Works on any value type (numpy arrays, `OrtValue`s, device buffers): values move, never copy.
    """

    def __init__(self, plan: CachePlan) -> None:
        index = {r.name: r.index for r in plan.regions}
        # (state, where its next value comes from, its region's index in fc_skip or -1 for every step)
        self.rules = [(s.name, s.next, -1 if s.kind == "mod" else index[s.region]) for s in plan.states]

    def __call__(self, current: Mapping[str, Any], produced: Mapping[str, Any], skip: np.ndarray) -> dict[str, Any]:
        new = dict(current)
        for name, source, region in self.rules:
            if region < 0 or skip[region] == 0:
                new[name] = current[source] if source in current else produced[source]
        return new


def with_decisions(fetch: list[str]) -> list[str]:
    """`fetch` and fc_skip, which the host needs to know which states take their next value."""
    return list(dict.fromkeys([*fetch, SKIP_OUTPUT]))


def written_outputs(plan: CachePlan) -> list[str]:
    """The graph outputs the state takes its next values from (once each)."""
    names = {s.name for s in plan.states}
    return list(dict.fromkeys(s.next for s in plan.states if s.next not in names))


class HostState:
    """State as numpy arrays, fed with every call; the states that take a next value point at it (no copies)."""

    def __init__(self, backend: Any, plan: CachePlan) -> None:
        self.backend = backend
        self.plan = plan
        self.commit = Commit(plan)
        self.values: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        self.values = {s.name: np.zeros([int(d) for d in s.shape], dtype=s.dtype) for s in self.plan.states}

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        out = self.backend.run({**feeds, **self.values})
        self.values = self.commit(self.values, out, out[SKIP_OUTPUT])
        return {k: out[k] for k in fetch}

    def state(self) -> dict[str, np.ndarray]:
        return self.values


class StatePools:
    """Device buffers for the state: per graph output a state takes, one buffer per state that can hold
    one of them plus one more, so a step always has a buffer no state holds to write that output into.

    `alloc(spec)` makes a buffer shaped like the state `spec`; buffers are told apart by identity.
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

    def reset(self, zero: Callable[[Any, StateSpec], None]) -> None:
        """Every state on a buffer of its pool, no two on one, zeroed by `zero(buffer, state)`."""
        used: Counter[str] = Counter()
        self.current = {}
        for s in self.plan.states:
            key = self.pool_of[s.name]
            buf = self.pools[key][used[key]]
            used[key] += 1
            zero(buf, s)
            self.current[s.name] = buf

    def targets(self) -> dict[str, Any]:
        """Per written output, a buffer of its pool that no state holds: where this step writes it."""
        held = {id(b) for b in self.current.values()}
        return {key: next(b for b in pool if id(b) not in held) for key, pool in self.pools.items()}

    def advance(self, written: Mapping[str, Any], skip: np.ndarray) -> None:
        self.current = self.commit(self.current, written, skip)


class BoundState:
    """State in `StatePools` of `OrtValue`s on the session's device, bound by address, with one I/O binding.

    A step binds the small per-step inputs, the state buffers that changed since the last step and the
    buffers the written outputs go to; the state itself is never copied.
    """

    def __init__(self, session: Any, plan: CachePlan, device: str = "cpu", device_id: int = 0) -> None:
        import onnxruntime as ort

        self.session = session
        self.plan = plan

        def alloc(s: StateSpec) -> Any:
            shape = [int(d) for d in s.shape]
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(s.dtype), device, device_id)

        self.pools = StatePools(plan, alloc)
        self.binding = session.io_binding()
        self._bound: dict[str, Any] = {}  # name -> the OrtValue it is bound to
        self._fetch: list[str] = []

    def reset(self) -> None:
        self.pools.reset(lambda buf, s: buf.update_inplace(np.zeros([int(d) for d in s.shape], dtype=s.dtype)))

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        b = self.binding
        for name, value in feeds.items():
            b.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, buf in self.pools.current.items():
            if self._bound.get(name) is not buf:
                b.bind_ortvalue_input(name, buf)
                self._bound[name] = buf
        targets = self.pools.targets()
        wanted = with_decisions(fetch)
        if wanted != self._fetch:
            b.clear_binding_outputs()
            for key in targets:
                self._bound.pop(key, None)
            for name in wanted:
                b.bind_output(name, "cpu")
            self._fetch = wanted
        for key, buf in targets.items():
            if self._bound.get(key) is not buf:
                b.bind_ortvalue_output(key, buf)
                self._bound[key] = buf
        self.session.run_with_iobinding(b)
        got = dict(zip(self._fetch, (v.numpy() for v in b.get_outputs()[:len(self._fetch)])))
        self.pools.advance(targets, got[SKIP_OUTPUT])
        return {name: got[name] for name in fetch}

    def state(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self.pools.current.items()}
