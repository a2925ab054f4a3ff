"""Calibration: fit every region's linear approximation and FastCache's per-block sigma^2.

Two passes over N sampling trajectories of the compiled graph with every region computing (which
makes its state outputs the true input H and output O of every region at every step):

1. Fit. For each step i and gap g in 1..max_gap (a skipped region's reference is up to max_gap
   steps old), with X = H(i) - H(i-g) and Y = O(i) - O(i-g), solve the ridge problem
   min ||X W + b - Y||^2 + lam (||W - I||^2 + ||b||^2) for V = W - I, b. Only the normal equations
   are accumulated ((D+1)^2 numbers per region output), never the activations, so memory is
   bounded. lam is chosen on held-out trajectories (every 4th) from a grid that includes lam = inf
   (W = I, b = 0: the residual approximation), so the fit never does worse than `residual` there;
   the residual stream has directions that barely vary, and a weak ridge blows the fit up along them.
2. Test. Rerun the same trajectories; wherever the fitted approximation reproduces O(i) within
   relative error eps, collect delta^2 = rel(H(i), H(i-g))^2. sigma^2 is their mean (ALGORITHMS 2a);
   a region with no such pair gets none and is never skipped by FastCache.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from scipy import linalg

from fcpass.errors import FcpassError
from fcpass.plan import CachePlan, RegionSpec
from runtimes.backend import OrtBackend
from runtimes.cache import CachedDenoiser
from runtimes.policies import NoCache
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config

log = logging.getLogger(__name__)


@dataclass
class CalibrationOptions:
    trajectories: int = 8
    steps: int = 50
    eps: float = 0.05
    max_gap: int = 4
    ridge: float = 1e-2  # used when there is no held-out trajectory to choose it (fewer than 4)
    seed: int = 1000


class _Recorder(CachedDenoiser):
    """Calls `sink(step, state)` after every step with the new (true, all-compute) state."""

    def __init__(self, *args: Any, sink: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink = sink

    def reset(self, num_steps: int) -> None:
        super().reset(num_steps)
        self.sink(-1, None)

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        out = super().__call__(feeds, step)
        self.sink(step, self.state)
        return out


def _pairs(region: RegionSpec) -> list[tuple[int, int]]:
    return [(k, j) for k, j in enumerate(region.pairs) if j is not None]


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample ||a - b|| / ||b|| (batch axis 0)."""
    axes = tuple(range(1, a.ndim))
    num = np.sqrt(np.sum((a.astype(np.float64) - b) ** 2, axis=axes))
    den = np.sqrt(np.sum(b.astype(np.float64) ** 2, axis=axes))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def calibrate(model: onnx.ModelProto, plan: CachePlan, setup: dict[str, Any], options: CalibrationOptions) -> None:
    """Fit V, b of every region (initializers of `model`) and store per-region numbers in `plan`."""
    if options.trajectories < 1:
        raise FcpassError(f"--calibrate {options.trajectories} must be at least 1 trajectory")
    request: SampleRequest = setup["request"]
    classes = request.classes or []
    n = options.trajectories
    calib_request = SampleRequest(
        classes=[classes[j % len(classes)] for j in range(n)] if classes else None,
        prompt_embeds=None if request.prompt_embeds is None else request.prompt_embeds[np.arange(n) % len(request.prompt_embeds)],
        steps=options.steps, guidance_scale=request.guidance_scale, uncond_class=request.uncond_class,
        seed=options.seed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calib.onnx"
        onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**20)
        backend = OrtBackend(path)
        from fcpass.runner import roles_from_plan

        roles = roles_from_plan(plan.roles, backend)
        fits = {r.name: _Fit(r, plan, options) for r in plan.regions}
        for phase in ("fit", "test"):
            if phase == "test":
                for f in fits.values():
                    f.solve()
            sink = _Sink(plan, fits, phase, options.max_gap)
            denoiser = _Recorder(backend, plan, NoCache(), roles, sink=sink)
            log.info("calibration, %s pass: %d trajectories x %d steps", phase, n, options.steps)
            sample(denoiser, scheduler_from_config(setup["scheduler_config"]), calib_request, progress=True)
    for r in plan.regions:
        fits[r.name].store(model)
        r.calibration = fits[r.name].summary()
    plan.calibration = {
        "trajectories": n, "steps": options.steps, "eps": options.eps, "max_gap": options.max_gap,
        "ridge": options.ridge, "seed": options.seed, "guidance_scale": request.guidance_scale,
    }


class _Sink:
    """Keeps the last max_gap states of the current trajectory and feeds (ref, now) pairs to fits."""

    def __init__(self, plan: CachePlan, fits: dict[str, _Fit], phase: str, max_gap: int) -> None:
        self.plan = plan
        self.fits = fits
        self.phase = phase
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=max_gap)
        self.trajectory = -1

    def __call__(self, step: int, state: dict[str, np.ndarray] | None) -> None:
        if state is None:
            self.history.clear()
            self.trajectory += 1
            return
        now = {s.name: state[s.name] for s in self.plan.states if s.kind in ("in", "out")}
        bad = [n for n, v in now.items() if not np.isfinite(v).all()]
        if bad:
            raise FcpassError(
                f"calibration diverged: {self._culprit(now)} is NaN/Inf at step {step} of trajectory "
                f"{self.trajectory}; check the scheduler config and the model's weights"
            )
        for gap, ref in enumerate(reversed(self.history), start=1):
            for f in self.fits.values():
                f.add(ref, now, gap, self.phase, held_out=self.trajectory % 4 == 3)
        self.history.append(now)


    def _culprit(self, now: dict[str, np.ndarray]) -> str:
        """The first block whose input is finite and output is not, else the first bad tensor."""
        for r in self.plan.block_regions():
            ins = [now[f"fc.{r.name}.in{j}"] for j in range(len(r.inputs))]
            outs = [now[f"fc.{r.name}.out{k}"] for k in range(len(r.outputs))]
            if all(np.isfinite(x).all() for x in ins) and not all(np.isfinite(x).all() for x in outs):
                return f"region {r.name} output"
        name = next(n for n, v in now.items() if not np.isfinite(v).all())
        return f"state {name}"


class _Fit:
    def __init__(self, region: RegionSpec, plan: CachePlan, options: CalibrationOptions) -> None:
        self.region = region
        self.options = options
        self.names_in = [f"fc.{region.name}.in{j}" for j in range(len(region.inputs))]
        self.names_out = [f"fc.{region.name}.out{k}" for k in range(len(region.outputs))]
        self.width = {k: s.shape[-1] for k, s in enumerate(st for st in plan.states if st.region == region.name and st.kind == "out")}
        # Per output k and split (0 fit, 1 held out): X'X, X'R and R'R of the augmented problem.
        self.normal: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, float]] = {}
        self.chosen_lambda: dict[int, float] = {}
        self.solution: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.good_delta2: list[float] = []
        self.pairs_seen = 0
        self.err_linear: list[float] = []
        self.err_residual: list[float] = []
        self.err_reuse: list[float] = []

    def add(
        self, ref: dict[str, np.ndarray], now: dict[str, np.ndarray], gap: int, phase: str, held_out: bool = False
    ) -> None:
        pairs = _pairs(self.region)
        if phase == "fit":
            for k, j in pairs:
                h0, h1 = ref[self.names_in[j]], now[self.names_in[j]]
                o0, o1 = ref[self.names_out[k]], now[self.names_out[k]]
                d = h1.shape[-1]
                x = (h1 - h0).reshape(-1, d).astype(np.float64)
                y = (o1 - o0).reshape(-1, d).astype(np.float64) - x
                xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
                key = (k, int(held_out))
                a, b, c = self.normal.get(key, (np.zeros((d + 1, d + 1)), np.zeros((d + 1, d)), 0.0))
                self.normal[key] = (a + xa.T @ xa, b + xa.T @ y, c + float(np.sum(y * y)))
            return
        # Test phase: one decision per region, so errors and deltas combine all its streams.
        self.pairs_seen += 1
        num = sum(np.sum((now[n] - ref[n]).astype(np.float64).reshape(len(now[n]), -1) ** 2, axis=1) for n in self.names_in)
        den = sum(np.sum(ref[n].astype(np.float64).reshape(len(ref[n]), -1) ** 2, axis=1) for n in self.names_in)
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = float(np.max(np.sqrt(num / den)))
        errs_lin, errs_res, errs_reuse = [], [], []
        for k in range(len(self.names_out)):
            o0, o1 = ref[self.names_out[k]], now[self.names_out[k]]
            j = self.region.pairs[k]
            if j is None:
                lin = res = o0
            else:
                dh = now[self.names_in[j]].astype(np.float64) - ref[self.names_in[j]]
                res = o0 + dh
                v, b = self.solution[k]
                lin = res + dh @ v + b
            errs_lin.append(np.max(_rel(lin, o1)))
            errs_res.append(np.max(_rel(res, o1)))
            errs_reuse.append(np.max(_rel(o0, o1)))
        err = float(max(errs_lin))
        self.err_linear.append(err)
        self.err_residual.append(float(max(errs_res)))
        self.err_reuse.append(float(max(errs_reuse)))
        if err <= self.options.eps and np.isfinite(delta):
            self.good_delta2.append(delta**2)

    def solve(self) -> None:
        zero = (np.zeros((0, 0)), np.zeros((0, 0)), 0.0)
        for k, _ in _pairs(self.region):
            d = int(self.width[k])
            fit, held = self.normal.get((k, 0), zero), self.normal.get((k, 1), zero)
            if not fit[0].size:  # no pair seen (a 1-step calibration): stay at W = I, b = 0
                self.solution[k] = (np.zeros((d, d)), np.zeros(d))
                self.chosen_lambda[k] = float("inf")
                continue
            scale = max(np.trace(fit[0][:d, :d]) / d, 1e-12)
            lam = self._select_lambda(fit, held, scale)
            self.chosen_lambda[k] = lam
            if not np.isfinite(lam):
                self.solution[k] = (np.zeros((d, d)), np.zeros(d))
                continue
            a = fit[0] + (held[0] if held[0].size else 0.0)
            b = fit[1] + (held[1] if held[1].size else 0.0)
            sol = linalg.solve(a + lam * scale * np.eye(d + 1), b, assume_a="pos")
            self.solution[k] = (sol[:d], sol[d])

    def _select_lambda(self, fit: tuple, held: tuple, scale: float) -> float:
        """The grid value with the least held-out squared error; inf means W = I, b = 0."""
        if not held[0].size:
            return self.options.ridge
        best, best_err = float("inf"), held[2]  # the residual approximation's error
        for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
            theta = linalg.solve(fit[0] + lam * scale * np.eye(len(fit[0])), fit[1], assume_a="pos")
            err = float(np.sum(theta * (held[0] @ theta)) - 2 * np.sum(theta * held[1]) + held[2])
            if err < best_err:
                best, best_err = lam, err
        return best

    def store(self, model: onnx.ModelProto) -> None:
        by_name = {t.name: t for t in model.graph.initializer}
        for k, (v, b) in self.solution.items():
            for name, value in ((f"fc.{self.region.name}.V{k}", v), (f"fc.{self.region.name}.b{k}", b)):
                tensor = by_name[name]
                dtype = numpy_helper.to_array(tensor).dtype
                tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))

    def summary(self) -> dict[str, Any]:
        mean = lambda xs: float(np.mean(xs)) if xs else None
        return {
            "sigma2": mean(self.good_delta2),
            "n_good": len(self.good_delta2),
            "n_pairs": self.pairs_seen,
            "fit_rel_err": mean(self.err_linear),
            "residual_rel_err": mean(self.err_residual),
            "reuse_rel_err": mean(self.err_reuse),
            # None: held-out data preferred W = I, b = 0 (the fit stays the residual approximation).
            "ridge": {str(k): (v if np.isfinite(v) else None) for k, v in self.chosen_lambda.items()},
        }
