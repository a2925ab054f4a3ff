"""`fcpass calibrate`: fit TeaCache's polynomial or MagCache's ratios into a cache-aware graph's plan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.cli.common import (
    CALIB_STEPS_HELP,
    INPUTS_HELP,
    calibration_runtime_args,
    cluster_for,
    ray_args,
    sampling_args,
    sampling_setup,
)


def add_parser(sub: Any) -> None:
    cal = sub.add_parser("calibrate", help="fit TeaCache's polynomial or MagCache's ratios into a cache-aware graph's plan")
    cal.add_argument("model", type=Path, help="a graph written by fcpass optimize")
    cal.add_argument("-o", "--output", type=Path, required=True, help="the recalibrated graph (never the input)")
    cal.add_argument("--for", dest="peer", required=True, choices=["teacache", "magcache"],
                     help="the policy whose calibration to fit")
    cal.add_argument("--calibrate", type=int, default=8, metavar="N", help="trajectories")
    cal.add_argument("--calib-steps", "--steps", dest="calib_steps", type=int, default=50, help=CALIB_STEPS_HELP)
    cal.add_argument("--inputs", help=INPUTS_HELP)
    calibration_runtime_args(cal)
    ray_args(cal, "the trajectories (as Ray tasks)")
    sampling_args(cal, calibrating=True)
    cal.set_defaults(func=cmd_calibrate)



def cmd_calibrate(args: argparse.Namespace) -> int:
    from fcpass.calibrate import CalibrationOptions, calibrate_peers
    from fcpass.contract.onnx_io import check_distinct, check_file_output, load_model
    from fcpass.contract.plan import check_digest, read_plan, write_plan
    from fcpass.optimize import save_compiled

    check_distinct(args.model, args.output)
    check_file_output(args.output)
    model = load_model(args.model)
    plan = read_plan(model, str(args.model))
    check_digest(model, plan, args.model)
    setup = sampling_setup(args, args.model)
    options = CalibrationOptions(trajectories=args.calibrate, steps=args.calib_steps, provider=args.provider,
                                 threads=args.threads)
    with cluster_for(args) as cluster:
        result = calibrate_peers(model, plan, setup, args.peer, options, cluster)
    write_plan(model, plan)
    save_compiled(model, args.output)
    if args.peer == "teacache":
        print(f"wrote {args.output}: teacache polynomial {', '.join(f'{c:.4g}' for c in result['coefficients'])} "
              f"(relative fit residual {result['rel_residual']:.3f} over {result['points']} points)")
    else:
        ratios = np.asarray(result["ratios"])
        print(f"wrote {args.output}: magcache ratios for {len(ratios)} steps, "
              f"{ratios.min():.4f} .. {ratios.max():.4f}")
    return 0
