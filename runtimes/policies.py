"""Cache policies: the host-loop rules that fill a compiled graph's controls at every step.

The graph holds the mechanism (regions, approximations, the statistic and the in-graph test); a
policy only says, before each step, which regions compute (ctl 0), skip (1) or decide in the graph
(2, skip iff every sample's statistic <= thr), and with which approximation. Changing a threshold
or the policy never needs a rebuild. Every policy computes the first `warmup` steps and the last.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import chi2

from fcpass.errors import FcpassError
from fcpass.plan import APPROX_MIX, CTL_DECIDE, CTL_SKIP, CachePlan


@dataclass
class StepControls:
    ctl: np.ndarray  # int64 (R,)
    thr: np.ndarray  # float32 (R,)
    mix: np.ndarray  # float32 (R, 3)


class Policy(ABC):
    name: str = "policy"

    def __init__(self) -> None:
        self.plan: CachePlan | None = None
        self.num_steps = 0

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        """Start a new trajectory; subclasses clear their counters here."""
        self.plan = plan
        self.num_steps = num_steps

    def base(self) -> StepControls:
        assert self.plan is not None, "reset() must be called before controls()"
        r = len(self.plan.regions)
        return StepControls(np.zeros(r, np.int64), np.zeros(r, np.float32), np.zeros((r, 3), np.float32))

    @abstractmethod
    def controls(self, step: int) -> StepControls: ...

    def observe(self, step: int, stat: np.ndarray, skip: np.ndarray) -> None:
        """See what the graph did at `step` (stat (R, B), skip (R,)); default: nothing to learn."""

    def describe(self) -> dict[str, object]:
        config = getattr(self, "config", None)
        return {"name": self.name, **(config.__dict__ if config is not None else {})}


class Scheduled(Policy):
    """A fixed schedule: full steps during `warmup`, at the last step and every `interval` steps after
    the warm-up; in between, `skipped` regions (every block, or the stack with `level = "stack"`) skip."""

    config: ForaConfig | TaylorSeerConfig | DeltaDiTConfig

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config  # type: ignore[assignment]
        if self.config.interval < 1:
            raise FcpassError(f"{self.name} interval {self.config.interval} must be >= 1")
        self.skipped: list[int] = []

    def full_step(self, step: int) -> bool:
        c = self.config
        return step < c.warmup or step == self.num_steps - 1 or (step - c.warmup) % c.interval == 0

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        level = getattr(self.config, "level", "blocks")
        if level not in ("blocks", "stack"):
            raise FcpassError(f"{self.name} level {level!r} unknown; use blocks or stack")
        self.skipped = [plan.region("stack").index] if level == "stack" else _block_indices(plan)


class NoCache(Policy):
    """Every region computes: the compiled graph then equals the original model."""

    name = "none"

    def controls(self, step: int) -> StepControls:
        return self.base()


def _block_indices(plan: CachePlan) -> list[int]:
    blocks = [r.index for r in plan.block_regions()]
    if not blocks:
        raise FcpassError("this policy needs per-block regions; optimize with --regions including 'blocks'")
    return blocks


@dataclass
class ForaConfig:
    """FORA: full steps every `interval` steps; in between, every block reuses its cached output.

    interval: larger is faster and drifts more (3 is FORA's usual setting for DiT).
    warmup: leading steps always computed (the trajectory changes fastest there).
    approx: the stand-in for a skipped block; `reuse` is FORA's own, `residual` is gentler.
    level: `blocks` skips every block region; `stack` skips the whole stack in one branch, which for
        `reuse` and `residual` gives the same result (the per-block approximations telescope) at a
        fraction of the per-step cost.
    """

    interval: int = 3
    warmup: int = 2
    approx: str = "reuse"
    level: str = "blocks"


class Fora(Scheduled):
    name = "fora"

    def __init__(self, config: ForaConfig | None = None) -> None:
        super().__init__(config or ForaConfig())
        if self.config.approx not in APPROX_MIX:
            raise FcpassError(f"approximation {self.config.approx!r} unknown; use one of {', '.join(APPROX_MIX)}")

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if not self.full_step(step):
            for k in self.skipped:
                out.ctl[k] = CTL_SKIP
                out.mix[k] = APPROX_MIX[self.config.approx]
        return out


@dataclass
class FastCacheConfig:
    """FastCache's transformer-level cache (per block), decided by a chi-square test in the graph.

    alpha: significance level; skip block l iff delta_l^2 <= sigma_l^2 * chi2_ppf(1 - alpha, nu) / nu.
        Smaller alpha raises the threshold (more skipping, more error).
    dof: `elements` (nu = N*D, the paper) or `tokens` (nu = N; tokens are correlated, so N*D overstates
        the evidence and makes alpha nearly irrelevant).
    warmup: leading steps always computed.  max_skips: consecutive skips of one block before it must
        compute again (bounds the drift of its cached reference).
    approx: `linear` (the calibrated W, b) by default; `residual` or `reuse` to compare; `taylor1`
        (an fcpass extension; graph optimized with --taylor) extrapolates from the region's own two last
        computed steps a > b: O = O_a + (i - a)(O_a - O_b)/(a - b).
    sigma_scale: multiplies every calibrated sigma^2 (a single knob for tuning speed against quality).
    levels: which regions take the test. `blocks` is the paper (one test per block). Adding `stack`
        and/or `tail` (an fcpass extension) tests the whole range first with its own calibrated sigma^2
        and fitted W: when the range passes, one cheap branch replaces every block in it; when it
        fails, the blocks inside are tested one by one. A block inside a skipped range counts as skipped
        for `max_skips`.
    """

    alpha: float = 0.05
    dof: str = "elements"
    warmup: int = 2
    max_skips: int = 3
    approx: str = "linear"
    sigma_scale: float = 1.0
    levels: str = "blocks"


class FastCache(Policy):
    name = "fastcache"

    def __init__(self, config: FastCacheConfig | None = None) -> None:
        super().__init__()
        self.config = config or FastCacheConfig()
        c = self.config
        if not 0 < c.alpha < 1:
            raise FcpassError(f"--alpha {c.alpha} must be in (0, 1)")
        if c.dof not in ("elements", "tokens"):
            raise FcpassError(f"--dof {c.dof!r} unknown; use elements or tokens")
        if c.approx not in APPROX_MIX:
            raise FcpassError(f"approximation {c.approx!r} unknown; use one of {', '.join(APPROX_MIX)}")
        self.streak: dict[int, int] = {}
        self.thresholds: dict[int, float] = {}

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        levels = {x.strip() for x in self.config.levels.split(",") if x.strip()}
        unknown = levels - {"blocks", "tail", "stack"}
        if unknown:
            raise FcpassError(f"fastcache levels {sorted(unknown)} unknown; use blocks, tail, stack (comma-separated)")
        tested = [r for r in plan.regions if ("blocks" if r.name.startswith("block") else r.name) in levels]
        missing = levels - {"blocks" if r.name.startswith("block") else r.name for r in plan.regions}
        if missing:
            raise FcpassError(f"fastcache levels {sorted(missing)} are not in this graph; optimize with --regions including them")
        self.streak = {r.index: 0 for r in plan.regions}
        self.computed: dict[int, list[int]] = {r.index: [] for r in plan.regions}
        if self.config.approx == "taylor1" and not any(s.kind == "prev" for s in plan.states):
            raise FcpassError("fastcache --approx taylor1 needs the previous outputs; optimize with --taylor")
        self.thresholds = {}
        for region in tested:
            sigma2 = region.calibration.get("sigma2")
            if sigma2 is not None:
                nu = self._dof(plan, region.name)
                self.thresholds[region.index] = chi2_threshold(sigma2 * self.config.sigma_scale, self.config.alpha, nu)
        if not any(plan.regions[k].name.startswith("block") for k in self.thresholds) and "blocks" in levels:
            raise FcpassError(
                "fastcache needs calibrated blocks and this graph has none; run fcpass optimize with --calibrate N"
            )

    def _dof(self, plan: CachePlan, region: str) -> int:
        state = next(s for s in plan.states if s.region == region and s.kind == "in")
        dims = [int(d) for d in state.shape[1:] if isinstance(d, int)]
        if self.config.dof == "tokens":
            return dims[0] if dims else 1
        return int(np.prod(dims)) if dims else 1

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if step < self.config.warmup or step == self.num_steps - 1:
            return out
        for k, thr in self.thresholds.items():
            if self.streak[k] >= self.config.max_skips:
                continue
            out.ctl[k] = CTL_DECIDE
            out.thr[k] = thr
            out.mix[k] = self._mix(k, step)
        return out

    def _mix(self, k: int, step: int) -> tuple[float, float, float]:
        if self.config.approx != "taylor1":
            return APPROX_MIX[self.config.approx]
        done = self.computed[k]
        if len(done) < 2:
            return APPROX_MIX["reuse"]
        a, b = done[-1], done[-2]
        return (0.0, 0.0, (step - a) / (a - b))

    def observe(self, step: int, stat: np.ndarray, skip: np.ndarray) -> None:
        # -1 (not reached) means an enclosing region was skipped: this one was not computed either.
        for k in self.streak:
            self.streak[k] = self.streak[k] + 1 if skip[k] != 0 else 0
            if skip[k] == 0:
                self.computed[k].append(step)

@dataclass
class TaylorSeerConfig:
    """TaylorSeer (order 1): full steps every `interval` steps; in between, every block extrapolates.

    O(i) = O_a + (i - a) (O_a - O_b) / (a - b), a > b the two last full steps. Needs a graph optimized
    with --taylor (the previous computed output is part of the state).
    interval: larger is faster; extrapolation error grows with the distance to the last full step.
    warmup: leading full steps (TaylorSeer uses 3).
    level: `blocks` extrapolates every block; `stack` extrapolates the whole stack's output in one
        branch (an fcpass extension: the cheapest skip, and the same idea one level up).
    """

    interval: int = 5
    warmup: int = 3
    level: str = "blocks"


class TaylorSeer(Scheduled):
    name = "taylorseer"

    def __init__(self, config: TaylorSeerConfig | None = None) -> None:
        super().__init__(config or TaylorSeerConfig())
        self.full: list[int] = []

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        if not any(s.kind == "prev" for s in plan.states):
            raise FcpassError("taylorseer needs the previous output in the cache state; optimize with --taylor")
        super().reset(plan, num_steps)
        self.full = []

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if self.full_step(step):
            self.full.append(step)
            return out
        a = self.full[-1]
        slope = (step - a) / (a - self.full[-2]) if len(self.full) > 1 else 0.0
        for k in self.skipped:
            out.ctl[k] = CTL_SKIP
            out.mix[k] = (0.0, 0.0, slope)
        return out


@dataclass
class DeltaDiTConfig:
    """Delta-DiT: cache the rear blocks early in sampling and the front blocks late, with `residual`.

    interval: a cached step every `interval` steps is computed in full (2: every other step).
    boundary: fraction of the steps after which the front blocks, not the rear ones, are cached.
    blocks: how many blocks are cached (default: half of them).
    """

    interval: int = 2
    warmup: int = 2
    boundary: float = 0.5
    blocks: int | None = None


class DeltaDiT(Scheduled):
    name = "delta-dit"

    def __init__(self, config: DeltaDiTConfig | None = None) -> None:
        super().__init__(config or DeltaDiTConfig())
        if not 0.0 <= self.config.boundary <= 1.0:
            raise FcpassError(f"Delta-DiT boundary {self.config.boundary} must be in [0, 1]")

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        k = self.config.blocks if self.config.blocks is not None else len(self.skipped) // 2
        if not 0 <= k <= len(self.skipped):
            raise FcpassError(f"Delta-DiT blocks {k} must be between 0 and {len(self.skipped)}")
        self.k = k

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if self.full_step(step) or not self.k:
            return out
        late = step >= self.config.boundary * self.num_steps
        for idx in self.skipped[: self.k] if late else self.skipped[-self.k :]:
            out.ctl[idx] = CTL_SKIP
            out.mix[idx] = APPROX_MIX["residual"]
        return out


def chi2_threshold(sigma2: float, alpha: float, nu: int) -> float:
    """Threshold on delta (not delta^2): sqrt(sigma^2 * chi2_ppf(1 - alpha, nu) / nu)."""
    return math.sqrt(sigma2 * float(chi2.ppf(1.0 - alpha, nu)) / nu)


POLICIES = {"none": NoCache, "fora": Fora, "fastcache": FastCache, "taylorseer": TaylorSeer, "delta-dit": DeltaDiT}
CONFIGS = {"fora": ForaConfig, "fastcache": FastCacheConfig, "taylorseer": TaylorSeerConfig, "delta-dit": DeltaDiTConfig}


def policy_defaults() -> dict[str, dict[str, object]]:
    """Every policy's default settings, as the cache plan records them."""
    return {name: asdict(cls()) for name, cls in CONFIGS.items()}


def make_policy(name: str, **options: object) -> Policy:
    """Build a policy by name from keyword options that match its config's fields (None = default)."""
    if name not in POLICIES:
        raise FcpassError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    config_cls = CONFIGS.get(name)
    if config_cls is None:
        return cls()
    fields = config_cls.__dataclass_fields__
    given = {k: v for k, v in options.items() if v is not None and k in fields}
    return cls(config_cls(**given))  # type: ignore[call-arg]

