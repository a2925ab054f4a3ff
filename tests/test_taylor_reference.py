"""fcpass's first-order forecast (`taylor1`) against a reference TaylorSeer written in numpy, over whole trajectories.

The reference runs the compiled graph only to compute the stack (a full step) or to apply the final
layer to a stack output it is given (a skipped step, `reuse` of a state it sets to its own forecast);
which steps compute and the forecast O_a + (i - a)(O_a - O_b)/(a - b) from its own history are numpy.
TaylorSeer's full steps are diffusers' (`TaylorSeerCacheConfig`: the warm-up, then every `interval`
steps from `warmup + 1`) and the last; FastCache's skips are the ones its in-graph test took in the
fcpass run, replayed, so that what is pinned is the forecast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fcpass.contract.plan import CTL_INPUT, MIX_INPUT, MIX_WIDTH, THR_INPUT, read_plan
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import load_denoiser
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import SCHEDULER_CONFIG, calibration_setup, export_tiny_dit, load

STEPS = 14
REQUEST = {"classes": [1], "steps": STEPS, "guidance_scale": 1.5, "uncond_class": 10, "seed": 0}


@pytest.fixture(scope="module")
def stack_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DiT compiled with the stack region and its previous output, calibrated for FastCache."""
    d = tmp_path_factory.mktemp("taylor_ref")
    src = export_tiny_dit(d / "tiny.onnx", "legacy", seed=3)
    out = d / "tiny.fc.onnx"
    optimize(src, out, OptimizeOptions(regions=("stack",), taylor=True, calibrate=2, calib_steps=6, calib_eps=0.5),
             calibration_setup([1, 2]))
    return out


class ReferenceTaylorSeer:
    """A denoiser that forecasts the stack's output in numpy at the steps `skipped(step)` says."""

    def __init__(self, path: Path, skipped: Callable[[int], bool]) -> None:
        self.plan = read_plan(load(path))
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.roles = load_denoiser(path, None, {}).roles  # the model's inputs, without the cache controls
        self.uncached_macs = 0
        self.skipped = skipped
        states = {s.kind: s for s in self.plan.states if s.region == "stack"}
        self.out_state, self.out_next = states["out"].name, states["out"].next
        self.history: list[tuple[int, np.ndarray]] = []  # (step, stack output) at each full step
        self.outputs: dict[int, np.ndarray] = {}

    def reset(self, num_steps: int) -> None:
        self.history = []

    def forecast(self, step: int) -> np.ndarray:
        (b, o_b), (a, o_a) = self.history[-2:]
        return (o_a + (step - a) * (o_a - o_b) / (a - b)).astype(np.float32)

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        skip = self.skipped(step)
        run = {**feeds, CTL_INPUT: np.array([int(skip)], np.int64), THR_INPUT: np.zeros(1, np.float32),
               MIX_INPUT: np.zeros((1, MIX_WIDTH), np.float32),  # reuse: the output state as it is fed
               **{s.name: np.zeros(s.shape, s.dtype) for s in self.plan.states}}
        if skip:
            run[self.out_state] = self.forecast(step)
        noise, stack_out = self.session.run(["noise_pred", self.out_next], run)
        if not skip:
            self.history.append((step, stack_out.astype(np.float64)))
        self.outputs[step] = noise
        return noise

    def last_record(self) -> dict[str, Any]:
        return {}


class Recording:
    """A denoiser that keeps the output of every step of `den`."""

    def __init__(self, den: Any) -> None:
        self.den, self.roles, self.uncached_macs = den, den.roles, den.uncached_macs
        self.outputs: dict[int, np.ndarray] = {}

    def reset(self, num_steps: int) -> None:
        self.den.reset(num_steps)

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        self.outputs[step] = self.den(feeds, step)
        return self.outputs[step]

    def last_record(self) -> dict[str, Any]:
        return self.den.last_record()


def _fcpass(path: Path, policy: str) -> tuple[dict[int, np.ndarray], list[dict[str, Any]], np.ndarray]:
    den = Recording(load_denoiser(path, policy, {}))
    result = sample(den, scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(**REQUEST), progress=False)
    return den.outputs, result.records, result.images


def _reference(path: Path, skipped: Callable[[int], bool]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    ref = ReferenceTaylorSeer(path, skipped)
    result = sample(ref, scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(**REQUEST),
                    progress=False)
    return ref.outputs, result.images


def _diffusers_schedule(interval: int, warmup: int, last: bool) -> Callable[[int], bool]:
    def skipped(step: int) -> bool:
        full = step < warmup or (step - warmup - 1) % interval == 0 or (last and step == STEPS - 1)
        return not full
    return skipped


@pytest.mark.parametrize(("interval", "warmup", "last"), [(3, 2, True), (4, 3, False), (5, 2, True)])
def test_taylorseer_forecasts_the_reference_taylorseer_at_every_skipped_step(stack_graph: Path, interval: int,
                                                                            warmup: int, last: bool) -> None:
    skipped = _diffusers_schedule(interval, warmup, last)
    spec = f"taylorseer:interval={interval},warmup={warmup},regions=stack" + ("" if last else ",last=0")
    got, records, images = _fcpass(stack_graph, spec)
    want, want_images = _reference(stack_graph, skipped)
    assert [r["skip"][0] for r in records] == [float(skipped(i)) for i in range(STEPS)]
    assert sum(skipped(i) for i in range(STEPS)) >= STEPS // 2  # most steps are forecasts
    for step in range(STEPS):
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(images, want_images, rtol=1e-5, atol=1e-5)


def test_fastcache_taylor1_forecasts_the_reference_at_the_steps_its_test_skips(stack_graph: Path) -> None:
    got, records, images = _fcpass(stack_graph, "fastcache:approx=taylor1,regions=stack,sigma_scale=1e6,max_skips=3,warmup=2")
    decided = [r["skip"][0] == 1 for r in records]
    assert sum(decided) >= 4  # the test skipped often enough for forecasts to build on forecasts' inputs
    want, want_images = _reference(stack_graph, lambda step: decided[step])
    for step in range(STEPS):
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(images, want_images, rtol=1e-5, atol=1e-5)
