"""The cache-aware denoiser: cache state between steps, the policy's controls, the step record."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import (
    CTL_DECIDE,
    CTL_INPUT,
    MIX_INPUT,
    MOTION_INPUT,
    SKIP_OUTPUT,
    STAT_OUTPUT,
    THR_INPUT,
    TOK_INPUT,
    TOK_RAND_INPUT,
    CachePlan,
)
from fcpass.contract.roles import InputRoles
from runtimes.policies import Policy
from runtimes.sampler import join_halves, split_halves
from runtimes.state import HostState

log = logging.getLogger(__name__)


class CachedDenoiser:
    """Runs a compiled graph one step at a time, carrying its cache state from step to step.

    State starts at zero on `reset`: the statistic against a zero reference is NaN or Inf, which
    the graph never skips on, so a fresh trajectory always computes until the policy lets it skip.
    Where the state lives is the backend's choice (`runtimes.state`): host arrays, or device
    buffers bound by address and swapped between steps.
    """

    def __init__(self, backend: Any, plan: CachePlan, policy: Policy, roles: InputRoles, keep_all: bool = False) -> None:
        self.backend = backend
        self.keep_all = keep_all  # keep every region's state (to read it), not only the policy's live regions
        self.plan = plan
        self.binding = self._new_binding()
        # The unconditional half's state, for a graph that takes one half of guidance (see __call__).
        self._twin: Any = None
        self._halved = False  # this trajectory runs two calls per step
        self._live: set[int] | None = None
        self.policy = policy
        self.roles = roles
        self.output = plan.outputs[0]
        self.uncached_macs = plan.uncached_macs
        self._record: dict[str, Any] = {}
        self._fixed: list[int] = []  # regions the policy never lets skip (see reset)
        policy.reset(plan, 2)  # a policy this graph cannot run says so now, not once sampling has started
        self._saved = [r.macs - r.approx_macs for r in plan.regions]
        # Token-level caching (graphs optimized with --tokens): a policy without token controls keeps
        # every block in full mode, where the graph equals the original.
        blocks = plan.tokens.get("blocks", []) if plan.tokens else []
        self._tok_zero = np.zeros(len(blocks), np.int64) if blocks else None
        self._tok_rand = bool(blocks) and plan.tokens.get("options", {}).get("score") == "random"
        # Saved per block by mode: 1 (attention reused) and 2 (attention computed).
        self._tok_saved = np.array([[0.0, b["macs"] - b["conservative_macs"], b["macs"] - b["conservative_macs"] - b["mixing_macs"]]
                                    for b in blocks], dtype=np.float64)
        self._tok_region = [next(r.index for r in plan.regions if r.name == b["region"]) for b in blocks]
        # Motion tokens (graphs optimized with --motion-ratio): a motion step of the computing stack
        # saves the blocks' MACs on the N - k static tokens, less the approximation they take instead.
        self._motion = plan.region(plan.motion["region"]) if plan.motion else None
        self._motion_saved = self._motion.macs - plan.motion["macs"] if self._motion else 0

    def _new_binding(self) -> Any:
        return self.backend.state_binding(self.plan) if hasattr(self.backend, "state_binding") else HostState(self.backend, self.plan)

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The current cache state, on the host (a copy where it lives on a device); with two calls a step,
        the halves' states joined as one call of both holds them."""
        if self._halved:
            return join_halves(self.binding.state(), self._twin.state(), self.roles)
        return self.binding.state()

    def reset(self, num_steps: int) -> None:
        self.policy.reset(self.plan, num_steps)
        live = None if self.keep_all else self.policy.live
        self._live, self._halved = live, False
        self.binding.reset(live)
        if self._twin is not None:
            self._twin.reset(live)
        self._fixed = [r.index for r in self.plan.regions if live is not None and r.index not in live]

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        controls = self.policy.controls(step)
        ctl = controls.ctl.tolist()
        if any(ctl[k] for k in self._fixed):
            raise FcpassError(f"policy {self.policy.name} controls a region outside its live regions "
                              f"{sorted(self.policy.live or ())}; their cache state is not kept (a bug in the policy)")
        halves = split_halves(feeds, self.roles)
        if halves is None:
            out, stat, skip, self._record = self._run(self.binding, feeds, controls)
            self.policy.observe(step, stat, skip)
            return out
        # A graph of one half of guidance: each half keeps its own state, and the unconditional half takes
        # the conditional half's decisions, so that both halves of a step are computed or approximated
        # alike, as in one call of both (where a region skips only if every row would).
        if self._twin is None:
            self._twin = self._new_binding()
            self._twin.reset(self._live)
        self._halved = True
        cond, stat, skip, record = self._run(self.binding, halves[0], controls)
        self.policy.observe(step, stat, skip)
        follow = dataclasses.replace(controls, ctl=(skip == 1).astype(np.int64))
        uncond, _, _, other = self._run(self._twin, halves[1], follow)
        self._record = {**record, "macs": record["macs"] + other["macs"]}
        return np.concatenate([cond, uncond])

    def _run(self, binding: Any, feeds: dict[str, np.ndarray], controls: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One graph call on `binding`'s state: the model output, the statistics (NaN where forced), the
        decisions and the step record."""
        ctl = controls.ctl.tolist()
        run_feeds = {**feeds, CTL_INPUT: controls.ctl, THR_INPUT: controls.thr, MIX_INPUT: controls.mix}
        tok = None
        if self._tok_zero is not None:
            tok = getattr(controls, "tok", None)
            tok = self._tok_zero if tok is None else tok
            run_feeds[TOK_INPUT] = tok
            if self._tok_rand:
                rand = getattr(controls, "rand", None)
                if rand is None:
                    raise FcpassError("this graph scores tokens with host-fed random numbers; sample it with --policy duca or toca")
                run_feeds[TOK_RAND_INPUT] = rand
        motion = self._motion is not None and controls.motion
        if self._motion is not None:
            run_feeds[MOTION_INPUT] = np.array(int(motion), np.int64)
        out = binding.step(run_feeds, [self.output, STAT_OUTPUT, SKIP_OUTPUT])
        # Plain Python on the small outputs from here on: right after a graph call, each distinct numpy
        # operation costs microseconds.
        stat, skip = out[STAT_OUTPUT], out[SKIP_OUTPUT]
        skips, rows = skip.tolist(), stat.tolist()
        # A forced region is not measured where the graph gates its statistic (ONNX Runtime) and is
        # where the gates are inlined (TensorRT, segments): report it as not measured on every backend.
        forced = [k for k, c in enumerate(ctl) if c < CTL_DECIDE and not all(math.isnan(v) for v in rows[k])]
        if forced:
            stat[forced] = np.nan
        saved = self._saved
        macs = self.uncached_macs - sum(saved[k] for k, v in enumerate(skips) if v == 1)
        if motion and skips[self._motion.index] == 0:
            macs -= self._motion_saved
        if tok is not None and tok.any():
            # A conservative block saves its MACs only where its region (the innermost) computed.
            reached = (tok != 0) & (skip[self._tok_region] == 0)
            macs -= self._tok_saved[np.arange(len(tok)), np.clip(tok, 0, 2)][reached].sum()
        record = {
            "macs": int(macs),
            "ctl": ctl,
            **({"tok": tok.tolist()} if tok is not None else {}),
            **({"motion": bool(motion)} if self._motion is not None else {}),
            "thr": controls.thr.tolist(),
            "skip": skips,
            # the largest over the batch; None where any sample's is not measured (NaN) or not finite
            "stat": [None if k in forced or not all(map(math.isfinite, row)) else max(row) for k, row in enumerate(rows)],
        }
        return out[self.output], stat, skip, record

    def last_record(self) -> dict[str, Any]:
        return self._record
