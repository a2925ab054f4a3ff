"""Multistep ODE solvers: DPM-Solver(++) and UniPC, as diffusers 0.42 computes them, in numpy float32.

* :class:`DPMSolverMultistepScheduler` -- ``diffusers.DPMSolverMultistepScheduler`` (PixArt's and Sana's
  pipelines): orders 1-3, ``dpmsolver++`` (data prediction) or ``dpmsolver`` (noise prediction).
* :class:`UniPCMultistepScheduler` -- ``diffusers.UniPCMultistepScheduler`` (Wan's): the UniP predictor
  with the UniC corrector, B(h) variants ``bh1`` and ``bh2``.

Both run on a variance-preserving training schedule (sigma = sqrt((1 - a) / a) of ``alphas_cumprod``), on
Karras sigmas over it, or on flow-matching sigmas (``use_flow_sigmas``: alpha = 1 - sigma, shifted by
``flow_shift``). A multistep solver extrapolates from the converted model outputs of the steps before, so
``step`` must be called for indices 0, 1, 2, ... in order; index 0 starts a new trajectory.

The per-step coefficients are float32 scalars computed as diffusers computes them; each update is then
folded into one linear combination of the latents it reads (one pass over each: on a video latent the
host's passes are what a step costs), so a trajectory agrees with diffusers' to float32 rounding (the
tests hold it to 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fcpass.contract.errors import FcpassError
from runtimes.scheduler_base import (
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

__all__ = ["DPMSolverMultistepScheduler", "MultistepScheduler", "UniPCMultistepScheduler"]

F32 = np.float32
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
KARRAS_RHO = 7.0  # Karras et al.'s rho, which diffusers fixes


def _karras(sigma_max: float, sigma_min: float, steps: int) -> np.ndarray:
    """Karras et al.'s noise levels from ``sigma_max`` down to ``sigma_min`` (float64, as diffusers' helper)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timesteps whose log-sigma interpolates to each of ``sigmas`` (diffusers' helper)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _linear_combination(terms: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """sum(c * a) in float32, one pass per term and one scratch array: the update's arrays are whole latents,
    whose passes are what a step costs the host."""
    (c0, a0), *rest = terms
    out = np.multiply(a0, F32(c0))
    scratch = np.empty_like(out)
    for c, a in rest:
        np.multiply(a, F32(c), out=scratch)
        out += scratch
    return out


class MultistepScheduler(Scheduler):
    """The part DPM-Solver and UniPC share: the training schedule, timestep spacing, the sigma <-> (alpha, sigma)
    conversion, and the history of converted model outputs that later steps extrapolate from.

    ``sigmas`` holds one noise level per step plus the final one; ``timesteps`` the model's integer timestep
    inputs as float32 (diffusers hands the transformer int64 timesteps).
    """

    #: diffusers' names for this solver's variants, the first the default.
    SOLVER_TYPES: tuple[str, ...] = ()
    #: Variants diffusers silently maps to its default (``register_to_config``).
    SOLVER_ALIASES: tuple[str, ...] = ()

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.num_train_timesteps = train_timesteps(config, minimum=2)  # the solvers step between two
        self.order = integer(config, "solver_order", 2, 1)
        if self.order > 3:
            raise unsupported("solver_order", self.order, "1, 2 or 3")
        self.prediction_type: str = choice(config, "prediction_type", "epsilon", PREDICTION_TYPES)
        self.timestep_spacing: str = choice(config, "timestep_spacing", "linspace", TIMESTEP_SPACINGS)
        self.steps_offset = integer(config, "steps_offset", 0, 0, self.num_train_timesteps - 1)
        self.lower_order_final = flag(config, "lower_order_final", True)
        self.final_sigmas_type: str = choice(config, "final_sigmas_type", "zero", ("zero", "sigma_min"))
        self.karras = flag(config, "use_karras_sigmas", False)
        self.flow = flag(config, "use_flow_sigmas", False)
        self.flow_shift = number(config, "flow_shift", 1.0, positive=True)
        solver_type = config.get("solver_type", self.SOLVER_TYPES[0])
        if solver_type in self.SOLVER_ALIASES:
            solver_type = self.SOLVER_TYPES[0]
        self.solver_type: str = choice({"solver_type": solver_type}, "solver_type", None, self.SOLVER_TYPES)
        for key in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting"):
            reject_unless(config, key, (False,))
        if self.prediction_type == "flow_prediction" and not self.flow:
            raise unsupported("prediction_type", "flow_prediction", "flow_prediction only with use_flow_sigmas: true")
        betas = training_betas(config)
        self.cosine = config.get("beta_schedule") == "squaredcos_cap_v2"
        alphas_cumprod = cumprod_f32(F32(1.0) - betas)
        if flag(config, "rescale_betas_zero_snr", False):
            alphas_cumprod[-1] = 2.0**-24  # diffusers' guard against an infinite first sigma
        self.alphas_cumprod: np.ndarray = alphas_cumprod
        #: The training schedule's noise levels, sqrt((1 - a) / a), float32 as diffusers computes them.
        self.train_sigmas: np.ndarray = np.sqrt((F32(1.0) - alphas_cumprod) / alphas_cumprod)
        self.sigmas: np.ndarray = np.zeros(0, dtype=np.float32)
        self._history: list[np.ndarray] = []
        self._next_index = 0

    # ---- the schedule -----------------------------------------------------------------------------

    def _spaced(self, steps: int, last: int) -> np.ndarray:
        """Integer timesteps below ``last`` spaced as ``timestep_spacing`` says, each once."""
        spaced = self._spacing(steps, last)
        if len(np.unique(spaced)) != len(spaced):  # a step of no length: the solver divides by it
            raise FcpassError(f"{steps} steps over a training schedule of {self.num_train_timesteps} timesteps repeat "
                              "a timestep; sample with fewer steps, or use the model's own num_train_timesteps.")
        return spaced

    def _spacing(self, steps: int, last: int) -> np.ndarray:
        """diffusers' numpy expressions of the spacing."""
        if self.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = last // (steps + 1)
            spaced = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + self.steps_offset
            check_timesteps(spaced, self.num_train_timesteps, self.steps_offset)
            return spaced
        ratio = self.num_train_timesteps / steps
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1

    def _sigma_min_vp(self) -> float:
        return float(self.train_sigmas[0])

    def _finish(self, timesteps: np.ndarray, sigmas: np.ndarray, last: float) -> None:
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        discrete = np.asarray(timesteps).astype(np.int64)  # diffusers casts to int64: truncation, not rounding
        self.timesteps = discrete.astype(np.float32)
        self.num_inference_steps = len(discrete)
        self._start_trajectory()

    def alpha_sigma(self, sigma: np.float32) -> tuple[np.float32, np.float32]:
        """The signal and noise scales of noise level ``sigma``: (1 - sigma, sigma) on flow sigmas, else
        (1 / sqrt(sigma^2 + 1), sigma * alpha)."""
        sigma = F32(sigma)
        if self.flow:
            return F32(1.0) - sigma, sigma
        alpha = F32(1.0) / np.sqrt(sigma * sigma + F32(1.0))
        return alpha, sigma * alpha

    def lam(self, sigma: np.float32) -> np.float32:
        """log(alpha) - log(sigma): +inf at sigma 0, where the last step lands."""
        alpha, sig = self.alpha_sigma(sigma)
        with np.errstate(divide="ignore"):
            return F32(np.log(alpha) - np.log(sig))

    # ---- the trajectory ---------------------------------------------------------------------------

    def _start_trajectory(self) -> None:
        """Forget the steps before: what a multistep solver extrapolates from."""
        self._history, self._next_index = [], 0

    def _begin(self, index: int) -> None:
        if index == 0:
            self._start_trajectory()
        elif index != self._next_index:
            raise RuntimeError(f"{type(self).__name__} steps in order: expected step {self._next_index}, got {index}; "
                               "start a new trajectory at step 0")
        self._next_index = index + 1

    def _remember(self, converted: np.ndarray) -> None:
        self._history = [*self._history, converted][-self.order:]

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """The clean sample the model output predicts at noise level ``sigma``."""
        if self.prediction_type == "flow_prediction":
            return sample - sigma * model_output
        if self.prediction_type == "sample":
            return model_output
        alpha, sig = self.alpha_sigma(sigma)
        if self.prediction_type == "epsilon":
            return (sample - sig * model_output) / alpha
        return alpha * sample - sig * model_output

    def _eps(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """The noise the model output predicts at noise level ``sigma``."""
        if self.prediction_type == "epsilon":
            return model_output
        alpha, sig = self.alpha_sigma(sigma)
        if self.prediction_type == "sample":
            return (sample - alpha * model_output) / sig
        return alpha * model_output + sig * sample


class DPMSolverMultistepScheduler(MultistepScheduler):
    """DPM-Solver++ (``algorithm_type: dpmsolver++``, the default) or DPM-Solver (``dpmsolver``), multistep,
    equal to ``diffusers.DPMSolverMultistepScheduler``.

    With ``lambda = log(alpha / sigma)`` and ``h`` its increase over a step, DPM-Solver++ of order 1 steps
    ``x' = (sigma' / sigma) x - alpha' (exp(-h) - 1) x0``; orders 2 and 3 add finite differences of the
    previous steps' x0 (``solver_type`` midpoint or heun at order 2). The first steps and, with
    ``lower_order_final`` and fewer than 15 steps or a final sigma of 0, the last ones fall back to lower
    orders, as diffusers does.
    """

    SOLVER_TYPES = ("midpoint", "heun")
    SOLVER_ALIASES = ("logrho", "bh1", "bh2")

    def __init__(self, **config: Any) -> None:
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm == "deis":  # diffusers runs DEIS configs as DPM-Solver++
            algorithm = "dpmsolver++"
        if algorithm in ("sde-dpmsolver++", "sde-dpmsolver"):
            raise FcpassError(f"DPMSolverMultistepScheduler with algorithm_type {algorithm!r} is not implemented: it draws "
                              "fresh noise at every step; use \"dpmsolver++\", the deterministic solver")
        self.algorithm: str = choice({"algorithm_type": algorithm}, "algorithm_type", None, ("dpmsolver++", "dpmsolver"))
        super().__init__(config)
        self.euler_at_final = flag(config, "euler_at_final", False)
        clip = config.get("lambda_min_clipped", -math.inf)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or math.isnan(clip):
            raise unsupported("lambda_min_clipped", clip, "a number, or -Infinity for none")
        self.lambda_min_clipped = float(clip)
        reject_unless(config, "use_lu_lambdas", (False,))
        choice(config, "variance_type", None, (None, "learned", "learned_range"))  # the sampler keeps the mean
        if self.algorithm == "dpmsolver" and self.final_sigmas_type == "zero":
            raise unsupported("final_sigmas_type", "zero", '"sigma_min" with algorithm_type "dpmsolver"')
        if self.algorithm == "dpmsolver" and self.prediction_type == "flow_prediction":
            raise unsupported("prediction_type", "flow_prediction", f'{format_values(PREDICTION_TYPES[:3])} with '
                              'algorithm_type "dpmsolver"')

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> None:
        if sigmas is not None:
            raise FcpassError("DPMSolverMultistepScheduler takes no pipeline sigmas; sample with its own schedule")
        steps = step_count(num_inference_steps, maximum=self.num_train_timesteps)
        n = self.num_train_timesteps
        # lambda_min_clipped cuts the schedule where log(alpha / sigma) falls below it (cosine schedules).
        alpha_t = np.sqrt(self.alphas_cumprod)
        lambda_t = np.log(alpha_t) - np.log(np.sqrt(F32(1.0) - self.alphas_cumprod))
        last = n - int(np.searchsorted(lambda_t[::-1], self.lambda_min_clipped))
        timesteps: np.ndarray = self._spaced(steps, last)
        if self.karras:
            schedule = self.train_sigmas[::-1]
            sig = _karras(float(schedule[0]), float(schedule[-1]), steps)
            timesteps = _sigma_to_t(sig, np.log(self.train_sigmas))
            if not self.cosine:  # diffusers keeps a cosine schedule's fractional timesteps (then truncates them)
                timesteps = timesteps.round()
        elif self.flow:
            alphas = np.linspace(1, 1 / n, steps + 1)
            sig = 1.0 - alphas
            sig = np.flip(self.flow_shift * sig / (1 + (self.flow_shift - 1) * sig))[:-1].copy()
            timesteps = sig * n
        else:
            sig = np.interp(timesteps, np.arange(0, len(self.train_sigmas)), self.train_sigmas)
        self._finish(timesteps, sig, self._sigma_min_vp() if self.final_sigmas_type == "sigma_min" else 0.0)
        if any(self._order_at(i) == 3 and self.sigmas[i + 1] == self.sigmas[i] for i in range(len(self.timesteps))):
            # diffusers' third-order update divides by the zero-length step and returns NaN
            raise FcpassError(f"DPMSolverMultistepScheduler of order 3 repeats a noise level in {steps} steps (Karras "
                              'sigmas end on sigma_min); use final_sigmas_type "zero" or solver_order 2')

    def _order_at(self, i: int) -> int:
        """The order of step ``i``: lower on the first steps, and on the last ones where diffusers lowers it."""
        steps = len(self.timesteps)
        final = i == steps - 1 and (self.euler_at_final or (self.lower_order_final and steps < 15)
                                    or self.final_sigmas_type == "zero")
        second = i == steps - 2 and self.lower_order_final and steps < 15
        if self.order == 1 or i < 1 or final:
            return 1
        if self.order == 2 or i < 2 or second:
            return 2
        return 3

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        model_output, sample, i = self._prepare(model_output, index, sample)
        self._begin(i)
        sigma = self.sigmas[i]
        converted = (self._x0(model_output, sample, sigma) if self.algorithm == "dpmsolver++"
                     else self._eps(model_output, sample, sigma))
        self._remember(converted)
        # A final sigma of 0 makes h infinite, and a repeated sigma makes it 0; the limits are what diffusers returns.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return self._update(sample, i, self._order_at(i))

    def _scales(self, i: int) -> tuple[np.float32, np.float32, np.float32, np.float32, np.float32]:
        """(alpha, sigma) at the step's target, (alpha, sigma) at its start, and h."""
        alpha_t, sigma_t = self.alpha_sigma(self.sigmas[i + 1])
        alpha_s, sigma_s = self.alpha_sigma(self.sigmas[i])
        return alpha_t, sigma_t, alpha_s, sigma_s, F32(self.lam(self.sigmas[i + 1]) - self.lam(self.sigmas[i]))

    def _update(self, sample: np.ndarray, i: int, order: int) -> np.ndarray:
        """The sample at sigma ``i + 1``: diffusers' update of ``order`` folded into one linear combination of the
        sample and the last ``order`` converted outputs m0, m1, m2 (newest first), with D1 and D2 (the divided
        differences) expanded into their weights."""
        alpha_t, sigma_t, alpha_s, sigma_s, h = self._scales(i)
        plus = self.algorithm == "dpmsolver++"
        one, half = F32(1.0), F32(0.5)
        e = np.exp(-h) if plus else np.exp(h)
        ratio = sigma_t / sigma_s if plus else alpha_t / alpha_s
        phi = (alpha_t if plus else sigma_t) * (e - one)
        m = self._history
        if order == 1:
            return _linear_combination([(ratio, sample), (-phi, m[-1])])
        lam = [self.lam(self.sigmas[i - k]) for k in range(order)]
        r0 = F32(lam[0] - lam[1]) / h
        # the weight of D1 (order 2), or of D1 and D2 (order 3), in diffusers' formulas
        c1 = alpha_t * ((e - one) / h + one) if plus else -(sigma_t * ((e - one) / h - one))
        if order == 2:
            if self.solver_type == "midpoint":
                c1 = -half * phi
            return _linear_combination([(ratio, sample), (-phi + c1 / r0, m[-1]), (-c1 / r0, m[-2])])
        r1 = F32(lam[1] - lam[2]) / h
        c2 = -(alpha_t * ((e - one + h) / (h * h) - half)) if plus else -(sigma_t * ((e - one - h) / (h * h) - half))
        # D1 = (1 + q) D1_0 - q D1_1 and D2 = p (D1_0 - D1_1), with D1_0 = (m0 - m1) / r0 and D1_1 = (m1 - m2) / r1
        q, p = r0 / (r0 + r1), one / (r0 + r1)
        a, b = c1 * (one + q) + c2 * p, -c1 * q - c2 * p
        return _linear_combination([(ratio, sample), (-phi + a / r0, m[-1]), (-a / r0 + b / r1, m[-2]),
                                    (-b / r1, m[-3])])


@dataclass(frozen=True)
class _UniTerms:
    """One UniP or UniC update: ``x' = ratio x - phi m0 - residual_scale sum_k rho_k (m_k - m0) / rks[k]``, the
    rho solving ``R rho = b`` (UniPC's order conditions), m0 the latest converted output and m_k the earlier."""

    ratio: np.float32
    phi: np.float32
    residual_scale: np.float32
    r: np.ndarray
    b: np.ndarray
    rks: np.ndarray  # one per earlier output


class UniPCMultistepScheduler(MultistepScheduler):
    """UniPC (Zhao et al. 2023), equal to ``diffusers.UniPCMultistepScheduler``: at each step the UniC corrector
    refines the sample the last step's predictor made, using this step's model output, then the UniP predictor
    of order ``solver_order`` steps on.

    Both extrapolate the converted outputs (x0 with ``predict_x0``, else the noise) with ``rho`` weights that
    solve UniPC's order conditions for the B(h) of ``solver_type`` (``bh1``: h, ``bh2``: exp(h) - 1).
    ``disable_corrector`` lists the steps whose corrector is skipped. Flow sigmas run from 1 - 1e-6 (diffusers
    keeps log(alpha) finite at the first step) and may be a pipeline's own.
    """

    SOLVER_TYPES = ("bh2", "bh1")
    SOLVER_ALIASES = ("midpoint", "heun", "logrho")

    def __init__(self, **config: Any) -> None:
        super().__init__(config)
        self.predict_x0 = flag(config, "predict_x0", True)
        disabled = config.get("disable_corrector", [])
        if not isinstance(disabled, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in disabled):
            raise unsupported("disable_corrector", disabled, "a list of step indices")
        self.disable_corrector = frozenset(disabled)
        reject_unless(config, "solver_p", (None,))
        reject_unless(config, "shift_terminal", (None,))
        if not self.lower_order_final and self.order > 1 and self.final_sigmas_type == "zero":
            # diffusers' last step then extrapolates with weights divided by an infinite h and returns NaN
            raise unsupported("lower_order_final", False, 'true, or false with final_sigmas_type "sigma_min" or '
                              "solver_order 1")
        if not self.predict_x0 and self.prediction_type == "flow_prediction":
            raise unsupported("predict_x0", False, "true with prediction_type \"flow_prediction\"")
        # The ends of a Karras schedule, where the config fixes them
        self.sigma_min, self.sigma_max = (None if config.get(key) is None else number(config, key, 1.0, positive=True)
                                          for key in ("sigma_min", "sigma_max"))
        self._last_sample: np.ndarray | None = None

    def _start_trajectory(self) -> None:
        super()._start_trajectory()
        self._last_sample = None  # the corrector's: no step before the first

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None,
                      sigmas: np.ndarray | None = None) -> None:
        n = self.num_train_timesteps
        if sigmas is not None:
            if not self.flow:
                raise FcpassError("a pipeline's own sigmas need use_flow_sigmas: true in the scheduler config")
            sigmas = np.asarray(sigmas, dtype=np.float64)
            num_inference_steps = len(sigmas)
        steps = step_count(num_inference_steps)
        timesteps: np.ndarray = self._spaced(steps, n)
        zero_last = self.final_sigmas_type == "zero"
        if self.karras:
            source = self.train_sigmas if sigmas is None else sigmas
            log_sigmas = np.log(source)
            schedule = np.flip(source)
            lo = self.sigma_min if self.sigma_min is not None else float(schedule[-1])
            hi = self.sigma_max if self.sigma_max is not None else float(schedule[0])
            sig = _karras(hi, lo, steps)
            if self.flow:
                sig = sig / (sig + 1)
                timesteps = sig * n
            else:
                timesteps = _sigma_to_t(sig, log_sigmas).round()
            last = 0.0 if zero_last else float(sig[-1])
        elif self.flow:
            sig = np.linspace(1, 1 / n, steps + 1)[:-1] if sigmas is None else sigmas
            sig = self.flow_shift * sig / (1 + (self.flow_shift - 1) * sig)
            if np.fabs(sig[0] - 1) < 1e-6:
                sig[0] -= 1e-6  # diffusers': log(alpha) = log(1 - sigma) stays finite
            timesteps = sig * n
            last = 0.0 if zero_last else float(sig[-1])
        else:
            sig = np.interp(timesteps, np.arange(0, len(self.train_sigmas)), self.train_sigmas)
            last = 0.0 if zero_last else self._sigma_min_vp()
        self._finish(timesteps, sig, last)

    def _order_at(self, i: int) -> int:
        """The predictor's order at step ``i``: one more than the steps before it, up to ``solver_order``, and
        with ``lower_order_final`` at most the steps left."""
        order = min(self.order, len(self.timesteps) - i) if self.lower_order_final else self.order
        return min(order, i + 1)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        model_output, sample, i = self._prepare(model_output, index, sample)
        self._begin(i)
        sigma = self.sigmas[i]
        converted = self._x0(model_output, sample, sigma) if self.predict_x0 else self._eps(model_output, sample, sigma)
        with np.errstate(divide="ignore", invalid="ignore"):  # as in DPM-Solver's step
            if i > 0 and (i - 1) not in self.disable_corrector and self._last_sample is not None:
                sample = self._corrector(converted, self._last_sample, i)
            self._remember(converted)
            self._last_sample = sample
            prev = self._predictor(sample, i, self._order_at(i))
        return prev.astype(np.float32, copy=False)

    def _terms(self, target: int, start: int, order: int, earlier: list[int]) -> _UniTerms:
        """The coefficients of a UniP/UniC update of ``order`` from sigma index ``start`` to ``target``, with
        ``earlier`` the sigma indices of the converted outputs before the latest."""
        alpha_t, sigma_t = self.alpha_sigma(self.sigmas[target])
        alpha_s, sigma_s = self.alpha_sigma(self.sigmas[start])
        lam_s = self.lam(self.sigmas[start])
        h = F32(self.lam(self.sigmas[target]) - lam_s)
        rks = [F32((self.lam(self.sigmas[index]) - lam_s) / h) for index in earlier]
        r = np.asarray([*rks, F32(1.0)], dtype=np.float32)
        hh = -h if self.predict_x0 else h
        h_phi_1 = F32(np.expm1(hh))
        h_phi_k = F32(h_phi_1 / hh - F32(1.0))
        b_h = hh if self.solver_type == "bh1" else h_phi_1
        rows, b, factorial = [], [], 1
        for k in range(1, order + 1):
            rows.append(r ** (k - 1))
            b.append(F32(h_phi_k * F32(factorial) / b_h))
            factorial *= k + 1
            h_phi_k = F32(h_phi_k / hh - F32(1.0 / factorial))
        # The first-order update scales the residual by alpha (data prediction) or sigma (noise prediction).
        if self.predict_x0:
            ratio, phi, scale = sigma_t / sigma_s, alpha_t * h_phi_1, alpha_t
        else:
            ratio, phi, scale = alpha_t / alpha_s, sigma_t * h_phi_1, sigma_t
        return _UniTerms(ratio, phi, scale * b_h, np.stack(rows).astype(np.float32), np.asarray(b, dtype=np.float32),
                         np.asarray(rks, dtype=np.float32))

    def _predictor(self, x: np.ndarray, i: int, order: int) -> np.ndarray:
        """UniP: ``x`` one step on, extrapolating the converted outputs of this step and the ``order - 1`` before."""
        earlier = self._history[-order:-1][::-1]  # the newest first, as rks
        t = self._terms(i + 1, i, order, [i - k for k in range(1, order)])
        if not earlier:
            return _linear_combination([(t.ratio, x), (-t.phi, self._history[-1])])
        rhos = np.array([0.5], dtype=np.float32) if order == 2 else np.linalg.solve(t.r[:-1, :-1], t.b[:-1])
        weights = [float(t.residual_scale) * float(rho) / float(rk) for rho, rk in zip(rhos, t.rks)]
        return _linear_combination([(t.ratio, x), (-float(t.phi) + sum(weights), self._history[-1]),
                                    *((-w, m) for w, m in zip(weights, earlier))])

    def _corrector(self, converted: np.ndarray, last_sample: np.ndarray, i: int) -> np.ndarray:
        """UniC: redo the last step from ``last_sample`` with this step's converted output as one more point; the
        result replaces the sample the last step's predictor made."""
        order = self._order_at(i - 1)
        earlier = self._history[-order:-1][::-1]
        t = self._terms(i, i - 1, order, [i - (k + 1) for k in range(1, order)])
        rhos = np.array([0.5], dtype=np.float32) if order == 1 else np.linalg.solve(t.r, t.b).astype(np.float32)
        scale = float(t.residual_scale)
        weights = [scale * float(rho) / float(rk) for rho, rk in zip(rhos[:-1], t.rks)]
        this = scale * float(rhos[-1])
        return _linear_combination([(t.ratio, last_sample), (-float(t.phi) + sum(weights) + this, self._history[-1]),
                                    *((-w, m) for w, m in zip(weights, earlier)), (-this, converted)])
