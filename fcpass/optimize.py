"""`fcpass optimize`: discover blocks, insert cache regions, calibrate, and write one artefact."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcpass.calibrate import CalibrationOptions, calibrate
from fcpass.discover import discover_blocks
from fcpass.onnx_io import check_distinct, load_model, save_model
from fcpass.passes.cache_regions import REGION_SETS, insert_cache_regions
from fcpass.plan import CachePlan, write_plan
from fcpass.roles import infer_roles, parse_role_overrides
from runtimes.policies import policy_defaults

log = logging.getLogger(__name__)


@dataclass
class OptimizeOptions:
    regions: tuple[str, ...] = REGION_SETS
    calibrate: int = 0
    calib_steps: int = 50
    calib_eps: float = 0.05
    block_pattern: str | None = None
    inputs: str | None = None
    taylor: bool = False


def optimize(model_path: str | Path, output: str | Path, options: OptimizeOptions, setup: dict[str, Any] | None) -> CachePlan:
    """Write the cache-aware graph of `model_path` to `output`; nothing is written on failure."""
    check_distinct(model_path, output)
    model = load_model(model_path)
    roles = infer_roles(model, parse_role_overrides(options.inputs))
    block_map = discover_blocks(model, roles.latent.name, options.block_pattern)
    role_names = {
        "latent": roles.latent.name,
        "timestep": roles.timestep.name,
        "class": roles.class_labels.name if roles.class_labels else None,
        "prompt_embeds": roles.prompt_embeds.name if roles.prompt_embeds else None,
    }
    out, plan = insert_cache_regions(model, block_map, role_names, options.regions, taylor=options.taylor)
    log.info("%d blocks (%s) -> %d cache regions", len(block_map), block_map.method, len(plan.regions))
    if options.calibrate:
        if setup is None:
            raise ValueError("calibration needs a sampling setup")
        calibrate(out, plan, setup, CalibrationOptions(options.calibrate, options.calib_steps, options.calib_eps))
    plan.policy_defaults = policy_defaults()
    write_plan(out, plan)
    save_model(out, output)
    return plan
