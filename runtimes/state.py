"""Where the cache state lives between steps, and how one step is run with it.

`HostState` keeps numpy arrays and feeds them with every call (any backend). `BoundState` uses
ONNX Runtime's I/O binding: the state lives in `OrtValue`s on the session's device (CPU memory, or
GPU memory with the CUDA provider), double-buffered: step i reads buffer A and writes buffer B, then
the two swap, so the state is never copied through the host. Only the outputs the host needs (the
model output, the statistics and the decisions) are fetched.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from fcpass.plan import CachePlan


class StateBinding(Protocol):
    def reset(self) -> None: ...

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, np.ndarray]: ...


class HostState:
    """State as numpy arrays, fed with every call; the next state replaces it (no copies)."""

    def __init__(self, backend: Any, plan: CachePlan) -> None:
        self.backend = backend
        self.plan = plan
        self.values: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        self.values = {s.name: np.zeros([int(d) for d in s.shape], dtype=s.dtype) for s in self.plan.states}

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        out = self.backend.run({**feeds, **self.values})
        self.values = {s.name: out[s.next] for s in self.plan.states}
        return {k: out[k] for k in fetch}

    def state(self) -> dict[str, np.ndarray]:
        return self.values


class BoundState:
    """State in two sets of device buffers, A and B, with two bindings built once: A -> B and B -> A.

    A step rebinds only the small per-step inputs (latent, timestep, controls) and alternates the
    two bindings, so the state's buffers are bound by address once and never copied.
    """

    def __init__(self, session: Any, plan: CachePlan, device: str = "cpu", device_id: int = 0) -> None:
        import onnxruntime as ort

        self.session = session
        self.plan = plan

        def alloc(s: Any) -> Any:
            shape = [int(d) for d in s.shape]
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(s.dtype), device, device_id)

        self.buffers = ({s.name: alloc(s) for s in plan.states}, {s.name: alloc(s) for s in plan.states})
        self.bindings = []
        for src, dst in ((0, 1), (1, 0)):
            binding = session.io_binding()
            for s in plan.states:
                binding.bind_ortvalue_input(s.name, self.buffers[src][s.name])
                binding.bind_ortvalue_output(s.next, self.buffers[dst][s.name])
            self.bindings.append(binding)
        self.parity = 0
        self._fetch: list[str] = []

    def reset(self) -> None:
        self.parity = 0
        for s in self.plan.states:
            self.buffers[0][s.name].update_inplace(np.zeros([int(d) for d in s.shape], dtype=s.dtype))

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        binding = self.bindings[self.parity]
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        if fetch != self._fetch:
            self._bind_outputs(fetch)
        self.session.run_with_iobinding(binding)
        fetched = binding.get_outputs()[len(self.plan.states):]
        self.parity ^= 1
        return {name: value.numpy() for name, value in zip(fetch, fetched)}

    def _bind_outputs(self, fetch: list[str]) -> None:
        for dst, binding in zip((1, 0), self.bindings):
            binding.clear_binding_outputs()
            for s in self.plan.states:
                binding.bind_ortvalue_output(s.next, self.buffers[dst][s.name])
            for name in fetch:
                binding.bind_output(name, "cpu")
        self._fetch = list(fetch)

    def state(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self.buffers[self.parity].items()}
