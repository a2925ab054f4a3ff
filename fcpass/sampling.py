"""Sampling jobs for the application: the setup a command samples with, a graph loaded as a denoiser, a run and
its report, and the timed comparison with the uncached graph."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcpass.compiler.graphinfo import GraphIndex, frames_axis, graph_macs, sized
from fcpass.compiler.static_shapes import dynamic_axes, parse_dims
from fcpass.contract.errors import FcpassError
from fcpass.contract.manifest import is_segments_artefact
from fcpass.contract.plan import check_digest, check_plan_fits, has_plan, read_plan
from fcpass.contract.roles import InputRoles, graph_inputs, infer_roles, parse_role_overrides
from fcpass.policy_graph import compiled_defaults, default_policy, unused_costs
from runtimes.backend import OrtBackend
from runtimes.cache import CachedDenoiser
from runtimes.policies import POLICIES, make_policy, parse_policy_spec
from runtimes.sampler import PlainDenoiser, SampleRequest, SampleResult, sample
from runtimes.schedulers import config_identity, scheduler_from_config

log = logging.getLogger(__name__)


@dataclass
class SamplingSetup:
    """What a command samples with, read once: the parsed scheduler config, the request (what to draw),
    the input-role overrides (`--inputs`) and the export's architecture (digits gets its classifier)."""

    scheduler_config: Mapping[str, Any] | str | Path  # parsed once by the command; a path is read at each use
    request: SampleRequest
    inputs: str | None = None
    arch: str | None = None


def classifier_for(setup: SamplingSetup) -> Any:
    """The digit classifier of the bundled model the graph was exported from, else None."""
    from models import bundled

    model = bundled(setup.arch)
    if model is None:
        return None
    from fcpass.quality import DigitClassifier

    return DigitClassifier(model.classifier)


def roles_from_plan(plan_roles: dict[str, str | None], backend: Any) -> InputRoles:
    """The model's own inputs, by the names the plan recorded (state inputs are not candidates)."""
    own = [s for s in graph_inputs(backend.model) if not s.name.startswith("fc")]
    overrides = {k: v for k, v in plan_roles.items() if v}
    return infer_roles(backend.model, overrides, candidates=own)


def load_denoiser(
    path: str | Path,
    policy: str | None,
    options: dict[str, Any],
    provider: str = "cpu",
    inputs: str | None = None,
    threads: int | None = None,
    engine: str | Path | None = None,
    cuda_graphs: bool = True,
    dims: str | None = None,
) -> Any:
    """A cache-aware graph becomes a CachedDenoiser under `policy`; a plain graph a PlainDenoiser, sampled
    at the sizes `dims` gives its named dynamic axes (`fcpass.compiler.static_shapes.parse_dims`).

    With `engine` (a TensorRT engine built from `path`), the engine runs the steps and `path` supplies
    the cache plan and the input roles. A folder written by `fcpass optimize --lowering segments`
    runs on `runtimes.segments_backend.SegmentsBackend` (its manifest supplies the plan and the interface), or
    with `engine` (the folder of engines `fcpass build` made from it) on
    `runtimes.trt_segments.TrtSegmentsBackend`, each segment captured in a CUDA graph if `cuda_graphs`.
    """
    name = parse_policy_spec(policy)[0] if policy is not None else None
    if name is not None and name not in POLICIES:
        raise FcpassError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    backend = _open_backend(path, provider, threads, engine, cuda_graphs)
    if has_plan(backend.model):
        if dims:
            raise FcpassError(f"--dims: {path} is compiled at fixed sizes; drop --dims")
        plan = read_plan(backend.model, str(path))
        check_plan_fits(plan, backend.model, str(path))
        if not is_segments_artefact(path):  # a segments folder's manifest is checked by its backend
            check_digest(backend.model, plan, path)
        fixed = {role: name for role, name in parse_role_overrides(inputs).items() if plan.roles.get(role) != name}
        if fixed:  # a cache-aware graph's roles were fixed when it was optimized
            given = ",".join(f"{role}={name}" for role, name in fixed.items())
            planned = ",".join(f"{role}={plan.roles.get(role)}" for role in fixed)
            raise FcpassError(f"--inputs {given}: {path} was optimized with {planned}; drop --inputs, or optimize "
                              f"the original export again with --inputs {given}")
        if policy is None and (default := _carried(plan, path, options)) is not None:
            policy, options = default
            name = policy
        elif compiled := plan.compiled_for.get(name or "none"):  # unless the command line says otherwise
            log.info("%s: %s as compiled (optimize --for)", name, ",".join(f"{k}={v}" for k, v in compiled.items()))
        options = compiled_defaults(plan, policy or "none", options)
        denoiser = CachedDenoiser(backend, plan, make_policy(policy or "none", **options), roles_from_plan(plan.roles, backend))
        if policy is not None and (costs := unused_costs(plan, denoiser.policy)):
            given = ",".join(f"{k}={v}" for k, v in options.items())
            spec = policy + ("," if ":" in policy else ":") + given if given else policy
            log.info("%s holds what %s does not use and pays for: %s; fcpass optimize --for %s compiles without them",
                     Path(path).name, name, "; ".join(costs), spec)
        denoiser.frames_axis = frames_axis(backend.model, plan.roles["latent"])
        return denoiser
    if name not in (None, "none"):
        raise FcpassError(f"--policy {policy} needs a cache-aware graph; run: fcpass optimize {path} -o model.fc.onnx --calibrate 8")
    drawn, per_row = backend.model, bool(dynamic_axes(backend.model))
    if per_row:  # the sampler draws at these sizes; MACs are of one batch row, times each call's rows
        drawn = sized(drawn, parse_dims(dims), batch=None)
    elif dims:
        raise FcpassError(f"--dims: {path} has no dynamic axes; drop --dims")
    roles = infer_roles(drawn, parse_role_overrides(inputs))
    macs = graph_macs(GraphIndex(sized(drawn, {}, batch=1) if per_row else drawn))
    denoiser = PlainDenoiser(backend, roles, backend.outputs[0].name, macs, per_row=per_row)
    denoiser.frames_axis = frames_axis(backend.model, roles.latent.name)
    return denoiser


def _open_backend(path: str | Path, provider: str, threads: int | None, engine: str | Path | None,
                  cuda_graphs: bool) -> Any:
    """The backend that runs `path`'s steps (see `load_denoiser`)."""
    if is_segments_artefact(path):
        if engine is not None:
            from runtimes.trt_segments import TrtSegmentsBackend

            return TrtSegmentsBackend(engine, path, cuda_graphs=cuda_graphs)
        from runtimes.segments_backend import SegmentsBackend

        return SegmentsBackend(path, [provider], threads=threads)
    if engine is not None:
        from fcpass.contract.engines import is_engines_folder
        from runtimes.trt_backend import TrtBackend

        if is_engines_folder(engine):
            raise FcpassError(f"{engine} holds the engines of a segments folder; run it with that folder: "
                              f"fcpass sample MODEL.fc --engine {engine}")

        return TrtBackend(engine, path)
    return OrtBackend(path, [provider], threads=threads)


def _carried(plan: Any, path: str | Path, options: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The policy the graph carries (`policy_graph.default_policy`) and its options, under the flags in `options`
    that are set; said in one line."""
    if (default := default_policy(plan)) is None:
        return None
    spec, why = default
    log.info("%s: sampling with %s (%s; --policy overrides)", Path(path).name, spec, why)
    name, spec_options = parse_policy_spec(spec)
    return name, {**spec_options, **{k: v for k, v in options.items() if v is not None}}


def warn_if_calibrated_for_another_sampler(denoiser: Any, setup: SamplingSetup) -> None:
    """A policy that acts on the graph's calibration gets fits and thresholds of one step's change under the
    sampler and step count it was calibrated with; say so when the run samples otherwise."""
    plan, policy = getattr(denoiser, "plan", None), getattr(denoiser, "policy", None)
    if plan is None or policy is None or not plan.calibration or not policy.reads_calibration():
        return
    c, steps = plan.calibration, setup.request.steps
    now = config_identity(setup.scheduler_config)
    # plans calibrated before the sampler was recorded hold only the step count
    other = c.get("scheduler_digest", now["scheduler_digest"]) != now["scheduler_digest"]
    if not other and c["steps"] == steps:
        return
    then = f"{c.get('scheduler', 'its sampler')} x {c['steps']} steps"
    log.warning("%s rests on a calibration made with %s; this run samples with %s x %d steps%s, whose steps change "
                "the model's state otherwise: calibrate with the sampler you sample with (fcpass optimize --calibrate N "
                "--scheduler-config F --steps %d)", policy.name, then, now["scheduler"], steps,
                " (another config)" if other and c.get("scheduler") == now["scheduler"] else "", steps)


def run_sampling(denoiser: Any, setup: SamplingSetup, model_path: str | Path, policy: str | None,
                 progress: bool = True) -> tuple[SampleResult, dict[str, Any]]:
    scheduler = scheduler_from_config(setup.scheduler_config)
    request = setup.request
    warn_if_calibrated_for_another_sampler(denoiser, setup)
    result = sample(denoiser, scheduler, request, progress=progress)
    report: dict[str, Any] = {
        "model": str(model_path),
        "policy": denoiser.policy.describe() if hasattr(denoiser, "policy") else {"name": policy or "none"},
        "provider": denoiser.backend.provider,
        "threads": getattr(denoiser.backend, "threads", None),
        "steps": request.steps,
        **config_identity(setup.scheduler_config),
        "samples": request.count,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
        "wall_seconds": result.wall_seconds,
        "step_seconds": result.step_seconds,
        "macs": result.macs_executed,
        "macs_uncached": result.macs_uncached,
        "macs_fraction": result.macs_executed / max(result.macs_uncached, 1),
        "regions": [r.name for r in denoiser.plan.regions] if hasattr(denoiser, "plan") else [],
        "motion_region": denoiser.plan.motion.get("region") if hasattr(denoiser, "plan") else None,
        # the region (innermost) of each token-cache block, in the order of the records' `tok`
        "token_regions": [b["region"] for b in denoiser.plan.tokens.get("blocks", [])]
        if hasattr(denoiser, "plan") and denoiser.plan.tokens else [],
        "records": result.records,
        "accuracy": None,
    }
    classifier = classifier_for(setup)
    if classifier is not None and request.classes:
        report["accuracy"] = classifier.accuracy(result.images, request.classes)
    return result, report


def time_against_baseline(denoiser: Any, base: Any, setup: SamplingSetup, result: SampleResult,
                          model_path: str | Path, report: dict[str, Any]) -> None:
    """Add to `report` the uncached graph's (`base`'s) wall time, MACs and quality, and the speedup.

    Timed cached, uncached, uncached, cached: a drift in the machine's speed during the four runs weighs
    on both sides alike, where one run of each would put it all on one side. Only the wall times of the
    repeats count: no report, no classifier."""
    from fcpass.quality import compare_batches

    base_result, _ = run_sampling(base, setup, model_path, "none")
    scheduler = scheduler_from_config(setup.scheduler_config)
    base_again = sample(base, scheduler, setup.request, progress=False)
    cached_again = sample(denoiser, scheduler, setup.request, progress=False)
    q = compare_batches(base_result.clips(), result.clips())
    base_wall = (base_result.wall_seconds + base_again.wall_seconds) / 2
    report["baseline"] = {"wall_seconds": base_wall, "macs": base_result.macs_executed,
                          "psnr_mean": q["psnr_mean"], "ssim_mean": q["ssim_mean"]}
    report["speedup"] = base_wall / ((result.wall_seconds + cached_again.wall_seconds) / 2)
    report["mac_ideal_speedup"] = base_result.macs_executed / max(result.macs_executed, 1)
