"""Numeric faults: NaN or Inf in the statistics, the model's output (so the latents) or the cache state at a
random step. A policy then never forces a skip on what it read (it computes, or lets the graph decide, which
fails closed on its own), and a trajectory whose latent is not finite stops with one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import CTL_SKIP, STAT_OUTPUT
from fcpass.sampling import load_denoiser
from models.digits import SCHEDULER_CONFIG
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.fuzz.harness import TALLY, examples

POLICIES = ["fastcache", "fbcache", "teacache", "magcache", "fora:regions=stack", "delta-dit"]
STEPS = 8


@pytest.fixture(scope="module")
def denoisers(digits_fc: Path) -> dict[str, Any]:
    return {p: load_denoiser(digits_fc, p, {}) for p in POLICIES}


class Poisoned:
    """A state binding whose step `at` returns `value` in `where` (the statistics, the output, or the state)."""

    def __init__(self, inner: Any, at: int, where: str, value: float, output: str) -> None:
        self.inner, self.at, self.where, self.value, self.output, self.calls = inner, at, where, value, output, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, feeds: dict[str, np.ndarray], fetch: list[str]) -> dict[str, np.ndarray]:
        out = self.inner.step(feeds, fetch)
        if self.calls == self.at:
            if self.where == "stat":
                out[STAT_OUTPUT] = np.full_like(out[STAT_OUTPUT], self.value)
            elif self.where == "output":
                out[self.output] = out[self.output].copy()
                out[self.output].flat[::7] = self.value
            else:  # the cache state the next steps reuse: host arrays, or OrtValues bound by address
                host = getattr(self.inner, "values", None)
                pools = getattr(self.inner, "pools", None)
                for buf in (host or (pools.current if pools is not None else {})).values():
                    array = buf if isinstance(buf, np.ndarray) else buf.numpy()
                    if array.dtype.kind != "f":
                        continue
                    if isinstance(buf, np.ndarray):
                        buf[...] = self.value
                    else:
                        buf.update_inplace(np.full_like(array, self.value))
        self.calls += 1
        return out


@settings(max_examples=examples(48))
@given(policy=st.sampled_from(POLICIES), at=st.integers(0, STEPS - 2), where=st.sampled_from(["stat", "output", "state"]),
       value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_numeric_fault(denoisers: dict[str, Any], policy: str, at: int, where: str, value: float) -> None:
    run_fault(denoisers, policy, at, where, value)


@pytest.mark.parametrize("policy", ["teacache", "magcache"])
def test_regression_nan_statistic(denoisers: dict[str, Any], policy: str) -> None:
    """teacache took a NaN change into its budget and raised LinAlgError finding the next threshold."""
    run_fault(denoisers, policy, 1, "stat", np.nan)


def run_fault(denoisers: dict[str, Any], policy: str, at: int, where: str, value: float) -> None:
    denoiser = denoisers[policy]
    clean = denoiser.binding
    denoiser.binding = Poisoned(clean, at, where, value, denoiser.output)
    ctls: list[list[int]] = []
    controls = denoiser.policy.controls

    def record(step: int) -> Any:
        c = controls(step)
        ctls.append(c.ctl.tolist())
        return c

    denoiser.policy.controls = record
    try:
        result = sample(denoiser, scheduler_from_config(SCHEDULER_CONFIG),
                        SampleRequest(classes=[1], steps=STEPS, seed=at, uncond_class=10), progress=False)
        assert np.isfinite(result.images).all(), f"{policy} drew non-finite images without an error"
        outcome = "worked"
    except FcpassError as exc:
        outcome = "error"
        assert where != "stat" and "not finite" in str(exc), f"{policy}: {exc}"
    finally:
        denoiser.binding = clean
        del denoiser.policy.controls
    if where == "output":  # the latent took the NaN: the trajectory must stop, not draw a blank image
        assert outcome == "error", f"{policy} sampled on with a non-finite latent from step {at}"
    if where == "stat" and len(ctls) > at + 1:
        # the statistics of call `at` read NaN/Inf: the next call forces no region to skip on them
        forced = [k for k, c in enumerate(ctls[at + 1]) if c == CTL_SKIP]
        fixed_schedule = policy.startswith(("fora", "delta-dit", "magcache"))  # they read no statistic
        assert not forced or fixed_schedule, f"{policy} forced regions {forced} to skip on a non-finite statistic"
    TALLY[f"numeric.{where}", outcome] += 1
