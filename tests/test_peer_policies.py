"""FBCache, TeaCache and MagCache: host rules on hand-made plans, then end to end on a calibrated graph."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpass.calibrate import CalibrationOptions, calibrate_peers
from fcpass.cli import main
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import APPROX_MIX, CTL_PROBE, CTL_SKIP, CachePlan, RegionSpec, read_plan
from fcpass.sampling import load_denoiser
from runtimes.policies import (
    FBCache,
    MagCache,
    MagCacheConfig,
    TeaCache,
    TeaCacheConfig,
    make_policy,
    parse_policy_spec,
    resample_ratios,
)
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import SCHEDULER_CONFIG, calibration_setup


def _plan(calibration: dict | None = None) -> CachePlan:
    stack = RegionSpec("stack", 0, [0, 1, 2], None, ["h"], ["o"], [0], 100, 1, calibration or {}, "modulated_input")
    block0 = RegionSpec("block0", 1, [0], "stack", ["h"], ["o0"], [0], 30, 1)
    tail = RegionSpec("tail", 2, [1, 2], "stack", ["o0"], ["o"], [0], 70, 1, {}, "head_residual")
    return CachePlan([stack, block0, tail], [], {"latent": "x"}, ["out"], 1000, "test")


def test_fbcache_tests_the_first_block_residual_on_the_tail() -> None:
    p = make_policy("fbcache:threshold=0.1")
    assert isinstance(p, FBCache)
    p.reset(_plan(), 6)
    assert not p.controls(0).ctl.any() and not p.controls(5).ctl.any()  # warm-up and last step
    c = p.controls(2)
    assert c.ctl.tolist() == [0, 0, CTL_PROBE]
    assert c.thr[2] == pytest.approx(0.1) and tuple(c.mix[2]) == APPROX_MIX["residual"]


def test_teacache_bound_inverts_the_polynomial_at_its_first_crossing() -> None:
    p = TeaCache(TeaCacheConfig(threshold=0.5, coefficients=(2.0, -1.0, 0.5, 0.0)))  # 2x^3 - x^2 + 0.5x
    p.reset(_plan(), 10)
    for budget in (0.01, 0.2, 0.5, 3.0):
        d = p.bound(budget)
        assert p.poly(d) == pytest.approx(budget)
        assert (p.poly(np.linspace(0, d, 50)[:-1]) < budget).all()
    assert p.bound(0.0) == -1.0  # poly(0) = 0 is not below a zero budget: never skip
    assert TeaCache(TeaCacheConfig(coefficients=(-1.0, 1.0))).__class__  # decreasing polys are legal too


def test_teacache_polynomial_from_too_few_points_lowers_its_degree_quietly() -> None:
    """A short calibration gives fewer distinct points than degree 4 needs: no RankWarning reaches the
    user, and the fit is the monotone one of a degree the points determine."""
    from fcpass.peer_calibration import TEACACHE_DEGREE, _monotone_polyfit

    x, y = np.array([0.1, 0.2, 0.2, 0.4]), np.array([0.05, 0.12, 0.11, 0.30])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coefficients = _monotone_polyfit(x, y, TEACACHE_DEGREE)
    assert len(coefficients) - 1 < len(np.unique(x))
    grid = np.linspace(0, 0.4, 50)
    assert (np.diff(np.polyval(coefficients, grid)) >= 0).all() and np.polyval(coefficients, 0) >= 0
    assert np.abs(np.polyval(coefficients, x) - y).max() < 0.02


def test_teacache_accumulates_while_skipping_and_resets_on_compute() -> None:
    p = TeaCache(TeaCacheConfig(threshold=0.3, coefficients=(1.0, 0.0), warmup=1))  # poly(d) = d
    p.reset(_plan(), 10)
    assert not p.controls(0).ctl.any()
    c = p.controls(1)
    assert c.ctl[0] == CTL_PROBE and c.thr[0] == pytest.approx(0.3)
    stat = np.zeros((3, 2), np.float32)
    stat[0] = [0.1, 0.05]  # the batch counts its largest sample
    p.observe(1, stat, np.array([1, -1, -1], np.float32))
    assert p.controls(2).thr[0] == pytest.approx(0.2)
    p.observe(2, stat, np.array([0, 0, 0], np.float32))
    assert p.controls(3).thr[0] == pytest.approx(0.3)
    q = TeaCache(TeaCacheConfig(threshold=0.3, coefficients=(1.0, -0.05)))  # poly(d) = d - 0.05 < 0 for small d
    q.reset(_plan(), 10)
    stat[0] = [0.01, 0.01]
    q.observe(1, stat, np.array([1, -1, -1], np.float32))
    assert q.accumulated == 0.0  # a negative rescaled change never pays back an earlier one


def test_teacache_needs_a_polynomial_and_the_probe() -> None:
    with pytest.raises(FcpassError, match="calibrate MODEL -o OUT --for teacache"):
        TeaCache().reset(_plan(), 10)
    plan = _plan()
    plan.regions[0].probe = None
    with pytest.raises(FcpassError, match="modulated_input probe"):
        TeaCache(TeaCacheConfig(coefficients=(1.0, 0.0))).reset(plan, 10)
    plan.regions = plan.regions[1:]
    with pytest.raises(FcpassError, match="--regions including stack"):
        TeaCache(TeaCacheConfig(coefficients=(1.0, 0.0))).reset(plan, 10)


def test_magcache_follows_the_accumulated_ratio_error() -> None:
    ratios = [1.0, 1.0, 0.99, 0.98, 0.97, 0.9, 0.99, 0.99, 0.99, 0.99]
    p = MagCache(MagCacheConfig(threshold=0.05, max_skips=2, retention=0.2))
    p.reset(_plan({"magcache": {"ratios": ratios}}), 10)
    skipped = [int(p.controls(i).ctl[0] == CTL_SKIP) for i in range(10)]
    # Steps 0-1 retained. 2: G=.99 e=.01 skip; 3: G=.9702 e=.0398 skip; 4: G=.941 e=.0988 > .05 compute;
    # 5: G=.9 e=.1 compute; 6: .99 skip; 7: G=.9801 e=.0299 skip; 8: third in a row: compute; 9: last.
    assert skipped == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    with pytest.raises(FcpassError, match="--for magcache"):
        MagCache().reset(_plan(), 10)


def test_resample_ratios_is_nearest_index() -> None:
    r = np.arange(50, dtype=float)
    assert resample_ratios(r, 50) is r
    np.testing.assert_array_equal(resample_ratios(r, 5), [0, 12, 24, 37, 49])  # round half to even, like numpy
    assert resample_ratios(r, 1).tolist() == [49]


def test_policy_specs_parse_and_unknown_options_are_named() -> None:
    assert parse_policy_spec("fastcache:alpha=0.1,regions=stack,blocks") == ("fastcache", {"alpha": 0.1, "regions": "stack,blocks"})
    assert parse_policy_spec("teacache:coefficients=[1,0]")[1] == {"coefficients": [1, 0]}
    with pytest.raises(FcpassError, match="fbcache has no option alpha; its options are: threshold, warmup"):
        make_policy("fbcache:alpha=0.1")
    with pytest.raises(FcpassError, match="needs a value"):
        make_policy("fbcache:threshold")


# --- end to end on the calibrated tiny DiT --------------------------------------------------------

def _run(path: Path, policy: str) -> tuple[np.ndarray, list[dict]]:
    den = load_denoiser(path, policy, {})
    req = SampleRequest(classes=[1, 2], steps=6, guidance_scale=1.5, uncond_class=10)
    result = sample(den, scheduler_from_config(SCHEDULER_CONFIG), req, progress=False)
    return result.images, result.records


def test_optimize_calibrates_teacache_and_magcache(calibrated: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(calibrated[1])]) == 0
    shown = capsys.readouterr().out
    assert "probe modulated_input" in shown and "teacache poly" in shown and "magcache ratios for 6 steps" in shown
    plan = read_plan(onnx.load(str(calibrated[1]), load_external_data=False))
    cal = plan.region("stack").calibration
    tea = cal["teacache"]
    assert 2 <= len(tea["coefficients"]) <= 5 and tea["points"] > 0
    slope = np.polyval(np.polyder(tea["coefficients"]), np.linspace(0, tea["x_range"][1], 100))
    assert (slope >= 0).all()  # never decreasing: a threshold on A + poly(d) is one on d
    assert np.polyval(tea["coefficients"], 0.0) >= 0  # no change never predicts a negative one
    assert len(cal["magcache"]["ratios"]) == 6 and cal["magcache"]["ratios"][0] == 1.0


def test_teacache_in_graph_decisions_equal_the_host_rule(calibrated: tuple[Path, Path]) -> None:
    """skip iff A + poly(d) <= threshold, with d the probe the graph reports, A reset on compute."""
    plan = read_plan(onnx.load(str(calibrated[1]), load_external_data=False))
    k = plan.region("stack").index
    poly = np.poly1d(plan.region("stack").calibration["teacache"]["coefficients"])
    _, never = _run(calibrated[1], "teacache:threshold=-1e9")  # every step computes, reporting its probe
    assert [r["skip"][k] for r in never] == [0] * len(never)
    threshold = float(np.median([poly(r["stat"][k]) for r in never if r["ctl"][k] == CTL_PROBE])) * 1.01
    _, records = _run(calibrated[1], f"teacache:threshold={threshold}")
    acc, skips = 0.0, 0
    for i, rec in enumerate(records):
        if rec["ctl"][k] != CTL_PROBE:
            assert rec["skip"][k] == 0
            acc = 0.0
            continue
        value = acc + max(poly(rec["stat"][k]), 0.0)
        assert bool(rec["skip"][k] == 1) == bool(value <= threshold + 1e-6), (i, value)
        acc, skips = (value, skips + 1) if rec["skip"][k] == 1 else (0.0, skips)
    assert skips >= 1  # the test exercised a skip


@pytest.mark.parametrize("policy", ["fbcache:threshold=1e9", "teacache:threshold=1e9", "magcache:threshold=1e9,retention=0"])
def test_peer_policies_skip_and_change_the_output(calibrated: tuple[Path, Path], policy: str) -> None:
    base, _ = _run(calibrated[1], "none")
    images, records = _run(calibrated[1], policy)
    plan = read_plan(onnx.load(str(calibrated[1]), load_external_data=False))
    k = plan.region("tail" if policy.startswith("fbcache") else "stack").index
    assert [r["skip"][k] for r in records[1:-1]].count(1) >= 2
    assert records[-1]["skip"][k] == 0 and records[0]["skip"][k] == 0
    assert np.abs(images - base).max() > 1e-4
    again, _ = _run(calibrated[1], policy)
    np.testing.assert_array_equal(again, images)  # state and accumulators reset between runs


def test_calibrate_for_writes_a_new_graph_and_keeps_the_input(calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    model = onnx.load(str(calibrated[1]))
    plan = read_plan(model)
    plan.region("stack").calibration.pop("magcache")
    out = calibrate_peers(model, plan, calibration_setup([3]), "magcache", CalibrationOptions(trajectories=1, steps=4))
    assert len(out["ratios"]) == 4 and plan.region("stack").calibration["magcache"] == out
    before = calibrated[1].read_bytes()
    target = tmp_path / "tc.fc.onnx"
    assert main([ "calibrate", str(calibrated[1]), "-o", str(target), "--for", "teacache", "--calibrate", "1",
                  "--calib-steps", "4", "--scheduler-config", str(SCHEDULER_CONFIG), "--class", "1",
                  "--uncond-class", "10"]) == 0
    assert calibrated[1].read_bytes() == before
    new = read_plan(onnx.load(str(target), load_external_data=False)).region("stack").calibration["teacache"]
    assert new["points"] == 2 * 3  # two samples (CFG halves) x three step pairs
    assert main(["calibrate", str(calibrated[1]), "-o", str(calibrated[1]), "--for", "teacache"]) == 2


def test_a_graph_without_probes_refuses_fbcache_and_teacache(tiny_dit: Path, tmp_path: Path) -> None:
    from fcpass.optimize import OptimizeOptions, optimize

    out = tmp_path / "np.fc.onnx"
    plan = optimize(tiny_dit, out, OptimizeOptions(probes=False), None)
    assert all(r.probe is None for r in plan.regions)
    assert not {s.kind for s in plan.states} & {"res", "mod"}
    for policy, region in (("fbcache", "tail"), ("teacache:coefficients=[1,0]", "stack")):
        with pytest.raises(FcpassError, match=f"probe on region '{region}'"):
            _run(out, policy)
