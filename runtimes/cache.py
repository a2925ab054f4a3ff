"""The cache-aware denoiser: cache state between steps, the policy's controls, the step record."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fcpass.plan import CTL_INPUT, MIX_INPUT, SKIP_OUTPUT, STAT_OUTPUT, THR_INPUT, CachePlan
from fcpass.roles import InputRoles
from runtimes.policies import Policy
from runtimes.state import HostState

log = logging.getLogger(__name__)


class CachedDenoiser:
    """Runs a compiled graph one step at a time, carrying its cache state from step to step.

    State starts at zero on `reset`: the statistic against a zero reference is NaN or Inf, which
    the graph never skips on, so a fresh trajectory always computes until the policy lets it skip.
    Where the state lives is the backend's choice (`runtimes.state`): host arrays, or device
    buffers bound by address and swapped between steps.
    """

    def __init__(self, backend: Any, plan: CachePlan, policy: Policy, roles: InputRoles) -> None:
        self.backend = backend
        self.binding = backend.state_binding(plan) if hasattr(backend, "state_binding") else HostState(backend, plan)
        self.plan = plan
        self.policy = policy
        self.roles = roles
        self.output = plan.outputs[0]
        self.uncached_macs = plan.uncached_macs
        self._record: dict[str, Any] = {}
        self._saved = np.array([r.macs - r.approx_macs for r in plan.regions], dtype=np.float64)

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current cache state, on the host (a copy where it lives on a device)."""
        return self.binding.state()

    def reset(self, num_steps: int) -> None:
        self.binding.reset()
        self.policy.reset(self.plan, num_steps)

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        controls = self.policy.controls(step)
        run_feeds = {**feeds, CTL_INPUT: controls.ctl, THR_INPUT: controls.thr, MIX_INPUT: controls.mix}
        out = self.binding.step(run_feeds, [self.output, STAT_OUTPUT, SKIP_OUTPUT])
        stat, skip = out[STAT_OUTPUT], out[SKIP_OUTPUT]
        self.policy.observe(step, stat, skip)
        skipped = skip == 1
        with np.errstate(invalid="ignore"):
            stat_max = np.where(np.isnan(stat).any(axis=1), np.nan, stat.max(axis=1))
        self._record = {
            "macs": int(self.uncached_macs - self._saved[skipped].sum()),
            "ctl": controls.ctl.tolist(),
            "thr": controls.thr.tolist(),
            "skip": skip.tolist(),
            "stat": [None if not np.isfinite(v) else float(v) for v in stat_max],
        }
        return out[self.output]

    def last_record(self) -> dict[str, Any]:
        return self._record
