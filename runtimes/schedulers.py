"""Numpy sampling schedulers configured from a diffusers-format ``scheduler_config.json``.

Two samplers are implemented, each reproducing its diffusers counterpart (diffusers 0.42) in
float32 without importing torch:

* :class:`DDIMScheduler` -- deterministic DDIM (eta = 0), ``diffusers.DDIMScheduler``.
* :class:`FlowMatchEulerScheduler` -- Euler steps on a rectified-flow ODE,
  ``diffusers.FlowMatchEulerDiscreteScheduler`` with static shifting, or with dynamic shifting as
  Flux's pipeline drives it.

:func:`scheduler_from_config` reads a config dict or file and builds the matching scheduler.
Every unsupported config value raises :class:`~fcpass.errors.FcpassError` naming the key, the
value found and the supported values; keys this module does not use are ignored.

Where diffusers' own arithmetic order or precision matters for bit-level agreement (float32
``torch.linspace``, float64-accumulated ``torch.cumprod``, float64 ``set_timesteps`` maths) the
code below reproduces it deliberately; the comments say where.
"""

from __future__ import annotations

import abc
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.errors import FcpassError

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_CLASS_NAMES",
    "DDIMScheduler",
    "FlowMatchEulerScheduler",
    "Scheduler",
    "scheduler_from_config",
]

CONFIG_FILE_NAME = "scheduler_config.json"

_DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_DDIM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_DDIM_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Configs of these classes are sampled with DDIM built from their beta fields; the dict holds
# the defaults of the *source* class for keys it may omit, so an omitted key means what the
# source scheduler would have done (DPM-Solver never clips x0 and spaces timesteps linearly).
_DDIM_FALLBACK_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {},
    "DPMSolverMultistepScheduler": {"clip_sample": False, "timestep_spacing": "linspace"},
}

SUPPORTED_CLASS_NAMES: tuple[str, ...] = (
    "DDIMScheduler",
    "FlowMatchEulerDiscreteScheduler",
    *_DDIM_FALLBACK_DEFAULTS,
)


# --------------------------------------------------------------------------------------------
# Config validation helpers
# --------------------------------------------------------------------------------------------


def _format_values(values: Iterable[Any]) -> str:
    return ", ".join(json.dumps(v) for v in values)


def _unsupported(key: str, value: Any, supported: str) -> FcpassError:
    return FcpassError(
        f"unsupported scheduler config value for {key!r}: found {json.dumps(value, default=repr)}; "
        f"supported: {supported}."
    )


def _choice(config: Mapping[str, Any], key: str, default: Any, supported: tuple[Any, ...]) -> Any:
    value = config.get(key, default)
    # bool is an int subclass, so `1 in (True,)` would pass; compare types explicitly.
    if not any(type(value) is type(s) and value == s for s in supported):
        raise _unsupported(key, value, _format_values(supported))
    return value


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    return bool(_choice(config, key, default, (True, False)))


def _integer(config: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _unsupported(key, value, f"an integer >= {minimum}")
    return value


def _number(config: Mapping[str, Any], key: str, default: float, *, positive: bool = False) -> float:
    value = config.get(key, default)
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or (positive and value <= 0):
        raise _unsupported(key, value, "a finite number > 0" if positive else "a finite number")
    return float(value)


def _steps(num_inference_steps: int, maximum: int | None = None) -> int:
    bad = isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
    if bad or num_inference_steps < 1 or (maximum is not None and num_inference_steps > maximum):
        limit = f"from 1 to {maximum} (num_train_timesteps)" if maximum is not None else ">= 1"
        raise FcpassError(f"invalid number of inference steps: found {num_inference_steps!r}; use an integer {limit}.")
    return int(num_inference_steps)


# --------------------------------------------------------------------------------------------
# Beta schedules, reproducing diffusers' torch float32 arithmetic
# --------------------------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as computed on CPU.

    Torch fills the first half as ``start + step * i`` and the second as ``end - step * (n-1-i)``
    with a float32 ``step`` and a fused multiply-add; numpy's float64 linspace differs by an ulp in
    a third of the entries, so we replay torch's recipe (float64 evaluation of the fma, which is
    exact for the product, then one rounding).
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    idx = np.arange(steps, dtype=np.float64)
    half = steps // 2
    out = np.empty(steps, dtype=np.float64)
    out[:half] = np.float64(start32) + step * idx[:half]
    out[half:] = np.float64(end32) - step * (steps - 1 - idx[half:])
    return out.astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` (cosine), computed in Python floats like the original."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def _cumprod_f32(values: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 inputs in float64 and rounds each output.
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` (arXiv 2305.08891, Algorithm 1) in float32."""
    one = np.float32(1.0)
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(one - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (one - alphas).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------


class Scheduler(abc.ABC):
    """A sampler that turns model outputs at a fixed sequence of timesteps into a sample.

    Use: ``set_timesteps(S)``; start from noise times ``init_noise_sigma``; for ``index`` in
    ``range(len(timesteps))`` run the model on ``scale_model_input(x, index)`` with timestep
    input ``timesteps[index]`` and set ``x = step(model_output, index, x)``.
    All arrays returned are float32.
    """

    #: Standard deviation of the initial noise sample (1.0 for both implemented samplers).
    init_noise_sigma: float = 1.0

    def __init__(self) -> None:
        self.num_inference_steps: int | None = None
        #: Model timestep inputs, float32, one per sampling step; empty until set_timesteps.
        self.timesteps: np.ndarray = np.zeros(0, dtype=np.float32)

    @abc.abstractmethod
    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> None:
        """Compute ``timesteps`` (and any per-step state) for ``num_inference_steps`` steps; `image_seq_len`,
        the latent's token count, for the schedules that shift with it, and `sigmas`, a pipeline's own
        unshifted sigmas, for the schedules that take them (flow matching; DDIM ignores them)."""

    @abc.abstractmethod
    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """Return the sample one step less noisy, given the model output at ``timesteps[index]``."""

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        """Return the model input for ``sample`` at ``index``; both samplers need no scaling."""
        del index
        return sample

    def _prepare(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}.set_timesteps() must be called before step()")
        position = int(index)
        if not 0 <= position < len(self.timesteps):
            raise IndexError(f"step index {index} is outside 0..{len(self.timesteps) - 1}")
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        # Broadcasting would silently hide a model returning the wrong shape.
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} differs from sample shape {sample.shape}")
        return model_output, sample, position


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
        self.num_train_timesteps = _integer(config, "num_train_timesteps", 1000, 1)
        self.beta_schedule: str = _choice(config, "beta_schedule", "linear", _DDIM_BETA_SCHEDULES)
        self.prediction_type: str = _choice(config, "prediction_type", "epsilon", _DDIM_PREDICTION_TYPES)
        self.timestep_spacing: str = _choice(config, "timestep_spacing", "leading", _DDIM_TIMESTEP_SPACINGS)
        self.clip_sample = _flag(config, "clip_sample", True)
        self.clip_sample_range = _number(config, "clip_sample_range", 1.0, positive=True)
        self.set_alpha_to_one = _flag(config, "set_alpha_to_one", True)
        self.steps_offset = _integer(config, "steps_offset", 0, 0)
        rescale = _flag(config, "rescale_betas_zero_snr", False)
        n = self.num_train_timesteps

        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float32)
            if betas.shape != (n,):
                raise FcpassError(
                    f"scheduler config 'trained_betas' has the wrong shape: found {betas.shape}, expected ({n},) "
                    "from 'num_train_timesteps'; make the two agree."
                )
        elif self.beta_schedule == "linear":
            betas = _torch_linspace_f32(_number(config, "beta_start", 0.0), _number(config, "beta_end", 0.0), n)
        elif self.beta_schedule == "scaled_linear":
            lo = _number(config, "beta_start", 0.0, positive=True)
            hi = _number(config, "beta_end", 0.0, positive=True)
            root = _torch_linspace_f32(lo**0.5, hi**0.5, n)
            betas = root * root
        else:
            betas = _cosine_betas(n)
        if rescale:
            betas = _rescale_zero_terminal_snr(betas)

        self.betas: np.ndarray = betas
        self.alphas_cumprod: np.ndarray = _cumprod_f32(np.float32(1.0) - betas)
        # The last step has no "previous" timestep; diffusers uses 1 (a clean x0) or alphas_cumprod[0].
        self.final_alpha_cumprod = np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]
        #: Integer training timesteps (int64), as diffusers' ``DDIMScheduler.timesteps``.
        self.discrete_timesteps: np.ndarray = np.zeros(0, dtype=np.int64)
        self._step_ratio = 0

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> None:
        n = self.num_train_timesteps
        steps = _steps(num_inference_steps, maximum=n)
        # Same numpy expressions as diffusers so that rounding (and its quirks) agree exactly.
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = n // steps
            timesteps = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64)
            timesteps += self.steps_offset
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

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        model_output, sample, position = self._prepare(model_output, index, sample)
        timestep = int(self.discrete_timesteps[position])
        prev_timestep = timestep - self._step_ratio
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
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
        self.num_train_timesteps = _integer(config, "num_train_timesteps", 1000, 1)
        self.shift = _number(config, "shift", 1.0, positive=True)
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
        steps = _steps(num_inference_steps)
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


def _load_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
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


def _reject_unless(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    """Raise unless ``config[key]`` (absent counts as ``allowed[0]``) is one of ``allowed``."""
    _choice(config, key, allowed[0], allowed)


def _ddim_from_config(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> DDIMScheduler:
    merged = {**defaults, **config}
    _reject_unless(merged, "thresholding", (False,))
    trained_betas = merged.get("trained_betas")
    if trained_betas is not None and not isinstance(trained_betas, list):
        raise _unsupported("trained_betas", trained_betas, "null or a list of numbers")
    return DDIMScheduler(
        num_train_timesteps=merged.get("num_train_timesteps", 1000),
        beta_start=merged.get("beta_start", 0.0001),
        beta_end=merged.get("beta_end", 0.02),
        beta_schedule=merged.get("beta_schedule", "linear"),
        trained_betas=trained_betas,
        clip_sample=merged.get("clip_sample", True),
        clip_sample_range=merged.get("clip_sample_range", 1.0),
        set_alpha_to_one=merged.get("set_alpha_to_one", True),
        steps_offset=merged.get("steps_offset", 0),
        prediction_type=merged.get("prediction_type", "epsilon"),
        timestep_spacing=merged.get("timestep_spacing", "leading"),
        rescale_betas_zero_snr=merged.get("rescale_betas_zero_snr", False),
    )


def _flow_from_config(config: Mapping[str, Any]) -> FlowMatchEulerScheduler:
    dynamic = None
    if _flag(config, "use_dynamic_shifting", False):
        _reject_unless(config, "time_shift_type", ("exponential",))
        # diffusers' defaults, as Flux's pipeline reads them
        dynamic = {"base_image_seq_len": _number(config, "base_image_seq_len", 256, positive=True),
                   "max_image_seq_len": _number(config, "max_image_seq_len", 4096, positive=True),
                   "base_shift": _number(config, "base_shift", 0.5), "max_shift": _number(config, "max_shift", 1.15)}
        if dynamic["max_image_seq_len"] == dynamic["base_image_seq_len"]:
            raise _unsupported("max_image_seq_len", config.get("max_image_seq_len"), "a length other than base_image_seq_len")
    _reject_unless(config, "invert_sigmas", (False,))
    _reject_unless(config, "shift_terminal", (None,))
    _reject_unless(config, "use_karras_sigmas", (False,))
    _reject_unless(config, "use_exponential_sigmas", (False,))
    _reject_unless(config, "use_beta_sigmas", (False,))
    _reject_unless(config, "stochastic_sampling", (False,))
    return FlowMatchEulerScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        shift=config.get("shift", 1.0),
        dynamic=dynamic,
    )


def scheduler_from_config(config: Mapping[str, Any] | str | Path) -> Scheduler:
    """Build the scheduler a diffusers ``scheduler_config.json`` describes.

    ``config`` is the parsed dict, the file's path, or the folder holding it. ``_class_name``
    selects the sampler; DDPM and DPM-Solver configs are sampled with DDIM built from their
    beta fields (with a warning). Raises FcpassError for unreadable files and unsupported values.
    """
    cfg = _load_config(config)
    class_name = cfg.get("_class_name")
    if class_name == "DDIMScheduler":
        return _ddim_from_config(cfg, {})
    if class_name == "FlowMatchEulerDiscreteScheduler":
        return _flow_from_config(cfg)
    if cfg.get("use_flow_sigmas") is True and "flow_shift" in cfg:
        # Wan's and other video models' UniPC / DPM-Solver configs: flow matching, whose Euler sampler is here.
        shift = _number(cfg, "flow_shift", 1.0, positive=True)
        raise FcpassError(f"{class_name} with flow sigmas is not implemented; sample this flow-matching model with "
                          f'{{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": {shift:g}}} as its '
                          "scheduler_config.json")
    if class_name in _DDIM_FALLBACK_DEFAULTS:
        if class_name == "DPMSolverMultistepScheduler":
            # A flow-matching DPM-Solver config describes a different model family than DDIM.
            _reject_unless(cfg, "use_flow_sigmas", (False,))
        logger.warning(
            "scheduler config names %s, which is not implemented; sampling with DDIM (eta = 0) "
            "built from its beta schedule instead",
            class_name,
        )
        return _ddim_from_config(cfg, _DDIM_FALLBACK_DEFAULTS[class_name])
    raise _unsupported("_class_name", class_name, _format_values(SUPPORTED_CLASS_NAMES))
