"""Host-loop policies: which regions compute, skip or decide at each step."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.stats import chi2

from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import APPROX_MIX, MIX_WIDTH, CachePlan, RegionSpec, StateSpec
from runtimes.policies import FastCache, FastCacheConfig, Fora, ForaConfig, NoCache, chi2_threshold, make_policy


def _plan(blocks: int = 3, sigma2: list[float | None] | None = None, n: int = 4, d: int = 8) -> CachePlan:
    regions, states = [], []
    regions.append(RegionSpec("stack", 0, list(range(blocks)), None, ["h"], ["o"], [0], 100, 1))
    states.append(StateSpec("fc.stack.in0", "fc.stack.in0.next", "stack", "in", "h", [2, n, d], "float32"))
    for b in range(blocks):
        cal = {"sigma2": (sigma2 or [0.01] * blocks)[b]}
        regions.append(RegionSpec(f"block{b}", b + 1, [b], "stack", [f"h{b}"], [f"o{b}"], [0], 10, 1, cal))
        states.append(StateSpec(f"fc.block{b}.in0", f"fc.block{b}.in0.next", f"block{b}", "in", f"h{b}", [2, n, d], "float32"))
    return CachePlan(regions, states, {"latent": "x"}, ["out"], 1000, "test")


def test_none_computes_everything() -> None:
    p = NoCache()
    p.reset(_plan(), 10)
    c = p.controls(5)
    assert not c.ctl.any() and c.ctl.shape == (4,) and c.mix.shape == (4, MIX_WIDTH)


def test_fora_schedule_reuses_blocks_between_full_steps() -> None:
    p = Fora(ForaConfig(interval=3, warmup=2))
    p.reset(_plan(), 12)
    full = [i for i in range(12) if not p.controls(i).ctl.any()]
    assert full == [0, 1, 2, 5, 8, 11]  # warm-up, every 3rd after it, the last step
    c = p.controls(3)
    assert c.ctl.tolist() == [0, 1, 1, 1]  # the stack computes; each block inside it is skipped
    assert tuple(c.mix[1]) == APPROX_MIX["reuse"]


def test_chi2_threshold_matches_the_formula() -> None:
    assert chi2_threshold(0.04, 0.05, 10) == pytest.approx(math.sqrt(0.04 * chi2.ppf(0.95, 10) / 10))
    # Smaller alpha -> larger quantile -> higher threshold (more skipping).
    assert chi2_threshold(0.04, 0.01, 10) > chi2_threshold(0.04, 0.05, 10)


@pytest.mark.parametrize("dof, nu", [("elements", 4 * 8), ("tokens", 4)])
def test_fastcache_thresholds_use_calibrated_sigma_and_dof(dof: str, nu: int) -> None:
    p = FastCache(FastCacheConfig(alpha=0.1, dof=dof, warmup=2))
    p.reset(_plan(sigma2=[0.01, 0.04, None]), 10)
    c = p.controls(3)
    assert c.ctl.tolist() == [0, 2, 2, 0]  # block2 is uncalibrated: never skipped
    assert c.thr[1] == pytest.approx(chi2_threshold(0.01, 0.1, nu))
    assert c.thr[2] == pytest.approx(chi2_threshold(0.04, 0.1, nu))
    assert tuple(c.mix[1]) == APPROX_MIX["linear"]


def test_fastcache_warmup_last_step_and_max_skips() -> None:
    p = FastCache(FastCacheConfig(warmup=2, max_skips=2))
    plan = _plan()
    p.reset(plan, 8)
    assert not p.controls(0).ctl.any() and not p.controls(1).ctl.any() and not p.controls(7).ctl.any()
    skip_all = np.array([0, 1, 1, 1], np.float32)
    stat = np.zeros((4, 2), np.float32)
    assert p.controls(2).ctl[1] == 2
    p.observe(2, stat, skip_all)
    assert p.controls(3).ctl[1] == 2
    p.observe(3, stat, skip_all)
    assert p.controls(4).ctl[1] == 0  # skipped twice in a row: must compute
    p.observe(4, stat, np.array([0, 0, 1, 1], np.float32))
    assert p.controls(5).ctl.tolist() == [0, 2, 0, 0]
    p.reset(plan, 8)  # a new trajectory forgets the streaks
    assert p.controls(2).ctl.tolist() == [0, 2, 2, 2]


def test_fastcache_refuses_an_uncalibrated_graph() -> None:
    with pytest.raises(FcpassError, match="--calibrate"):
        FastCache().reset(_plan(sigma2=[None, None, None]), 10)
    with pytest.raises(FcpassError, match="calibrated region in stack and this graph has none"):
        FastCache(FastCacheConfig(regions="stack")).reset(_plan(), 10)  # the blocks have sigma^2, the stack none


def test_fastcache_says_why_a_calibration_left_nothing_to_skip() -> None:
    """Calibrated, but no step's approximation came within eps: no sigma^2, so nothing the test could skip."""
    plan = _plan(sigma2=[None, None, None])
    plan.calibration = {"trajectories": 1, "steps": 4, "eps": 0.05}
    with pytest.raises(FcpassError, match=r"no calibrated blocks: in calibration \(1 trajectories x 4 steps\) no "
                                          r"approximation there came within --calib-eps 0.05"):
        FastCache().reset(plan, 10)


def test_make_policy_validates_names_and_options() -> None:
    assert isinstance(make_policy("fora", interval=4, alpha=None), Fora)
    with pytest.raises(FcpassError, match="unknown policy"):
        make_policy("teacup")
    with pytest.raises(FcpassError, match="alpha"):
        make_policy("fastcache", alpha=1.5)


@pytest.mark.parametrize("spec, message", [
    ("fastcache:alpha=abc", "fastcache option alpha='abc' is not a finite number; pass e.g. alpha=0.05"),
    ("fastcache:max_skips=2.5", "max_skips=2.5 is not a whole number >= 0; pass e.g. max_skips=3"),
    ("fastcache:warmup=-1", "warmup=-1 is not a whole number >= 0"),
    ("fastcache:alpha=NaN", "alpha=nan is not a finite number"),
    ("fastcache:sigma_scale=-1", "sigma_scale -1.0 must be > 0"),
    ("fastcache:motion=2", "motion=2 is not 0 or 1; pass e.g. motion=1"),
    ("fastcache:regions=3", "regions=3 is not a word"),
    ("teacache:coefficients=abc", "coefficients='abc' is not a list of numbers"),
    ("delta-dit:blocks=x", "blocks='x' is not a whole number"),
])
def test_a_spec_value_of_the_wrong_type_is_refused_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(FcpassError, match=re.escape(message)):
        make_policy(spec)


def test_spec_values_take_their_option_types() -> None:
    """JSON gives 4 for `interval=4.0` and 1 for `sigma_scale=1`: each becomes its field's type."""
    fc = make_policy("fastcache:sigma_scale=1,max_skips=4.0,motion=1").config
    assert (type(fc.sigma_scale), type(fc.max_skips), fc.motion) == (float, int, True)
    assert make_policy("teacache:coefficients=[1,0.5]").config.coefficients == (1.0, 0.5)


def test_fastcache_regions_test_the_stack_first_and_count_unreached_blocks_as_skipped() -> None:
    plan = _plan()
    plan.regions[0].calibration = {"sigma2": 0.09}
    p = FastCache(FastCacheConfig(regions="stack,blocks", max_skips=2, warmup=0))
    p.reset(plan, 10)
    c = p.controls(1)
    assert c.ctl.tolist() == [2, 2, 2, 2]
    assert c.thr[0] == pytest.approx(chi2_threshold(0.09, 0.05, 4 * 8))
    stack_skipped = np.array([1, -1, -1, -1], np.float32)
    p.observe(1, np.zeros((4, 2)), stack_skipped)
    p.observe(2, np.zeros((4, 2)), stack_skipped)
    assert p.controls(3).ctl.tolist() == [0, 0, 0, 0]  # every region reached max_skips
    with pytest.raises(FcpassError, match="regions"):
        FastCache(FastCacheConfig(regions="stack,bogus")).reset(plan, 10)
    with pytest.raises(FcpassError, match="not in this graph"):
        FastCache(FastCacheConfig(regions="tail,blocks")).reset(plan, 10)


def test_fora_at_stack_level_skips_one_region() -> None:
    p = Fora(ForaConfig(interval=2, warmup=1, regions="stack"))
    p.reset(_plan(), 6)
    assert p.controls(2).ctl.tolist() == [1, 0, 0, 0]
    assert not p.controls(1).ctl.any()


def _taylor_plan() -> CachePlan:
    plan = _plan()
    plan.states.append(StateSpec("fc.block0.prev0", "fc.block0.prev0.next", "block0", "prev", "o0", [2, 4, 8], "float32"))
    return plan


def test_taylorseer_extrapolates_from_the_two_last_full_steps() -> None:
    from runtimes.policies import TaylorSeer, TaylorSeerConfig

    p = TaylorSeer(TaylorSeerConfig(interval=3, warmup=2, phase=0))
    p.reset(_taylor_plan(), 10)
    assert not p.controls(0).ctl.any() and not p.controls(1).ctl.any() and not p.controls(2).ctl.any()
    c = p.controls(3)  # full steps so far: 0, 1, 2 -> a = 2, b = 1
    assert c.ctl.tolist() == [0, 1, 1, 1] and c.mix[1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert p.controls(4).mix[2].tolist() == [0.0, 0.0, 2.0, 0.0]
    assert not p.controls(5).ctl.any()  # full: a = 5, b = 2
    assert p.controls(6).mix[3][2] == pytest.approx(1 / 3)
    with pytest.raises(FcpassError, match="--taylor"):
        TaylorSeer().reset(_plan(), 10)


def _full_steps(config: object, steps: int) -> list[int]:
    from runtimes.policies import TaylorSeer

    p = TaylorSeer(config)  # type: ignore[arg-type]
    p.reset(_taylor_plan(), steps)
    return [i for i in range(steps) if not p.controls(i).ctl.any()]


def test_taylorseer_phase_places_the_first_full_step_after_the_warmup() -> None:
    from runtimes.policies import TaylorSeerConfig

    # diffusers' TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2) computes 0, 1, 3, 6, 9
    assert _full_steps(TaylorSeerConfig(interval=3, warmup=2, last=False), 11) == [0, 1, 3, 6, 9]
    assert _full_steps(TaylorSeerConfig(interval=3, warmup=2), 11) == [0, 1, 3, 6, 9, 10]
    assert _full_steps(TaylorSeerConfig(interval=3, warmup=2, phase=2, last=False), 11) == [0, 1, 4, 7, 10]
    assert _full_steps(TaylorSeerConfig(interval=3, warmup=0, phase=1, last=False), 5) == [0, 1, 4]  # step 0 always
    with pytest.raises(FcpassError, match="phase 3 must be in"):
        _full_steps(TaylorSeerConfig(interval=3, phase=3), 10)


def test_delta_dit_caches_rear_blocks_early_and_front_blocks_late() -> None:
    from runtimes.policies import DeltaDiT, DeltaDiTConfig

    p = DeltaDiT(DeltaDiTConfig(interval=2, warmup=1, boundary=0.5, blocks=2))
    p.reset(_plan(), 10)
    assert p.controls(2).ctl.tolist() == [0, 0, 1, 1]  # early: rear blocks 1, 2
    assert not p.controls(3).ctl.any()
    assert p.controls(6).ctl.tolist() == [0, 1, 1, 0]  # late: front blocks 0, 1
    assert tuple(p.controls(6).mix[1]) == APPROX_MIX["residual"]


def test_fastcache_taylor1_uses_each_regions_own_computed_steps() -> None:
    p = FastCache(FastCacheConfig(approx="taylor1", warmup=2))
    p.reset(_taylor_plan(), 12)
    stat = np.zeros((4, 2))
    for step in (0, 1):
        p.controls(step)
        p.observe(step, stat, np.zeros(4, np.float32))
    assert p.controls(2).mix[1].tolist() == [0.0, 0.0, 1.0, 0.0]  # a = 1, b = 0
    p.observe(2, stat, np.array([0, 1, 0, 0], np.float32))  # block0 skipped at 2; block1 computed
    c = p.controls(3)
    assert c.mix[1].tolist() == [0.0, 0.0, 2.0, 0.0]  # block0: a = 1, b = 0 -> (3 - 1) / 1
    assert c.mix[2].tolist() == [0.0, 0.0, 1.0, 0.0]  # block1: a = 2, b = 1
    with pytest.raises(FcpassError, match="--taylor"):
        FastCache(FastCacheConfig(approx="taylor1")).reset(_plan(), 10)
