"""Calibration for the peer policies: TeaCache's rescaling polynomial and MagCache's magnitude ratios.

Both come from trajectories of the compiled graph with every region computing, recorded step by step:

- TeaCache (stack region with the `modulated_input` probe): x_i = rel_L1 of block 0's modulated input
  between steps i-1 and i, y_i = rel_L1 of the model output between the same steps, per sample; poly
  is the least-squares polynomial y ~ poly(x) (degree 4, as TeaCache publishes, lowered until it
  does not decrease over the calibrated range), so its accumulated value estimates the output
  change a skipped step would have missed.
- MagCache (stack region): gamma_i = mean over tokens of ||R(i)|| / ||R(i-1)||, R = the stack's output
  minus its input, averaged over samples and trajectories; gamma_0 = 1.

Neither keeps activations: per step only sums (MagCache) and two floats per sample (TeaCache).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from numpy.exceptions import RankWarning

from fcpass.contract.plan import CachePlan

log = logging.getLogger(__name__)

PEERS = ("teacache", "magcache")
TEACACHE_DEGREE = 4


def _rel_l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, a.ndim))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(a.astype(np.float64) - b).sum(axis=axes) / np.abs(b.astype(np.float64)).sum(axis=axes)


def _monotone_polyfit(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    """The least-squares polynomial of the highest degree <= `degree` that does not decrease on
    [0, max x] and is not negative at 0: more change in the input never predicts less change in the
    output (so the policy's threshold on the accumulated value is a threshold on d, see
    runtimes.policies.TeaCache), and no change never predicts a negative one (which would let
    small changes skip forever). A degree the points cannot determine is skipped. Failing every
    degree: y = c x through the origin."""
    grid = np.linspace(0.0, float(x.max()), 256)
    for deg in range(degree, 0, -1):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RankWarning)
            try:
                coefficients = np.polyfit(x, y, deg)
            except RankWarning:  # too few distinct points for this degree (a short calibration): a lower one
                continue
        if (np.polyval(np.polyder(coefficients), grid) >= 0).all() and np.polyval(coefficients, 0.0) >= 0:
            return coefficients
    return np.array([max(float(np.sum(x * y) / max(np.sum(x * x), 1e-30)), 0.0), 0.0])  # y ~ c x, c >= 0


class PeerStats:
    """Accumulates what `which` needs from all-compute steps; `store` writes it into the plan."""

    def __init__(self, plan: CachePlan, which: tuple[str, ...] = PEERS) -> None:
        self.plan = plan
        stack = [r for r in plan.regions if r.name == "stack"]
        self.stack = stack[0] if stack else None
        self.which = tuple(w for w in which if self._supported(w))
        self.prev: dict[str, np.ndarray] = {}
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.ratio_sum: dict[int, float] = {}
        self.ratio_count: dict[int, int] = {}

    def _supported(self, which: str) -> bool:
        if self.stack is None:
            log.info("no stack region: no %s calibration", which)
            return False
        if which == "teacache" and self.stack.probe != "modulated_input":
            log.info("the stack has no modulated-input probe: no teacache calibration")
            return False
        return True

    def _state(self, kind: str, k: int = 0) -> str:
        assert self.stack is not None
        return f"fc.{self.stack.name}.{kind}{k}"

    def reset(self) -> None:
        self.prev = {}

    def add(self, step: int, state: dict[str, np.ndarray], output: np.ndarray) -> None:
        now: dict[str, np.ndarray] = {"output": output}
        if "teacache" in self.which:
            now["mod"] = state[self._state("mod")]
        if "magcache" in self.which:
            residual = state[self._state("out")].astype(np.float64) - state[self._state("in")]
            now["norm"] = np.linalg.norm(residual.reshape(residual.shape[0], -1, residual.shape[-1]), axis=-1)
        if self.prev:
            if "teacache" in self.which:
                self.x.append(_rel_l1(now["mod"], self.prev["mod"]))
                self.y.append(_rel_l1(output, self.prev["output"]))
            if "magcache" in self.which:
                with np.errstate(divide="ignore", invalid="ignore"):
                    gamma = float(np.mean(now["norm"] / self.prev["norm"]))
                if np.isfinite(gamma):
                    self.ratio_sum[step] = self.ratio_sum.get(step, 0.0) + gamma
                    self.ratio_count[step] = self.ratio_count.get(step, 0) + 1
        self.prev = now

    def stats(self) -> dict[str, Any]:
        """What the trajectories added so far."""
        return {"x": self.x, "y": self.y, "ratio_sum": self.ratio_sum, "ratio_count": self.ratio_count}

    def absorb(self, stats: dict[str, Any]) -> None:
        """Add another run's `stats` (later trajectories) to these: one ratio per step and trajectory, so the sums
        add in the order one run adds them."""
        self.x += stats["x"]
        self.y += stats["y"]
        for step, value in stats["ratio_sum"].items():
            self.ratio_sum[step] = self.ratio_sum.get(step, 0.0) + value
            self.ratio_count[step] = self.ratio_count.get(step, 0) + stats["ratio_count"][step]

    def store(self, steps: int) -> dict[str, Any]:
        """Write the fits into the stack region's calibration; return them."""
        assert self.stack is not None or not self.which
        done: dict[str, Any] = {}
        if "teacache" in self.which and self.x:
            x, y = np.concatenate(self.x), np.concatenate(self.y)
            keep = np.isfinite(x) & np.isfinite(y)
            coefficients = _monotone_polyfit(x[keep], y[keep], TEACACHE_DEGREE)
            fit = np.polyval(coefficients, x[keep])
            done["teacache"] = {
                "coefficients": [float(c) for c in coefficients],
                "x_range": [float(x[keep].min()), float(x[keep].max())],
                "rel_residual": float(np.linalg.norm(fit - y[keep]) / max(np.linalg.norm(y[keep]), 1e-12)),
                "points": int(keep.sum()),
            }
        if "magcache" in self.which and self.ratio_count:
            ratios = [1.0] + [self.ratio_sum.get(i, 0.0) / self.ratio_count[i] if i in self.ratio_count else 1.0
                              for i in range(1, steps)]
            done["magcache"] = {"ratios": ratios, "steps": steps}
        if self.stack is not None:
            self.stack.calibration.update(done)
        return done
