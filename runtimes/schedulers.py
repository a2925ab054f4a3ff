"""Numpy sampling schedulers configured from a diffusers-format ``scheduler_config.json``.

Each sampler reproduces its diffusers counterpart (diffusers 0.42) in float32 without importing
torch:

* :class:`DDIMScheduler` -- deterministic DDIM (eta = 0), ``diffusers.DDIMScheduler``, and
  :class:`CogVideoXDDIMScheduler`, CogVideoX's variant on an SNR-shifted schedule.
* :class:`FlowMatchEulerScheduler` -- Euler steps on a rectified-flow ODE,
  ``diffusers.FlowMatchEulerDiscreteScheduler`` with static shifting, or with dynamic shifting as
  Flux's pipeline drives it.
* :class:`~runtimes.multistep.DPMSolverMultistepScheduler` and
  :class:`~runtimes.multistep.UniPCMultistepScheduler` -- the multistep solvers PixArt's, Sana's and
  Wan's pipelines use, on VP, Karras or flow-matching sigmas.

:func:`scheduler_from_config` reads a config dict or file and builds the matching scheduler.
Every unsupported config value raises :class:`~fcpass.contract.errors.FcpassError` naming the key, the
value found and the supported values; keys this module does not use are ignored.

Where diffusers' own arithmetic order or precision matters for bit-level agreement (float32
``torch.linspace``, float64-accumulated ``torch.cumprod``, float64 ``set_timesteps`` maths) the
code below reproduces it deliberately; the comments say where.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.contract.errors import FcpassError
from runtimes.multistep import DPMSolverMultistepScheduler, MultistepScheduler, UniPCMultistepScheduler
from runtimes.scheduler_base import (
    BETA_SCHEDULES,
    Scheduler,
    choice,
    cumprod_f32,
    flag,
    format_values,
    check_timesteps,
    integer,
    train_timesteps,
    number,
    reject_unless,
    step_count,
    training_betas,
    unsupported,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_CLASS_NAMES",
    "CogVideoXDDIMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerScheduler",
    "Scheduler",
    "UniPCMultistepScheduler",
    "config_identity",
    "load_config",
    "scheduler_from_config",
]

CONFIG_FILE_NAME = "scheduler_config.json"

_DDIM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_DDIM_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# The multistep solvers, built from the whole config.
_MULTISTEP: dict[str, type[MultistepScheduler]] = {
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
}

SUPPORTED_CLASS_NAMES: tuple[str, ...] = (
    "DDIMScheduler",
    "CogVideoXDDIMScheduler",
    "FlowMatchEulerDiscreteScheduler",
    *_MULTISTEP,
    "DDPMScheduler",  # sampled with DDIM built from its beta fields
)




class DDIMScheduler(Scheduler):
    """Deterministic DDIM sampling (eta = 0), equal to ``diffusers.DDIMScheduler``.

    With ``a_t = alphas_cumprod[t]`` and ``a_prev = alphas_cumprod[t - T // S]`` (or
    ``final_alpha_cumprod`` when that index is negative, T = num_train_timesteps, S = steps) each
    step predicts ``x0`` and the noise ``eps`` from the model output (``epsilon``:
    ``x0 = (x - sqrt(1 - a_t) * out) / sqrt(a_t)``; ``v_prediction``:
    ``x0 = sqrt(a_t) * x - sqrt(1 - a_t) * out``; ``sample``: ``x0 = out``), optionally clips
    ``x0`` to ``+-clip_sample_range`` and returns ``sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps``.
    ``timesteps`` holds the integer training timesteps as float32.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | np.ndarray | None = None,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__()
        # Validate through the config path so direct construction gets the same messages.
        config = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
            "clip_sample": clip_sample,
            "clip_sample_range": clip_sample_range,
            "set_alpha_to_one": set_alpha_to_one,
            "steps_offset": steps_offset,
            "prediction_type": prediction_type,
            "timestep_spacing": timestep_spacing,
            "rescale_betas_zero_snr": rescale_betas_zero_snr,
        }
        self.num_train_timesteps = train_timesteps(config)
        self.beta_schedule: str = choice(config, "beta_schedule", "linear", BETA_SCHEDULES)
        self.prediction_type: str = choice(config, "prediction_type", "epsilon", _DDIM_PREDICTION_TYPES)
        self.timestep_spacing: str = choice(config, "timestep_spacing", "leading", _DDIM_TIMESTEP_SPACINGS)
        self.clip_sample = flag(config, "clip_sample", True)
        self.clip_sample_range = number(config, "clip_sample_range", 1.0, positive=True)
        self.set_alpha_to_one = flag(config, "set_alpha_to_one", True)
        self.steps_offset = integer(config, "steps_offset", 0, 0, self.num_train_timesteps - 1)
        betas = training_betas({**config, "trained_betas": trained_betas})

        self.betas: np.ndarray = betas
        self.alphas_cumprod: np.ndarray = cumprod_f32(np.float32(1.0) - betas)
        # The last step has no "previous" timestep; diffusers uses 1 (a clean x0) or alphas_cumprod[0].
        self.final_alpha_cumprod = np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]
        #: Integer training timesteps (int64), as diffusers' ``DDIMScheduler.timesteps``.
        self.discrete_timesteps: np.ndarray = np.zeros(0, dtype=np.int64)
        self._step_ratio = 0

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> None:
        n = self.num_train_timesteps
        steps = step_count(num_inference_steps, maximum=n)
        # Same numpy expressions as diffusers so that rounding (and its quirks) agree exactly.
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = n // steps
            timesteps = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64)
            timesteps += self.steps_offset
            check_timesteps(timesteps, n, self.steps_offset)
        else:
            timesteps = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
            if len(timesteps) != steps:
                # diffusers' float arange overshoots for some step counts; keep its behaviour.
                logger.warning(
                    "DDIM 'trailing' spacing with %d steps yields %d timesteps (%s) because of "
                    "rounding in diffusers' schedule, which this scheduler reproduces; choose "
                    "another step count to avoid it",
                    steps,
                    len(timesteps),
                    timesteps[-1],
                )
        self.num_inference_steps = steps
        self.discrete_timesteps = timesteps
        self.timesteps = timesteps.astype(np.float32)
        # diffusers derives the previous timestep from T // S whatever the spacing.
        self._step_ratio = n // steps

    def _alphas(self, position: int) -> tuple[Any, Any]:
        """alphas_cumprod at step `position`'s timestep and at the one the step goes to."""
        timestep = int(self.discrete_timesteps[position])
        prev_timestep = timestep - self._step_ratio
        prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return self.alphas_cumprod[timestep], prev

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        model_output, sample, position = self._prepare(model_output, index, sample)
        alpha_prod_t, alpha_prod_prev = self._alphas(position)
        one = np.float32(1.0)
        sqrt_alpha = np.sqrt(alpha_prod_t)
        sqrt_beta = np.sqrt(one - alpha_prod_t)

        if self.prediction_type == "epsilon":
            pred_x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
            pred_eps = model_output
        elif self.prediction_type == "sample":
            pred_x0 = model_output
            pred_eps = (sample - sqrt_alpha * pred_x0) / sqrt_beta
        else:
            pred_x0 = sqrt_alpha * sample - sqrt_beta * model_output
            pred_eps = sqrt_alpha * model_output + sqrt_beta * sample

        if self.clip_sample:
            limit = np.float32(self.clip_sample_range)
            pred_x0 = np.clip(pred_x0, -limit, limit)

        # eta = 0: the noise direction is not re-estimated from the clipped x0 (diffusers' default).
        prev = np.sqrt(alpha_prod_prev) * pred_x0 + np.sqrt(one - alpha_prod_prev) * pred_eps
        return prev.astype(np.float32, copy=False)


class CogVideoXDDIMScheduler(DDIMScheduler):
    """CogVideoX's DDIM, equal to ``diffusers.CogVideoXDDIMScheduler``: deterministic DDIM on the training
    schedule with its signal-to-noise ratio divided by ``snr_shift_scale``
    (``a' = a / (s + (1 - s) a)`` of ``alphas_cumprod``), then rescaled to zero terminal SNR on
    ``alphas_cumprod`` itself where ``rescale_betas_zero_snr`` asks. Each step returns
    ``sqrt((1 - a_prev) / (1 - a_t)) x + (sqrt(a_prev) - sqrt(a_t) sqrt((1 - a_prev) / (1 - a_t))) x0``
    and never clips x0. A ``scaled_linear`` schedule is computed in float64, as diffusers does.
    """

    def __init__(self, snr_shift_scale: float = 3.0, **ddim: Any) -> None:
        rescale = flag(ddim, "rescale_betas_zero_snr", False)
        super().__init__(**{**ddim, "clip_sample": False, "rescale_betas_zero_snr": False})
        self.snr_shift_scale = number({"snr_shift_scale": snr_shift_scale}, "snr_shift_scale", 3.0, positive=True)
        if self.beta_schedule == "scaled_linear" and ddim.get("trained_betas") is None:
            root = np.linspace(ddim.get("beta_start", 0.00085) ** 0.5, ddim.get("beta_end", 0.012) ** 0.5,
                               self.num_train_timesteps, dtype=np.float64)
            alphas_cumprod = np.cumprod(1.0 - root**2)
        else:
            alphas_cumprod = self.alphas_cumprod
        s = alphas_cumprod.dtype.type(self.snr_shift_scale)
        alphas_cumprod = alphas_cumprod / (s + (1 - s) * alphas_cumprod)
        if rescale:
            root = np.sqrt(alphas_cumprod)
            first, last = root[0], root[-1]
            alphas_cumprod = ((root - last) * (first / (first - last))) ** 2
        self.alphas_cumprod = alphas_cumprod
        self.final_alpha_cumprod = np.float32(1.0) if self.set_alpha_to_one else alphas_cumprod[0]

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        model_output, sample, position = self._prepare(model_output, index, sample)
        a_t, a_prev = self._alphas(position)
        a_prev = a_t.dtype.type(a_prev)
        beta = 1 - a_t
        # diffusers' coefficients are 0-d tensors of the schedule's dtype, rounded to float32 against the sample
        if self.prediction_type == "epsilon":
            x0 = (sample - np.float32(beta**0.5) * model_output) / np.float32(a_t**0.5)
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = np.float32(a_t**0.5) * sample - np.float32(beta**0.5) * model_output
        scale = ((1 - a_prev) / (1 - a_t)) ** 0.5
        shift = a_prev**0.5 - a_t**0.5 * scale
        return (np.float32(scale) * sample + np.float32(shift) * x0).astype(np.float32, copy=False)


class FlowMatchEulerScheduler(Scheduler):
    """Euler integration of a rectified-flow ODE, equal to ``diffusers.FlowMatchEulerDiscreteScheduler``.

    Sigmas run from ``sigma_max`` to ``sigma_min`` of the shifted training schedule, linearly
    spaced over ``S`` steps and then shifted (again, as diffusers does) with
    ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``; a final sigma of 0 is appended.
    The model predicts the velocity ``v = dx/dsigma`` and each step returns
    ``x + (sigma[i + 1] - sigma[i]) * v``. ``timesteps`` is ``sigma * num_train_timesteps``.

    A pipeline may pass sigmas of its own (Flux's ``linspace(1, 1 / S, S)``), shifted the same way. With
    ``dynamic`` shifting (Flux) the shift is ``exp(mu) / (exp(mu) + 1 / sigma - 1)`` where ``mu`` grows
    linearly with the image's token count from ``base_shift`` at ``base_image_seq_len`` to ``max_shift``
    at ``max_image_seq_len``.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, dynamic: dict[str, float] | None = None) -> None:
        super().__init__()
        config = {"num_train_timesteps": num_train_timesteps, "shift": shift}
        self.num_train_timesteps = train_timesteps(config)
        self.shift = number(config, "shift", 1.0, positive=True)
        self.dynamic = dynamic
        n = self.num_train_timesteps
        # Training schedule in float32 as diffusers' __init__ builds it; only its end points are used.
        train_sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        if dynamic is None:  # with dynamic shifting diffusers shifts at set_timesteps only
            shift32 = np.float32(self.shift)
            train_sigmas = shift32 * train_sigmas / (np.float32(1.0) + np.float32(self.shift - 1) * train_sigmas)
        self.sigma_max = float(train_sigmas[0])
        self.sigma_min = float(train_sigmas[-1])
        #: Sigmas per step plus a trailing 0, float32; empty until set_timesteps.
        self.sigmas: np.ndarray = np.zeros(0, dtype=np.float32)

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> None:
        steps = step_count(num_inference_steps)
        n = self.num_train_timesteps
        if sigmas is None:  # diffusers does this part in float64 numpy and only then rounds to float32
            sigmas = np.linspace(self.sigma_max * n, self.sigma_min * n, steps) / n
        else:  # a pipeline's own, in float32 as diffusers takes them
            sigmas = np.asarray(sigmas).astype(np.float32)
            steps = len(sigmas)
        if self.dynamic is not None:
            if image_seq_len is None:
                raise FcpassError("this scheduler shifts with the image's token count (use_dynamic_shifting); "
                                  "the sampler passes it")
            d = self.dynamic
            slope = (d["max_shift"] - d["base_shift"]) / (d["max_image_seq_len"] - d["base_image_seq_len"])
            mu = image_seq_len * slope + d["base_shift"] - slope * d["base_image_seq_len"]
            if not -30 <= mu <= 30:  # exp(mu) is the shift: past e^30 every sigma rounds to 0 or 1
                raise FcpassError(f"scheduler config's base_shift and max_shift give a shift of exp({mu:.3g}) at "
                                  f"{image_seq_len} tokens; use the model's own values (Flux's: 0.5 and 1.15).")
            sigmas = (math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))).astype(np.float32)
        else:
            sigmas = (self.shift * sigmas / (1 + (self.shift - 1) * sigmas)).astype(np.float32)
        self.num_inference_steps = steps
        self.timesteps = sigmas * np.float32(n)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        model_output, sample, position = self._prepare(model_output, index, sample)
        dt = self.sigmas[position + 1] - self.sigmas[position]
        return (sample + dt * model_output).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Construction from scheduler_config.json
# --------------------------------------------------------------------------------------------


def load_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The config as a dict: a copy of a mapping, or the parsed file (or `scheduler_config.json` in the folder)."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    # A diffusers model folder keeps the file in scheduler/; accept that folder too.
    if path.is_dir():
        path = path / CONFIG_FILE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FcpassError(
            f"scheduler config file not found: {path}; pass the path of the model's "
            f"diffusers-format {CONFIG_FILE_NAME}."
        ) from None
    except OSError as exc:
        raise FcpassError(
            f"cannot read scheduler config file {path}: {exc.strerror}; check the path and its permissions."
        ) from None
    except UnicodeDecodeError:
        raise FcpassError(f"scheduler config file {path} is not UTF-8 text; save it as UTF-8 JSON, "
                          f"as diffusers writes its {CONFIG_FILE_NAME}") from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FcpassError(
            f"scheduler config file is not valid JSON: {path} ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}); repair it or copy the model's original {CONFIG_FILE_NAME}."
        ) from None
    if not isinstance(loaded, dict):
        raise FcpassError(
            f"scheduler config file does not hold a JSON object: {path}; "
            f"use the model's diffusers-format {CONFIG_FILE_NAME}."
        )
    return loaded


_DDIM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
              "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type", "timestep_spacing",
              "rescale_betas_zero_snr")
# CogVideoXDDIMScheduler's defaults where DDIMScheduler's differ
_COGVIDEOX_DEFAULTS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _ddim_from_config(config: Mapping[str, Any]) -> DDIMScheduler:
    reject_unless(config, "thresholding", (False,))
    kwargs = {k: config[k] for k in _DDIM_KEYS if k in config}
    if config.get("_class_name") == "CogVideoXDDIMScheduler":
        return CogVideoXDDIMScheduler(snr_shift_scale=config.get("snr_shift_scale", 3.0),
                                      **{**_COGVIDEOX_DEFAULTS, **kwargs})
    return DDIMScheduler(**kwargs)


def _flow_from_config(config: Mapping[str, Any]) -> FlowMatchEulerScheduler:
    dynamic = None
    if flag(config, "use_dynamic_shifting", False):
        reject_unless(config, "time_shift_type", ("exponential",))
        # diffusers' defaults, as Flux's pipeline reads them
        dynamic = {"base_image_seq_len": number(config, "base_image_seq_len", 256, positive=True),
                   "max_image_seq_len": number(config, "max_image_seq_len", 4096, positive=True),
                   "base_shift": number(config, "base_shift", 0.5), "max_shift": number(config, "max_shift", 1.15)}
        if dynamic["max_image_seq_len"] == dynamic["base_image_seq_len"]:
            raise unsupported("max_image_seq_len", config.get("max_image_seq_len"), "a length other than base_image_seq_len")
    reject_unless(config, "invert_sigmas", (False,))
    reject_unless(config, "shift_terminal", (None,))
    reject_unless(config, "use_karras_sigmas", (False,))
    reject_unless(config, "use_exponential_sigmas", (False,))
    reject_unless(config, "use_beta_sigmas", (False,))
    reject_unless(config, "stochastic_sampling", (False,))
    return FlowMatchEulerScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        shift=config.get("shift", 1.0),
        dynamic=dynamic,
    )


def config_identity(config: Mapping[str, Any] | str | Path) -> dict[str, str]:
    """The sampler a config names and a digest of its settings (diffusers' private keys left out), so that two
    configs that sample alike compare equal: ``{"scheduler": class name, "scheduler_digest": 16 hex digits}``."""
    cfg = load_config(config)
    settings = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"scheduler": str(cfg.get("_class_name")), "scheduler_digest": digest}


def scheduler_from_config(config: Mapping[str, Any] | str | Path) -> Scheduler:
    """Build the scheduler a diffusers ``scheduler_config.json`` describes.

    ``config`` is the parsed dict, the file's path, or the folder holding it. ``_class_name``
    selects the sampler; a DDPM config is sampled with DDIM built from its beta fields (with a
    warning). Raises FcpassError for unreadable files and unsupported values.
    """
    cfg = load_config(config)
    class_name = cfg.get("_class_name")
    if not isinstance(class_name, str):  # a list or an object would not even look up
        raise unsupported("_class_name", class_name, format_values(SUPPORTED_CLASS_NAMES))
    if class_name in ("DDIMScheduler", "CogVideoXDDIMScheduler"):
        return _ddim_from_config(cfg)
    if class_name == "FlowMatchEulerDiscreteScheduler":
        return _flow_from_config(cfg)
    if class_name in _MULTISTEP:
        return _MULTISTEP[class_name](**cfg)
    if class_name == "DDPMScheduler":
        logger.warning("scheduler config names DDPMScheduler, whose sampling draws fresh noise at every step; sampling "
                       "with DDIM (eta = 0) built from its beta schedule instead")
        return _ddim_from_config(cfg)
    raise unsupported("_class_name", class_name, format_values(SUPPORTED_CLASS_NAMES))
