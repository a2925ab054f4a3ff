"""diffusers' cache hooks on the bundled DiT (tools/peers_diffusers.py), driven by fcpass's host loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fcpass.contract.errors import FcpassError
from models.digits import ONNX, WEIGHTS
from runtimes.sampler import SampleRequest, SampleResult, sample
from runtimes.schedulers import scheduler_from_config

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not (ONNX.exists() and WEIGHTS.exists()), reason="bundled model missing")

from tests.conftest import SCHEDULER_CONFIG
from tools.peers_diffusers import (
    DEFAULTS,
    KNOBS,
    METHODS,
    DiffusersDenoiser,
    _options,
    apply_hook,
    calibrate_magcache,
    load_diffusers_digits,
)

STEPS = 10
REQUEST = SampleRequest(classes=[3, 7], steps=STEPS, guidance_scale=1.5, uncond_class=10, seed=0)
# fp32 PyTorch eager against ONNX Runtime: 1.8e-5 max abs here (4.9e-5 for 10 classes x 50 steps) on [-1, 1] images.
PARITY_ATOL = 1e-4


def _run(denoiser: Any) -> SampleResult:
    return sample(denoiser, scheduler_from_config(SCHEDULER_CONFIG), REQUEST, progress=False)


def _total(result: SampleResult, key: str) -> int:
    return sum(r[key] for r in result.records)


@pytest.fixture(scope="module")
def uncached() -> SampleResult:
    return _run(DiffusersDenoiser(load_diffusers_digits(threads=1)))


@pytest.fixture(scope="module")
def mag_ratios() -> list[float]:
    return calibrate_magcache(steps=STEPS, classes=(5,))


def test_uncached_matches_onnx_graph(uncached: SampleResult) -> None:
    from fcpass.sampling import load_denoiser

    reference = _run(load_denoiser(ONNX, None, {}, threads=1))
    assert uncached.images.shape == reference.images.shape == (2, 1, 16, 16)
    assert np.abs(uncached.images - reference.images).max() <= PARITY_ATOL
    records = uncached.records
    assert len(records) == 2 * STEPS and all(r["blocks_run"] == 8 and r["attn_run"] == 8 for r in records)


# Settings aggressive enough to skip within 10 steps; `blocks` says whether whole blocks are skipped.
HOOKS = [
    ("fbcache", {"threshold": 0.2}, True),
    ("taylorseer", {"cache_interval": 3, "disable_cache_before_step": 2}, True),
    ("taylorseer", {"scope": "modules", "cache_interval": 3, "disable_cache_before_step": 2}, False),
    ("magcache", {"threshold": 0.2, "retention_ratio": 0.1}, True),
    ("fastercache", {}, False),
    ("pab", {"spatial_attention_timestep_skip_range": (-1, 1000)}, False),
    ("seacache", {"threshold": 0.5, "max_consecutive_cached": 3}, True),
]


@pytest.mark.parametrize(("method", "options", "blocks"), HOOKS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(HOOKS)])
def test_hook_skips_work_changes_output_and_resets(
    uncached: SampleResult, mag_ratios: list[float], method: str, options: dict[str, Any], blocks: bool
) -> None:
    model = load_diffusers_digits(threads=1)
    if method == "magcache":
        options = {**options, "mag_ratios": mag_ratios}
    apply_hook(model, method, **options)
    denoiser = DiffusersDenoiser(model)
    first, second = _run(denoiser), _run(denoiser)

    assert np.array_equal(first.images, second.images), "hook state leaked from one sampling run into the next"
    assert first.records == second.records
    assert _total(first, "rows_run") < _total(uncached, "rows_run")
    if blocks:
        assert _total(first, "blocks_run") < _total(uncached, "blocks_run")
    else:
        assert _total(first, "attn_run") < _total(uncached, "attn_run")
    assert np.abs(first.images - uncached.images).max() > 1e-4
    assert np.all(np.isfinite(first.images))


def test_bad_method_names_every_valid_one() -> None:
    model = load_diffusers_digits(threads=1)
    with pytest.raises(FcpassError) as info:
        apply_hook(model, "teacache")
    message = str(info.value)
    assert "\n" not in message and "'teacache'" in message
    assert all(name in message for name in METHODS)


def test_bad_options_are_user_errors(mag_ratios: list[float]) -> None:
    model = load_diffusers_digits(threads=1)
    with pytest.raises(FcpassError, match=r"unknown option\(s\) treshold for fbcache; its options are: threshold"):
        apply_hook(model, "fbcache", treshold=0.1)
    with pytest.raises(FcpassError, match="calibrate_magcache"):
        apply_hook(model, "magcache")
    with pytest.raises(FcpassError, match="scope"):
        apply_hook(model, "taylorseer", scope="everything")
    apply_hook(model, "magcache", mag_ratios=mag_ratios)
    with pytest.raises(FcpassError, match="already has magcache"):
        apply_hook(model, "fbcache")
    with pytest.raises(FcpassError, match=f"set up for {STEPS} steps but the run has 20"):
        DiffusersDenoiser(model).reset(20)


def test_knobs_cover_the_methods_with_valid_options() -> None:
    assert set(KNOBS) == set(METHODS) - {"none"}
    for method, sweep in KNOBS.items():
        assert len(sweep) >= 4
        for knob in sweep:
            assert set(_options(method, knob)) == set(DEFAULTS[method])
