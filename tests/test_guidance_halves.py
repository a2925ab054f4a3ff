"""Guidance on a graph exported at batch 1: two calls a step, one per half, each half with its own cache state
and the unconditional half taking the conditional half's decisions. Checked against the same model
exported at batch 2, which runs both halves in one call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import read_plan
from fcpass.contract.roles import InputRoles, TensorSpec
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import load_denoiser
from runtimes.cache import CachedDenoiser
from runtimes.sampler import SampleRequest, SampleResult, sample, split_halves
from runtimes.schedulers import scheduler_from_config
from tests.conftest import SCHEDULER_CONFIG, calibration_setup, export_tiny_dit
from tests.helpers.fake_trt import Fake, fake_engine_file, install_fake_trt

REQUEST = {"classes": [1, 2, 7], "steps": 8, "guidance_scale": 1.5, "uncond_class": 10, "seed": 0}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Path]]:
    """{batch: (export, calibrated compiled graph)} of one model."""
    d = tmp_path_factory.mktemp("halves")
    out = {}
    for batch in (1, 2):
        src = export_tiny_dit(d / f"b{batch}.onnx", "legacy", seed=3, batch=batch)
        fc = d / f"b{batch}.fc.onnx"
        optimize(src, fc, OptimizeOptions(calibrate=2, calib_steps=6, calib_eps=0.5, taylor=True), calibration_setup([1, 2]))
        out[batch] = (src, fc)
    return out


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Fake:
    return install_fake_trt(monkeypatch)


def _sample(path: Path, policy: str | None = None, options: dict | None = None) -> SampleResult:
    den = load_denoiser(path, policy, options or {})
    return sample(den, scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(**REQUEST), progress=False)


def test_a_batch_1_graph_samples_with_guidance_as_the_batch_2_graph_does(graphs: dict[int, tuple[Path, Path]]) -> None:
    one, two = _sample(graphs[1][0]), _sample(graphs[2][0])
    np.testing.assert_allclose(one.images, two.images, atol=1e-5)
    assert one.calls == 2 * two.calls == 2 * 3 * REQUEST["steps"]  # a call per half, one sample per call
    assert one.macs_executed == one.macs_uncached == 2 * len(REQUEST["classes"]) * REQUEST["steps"] * (
        two.macs_uncached // two.calls // 2)


@pytest.mark.parametrize("policy", ["none", "fora:interval=3", "fora:interval=2,regions=stack", "taylorseer:interval=3"])
def test_a_forced_schedule_on_two_calls_equals_it_on_one(graphs: dict[int, tuple[Path, Path]], policy: str) -> None:
    """Each half's state holds what its rows of the batch-2 graph's state hold: every approximation of the
    two calls equals the one call's."""
    one, two = _sample(graphs[1][1], policy), _sample(graphs[2][1], policy)
    np.testing.assert_allclose(one.images, two.images, atol=1e-5)
    assert [r["skip"] for r in one.records] == [r["skip"] for r in two.records]
    assert one.macs_executed == two.macs_executed and one.macs_uncached == two.macs_uncached
    if policy != "none":
        assert one.macs_executed < one.macs_uncached


def test_calibrating_a_batch_1_graph_fits_what_the_batch_2_graph_fits(graphs: dict[int, tuple[Path, Path]]) -> None:
    """Calibration reads both halves' states, joined as one call of both would hold them."""
    plans = [read_plan(onnx.load(str(graphs[b][1]), load_external_data=False)) for b in (1, 2)]
    assert [r.name for r in plans[0].regions] == [r.name for r in plans[1].regions]
    for r1, r2 in zip(*(p.regions for p in plans)):
        one, two = r1.calibration, r2.calibration
        assert one["n_pairs"] == two["n_pairs"] > 0  # both halves' rows, step after step
        for key in ("sigma2", "fit_rel_err", "reuse_rel_err"):
            np.testing.assert_allclose(one[key] if one[key] is not None else np.nan,
                                       two[key] if two[key] is not None else np.nan, rtol=1e-3, err_msg=key)
        if "teacache" in two:
            np.testing.assert_allclose(one["teacache"]["coefficients"], two["teacache"]["coefficients"], rtol=1e-3, atol=1e-6)


def test_the_unconditional_half_takes_the_conditional_half_s_decisions(graphs: dict[int, tuple[Path, Path]],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[int], list[int]]] = []
    run = CachedDenoiser._run

    def spy(self, binding, feeds, controls):  # type: ignore[no-untyped-def]
        out = run(self, binding, feeds, controls)
        calls.append((controls.ctl.tolist(), out[2].tolist()))
        return out

    monkeypatch.setattr(CachedDenoiser, "_run", spy)
    result = _sample(graphs[1][1], "fastcache", {"sigma_scale": 50.0, "max_skips": 4})
    assert len(calls) == result.calls
    decided = 0
    for (ctl, skip), (follow, followed) in zip(calls[::2], calls[1::2]):
        assert follow == [int(s == 1) for s in skip]  # forced: skip where the first half skipped, else compute
        assert [max(s, 0) for s in followed] == [max(s, 0) for s in skip]
        decided += 2 in ctl
    assert decided and any(1 in r["skip"] for r in result.records)  # the test decided, and skipped somewhere
    np.testing.assert_allclose(result.macs_executed, sum(r["macs"] for r in result.records))


def test_two_bindings_share_one_tensorrt_context(graphs: dict[int, tuple[Path, Path]], fake: Fake,
                                                 tmp_path: Path) -> None:
    """On TensorRT the halves' states point one execution context at their buffers in turn."""
    fc = graphs[1][1]
    engine = fake_engine_file(fc, tmp_path / "b1.fc.engine")
    ref = _sample(fc, "fora:interval=3")
    got = sample(load_denoiser(fc, "fora:interval=3", {}, engine=engine), scheduler_from_config(SCHEDULER_CONFIG),
                 SampleRequest(**REQUEST), progress=False)
    np.testing.assert_array_equal(got.images, ref.images)
    assert [r["skip"] for r in got.records] == [r["skip"] for r in ref.records]
    assert len(fake.executed) == got.calls


def spec(name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, np.dtype(dtype), shape)


def test_inputs_without_a_batch_axis_serve_both_calls() -> None:
    """Flux's position ids (tokens, 3) and a scalar timestep go to both calls whole, however many rows they have."""
    roles = InputRoles(spec("x", "float32", (1, 2, 4)), spec("t", "float32", ()),
                       prompt_embeds=spec("c", "float32", (1, 2, 4)), img_ids=spec("img", "float32", (2, 3)))
    feeds = {"x": np.arange(16.0).reshape(2, 2, 4), "t": np.array(0.5), "c": -np.arange(16.0).reshape(2, 2, 4),
             "img": np.arange(6.0).reshape(2, 3)}
    cond, uncond = split_halves(feeds, roles)
    for name in ("x", "c"):
        np.testing.assert_array_equal(np.concatenate([cond[name], uncond[name]]), feeds[name])
        assert len(cond[name]) == 1
    for name in ("t", "img"):
        assert cond[name] is feeds[name] and uncond[name] is feeds[name]
    assert split_halves({**feeds, "x": feeds["x"][:1]}, roles) is None  # one half's rows: one call


def test_an_odd_batch_above_one_is_refused_for_guidance() -> None:
    class Three:
        roles = InputRoles(spec("x", "float32", (3, 4, 8, 8)), spec("t", "float32", (3,)), spec("y", "int64", (3,)))
        uncached_macs = 0

    with pytest.raises(FcpassError, match="the graph's batch is 3: guidance needs an even batch"):
        sample(Three(), scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(**REQUEST), progress=False)
