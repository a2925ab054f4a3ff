"""`fcpass optimize`: discover blocks, insert cache regions, calibrate, and write one artefact.

The artefact is one `.fc.onnx` file with `lowering="if"` (every region an ONNX If; its weights in
`<name>.data` beside it once they pass `EXTERNAL_DATA_MIN_BYTES`), or a folder of
If-free segments with `lowering="segments"` (`fcpass.compiler.passes.lower_segments`: the same calibrated graph, cut
at its Ifs, for runtimes that must not see an If). An input that is already cache-aware can only be
lowered to segments, as it is (its regions, calibration and fitted weights are kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcpass.calibrate import CalibrationOptions, calibrate
from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.graphinfo import settle_outputs
from fcpass.compiler.passes.bool_where import rewrite_bool_where
from fcpass.compiler.passes.cache_regions import REGION_SETS, insert_cache_regions
from fcpass.compiler.passes.localize_weights import EXTERNAL_DATA_MIN_BYTES, branch_weight_bytes, localize_weights
from fcpass.compiler.passes.lower_segments import (
    check_lowering,
    check_segments_output,
    lower_to_segments,
    write_segments,
)
from fcpass.compiler.passes.motion_tokens import MergeOptions
from fcpass.compiler.passes.scatter_reduction import drop_default_reductions
from fcpass.compiler.static_shapes import dynamic_axes, fix_dims, parse_dims
from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import check_distinct, check_file_output, check_types, load_model, save_model
from fcpass.contract.plan import CachePlan, check_digest, has_plan, read_plan, write_plan
from fcpass.contract.roles import infer_roles, parse_role_overrides
from runtimes.backend import session_setup
from runtimes.policies import parse_policy_spec, policy_defaults, token_options

if TYPE_CHECKING:
    from fcpass.sampling import SamplingSetup

log = logging.getLogger(__name__)


@dataclass
class OptimizeOptions:
    regions: tuple[str, ...] = REGION_SETS
    calibrate: int = 0
    calib_steps: int = 50
    calib_eps: float = 0.05
    calib_provider: str = "cpu"  # ONNX Runtime's provider for the calibration runs
    calib_threads: int | None = None
    block_pattern: str | None = None
    inputs: str | None = None
    taylor: bool = False
    lowering: str = "if"  # "if": one .fc.onnx file; "segments": a folder of If-free segments
    tokens: str | None = None  # token-level caching with this policy's k schedule: "duca" or "toca"
    token_score: str | None = None  # vnorm (default), attention, saliency or random
    probes: bool = True  # FBCache's and TeaCache's statistics (see fcpass.compiler.passes.cache_regions)
    motion_ratio: float | None = None  # FastCache's motion tokens in the stack (fcpass.compiler.passes.motion_tokens)
    token_merge: MergeOptions | None = None  # with motion_ratio: k-NN token merging instead of the top-k
    motion_context: bool = False  # with motion_ratio: motion tokens attend to all tokens' cached keys and values
    batch: int | None = None  # the batch a graph with a dynamic batch axis is compiled at (default DYNAMIC_BATCH)
    dims: str | None = None  # sizes of other dynamic axes by name: "height=64,width=64"
    for_policies: tuple[str, ...] = ()  # --for: the policy specs the graph was compiled for (stored in the plan)
    cluster: Any = None  # --ray: where the calibration's trajectories run (fcpass.calibrate.Cluster); None: here


# What `fcpass export` writes by default: one sample with classifier-free guidance per call.
DYNAMIC_BATCH = 2


def optimize(model_path: str | Path, output: str | Path, options: OptimizeOptions, setup: SamplingSetup | None) -> CachePlan:
    """Write the cache-aware graph of `model_path` to `output`; nothing is written on failure."""
    check_lowering(options.lowering)
    check_distinct(model_path, output)
    if options.lowering == "segments":  # before the (possibly long) calibration
        check_segments_output(output)
    else:
        check_file_output(output)
    calibration = CalibrationOptions(options.calibrate, options.calib_steps, options.calib_eps,
                                     provider=options.calib_provider, threads=options.calib_threads) if options.calibrate else None
    if options.batch is not None and options.batch < 1:
        raise FcpassError(f"--batch {options.batch} must be at least 1")
    if calibration is not None:  # a missing provider says so before the rewrite, not after it
        session_setup([calibration.provider], calibration.threads)
    elif options.calib_provider != "cpu" or options.calib_threads is not None:
        raise FcpassError("--provider and --threads set the calibration runs; add --calibrate N, or drop them")
    dims = parse_dims(options.dims)
    model = load_model(model_path)
    check_types(model, str(model_path))
    if options.lowering == "segments" and has_plan(model):
        return _lower_compiled(model, model_path, output, options)
    if axes := dynamic_axes(model):
        fixed = fix_dims(model, dims, batch=options.batch or DYNAMIC_BATCH)
        default_batch = options.batch is None and any(axis == 0 and dim not in dims for _, axis, dim in axes)
        log.info("%s has dynamic axes: compiled at %s%s", Path(model_path).name, ", ".join(fixed),
                 f" (batch {DYNAMIC_BATCH}: one sample with guidance; --batch N for another)" if default_batch else "")
    elif dims:
        raise FcpassError(f"--dims: {model_path} has no dynamic axes; drop --dims")
    settle_outputs(model)  # output axes the exporter named take the sizes the fixed inputs give them
    if dropped := drop_default_reductions(model).count:
        log.info("dropped reduction='none' (the default) from %d scatter nodes: TensorRT's parser up to 10.7 refuses it",
                 dropped)
    if rewritten := rewrite_bool_where(model).count:
        log.info("rewrote %d bool Where nodes as And/Or/Not: ONNX Runtime's CPU kernels have no bool Where", rewritten)
    roles = infer_roles(model, parse_role_overrides(options.inputs))
    if options.batch is not None and roles.latent.shape[0] != options.batch:
        raise FcpassError(f"--batch {options.batch}: {model_path} fixes its batch at {roles.latent.shape[0]}; drop "
                          "--batch, or re-export with that batch or a dynamic batch axis")
    block_map = discover_blocks(model, roles.latent.name, options.block_pattern)
    tokens = token_options(options.tokens, options.token_score) if options.tokens else None
    compiled = insert_cache_regions(model, block_map, roles.names(), options.regions, taylor=options.taylor,
                                    tokens=tokens, probes=options.probes, motion_ratio=options.motion_ratio,
                                    merge=options.token_merge, motion_context=options.motion_context)
    out, plan = compiled.model, compiled.plan
    log.info("%d blocks (%s) -> %d cache regions", len(block_map), block_map.method, len(plan.regions))
    if calibration is not None:
        if setup is None:
            raise ValueError("calibration needs a sampling setup")
        calibrate(out, plan, setup, calibration, options.cluster)
    plan.policy_defaults = policy_defaults()
    plan.compiled_for = dict(map(parse_policy_spec, options.for_policies))
    write_plan(out, plan)
    if options.lowering == "segments":
        write_segments(lower_to_segments(out), output)
    else:
        localize_weights(out)
        save_compiled(out, output)
    return plan


def save_compiled(model: Any, output: str | Path) -> Path:
    """Write a compiled If graph atomically, its weights external once those in branches pass
    `EXTERNAL_DATA_MIN_BYTES`."""
    write_plan(model, read_plan(model))  # the digest of the graph as saved (localize_weights moved weights)
    return save_model(model, output, external=branch_weight_bytes(model) >= EXTERNAL_DATA_MIN_BYTES)


def _lower_compiled(model: Any, model_path: str | Path, output: str | Path, options: OptimizeOptions) -> CachePlan:
    """Lower an already compiled graph as it is: its regions and calibration are fixed in it."""
    fixed = OptimizeOptions(lowering=options.lowering)
    changed = [flag for flag, given, default in (
        ("--calibrate", options.calibrate, fixed.calibrate), ("--regions", options.regions, fixed.regions),
        ("--taylor", options.taylor, fixed.taylor), ("--tokens", options.tokens, fixed.tokens),
        ("--token-score", options.token_score, fixed.token_score),
        ("--motion-ratio", options.motion_ratio, fixed.motion_ratio),
        ("--token-merge", options.token_merge, fixed.token_merge),
        ("--motion-context", options.motion_context, fixed.motion_context)) if given != default]
    if changed:
        raise FcpassError(f"{model_path} is already cache-aware, so {', '.join(changed)} cannot change it; "
                          "drop the flag to lower it as it is, or optimize the original export")
    plan = read_plan(model, str(model_path))
    check_digest(model, plan, model_path)
    log.info("%s is already cache-aware: lowering it as it is", model_path)
    write_segments(lower_to_segments(model), output)
    return plan
