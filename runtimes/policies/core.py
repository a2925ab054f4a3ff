"""Cache policies: the host-loop rules that fill a compiled graph's controls at every step.

The graph holds the mechanism (regions, approximations, the statistic and the in-graph test); a
policy only says, before each step, which regions compute (ctl 0), skip (1) or decide in the graph
(2, skip iff every sample's statistic <= thr), and with which approximation. Changing a threshold
or the policy never needs a rebuild. Every policy computes the first `warmup` steps and the last
(TaylorSeer with `last = 0` forecasts the last).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import APPROX_MIX, CTL_DECIDE, CTL_PROBE, CTL_SKIP, MIX_WIDTH, CachePlan, RegionSpec

log = logging.getLogger(__name__)


@dataclass
class StepControls:
    ctl: np.ndarray  # int64 (R,)
    thr: np.ndarray  # float32 (R,)
    mix: np.ndarray  # float32 (R, MIX_WIDTH)
    motion: bool = False  # a computing stack runs on its motion tokens (graphs optimized with --motion-ratio)


def taylor1_mix(step: int, computed: list[int]) -> tuple[float, ...]:
    """`taylor1`'s mix row at `step`: slope (step - a) / (a - b) from the two last computed steps a > b;
    `reuse` (slope 0) until two steps have been computed."""
    if len(computed) < 2:
        return APPROX_MIX["reuse"]
    a, b = computed[-1], computed[-2]
    return (0.0, 0.0, (step - a) / (a - b), 0.0)


class Policy(ABC):
    name: str = "policy"
    #: Its test's thresholds come from calibration (sigma^2, TeaCache's polynomial, MagCache's ratios).
    calibrated_test: bool = False

    def __init__(self) -> None:
        self.plan: CachePlan | None = None
        self.num_steps = 0
        # The regions this policy may ever skip, leave to the graph or run on fewer tokens (None: any).
        # The others always compute, so the host keeps no cache state for them; set by reset().
        self.live: set[int] | None = None

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        """Start a new trajectory; subclasses clear their counters here and narrow `live` where they can."""
        self.plan = plan
        self.num_steps = num_steps
        self.live = None

    def base(self) -> StepControls:
        assert self.plan is not None, "reset() must be called before controls()"
        r = len(self.plan.regions)
        return StepControls(np.zeros(r, np.int64), np.zeros(r, np.float32), np.zeros((r, MIX_WIDTH), np.float32))

    @abstractmethod
    def controls(self, step: int) -> StepControls: ...

    def observe(self, step: int, stat: np.ndarray, skip: np.ndarray) -> None:
        """See what the graph did at `step` (stat (R, B), skip (R,)); default: nothing to learn."""

    def reads_calibration(self) -> bool:
        """Whether what it does rests on the graph's calibration, which describes one sampler's steps: a calibrated
        test, or the fitted approximations."""
        return self.calibrated_test or getattr(getattr(self, "config", None), "approx", None) in ("linear", "affine")

    def describe(self) -> dict[str, object]:
        config = getattr(self, "config", None)
        return {"name": self.name, **(config.__dict__ if config is not None else {})}


class Scheduled(Policy):
    """A fixed schedule: full steps during `warmup`, at the last step and every `interval` steps after
    the warm-up; in between, `skipped` regions (every block, or the stack with `regions = "stack"`) skip."""

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
        regions = getattr(self.config, "regions", "blocks")
        if regions not in ("blocks", "stack"):
            raise FcpassError(f"{self.name} regions {regions!r} unknown; use blocks or stack")
        self.skipped = [plan.region("stack").index] if regions == "stack" else _block_indices(plan)
        self.live = set(self.skipped)


class NoCache(Policy):
    """Every region computes: the compiled graph then equals the original model."""

    name = "none"

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        self.live = set()

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
    regions: `blocks` skips every block region; `stack` skips the whole stack in one branch, which for
        `reuse` and `residual` gives the same result (the per-block approximations telescope) at a
        fraction of the per-step cost.
    """

    interval: int = 3
    warmup: int = 2
    approx: str = "reuse"
    regions: str = "blocks"


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
    approx: `linear` (the calibrated W, b) by default; `residual` or `reuse` to compare; `affine`, the
        paper's literal O = H A + c (fitted too, but blind to the cached reference); `taylor1`
        (an fcpass extension; graph optimized with --taylor) extrapolates from the region's own two last
        computed steps a > b: O = O_a + (i - a)(O_a - O_b)/(a - b).
    sigma_scale: multiplies every calibrated sigma^2 (a single knob for tuning speed against quality).
    motion: spatial token selection (ALGORITHMS 2b; graph optimized with --motion-ratio): after the
        warm-up, a step that computes the stack runs only its k most salient tokens through the blocks
        and gives the others the stack's approximation. Blocks nested in the stack are not tested then.
    motion_full_every: with motion, every n-th computing step runs all tokens (0: only the warm-up
        and the last step do), which refreshes the static tokens' references.
    regions: which region sets take the test. `blocks` is the paper (one test per block). Adding `stack`
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
    regions: str = "blocks"
    motion: bool = False
    motion_full_every: int = 0


class FastCache(Policy):
    name = "fastcache"
    calibrated_test = True

    def __init__(self, config: FastCacheConfig | None = None) -> None:
        super().__init__()
        self.config = config or FastCacheConfig()
        c = self.config
        if not 0 < c.alpha < 1:
            raise FcpassError(f"--alpha {c.alpha} must be in (0, 1)")
        if not c.sigma_scale > 0:
            raise FcpassError(f"fastcache sigma_scale {c.sigma_scale} must be > 0 (it scales the calibrated variances)")
        if c.dof not in ("elements", "tokens"):
            raise FcpassError(f"--dof {c.dof!r} unknown; use elements or tokens")
        if c.approx not in APPROX_MIX:
            raise FcpassError(f"approximation {c.approx!r} unknown; use one of {', '.join(APPROX_MIX)}")
        self.streak: dict[int, int] = {}
        self.thresholds: dict[int, float] = {}

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        regions = {x.strip() for x in self.config.regions.split(",") if x.strip()}
        unknown = regions - {"blocks", "tail", "stack"}
        if unknown:
            raise FcpassError(f"fastcache regions {sorted(unknown)} unknown; use blocks, tail, stack (comma-separated)")
        tested = [r for r in plan.regions if r.region_set in regions]
        missing = regions - {r.region_set for r in plan.regions}
        if missing:
            raise FcpassError(f"fastcache regions {sorted(missing)} are not in this graph; optimize with --regions including them")
        self.streak = {r.index: 0 for r in plan.regions}
        self.computed: dict[int, list[int]] = {r.index: [] for r in plan.regions}
        if self.config.approx == "taylor1" and not any(s.kind == "prev" for s in plan.states):
            raise FcpassError("fastcache --approx taylor1 needs the previous outputs; optimize with --taylor")
        if self.config.motion and not plan.motion:
            raise FcpassError("fastcache motion=1 needs motion tokens in the graph; optimize with --motion-ratio RHO")
        if self.config.motion_full_every < 0:
            raise FcpassError(f"fastcache motion_full_every {self.config.motion_full_every} must be >= 0")
        self.motion_region = plan.region(plan.motion["region"]).index if plan.motion else -1
        self.motion_steps = 0  # computing steps run on the motion tokens since the last full one
        self.asked_motion = False
        self.thresholds = {}
        for region in tested:
            sigma2 = region.calibration.get("sigma2")
            if sigma2 is not None:
                nu = self._dof(plan, region.name)
                self.thresholds[region.index] = chi2_threshold(sigma2 * self.config.sigma_scale, self.config.alpha, nu)
        blocks = "blocks" in regions and not any(plan.regions[k].region_set == "blocks" for k in self.thresholds)
        if blocks or not (self.thresholds or self.config.motion):  # nothing the test could ever skip
            what = "blocks" if blocks else f"region in {self.config.regions}"
            if not plan.calibration:
                raise FcpassError(f"fastcache needs calibrated {what} and this graph has none; run fcpass optimize "
                                  "with --calibrate N")
            c = plan.calibration  # calibrated, but no step's approximation held: sigma^2 has no sample
            raise FcpassError(
                f"fastcache found no calibrated {what}: in calibration ({c['trajectories']} trajectories x "
                f"{c['steps']} steps) no approximation there came within --calib-eps {c['eps']} of its output; "
                "optimize again with more trajectories or steps, or a larger --calib-eps")
        self.live = set(self.thresholds) | ({self.motion_region} if self.config.motion else set())

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
        every = self.config.motion_full_every
        out.motion = self.config.motion and not (every and self.motion_steps >= every - 1)
        self.asked_motion = out.motion
        for k, thr in self.thresholds.items():
            if self.streak[k] >= self.config.max_skips:
                continue
            out.ctl[k] = CTL_DECIDE
            out.thr[k] = thr
            out.mix[k] = self._mix(k, step)
        return out

    def _mix(self, k: int, step: int) -> tuple[float, ...]:
        if self.config.approx != "taylor1":
            return APPROX_MIX[self.config.approx]
        return taylor1_mix(step, self.computed[k])

    def observe(self, step: int, stat: np.ndarray, skip: np.ndarray) -> None:
        if self.motion_region >= 0 and skip[self.motion_region] == 0:
            self.motion_steps = self.motion_steps + 1 if self.asked_motion else 0
        self.asked_motion = False
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
    phase: the first full step after the warm-up is step `warmup + phase`, then every `interval` steps;
        the steps before it are forecast from the last two warm-up steps. 1 is diffusers' schedule
        (`disable_cache_before_step = warmup`), the same samples as its hook at every interval.
        Where the full steps fall matters as much as how many there are: the output moves unevenly
        from step to step, and a slope carries its two steps' unevenness over the whole next interval.
        On the bundled model (unclipped DDIM, 50 steps, 20 samples) phase 1 against 0 holds 42.1 / 37.7
        / 35.8 dB against 40.0 / 36.0 / 34.9 at interval 7 / 8 / 10, but 46.9 / 39.9 against 54.8 /
        46.7 at interval 3 / 5; the best phase holds 43.6 / 41.4 / 37.0 at 7 / 8 / 10 and 34.8 at 12
        (phase 6). A knob for the search, not a constant: no one phase is best at every interval.
    last: compute the last step too. Under a DDIM-type sampler its output hardly reaches the sample
        (bundled model: the same PSNR to 0.001 dB with it forecast, one full step fewer); under flow
        matching each step's output counts alike.
    regions: `blocks` extrapolates every block; `stack` extrapolates the whole stack's output in one
        branch (an fcpass extension: the cheapest skip, and the same idea one level up).
    """

    interval: int = 5
    warmup: int = 3
    regions: str = "blocks"
    phase: int = 1
    last: bool = True


class TaylorSeer(Scheduled):
    name = "taylorseer"

    def __init__(self, config: TaylorSeerConfig | None = None) -> None:
        super().__init__(config or TaylorSeerConfig())
        if not 0 <= self.config.phase < self.config.interval:
            raise FcpassError(f"taylorseer phase {self.config.phase} must be in [0, interval - 1 = {self.config.interval - 1}]")
        self.full: list[int] = []

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        if not any(s.kind == "prev" for s in plan.states):
            raise FcpassError("taylorseer needs the previous output in the cache state; optimize with --taylor")
        super().reset(plan, num_steps)
        self.full = []

    def full_step(self, step: int) -> bool:
        c = self.config
        if step < c.warmup or not self.full or (c.last and step == self.num_steps - 1):
            return True  # the first step always computes: nothing is cached to forecast from
        return step >= c.warmup + c.phase and (step - c.warmup - c.phase) % c.interval == 0

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if self.full_step(step):
            self.full.append(step)
            return out
        mix = taylor1_mix(step, self.full)
        for k in self.skipped:
            out.ctl[k] = CTL_SKIP
            out.mix[k] = mix
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


def _probed_region(plan: CachePlan, name: str, probe: str, policy: str) -> RegionSpec:
    regions = [r for r in plan.regions if r.name == name]
    if not regions:
        raise FcpassError(f"{policy} needs the {name!r} region; optimize with --regions including {name}")
    if regions[0].probe != probe:
        raise FcpassError(f"{policy} needs the {probe} probe on region {name!r}, which this graph lacks "
                          "(optimized with --no-probes, or block 0 has no LayerNormalization on its input); "
                          "re-optimize without --no-probes")
    return regions[0]


@dataclass
class FBCacheConfig:
    """First-block cache (FBCache; diffusers' FirstBlockCache): block 0 always runs; the rest of the
    stack is skipped with `residual` while d = rel_L1 of block 0's residual against its value at the
    last computed step stays below `threshold`. The test runs in the graph (the `tail` region's probe).

    threshold: diffusers' default 0.05 (FLUX 0.08); larger is faster and drifts more.
    warmup: leading steps always computed (the first has no reference anyway).
    """

    threshold: float = 0.05
    warmup: int = 1


class FBCache(Policy):
    name = "fbcache"

    def __init__(self, config: FBCacheConfig | None = None) -> None:
        super().__init__()
        self.config = config or FBCacheConfig()
        if self.config.threshold < 0:
            raise FcpassError(f"fbcache threshold {self.config.threshold} must be >= 0")

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        self.tail = _probed_region(plan, "tail", "head_residual", self.name).index
        self.live = {self.tail}

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if step < self.config.warmup or step == self.num_steps - 1:
            return out
        out.ctl[self.tail] = CTL_PROBE
        out.thr[self.tail] = self.config.threshold
        out.mix[self.tail] = APPROX_MIX["residual"]
        return out


@dataclass
class TeaCacheConfig:
    """TeaCache: d = rel_L1 of block 0's modulated input against the previous step's; the stack is
    skipped (`residual`) while the accumulated rescaled change A + poly(d) stays below `threshold`;
    a computed step resets A. poly is fitted per model (`fcpass calibrate --for teacache`, or
    `fcpass optimize --calibrate N`), so `threshold` means the same output change on any model.

    threshold: TeaCache's rel_l1_thresh; larger is faster (0.1-0.3 is near-lossless on its models).
    warmup: leading steps always computed. The last step is always computed.
    coefficients: the polynomial, highest degree first; None takes the calibrated one from the plan.
    """

    threshold: float = 0.3
    warmup: int = 1
    coefficients: tuple[float, ...] | None = None


class TeaCache(Policy):
    """The in-graph test is skip iff d <= thr; the host turns A + poly(d) < threshold into a bound
    on d (the first crossing of poly(d) = threshold - A above 0), so the graph needs no polynomial."""

    name = "teacache"
    calibrated_test = True

    def __init__(self, config: TeaCacheConfig | None = None) -> None:
        super().__init__()
        self.config = config or TeaCacheConfig()
        self.accumulated = 0.0
        self.poly = np.poly1d([1.0, 0.0])

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        stack = _probed_region(plan, "stack", "modulated_input", self.name)
        self.stack = stack.index
        self.live = {self.stack}
        coefficients = self.config.coefficients or stack.calibration.get("teacache", {}).get("coefficients")
        if not coefficients:
            raise FcpassError("teacache needs its rescaling polynomial; run: fcpass calibrate MODEL -o OUT --for teacache "
                              "(or optimize with --calibrate N), or give coefficients")
        self.poly = np.poly1d(np.asarray(coefficients, dtype=np.float64))
        self.accumulated = 0.0

    def bound(self, budget: float) -> float:
        """The largest d with poly(x) < budget for every x in [0, d]; -1 when there is none."""
        if self.poly(0.0) >= budget:
            return -1.0
        roots = (self.poly - budget).roots
        real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
        return float(min(real)) if real else float("inf")

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if step < self.config.warmup or step == self.num_steps - 1:
            return out
        out.ctl[self.stack] = CTL_PROBE
        out.thr[self.stack] = self.bound(self.config.threshold - self.accumulated)
        out.mix[self.stack] = APPROX_MIX["residual"]
        return out

    def observe(self, step: int, stat: np.ndarray, skip: np.ndarray) -> None:
        if skip[self.stack] == 1:
            change = float(np.max(stat[self.stack]))
            if not math.isfinite(change):  # a change that is not a number vouches for no skip: compute next
                log.warning("teacache: a non-finite statistic at step %d; the next step computes", step)
                self.accumulated = math.inf
                return
            # A fitted poly can dip below 0 near d = 0; a change never makes up for an earlier one.
            self.accumulated += max(float(self.poly(change)), 0.0)
        else:
            self.accumulated = 0.0


@dataclass
class MagCacheConfig:
    """MagCache: the stack residual's magnitude ratio gamma_i = mean_token ||R(i)|| / ||R(i-1)|| is
    calibrated once per model; at run time Gamma *= gamma_i and err += |1 - Gamma| over consecutive
    skipped steps, and the stack is skipped (`residual`) while err <= threshold and at most
    `max_skips` steps in a row. Decided on the host alone: no statistic is needed.

    threshold: MagCache's default 0.06; larger is faster.
    max_skips: K, consecutive skips before a computed step.
    retention: the leading fraction of steps always computed (0.2; the first step always is).
    """

    threshold: float = 0.06
    max_skips: int = 3
    retention: float = 0.2


class MagCache(Policy):
    name = "magcache"
    calibrated_test = True

    def __init__(self, config: MagCacheConfig | None = None) -> None:
        super().__init__()
        self.config = config or MagCacheConfig()
        if not 0.0 <= self.config.retention <= 1.0:
            raise FcpassError(f"magcache retention {self.config.retention} must be in [0, 1]")

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        regions = [r for r in plan.regions if r.name == "stack"]
        if not regions:
            raise FcpassError("magcache needs the 'stack' region; optimize with --regions including stack")
        self.stack = regions[0].index
        self.live = {self.stack}
        ratios = regions[0].calibration.get("magcache", {}).get("ratios")
        if not ratios:
            raise FcpassError("magcache needs calibrated magnitude ratios; run: fcpass calibrate MODEL -o OUT --for magcache "
                              "(or optimize with --calibrate N)")
        self.ratios = resample_ratios(np.asarray(ratios, dtype=np.float64), num_steps)
        self.gamma, self.err, self.run = 1.0, 0.0, 0

    def controls(self, step: int) -> StepControls:
        out = self.base()
        if step < max(1, int(self.config.retention * self.num_steps)) or step == self.num_steps - 1:
            return out
        self.gamma *= float(self.ratios[step])
        self.err += abs(1.0 - self.gamma)
        self.run += 1
        if self.err <= self.config.threshold and self.run <= self.config.max_skips:
            out.ctl[self.stack] = CTL_SKIP
            out.mix[self.stack] = APPROX_MIX["residual"]
        else:
            self.gamma, self.err, self.run = 1.0, 0.0, 0
        return out


def resample_ratios(ratios: np.ndarray, steps: int) -> np.ndarray:
    """Calibrated per-step ratios mapped to another step count by nearest index (MagCache's nearest_interp)."""
    if steps == len(ratios):
        return ratios
    if steps == 1:
        return ratios[-1:]
    idx = np.round(np.arange(steps) * (len(ratios) - 1) / (steps - 1)).astype(int)
    return ratios[idx]


def chi2_threshold(sigma2: float, alpha: float, nu: int) -> float:
    """Threshold on delta (not delta^2): sqrt(sigma^2 * chi2_ppf(1 - alpha, nu) / nu)."""
    return math.sqrt(sigma2 * float(chi2.ppf(1.0 - alpha, nu)) / nu)
