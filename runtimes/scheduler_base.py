"""What every scheduler shares: the sampling interface, config validation, and the training noise schedule.

The beta schedules reproduce diffusers' torch float32 arithmetic without importing torch (float32
``torch.linspace``, float64-accumulated ``torch.cumprod``); the comments say where.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fcpass.contract.errors import FcpassError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# --------------------------------------------------------------------------------------------
# Config validation helpers
# --------------------------------------------------------------------------------------------


def format_values(values: Iterable[Any]) -> str:
    return ", ".join(json.dumps(v) for v in values)


def unsupported(key: str, value: Any, supported: str) -> FcpassError:
    return FcpassError(
        f"unsupported scheduler config value for {key!r}: found {json.dumps(value, default=repr)}; "
        f"supported: {supported}."
    )


def choice(config: Mapping[str, Any], key: str, default: Any, supported: tuple[Any, ...]) -> Any:
    value = config.get(key, default)
    # bool is an int subclass, so `1 in (True,)` would pass; compare types explicitly.
    if not any(type(value) is type(s) and value == s for s in supported):
        raise unsupported(key, value, format_values(supported))
    return value


def flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    return bool(choice(config, key, default, (True, False)))


# The longest training schedule a config may name: diffusers' models train on 1000 steps, and a
# schedule is allocated whole, so a typo of a few more digits must not ask for terabytes.
MAX_TRAIN_TIMESTEPS = 100_000


def integer(config: Mapping[str, Any], key: str, default: int, minimum: int, maximum: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        raise unsupported(key, value, f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else ""))
    return value


def train_timesteps(config: Mapping[str, Any], minimum: int = 1) -> int:
    return integer(config, "num_train_timesteps", 1000, minimum, MAX_TRAIN_TIMESTEPS)


def check_timesteps(timesteps: np.ndarray, n: int, steps_offset: int) -> None:
    """Every spaced timestep indexes the training schedule (steps_offset can push the first past its end)."""
    if len(timesteps) and (timesteps.max() >= n or timesteps.min() < 0):
        raise FcpassError(f"scheduler config 'steps_offset' {steps_offset} puts timestep {int(timesteps.max())} past "
                          f"the training schedule's {n}; use a smaller steps_offset (diffusers' configs use 0 or 1) "
                          "or more num_train_timesteps.")


def number(config: Mapping[str, Any], key: str, default: float, *, positive: bool = False) -> float:
    value = config.get(key, default)
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or (positive and value <= 0):
        raise unsupported(key, value, "a finite number > 0" if positive else "a finite number")
    return float(value)


def reject_unless(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    """Raise unless ``config[key]`` (absent counts as ``allowed[0]``) is one of ``allowed``."""
    choice(config, key, allowed[0], allowed)


def step_count(num_inference_steps: int, maximum: int | None = None) -> int:
    bad = isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
    if bad or num_inference_steps < 1 or (maximum is not None and num_inference_steps > maximum):
        limit = f"from 1 to {maximum} (num_train_timesteps)" if maximum is not None else ">= 1"
        raise FcpassError(f"invalid number of inference steps: found {num_inference_steps!r}; use an integer {limit}.")
    return int(num_inference_steps)


# --------------------------------------------------------------------------------------------
# Beta schedules, reproducing diffusers' torch float32 arithmetic
# --------------------------------------------------------------------------------------------


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
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


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` (cosine), computed in Python floats like the original."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 inputs in float64 and rounds each output.
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` (arXiv 2305.08891, Algorithm 1) in float32."""
    one = np.float32(1.0)
    alphas_bar_sqrt = np.sqrt(cumprod_f32(one - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (one - alphas).astype(np.float32)


def training_betas(config: Mapping[str, Any]) -> np.ndarray:
    """The training schedule's betas (float32) that a diffusers config's beta fields describe, as diffusers builds
    them: ``trained_betas``, else ``beta_schedule`` from ``beta_start`` to ``beta_end`` over ``num_train_timesteps``,
    then ``rescale_betas_zero_snr``."""
    n = train_timesteps(config)
    schedule = choice(config, "beta_schedule", "linear", BETA_SCHEDULES)
    trained = config.get("trained_betas")
    if trained is not None:
        numbers = isinstance(trained, np.ndarray) and trained.dtype.kind == "f" or isinstance(trained, (list, tuple)) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in trained)
        if not numbers:
            raise unsupported("trained_betas", trained, "null or a list of numbers")
        betas = np.asarray(trained, dtype=np.float32)
        if betas.shape != (n,):
            raise FcpassError(
                f"scheduler config 'trained_betas' has the wrong shape: found {betas.shape}, expected ({n},) "
                "from 'num_train_timesteps'; make the two agree."
            )
    elif schedule == "linear":
        betas = torch_linspace_f32(number(config, "beta_start", 0.0001), number(config, "beta_end", 0.02), n)
    elif schedule == "scaled_linear":
        root = torch_linspace_f32(number(config, "beta_start", 0.0001, positive=True) ** 0.5,
                                  number(config, "beta_end", 0.02, positive=True) ** 0.5, n)
        betas = root * root
    else:
        betas = cosine_betas(n)
    if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
        raise FcpassError(f"scheduler config's betas leave (0, 1): they run from {float(betas.min()):.3g} to "
                          f"{float(betas.max()):.3g}; use 0 < beta_start <= beta_end < 1 (or trained_betas inside it), "
                          "as the model's own scheduler_config.json has them.")
    if not cumprod_f32(np.float32(1.0) - betas)[-1] >= 1e-20:  # no signal left: the samplers divide by it
        raise FcpassError(f"scheduler config's betas leave no signal by the last of {n} training timesteps "
                          "(alphas_cumprod reaches 0); use a smaller beta_end or fewer num_train_timesteps, as the "
                          "model's own scheduler_config.json has them.")
    if flag(config, "rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Scheduler(abc.ABC):
    """A sampler that turns model outputs at a fixed sequence of timesteps into a sample.

    Use: ``set_timesteps(S)``; start from noise times ``init_noise_sigma``; for ``index`` in
    ``range(len(timesteps))`` run the model on ``scale_model_input(x, index)`` with timestep
    input ``timesteps[index]`` and set ``x = step(model_output, index, x)``, for each index in
    order: a multistep solver extrapolates from the steps before, and index 0 starts a new
    trajectory. All arrays returned are float32.
    """

    #: Standard deviation of the initial noise sample (1.0 for every implemented sampler).
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
        unshifted sigmas, for the schedules that take them (flow matching; DDIM ignores them, DPM-Solver refuses
        them)."""

    @abc.abstractmethod
    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """Return the sample one step less noisy, given the model output at ``timesteps[index]``."""

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        """Return the model input for ``sample`` at ``index``; no implemented sampler scales it."""
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
