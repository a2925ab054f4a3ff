"""Calibration: the ridge fit recovers a known map; end to end it writes a usable, calibrated graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpass.calibrate import CalibrationOptions, _Fit
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import CachePlan, RegionSpec, StateSpec, read_plan
from fcpass.optimize import OptimizeOptions, optimize
from tests.conftest import all_initializers, calibration_setup, export_tiny_dit


def _region(d: int) -> tuple[RegionSpec, CachePlan]:
    spec = RegionSpec("block0", 0, [0], None, ["h"], ["o"], [0], 1, 1)
    states = [StateSpec("fc.block0.out0", "fc.block0.out0.next", "block0", "out", "o", [2, 4, d], "float32")]
    return spec, CachePlan([spec], states, {}, ["y"], 1, "test")


def test_ridge_fit_recovers_a_known_linear_map_and_sigma2() -> None:
    rng = np.random.default_rng(0)
    d = 6
    w_true = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    spec, plan = _region(d)
    fit = _Fit(spec, plan, CalibrationOptions(ridge=1e-9, eps=0.05))
    hs = [rng.standard_normal((2, 4, d)) for _ in range(6)]
    frames = [{"fc.block0.in0": h, "fc.block0.out0": h @ w_true + 5.0} for h in hs]
    for phase in ("fit", "test"):
        if phase == "test":
            fit.solve()
        for i in range(1, len(frames)):
            for gap in (1, 2):
                if i - gap >= 0:
                    fit.add(frames[i - gap], frames[i], gap, phase)
    v, b = fit.solution[0]
    np.testing.assert_allclose(v, w_true - np.eye(d), atol=1e-6)
    np.testing.assert_allclose(b, 0.0, atol=1e-6)
    summary = fit.summary()
    assert summary["fit_rel_err"] < 1e-6 < summary["residual_rel_err"]
    # Every pair is reproduced within eps, so sigma^2 is the mean squared relative input change.
    deltas = [
        np.max(np.linalg.norm((frames[i]["fc.block0.in0"] - frames[i - g]["fc.block0.in0"]).reshape(2, -1), axis=1)
               / np.linalg.norm(frames[i - g]["fc.block0.in0"].reshape(2, -1), axis=1))
        for i in range(1, 6) for g in (1, 2) if i - g >= 0
    ]
    assert summary["n_good"] == len(deltas)
    assert summary["sigma2"] == pytest.approx(np.mean(np.square(deltas)))


def test_calibrated_graph_has_fitted_weights_and_sigma(calibrated: tuple[Path, Path]) -> None:
    _src, out = calibrated
    model = onnx.load(str(out))
    plan = read_plan(model)
    assert plan.calibration["trajectories"] == 2 and plan.calibration["steps"] == 6
    for r in plan.regions:
        cal = r.calibration
        assert cal["n_pairs"] > 0
        assert cal["fit_rel_err"] <= cal["residual_rel_err"] * 1.05, r.name
        assert cal["sigma2"] is None or cal["sigma2"] > 0
    assert any(r.calibration["sigma2"] is not None for r in plan.block_regions())
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in all_initializers(model) if ".V" in t.name}
    assert weights and all(np.abs(v).max() > 0 for v in weights.values())
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_calibration_that_diverges_names_the_region_and_writes_nothing(tmp_path: Path) -> None:
    src = export_tiny_dit(tmp_path / "tiny.onnx", "legacy")
    model = onnx.load(str(src))
    for t in model.graph.initializer:  # poison block 1's MLP bias
        if "blocks.1" in t.name and "fc2.bias" in t.name:
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[:] = np.nan
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    bad = tmp_path / "nan.onnx"
    onnx.save(model, str(bad))
    out = tmp_path / "nan.fc.onnx"
    with pytest.raises(FcpassError, match="calibration diverged: region .*block1"):
        optimize(bad, out, OptimizeOptions(calibrate=1, calib_steps=3), calibration_setup([1]))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("related", [True, False])
def test_held_out_trajectories_choose_the_ridge(related: bool) -> None:
    """A real linear relation is fitted; pure noise keeps W = I, b = 0 (the residual approximation)."""
    rng = np.random.default_rng(1)
    d = 6
    w_true = np.eye(d) + 0.5 * rng.standard_normal((d, d))
    spec, plan = _region(d)
    fit = _Fit(spec, plan, CalibrationOptions())
    for traj in range(8):
        hs = [rng.standard_normal((2, 4, d)) for _ in range(5)]
        outs = [h @ w_true if related else h + rng.standard_normal(h.shape) for h in hs]
        for i in range(1, 5):
            ref = {"fc.block0.in0": hs[i - 1], "fc.block0.out0": outs[i - 1]}
            now = {"fc.block0.in0": hs[i], "fc.block0.out0": outs[i]}
            fit.add(ref, now, 1, "fit", held_out=traj % 4 == 3)
    fit.solve()
    v, b = fit.solution[0]
    va, c = fit.affine[0]
    if related:  # O = H W: both the delta form and the affine form recover W
        assert np.isfinite(fit.chosen_lambda[("lin", 0)]) and np.isfinite(fit.chosen_lambda[("aff", 0)])
        np.testing.assert_allclose(v, w_true - np.eye(d), atol=0.05)
        np.testing.assert_allclose(va, w_true - np.eye(d), atol=0.05)
        np.testing.assert_allclose(c, 0.0, atol=0.05)
    else:
        assert fit.chosen_lambda[("lin", 0)] == float("inf") and not v.any() and not b.any()


def test_plan_records_every_policys_defaults(calibrated: tuple[Path, Path]) -> None:
    from runtimes.policies import CONFIGS, FastCacheConfig

    plan = read_plan(onnx.load(str(calibrated[1])))
    assert set(plan.policy_defaults) == set(CONFIGS)
    assert plan.policy_defaults["fastcache"]["alpha"] == FastCacheConfig().alpha


def test_a_model_over_2_gb_calibrates_as_one_under_it(calibrated: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 2 GB the recording session reads the model from a file with external data, which saving
    moves the weights out to: calibration must fit the same weights as it does under 2 GB."""
    import fcpass.contract.onnx_io

    src, want = calibrated
    monkeypatch.setattr(fcpass.contract.onnx_io, "over_proto_limit", lambda model: True)
    out = tmp_path / "big.fc.onnx"
    optimize(src, out, OptimizeOptions(calibrate=2, calib_steps=6, calib_eps=0.5), calibration_setup([1, 2]))
    got = {t.name: onnx.numpy_helper.to_array(t) for t in all_initializers(onnx.load(str(out)))}
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in all_initializers(onnx.load(str(want)))}
    assert got.keys() == ref.keys() and any(".V" in name for name in got)
    for name, value in ref.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize(("policy", "config", "steps", "warned"), [
    ("fastcache", None, 6, None),
    ("fastcache", None, 7, "DDIMScheduler x 6 steps; this run samples with DDIMScheduler x 7 steps,"),
    ("fastcache", "dpmsolver", 6, "DDIMScheduler x 6 steps; this run samples with DPMSolverMultistepScheduler x 6 steps,"),
    ("fastcache", "../scheduler_config", 6, "with DDIMScheduler x 6 steps (another config)"),
    ("fora:approx=linear", "dpmsolver", 6, "fora rests on a calibration"),
    ("fora", "dpmsolver", 20, None),  # reuse reads nothing calibrated
])
def test_sampling_otherwise_than_calibrated_is_told(calibrated: tuple[Path, Path], policy: str, config: str | None,
                                                    steps: int, warned: str | None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The plan records the sampler calibration ran; a policy that rests on its fits or thresholds says when a run
    samples with another sampler, config or step count."""
    from fcpass.sampling import load_denoiser, warn_if_calibrated_for_another_sampler
    from models.digits import DIGITS_DIR
    from runtimes.schedulers import config_identity
    from tests.conftest import SCHEDULER_CONFIG

    _, out = calibrated
    recorded = read_plan(onnx.load(str(out), load_external_data=False)).calibration
    assert {k: recorded[k] for k in ("scheduler", "scheduler_digest")} == config_identity(SCHEDULER_CONFIG)
    setup = calibration_setup([1, 2])
    setup.request.steps = steps
    if config is not None:
        setup.scheduler_config = DIGITS_DIR / "schedulers" / f"{config}.json"
    with caplog.at_level("WARNING", logger="fcpass.sampling"):
        warn_if_calibrated_for_another_sampler(load_denoiser(out, policy, {}), setup)
    if warned is None:
        assert caplog.text == ""
    else:
        assert warned in caplog.text and f"--scheduler-config F --steps {steps}" in caplog.text
