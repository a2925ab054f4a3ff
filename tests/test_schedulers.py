"""The numpy schedulers against diffusers as the oracle, plus config loading and its error messages.

Sampling loops use a deterministic fake model, ``out = 0.1 * x + 0.05 * cos(t)``, evaluated in
float32 numpy for both sides so that only the schedulers differ. Final samples must agree within
``RTOL = 1e-5`` and ``ATOL = 1e-5``: our float32 arithmetic follows diffusers' operation order,
but torch's CPU ``sqrt`` is not always correctly rounded (it is off by one ulp for some inputs),
so DDIM agrees to about 2e-6 relative rather than bit for bit. Timesteps must agree exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fcpass.contract.errors import FcpassError
from runtimes.schedulers import (
    SUPPORTED_CLASS_NAMES,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerScheduler,
    Scheduler,
    UniPCMultistepScheduler,
    scheduler_from_config,
)
from tools.export_diffusers import COGVIDEOX_SCHEDULER, SANA_SCHEDULER, WAN_SCHEDULER

RTOL = 1e-5
ATOL = 1e-5
SHAPE = (1, 4, 8, 8)
REPO_ROOT = Path(__file__).resolve().parent.parent
SD_BETAS: dict[str, Any] = {"beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def diffusers() -> ModuleType:
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers")


def _fake_model(sample: np.ndarray, timestep: float) -> np.ndarray:
    return (np.float32(0.1) * sample + np.float32(0.05) * np.cos(np.float32(timestep))).astype(np.float32)


def _initial_sample() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def _sample_ours(scheduler: Scheduler, steps: int) -> np.ndarray:
    scheduler.set_timesteps(steps)
    x = _initial_sample() * np.float32(scheduler.init_noise_sigma)
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, index)
        x = scheduler.step(_fake_model(model_input, float(timestep)), index, x)
    return x


def _sample_diffusers(scheduler: Any, steps: int) -> np.ndarray:
    import torch

    scheduler.set_timesteps(steps)
    # FlowMatchEulerDiscreteScheduler has neither attribute; its pipelines use the sample as is.
    x = torch.from_numpy(_initial_sample()) * getattr(scheduler, "init_noise_sigma", 1.0)
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
        model_output = torch.from_numpy(_fake_model(model_input.numpy(), float(timestep)))
        x = scheduler.step(model_output, timestep, x).prev_sample
    return x.numpy()


def _assert_same_sampling(ours: Scheduler, reference: Any, steps: int) -> None:
    final_ours = _sample_ours(ours, steps)
    final_ref = _sample_diffusers(reference, steps)
    assert final_ours.dtype == np.float32
    # A schedule that never moved the sample would make the comparison vacuous.
    assert not np.allclose(final_ref, _initial_sample(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final_ours, final_ref, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------

DDIM_GRID = list(
    itertools.product(
        ["linear", "scaled_linear", "squaredcos_cap_v2"],
        ["epsilon", "v_prediction", "sample"],
        [False, True],
        ["leading", "trailing", "linspace"],
        [False, True],
    )
)


def _ddim_kwargs(beta_schedule: str, prediction: str, clip: bool, spacing: str, alpha_one: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "beta_schedule": beta_schedule,
        "prediction_type": prediction,
        "clip_sample": clip,
        # A range other than 1 checks that the configured range, not a constant, is used.
        "clip_sample_range": 1.5,
        "timestep_spacing": spacing,
        "set_alpha_to_one": alpha_one,
        # steps_offset only acts on "leading"; SD-style configs set it to 1.
        "steps_offset": 1 if spacing == "leading" else 0,
    }
    if beta_schedule == "scaled_linear":
        kwargs.update(SD_BETAS)
    return kwargs


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize(("beta_schedule", "prediction", "clip", "spacing", "alpha_one"), DDIM_GRID)
def test_ddim_matches_diffusers(
    diffusers: ModuleType, beta_schedule: str, prediction: str, clip: bool, spacing: str, alpha_one: bool, steps: int
) -> None:
    kwargs = _ddim_kwargs(beta_schedule, prediction, clip, spacing, alpha_one)
    config = {"_class_name": "DDIMScheduler", **kwargs}
    ours = scheduler_from_config(config)
    reference = diffusers.DDIMScheduler(**kwargs)

    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    _assert_same_sampling(ours, reference, steps)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_alphas_cumprod_match(diffusers: ModuleType, beta_schedule: str) -> None:
    kwargs = {"beta_schedule": beta_schedule, **(SD_BETAS if beta_schedule == "scaled_linear" else {})}
    ours = DDIMScheduler(**kwargs)
    reference = diffusers.DDIMScheduler(**kwargs)
    np.testing.assert_allclose(ours.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-6, atol=0)


def test_ddim_final_alpha_cumprod(diffusers: ModuleType) -> None:
    for alpha_one in (False, True):
        ours = DDIMScheduler(set_alpha_to_one=alpha_one)
        reference = diffusers.DDIMScheduler(set_alpha_to_one=alpha_one)
        assert ours.final_alpha_cumprod == pytest.approx(float(reference.final_alpha_cumprod), rel=1e-7)


def test_ddim_rescale_zero_terminal_snr_matches_diffusers(diffusers: ModuleType) -> None:
    kwargs = {
        "beta_schedule": "scaled_linear",
        **SD_BETAS,
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
    }
    ours = DDIMScheduler(**kwargs)
    reference = diffusers.DDIMScheduler(**kwargs)
    assert ours.alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(ours.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    _assert_same_sampling(ours, reference, 25)


def test_ddim_trailing_overshoot_reproduced_and_warned(diffusers: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    # diffusers' float arange gives 62 "trailing" timesteps, ending at -1, for 61 steps.
    ours = DDIMScheduler(timestep_spacing="trailing")
    reference = diffusers.DDIMScheduler(timestep_spacing="trailing")
    with caplog.at_level(logging.WARNING, logger="runtimes.schedulers"):
        ours.set_timesteps(61)
    reference.set_timesteps(61)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    assert "61 steps yields 62 timesteps" in caplog.text
    _assert_same_sampling(ours, reference, 61)


def test_ddim_fallback_for_ddpm(diffusers: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    source = diffusers.DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", **SD_BETAS)
    config = {key: value for key, value in source.config.items() if not key.startswith("_")}
    config["_class_name"] = "DDPMScheduler"
    with caplog.at_level(logging.WARNING, logger="runtimes.schedulers"):
        ours = scheduler_from_config(config)
    assert isinstance(ours, DDIMScheduler)
    assert "DDPMScheduler" in caplog.text and "DDIM" in caplog.text
    reference = diffusers.DDIMScheduler.from_config(config)
    ours.set_timesteps(20)
    reference.set_timesteps(20)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    _assert_same_sampling(ours, reference, 20)


def test_ddim_trained_betas(diffusers: ModuleType) -> None:
    betas = np.linspace(0.0002, 0.03, 100).tolist()
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 100, "trained_betas": betas, "clip_sample": False}
    ours = scheduler_from_config(config)
    reference = diffusers.DDIMScheduler(num_train_timesteps=100, trained_betas=betas, clip_sample=False)
    _assert_same_sampling(ours, reference, 10)


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("variant", [
    {}, {"prediction_type": "epsilon", "rescale_betas_zero_snr": False},
    {"prediction_type": "sample", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
     "set_alpha_to_one": False},
    {"timestep_spacing": "leading", "snr_shift_scale": 1.5},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace", "clip_sample": True},
], ids=["cogvideox-2b", "epsilon", "linear-sample", "leading", "cosine-clip-ignored"])
def test_cogvideox_ddim_matches_diffusers(diffusers: ModuleType, variant: dict[str, Any], steps: int) -> None:
    config = {**COGVIDEOX_SCHEDULER, **variant}
    ours = scheduler_from_config(config)
    reference = diffusers.CogVideoXDDIMScheduler.from_config(config)
    np.testing.assert_allclose(ours.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-12)
    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    _assert_same_sampling(ours, reference, steps)


# --------------------------------------------------------------------------------------------
# Flow matching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_matches_diffusers(diffusers: ModuleType, shift: float, steps: int) -> None:
    ours = scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift})
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    assert isinstance(ours, FlowMatchEulerScheduler)

    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, reference.sigmas.numpy())
    _assert_same_sampling(ours, reference, steps)


@pytest.mark.parametrize("steps", [1, 10, 28])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
def test_dynamic_shifting_matches_diffusers(diffusers: ModuleType, seq_len: int, steps: int) -> None:
    """FLUX.1-dev's config: the scheduler's own sigmas and FluxPipeline's linspace(1, 1/S, S), shifted by mu of
    the token count as diffusers shifts them."""
    from tools.export_diffusers import FLUX_SCHEDULER

    def calculate_shift(image_seq_len: int) -> float:  # diffusers.pipelines.flux's (importing it needs transformers)
        m = (1.15 - 0.5) / (4096 - 256)
        return image_seq_len * m + 0.5 - m * 256

    config = {k: v for k, v in FLUX_SCHEDULER.items() if not k.startswith("_")}
    for sigmas in (None, np.linspace(1.0, 1 / steps, steps)):
        ours = scheduler_from_config(FLUX_SCHEDULER)
        reference = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        ours.set_timesteps(steps, image_seq_len=seq_len, sigmas=sigmas)
        reference.set_timesteps(steps if sigmas is None else None, sigmas=sigmas, mu=calculate_shift(seq_len))
        np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
        np.testing.assert_array_equal(ours.sigmas, reference.sigmas.numpy())
    with pytest.raises(FcpassError, match="shifts with the image's token count"):
        ours.set_timesteps(steps)
    if seq_len == 4096 and steps > 1:  # a larger image shifts towards high noise
        small = scheduler_from_config(FLUX_SCHEDULER)
        small.set_timesteps(steps, image_seq_len=16)
        assert np.all(ours.sigmas[1:-1] > small.sigmas[1:-1])


@pytest.mark.parametrize("steps", [1, 10, 30])
def test_a_pipeline_s_own_sigmas_shift_as_diffusers_shifts_them(diffusers: ModuleType, steps: int) -> None:
    """HunyuanVideo's pipeline passes linspace(1, 0, S + 1)[:-1] to a statically shifted scheduler."""
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
    ours = scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0})
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    ours.set_timesteps(steps, sigmas=sigmas)
    reference.set_timesteps(sigmas=sigmas)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, reference.sigmas.numpy())


def test_flow_match_shift_changes_schedule() -> None:
    plain, shifted = FlowMatchEulerScheduler(shift=1.0), FlowMatchEulerScheduler(shift=3.0)
    plain.set_timesteps(10)
    shifted.set_timesteps(10)
    # Shifting moves the schedule towards high noise; the end points stay at sigma 1 and 0.
    assert np.all(shifted.sigmas[1:-1] > plain.sigmas[1:-1])
    assert shifted.sigmas[0] == pytest.approx(1.0) and shifted.sigmas[-1] == 0.0


# --------------------------------------------------------------------------------------------
# Multistep solvers: DPM-Solver(++) and UniPC
# --------------------------------------------------------------------------------------------

# PixArt-alpha's scheduler_config.json (the keys DPM-Solver reads); Sana's and Wan's are the exporter's.
PIXART_DPM = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
              "beta_schedule": "linear", "beta_start": 0.0001, "lower_order_final": True, "num_train_timesteps": 1000,
              "prediction_type": "epsilon", "solver_order": 2, "solver_type": "midpoint", "variance_type": None}


def _multistep_grid(class_name: str) -> list[Any]:
    """Every order, prediction type and sigma schedule, each against three spacings, both final sigmas and
    four step counts; but the runs that go nowhere (one step ending on its own sigma) and the one diffusers
    turns to NaN (test_dpm_solver_refuses_a_zero_length_third_order_step)."""
    unipc = class_name == "UniPCMultistepScheduler"
    grid = []
    for order, prediction, sigmas in itertools.product([1, 2, 3], ["epsilon", "v_prediction", "sample", "flow_prediction"],
                                                       ["vp", "karras", "flow", "karras+flow"]):
        if (prediction == "flow_prediction") != ("flow" in sigmas):
            continue
        if sigmas == "karras+flow" and not unipc:
            continue  # diffusers' DPM-Solver ignores flow sigmas under Karras
        karras, flow = "karras" in sigmas, "flow" in sigmas
        for (spacing, final), steps in itertools.product(
                (("linspace", "zero"), ("trailing", "sigma_min"), ("leading", "zero")), (1, 2, 5, 20)):
            on_its_own_sigma = final == "sigma_min" and (karras or (unipc and flow))
            if (steps == 1 and on_its_own_sigma) or (not unipc and order == 3 and karras and final == "sigma_min"
                                                      and steps >= 15):
                continue
            config = {"_class_name": class_name, "solver_order": order, "prediction_type": prediction,
                      "use_karras_sigmas": karras, "use_flow_sigmas": flow, "flow_shift": 3.0,
                      "timestep_spacing": spacing, "final_sigmas_type": final}
            grid.append(pytest.param(config, steps, id=f"o{order}-{prediction}-{sigmas}-{spacing}-{final}-{steps}"))
    return grid


def _assert_multistep_matches(diffusers: ModuleType, config: dict[str, Any], steps: int) -> None:
    ours = scheduler_from_config(config)
    reference = getattr(diffusers, config["_class_name"]).from_config(config)
    ours.set_timesteps(steps)
    reference.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-6)
    _assert_same_sampling(ours, reference, steps)


@pytest.mark.parametrize(("config", "steps"), _multistep_grid("DPMSolverMultistepScheduler"))
def test_dpm_solver_matches_diffusers(diffusers: ModuleType, config: dict[str, Any], steps: int) -> None:
    _assert_multistep_matches(diffusers, config, steps)


@pytest.mark.parametrize(("config", "steps"), _multistep_grid("UniPCMultistepScheduler"))
def test_unipc_matches_diffusers(diffusers: ModuleType, config: dict[str, Any], steps: int) -> None:
    _assert_multistep_matches(diffusers, config, steps)


@pytest.mark.parametrize("config", [
    {**PIXART_DPM, "solver_type": "heun"}, {**PIXART_DPM, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {**PIXART_DPM, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
    {**PIXART_DPM, "euler_at_final": True, "lower_order_final": False},
    {**PIXART_DPM, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {**PIXART_DPM, "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
     "prediction_type": "v_prediction", **SD_BETAS},
    {**WAN_SCHEDULER, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {**WAN_SCHEDULER, "solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {**WAN_SCHEDULER, "disable_corrector": [0, 3]}, {**WAN_SCHEDULER, "predict_x0": False, "prediction_type": "epsilon",
                                                 "use_flow_sigmas": False},
    {**WAN_SCHEDULER, "use_karras_sigmas": True, "use_flow_sigmas": False, "prediction_type": "epsilon", "sigma_min": 0.1,
     "sigma_max": 50.0},
], ids=["heun", "dpmsolver", "dpmsolver-o3", "euler-at-final", "cosine-clipped", "zero-snr",
        "bh1", "unipc-o3", "no-corrector", "unipc-noise", "karras-bounds"])
@pytest.mark.parametrize("steps", [3, 20])
def test_multistep_variants_match_diffusers(diffusers: ModuleType, config: dict[str, Any], steps: int) -> None:
    _assert_multistep_matches(diffusers, config, steps)


@pytest.mark.parametrize("config", [PIXART_DPM, SANA_SCHEDULER, WAN_SCHEDULER], ids=["pixart", "sana", "wan"])
@pytest.mark.parametrize("steps", [14, 20, 50])
def test_pipelines_own_multistep_configs_match_diffusers(diffusers: ModuleType, config: dict[str, Any], steps: int) -> None:
    _assert_multistep_matches(diffusers, config, steps)


def test_unipc_takes_a_pipeline_s_own_flow_sigmas(diffusers: ModuleType) -> None:
    sigmas = np.linspace(1.0, 0.05, 12)
    ours = scheduler_from_config(WAN_SCHEDULER)
    reference = diffusers.UniPCMultistepScheduler.from_config(WAN_SCHEDULER)
    ours.set_timesteps(12, sigmas=sigmas)
    reference.set_timesteps(sigmas=sigmas)
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-6)
    with pytest.raises(FcpassError, match="use_flow_sigmas"):
        scheduler_from_config({"_class_name": "UniPCMultistepScheduler"}).set_timesteps(12, sigmas=sigmas)
    with pytest.raises(FcpassError, match="no pipeline sigmas"):
        scheduler_from_config(SANA_SCHEDULER).set_timesteps(12, sigmas=sigmas)


@pytest.mark.parametrize("config", [PIXART_DPM, WAN_SCHEDULER], ids=["dpm", "unipc"])
def test_multistep_trajectories_restart_at_step_zero_and_run_in_order(config: dict[str, Any]) -> None:
    """The sampler runs one trajectory per chunk of samples with one scheduler: step 0 forgets the last one."""
    scheduler = scheduler_from_config(config)
    first = _sample_ours(scheduler, 6)
    x = _initial_sample()
    for index in range(3):  # a trajectory left half way
        x = scheduler.step(_fake_model(x, float(scheduler.timesteps[index])), index, x)
    x = _initial_sample()
    for index, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(_fake_model(x, float(timestep)), index, x)
    np.testing.assert_array_equal(x, first)
    with pytest.raises(RuntimeError, match="expected step 1, got 2"):
        scheduler.step(x, 0, x)
        scheduler.step(x, 2, x)


def test_dpm_solver_refuses_a_zero_length_third_order_step(diffusers: ModuleType) -> None:
    config = {**PIXART_DPM, "solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    reference = diffusers.DPMSolverMultistepScheduler.from_config(config)
    assert np.isnan(_sample_diffusers(reference, 20)).all()  # what the refusal spares a user
    with pytest.raises(FcpassError, match='repeats a noise level in 20 steps.*final_sigmas_type "zero" or solver_order 2'):
        scheduler_from_config(config).set_timesteps(20)
    scheduler_from_config(config).set_timesteps(10)  # lower_order_final keeps a short schedule at order 1


def test_unipc_bh1_lands_on_a_final_sigma_of_zero(diffusers: ModuleType) -> None:
    """B(h) = h is infinite on the last step to sigma 0; diffusers multiplies it by a zero residual and returns NaN,
    where the first-order update it stands for lands on the predicted x0."""
    config = {**WAN_SCHEDULER, "solver_type": "bh1"}
    assert np.isnan(_sample_diffusers(diffusers.UniPCMultistepScheduler.from_config(config), 10)).all()
    ours, bh2 = _sample_ours(scheduler_from_config(config), 10), _sample_ours(scheduler_from_config(WAN_SCHEDULER), 10)
    assert np.isfinite(ours).all() and not np.allclose(ours, bh2)


def test_unipc_refuses_to_extrapolate_onto_a_final_sigma_of_zero() -> None:
    with pytest.raises(FcpassError, match="lower_order_final.*final_sigmas_type"):
        scheduler_from_config({**WAN_SCHEDULER, "lower_order_final": False})
    scheduler_from_config({**WAN_SCHEDULER, "lower_order_final": False, "solver_order": 1})


@pytest.mark.parametrize(("name", "kind"), [("ddim_clipped", DDIMScheduler), ("dpmsolver", DPMSolverMultistepScheduler),
                                            ("unipc", UniPCMultistepScheduler)])
def test_the_bundled_model_s_other_samplers_share_its_training_schedule(name: str, kind: type[Scheduler]) -> None:
    bundled = scheduler_from_config(REPO_ROOT / "models" / "digits" / "scheduler_config.json")
    other = scheduler_from_config(REPO_ROOT / "models" / "digits" / "schedulers" / f"{name}.json")
    assert isinstance(other, kind)
    np.testing.assert_array_equal(other.alphas_cumprod, bundled.alphas_cumprod)


def test_stochastic_dpm_solver_is_refused() -> None:
    with pytest.raises(FcpassError, match="sde-dpmsolver\\+\\+.*fresh noise.*dpmsolver\\+\\+"):
        scheduler_from_config({**PIXART_DPM, "algorithm_type": "sde-dpmsolver++"})


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [DDIMScheduler(), FlowMatchEulerScheduler(shift=3.0), DPMSolverMultistepScheduler(),
                                       UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0)],
                         ids=["ddim", "flow", "dpm", "unipc"])
def test_common_interface(scheduler: Scheduler) -> None:
    assert isinstance(scheduler, Scheduler)
    assert scheduler.init_noise_sigma == 1.0
    sample = _initial_sample()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(sample, 0, sample)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.shape == (4,) and scheduler.timesteps.dtype == np.float32
    assert scheduler.scale_model_input(sample, 0) is sample
    # Timesteps run from noisy to clean.
    assert np.all(np.diff(scheduler.timesteps) < 0)
    out = scheduler.step(sample.astype(np.float16), 0, sample.astype(np.float64))
    assert out.dtype == np.float32 and out.shape == sample.shape
    with pytest.raises(IndexError):
        scheduler.step(sample, 4, sample)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(sample[:, :2], 0, sample)


def test_module_does_not_import_torch() -> None:
    code = "import sys, runtimes.schedulers; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()


# --------------------------------------------------------------------------------------------
# Config files and error messages
# --------------------------------------------------------------------------------------------


def test_config_from_file_and_folder(tmp_path: Path) -> None:
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "_diffusers_version": "0.30.0"}
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    for source in (path, str(path), tmp_path):
        scheduler = scheduler_from_config(source)
        assert isinstance(scheduler, FlowMatchEulerScheduler) and scheduler.shift == 3.0


def test_unknown_keys_are_ignored() -> None:
    scheduler = scheduler_from_config({"_class_name": "DDIMScheduler", "some_future_option": [1, 2]})
    assert isinstance(scheduler, DDIMScheduler)


def test_unknown_class_name_lists_supported() -> None:
    with pytest.raises(FcpassError) as info:
        scheduler_from_config({"_class_name": "EulerAncestralDiscreteScheduler"})
    message = str(info.value)
    assert "_class_name" in message and "EulerAncestralDiscreteScheduler" in message
    assert all(name in message for name in SUPPORTED_CLASS_NAMES)


def test_missing_class_name() -> None:
    with pytest.raises(FcpassError, match="_class_name.*found null"):
        scheduler_from_config({"beta_schedule": "linear"})


def test_unsupported_beta_schedule() -> None:
    with pytest.raises(FcpassError) as info:
        scheduler_from_config({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"})
    message = str(info.value)
    assert "'beta_schedule'" in message and '"sigmoid"' in message
    assert all(f'"{s}"' in message for s in ("linear", "scaled_linear", "squaredcos_cap_v2"))


@pytest.mark.parametrize(
    ("config", "key", "found"),
    [
        ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding", "true"),
        ({"_class_name": "DDPMScheduler", "thresholding": True}, "thresholding", "true"),
        (
            {"_class_name": "DDIMScheduler", "prediction_type": "flow_prediction"},
            "prediction_type",
            '"flow_prediction"',
        ),
        ({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}, "timestep_spacing", '"karras"'),
        ({"_class_name": "DDIMScheduler", "clip_sample": "yes"}, "clip_sample", '"yes"'),
        ({"_class_name": "DDIMScheduler", "steps_offset": -1}, "steps_offset", "-1"),
        (
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "time_shift_type": "linear"},
            "time_shift_type",
            '"linear"',
        ),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 0}, "shift", "0"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.02}, "shift_terminal", "0.02"),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}, "solver_order", "4"),
        ({"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction"}, "prediction_type",
         '"flow_prediction"'),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, "final_sigmas_type", '"zero"'),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True}, "use_lu_lambdas", "true"),
        ({"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": "low"}, "lambda_min_clipped", '"low"'),
        ({"_class_name": "DPMSolverMultistepScheduler", "thresholding": True}, "thresholding", "true"),
        ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh3"}, "solver_type", '"bh3"'),
        ({"_class_name": "UniPCMultistepScheduler", "use_exponential_sigmas": True}, "use_exponential_sigmas", "true"),
        ({"_class_name": "UniPCMultistepScheduler", "disable_corrector": "all"}, "disable_corrector", '"all"'),
        ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
          "predict_x0": False}, "predict_x0", "false"),
    ],
)
def test_unsupported_value_names_key_and_value(config: dict[str, Any], key: str, found: str) -> None:
    with pytest.raises(FcpassError) as info:
        scheduler_from_config(config)
    message = str(info.value)
    assert f"{key!r}" in message and f"found {found};" in message and "supported" in message


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "scheduler_config.json"
    with pytest.raises(FcpassError, match="not found") as info:
        scheduler_from_config(missing)
    assert str(missing) in str(info.value)


def test_invalid_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "scheduler_config.json"
    path.write_text('{"_class_name": "DDIMScheduler",', encoding="utf-8")
    with pytest.raises(FcpassError, match="not valid JSON") as info:
        scheduler_from_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_invalid_step_count(steps: Any) -> None:
    with pytest.raises(FcpassError, match="inference steps"):
        DDIMScheduler().set_timesteps(steps)
