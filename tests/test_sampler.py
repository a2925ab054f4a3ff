"""The sampling host loop: determinism, guidance, batching, state reset, learned sigma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpass.contract.errors import FcpassError
from fcpass.sampling import load_denoiser
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import SCHEDULER_CONFIG, all_initializers, load


def _run(path: Path, policy: str | None = None, **request: object) -> np.ndarray:
    args = {"classes": [1, 2, 3], "steps": 6, "guidance_scale": 1.5, "uncond_class": 10, "seed": 0}
    args.update(request)
    den = load_denoiser(path, policy, {})
    return sample(den, scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(**args), progress=False).images


def test_same_seed_same_samples_and_different_seed_differs(calibrated: tuple[Path, Path]) -> None:
    src, _ = calibrated
    a, b = _run(src), _run(src)
    np.testing.assert_array_equal(a, b)
    assert np.abs(_run(src, seed=1) - a).max() > 1e-3


def test_guidance_changes_samples_and_one_means_no_guidance(calibrated: tuple[Path, Path]) -> None:
    src, _ = calibrated
    assert np.abs(_run(src, guidance_scale=3.0) - _run(src)).max() > 1e-3
    # guidance 1: one conditional batch per call; the graph's batch of 2 then holds two samples.
    assert _run(src, guidance_scale=1.0).shape == (3, 4, 8, 8)


def test_a_sample_does_not_depend_on_how_requests_are_batched(calibrated: tuple[Path, Path]) -> None:
    src, _ = calibrated
    three = _run(src, classes=[1, 2, 3])
    one = _run(src, classes=[1])
    np.testing.assert_allclose(three[:1], one, atol=1e-6)


def test_compiled_graph_with_no_policy_equals_the_original(calibrated: tuple[Path, Path]) -> None:
    src, fc = calibrated
    np.testing.assert_allclose(_run(fc, "none"), _run(src), atol=1e-5)


def test_cache_state_is_reset_between_runs(calibrated: tuple[Path, Path]) -> None:
    _, fc = calibrated
    den = load_denoiser(fc, "fora", {"interval": 2, "warmup": 1})
    sched = scheduler_from_config(SCHEDULER_CONFIG)
    req = SampleRequest(classes=[1], steps=6, guidance_scale=1.5, uncond_class=10)
    first = sample(den, sched, req, progress=False)
    second = sample(den, sched, req, progress=False)
    np.testing.assert_array_equal(first.images, second.images)
    skips = [r["skip"] for r in first.records]
    assert skips == [r["skip"] for r in second.records]
    assert any(1 in s for s in skips)  # FORA really skipped something
    assert first.macs_executed < first.macs_uncached


def test_guidance_without_an_unconditional_label_is_refused(calibrated: tuple[Path, Path]) -> None:
    src, _ = calibrated
    with pytest.raises(FcpassError, match="--uncond-class"):
        _run(src, uncond_class=None)


def test_fora_reuse_at_stack_level_equals_fora_reuse_per_block(calibrated: tuple[Path, Path]) -> None:
    """Per-block reuse telescopes to the stack's reuse: same samples, one branch instead of L."""
    _, fc = calibrated
    sched = scheduler_from_config(SCHEDULER_CONFIG)
    req = SampleRequest(classes=[1, 2], steps=8, guidance_scale=1.5, uncond_class=10)
    per_block = sample(load_denoiser(fc, "fora", {"interval": 2, "warmup": 1}), sched, req, progress=False)
    stack = sample(load_denoiser(fc, "fora", {"interval": 2, "warmup": 1, "regions": "stack"}), sched, req,
                   progress=False)
    np.testing.assert_allclose(stack.images, per_block.images, atol=1e-5)


@pytest.mark.parametrize("policy", ["taylorseer", "delta-dit"])
def test_peer_policies_run_end_to_end(tmp_path: Path, policy: str) -> None:
    from fcpass.optimize import OptimizeOptions, optimize
    from tests.conftest import export_tiny_dit

    src = export_tiny_dit(tmp_path / "m.onnx", "legacy", seed=4)
    fc = tmp_path / "m.fc.onnx"
    optimize(src, fc, OptimizeOptions(taylor=True), None)
    sched = scheduler_from_config(SCHEDULER_CONFIG)
    req = SampleRequest(classes=[1], steps=10, guidance_scale=1.5, uncond_class=10)
    result = sample(load_denoiser(fc, policy, {}), sched, req, progress=False)
    assert np.isfinite(result.images).all() and result.macs_executed < result.macs_uncached
    full = sample(load_denoiser(src, None, {}), sched, req, progress=False)
    assert np.abs(result.images - full.images).max() > 0


@pytest.mark.parametrize("policy, options", [("fora", {"interval": 2, "regions": "stack", "warmup": 1}),
                                             ("fastcache", {"regions": "stack", "sigma_scale": 50.0})])
def test_state_kept_only_for_live_regions_changes_nothing(calibrated: tuple[Path, Path], policy: str,
                                                          options: dict[str, object]) -> None:
    """A stack-level policy keeps only the stack's state; samples and decisions equal keeping every region's."""
    from fcpass.contract.plan import read_plan
    from fcpass.sampling import roles_from_plan
    from runtimes.backend import OrtBackend
    from runtimes.cache import CachedDenoiser
    from runtimes.policies import make_policy

    _, fc = calibrated
    sched = scheduler_from_config(SCHEDULER_CONFIG)
    req = SampleRequest(classes=[1, 2], steps=10, guidance_scale=1.5, uncond_class=10)
    runs = {}
    for keep_all in (False, True):
        backend = OrtBackend(fc)
        plan = read_plan(backend.model)
        den = CachedDenoiser(backend, plan, make_policy(policy, **options), roles_from_plan(plan.roles, backend),
                             keep_all=keep_all)
        runs[keep_all] = (sample(den, sched, req, progress=False), den.state)
    stack = plan.region("stack")
    assert den.policy.live == {stack.index} and len(plan.regions) > 1
    (lean, lean_state), (full, full_state) = runs[False], runs[True]
    assert any(1 in r["skip"] for r in lean.records)
    np.testing.assert_array_equal(lean.images, full.images)
    assert [r["skip"] for r in lean.records] == [r["skip"] for r in full.records]
    assert [r["stat"] for r in lean.records] == [r["stat"] for r in full.records]
    for s in plan.states:  # the stack's state is the same; the others' stayed at their reset (zero) value
        if s.region == "stack":
            np.testing.assert_array_equal(lean_state[s.name], full_state[s.name])
        else:
            assert not lean_state[s.name].any() and full_state[s.name].any(), s.name


def test_a_policy_controlling_a_region_it_keeps_no_state_for_is_refused(calibrated: tuple[Path, Path]) -> None:
    from runtimes.policies import Fora, ForaConfig

    class Undeclared(Fora):
        def reset(self, plan: object, num_steps: int) -> None:
            super().reset(plan, num_steps)  # type: ignore[arg-type]
            self.live = set()

    _, fc = calibrated
    den = load_denoiser(fc, "fora", {})
    den.policy = Undeclared(ForaConfig(interval=2, warmup=1))
    with pytest.raises(FcpassError, match="outside its live regions"):
        sample(den, scheduler_from_config(SCHEDULER_CONFIG), SampleRequest(classes=[1], steps=6, uncond_class=10),
               progress=False)


def test_bound_device_state_equals_host_state(calibrated: tuple[Path, Path]) -> None:
    """I/O binding (the state in pools of OrtValues, never copied) gives the same trajectory as host arrays."""
    from fcpass.contract.plan import read_plan
    from fcpass.sampling import roles_from_plan
    from runtimes.backend import OrtBackend
    from runtimes.cache import CachedDenoiser
    from runtimes.policies import make_policy
    from runtimes.state import BoundState, HostState

    _, fc = calibrated
    sched = scheduler_from_config(SCHEDULER_CONFIG)
    req = SampleRequest(classes=[1, 2], steps=8, guidance_scale=1.5, uncond_class=10)
    results = {}
    for iobinding in (False, True):
        backend = OrtBackend(fc, iobinding=iobinding)
        plan = read_plan(backend.model)
        den = CachedDenoiser(backend, plan, make_policy("fora", interval=2, warmup=1), roles_from_plan(plan.roles, backend))
        assert isinstance(den.binding, BoundState if iobinding else HostState)
        results[iobinding] = sample(den, sched, req, progress=False)
    np.testing.assert_array_equal(results[True].images, results[False].images)
    assert [r["skip"] for r in results[True].records] == [r["skip"] for r in results[False].records]


def test_bound_state_fetches_what_it_is_asked_when_the_ask_changes(calibrated: tuple[Path, Path]) -> None:
    """Fetched outputs are bound once per fetch list; a new list (here with a value the state takes) rebinds."""
    from fcpass.contract.plan import CTL_INPUT, MIX_INPUT, MIX_WIDTH, SKIP_OUTPUT, STAT_OUTPUT, THR_INPUT, read_plan
    from runtimes.backend import OrtBackend
    from runtimes.state import BoundState, HostState, written_outputs
    from tests.conftest import tiny_feeds

    _, fc = calibrated
    host_backend = OrtBackend(fc, iobinding=False)
    plan = read_plan(host_backend.model)
    host, bound = HostState(host_backend, plan), OrtBackend(fc).state_binding(plan)
    assert isinstance(bound, BoundState)
    r, value = len(plan.regions), written_outputs(plan)[1]
    for b in (host, bound):
        b.reset()
    for step, fetch in enumerate([["noise_pred"], ["noise_pred", STAT_OUTPUT], [value, SKIP_OUTPUT], ["noise_pred"]]):
        feeds = {**tiny_feeds(step), CTL_INPUT: np.full(r, 1 if step == 2 else 0, np.int64),
                 THR_INPUT: np.zeros(r, np.float32), MIX_INPUT: np.zeros((r, MIX_WIDTH), np.float32)}
        want, got = host.step(feeds, fetch), bound.step(feeds, fetch)
        assert list(got) == fetch
        for name in fetch:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"step {step}: {name}")
    final = host.state()
    assert {k: v.tolist() for k, v in bound.state().items()} == {k: v.tolist() for k, v in final.items()}


def test_bound_call_equals_run_and_hands_out_copies(calibrated: tuple[Path, Path]) -> None:
    """The uncached graph is called through I/O binding like the cached one: the same outputs as `run`."""
    from runtimes.backend import OrtBackend
    from runtimes.state import BoundCall
    from tests.conftest import tiny_feeds

    src, _ = calibrated
    backend = OrtBackend(src)
    call = backend.bound_call()
    kept = []
    for seed in range(3):
        got = call(tiny_feeds(seed), ["noise_pred"])["noise_pred"]
        np.testing.assert_array_equal(got, backend.run(tiny_feeds(seed))["noise_pred"])
        kept.append((got, got.copy()))
    for got, was in kept:  # later calls left earlier outputs alone
        np.testing.assert_array_equal(got, was)
    assert isinstance(load_denoiser(src, None, {})._bound, BoundCall)  # the uncached denoiser is bound too
    assert OrtBackend(src, iobinding=False).bound_call() is None


def test_bound_call_rebinds_when_the_batch_changes(tmp_path: Path) -> None:
    """Inputs are restaged and outputs resized when a shape changes (2, 2, 5, 2), and only then."""
    import onnx
    from onnx import TensorProto, helper

    from runtimes.backend import OrtBackend

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y],
                              [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "double.onnx")
    call = OrtBackend(tmp_path / "double.onnx").bound_call()
    rng = np.random.default_rng(0)
    buffers = []
    for batch in (2, 2, 5, 2):
        x = rng.standard_normal((batch, 3)).astype(np.float32)
        np.testing.assert_array_equal(call({"x": x}, ["y"])["y"], 2 * x)
        buffers.append(call._staged["x"][1])
    assert buffers[0] is buffers[1] and buffers[2] is not buffers[1] and buffers[3] is not buffers[2]


def test_an_fp16_graph_calibrates_and_samples(tiny_dit_fp16: Path, tmp_path: Path) -> None:
    """Calibration reads fp16 activations and writes its fit in the graph's type; with no policy the
    compiled graph samples what the original does, and FastCache's linear approximation skips."""
    from fcpass.optimize import OptimizeOptions, optimize
    from tests.conftest import calibration_setup

    fc = tmp_path / "tiny16.fc.onnx"
    optimize(tiny_dit_fp16, fc, OptimizeOptions(calibrate=2, calib_steps=6, calib_eps=0.5), calibration_setup([1, 2]))
    fitted = {t.name: t for t in all_initializers(load(fc)) if t.name in ("fc.block1.V0", "fc.block1.b0")}
    assert {t.data_type for t in fitted.values()} == {onnx.TensorProto.FLOAT16}
    assert np.abs(onnx.numpy_helper.to_array(fitted["fc.block1.V0"])).max() > 0  # fitted, not left at W = I
    original = _run(tiny_dit_fp16)
    # Fused a little differently, the fp16 steps round differently, and six steps carry that on: the
    # compiled graph stays well inside what fp16 itself moves the samples from fp32.
    fp16_error = np.abs(original - _run(tiny_dit_fp16.parent / "tiny.onnx")).max()
    assert np.abs(_run(fc, "none") - original).max() < fp16_error / 5
    sched = scheduler_from_config(SCHEDULER_CONFIG)
    req = SampleRequest(classes=[1, 2, 3], steps=10, guidance_scale=1.5, uncond_class=10)
    result = sample(load_denoiser(fc, "fastcache", {"approx": "linear", "sigma_scale": 50.0}), sched, req, progress=False)
    assert np.isfinite(result.images).all() and result.macs_executed < result.macs_uncached
