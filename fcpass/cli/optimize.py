"""`fcpass optimize`: rewrite a DiT graph into a cache-aware graph."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fcpass.cli.common import (
    BLOCK_PATTERN_HELP,
    CALIB_STEPS_HELP,
    DIMS_HELP,
    INPUTS_HELP,
    bundled_onnx,
    calibration_runtime_args,
    cluster_for,
    ray_args,
    sampling_args,
    sampling_setup,
    search_args,
    search_options,
    write_search_json,
)
from fcpass.contract.errors import FcpassError

log = logging.getLogger("fcpass")


def add_parser(sub: Any) -> None:
    o = sub.add_parser("optimize", help="rewrite a DiT graph into a cache-aware graph")
    o.add_argument("model", type=Path, nargs="?", help="exported DiT (default: the bundled digits model)")
    o.add_argument("-o", "--output", type=Path, required=True,
                   help="the cache-aware graph to write (never the input); a folder with --lowering segments")
    o.add_argument("--for", dest="for_policies", nargs="+", metavar="POLICY",
                   help="compile what these policies need and nothing more (their region sets, probes, previous "
                        "outputs, token caching), in place of --regions, --taylor, --no-probes and --tokens, and "
                        "keep their options as the graph's defaults for fcpass sample; "
                        "e.g. --for fastcache:regions=stack,approx=taylor1")
    o.add_argument("--regions", default="blocks,tail,stack", help="region sets: blocks, tail (1..L-1), stack")
    o.add_argument("--taylor", action="store_true", help="keep each region's previous output (for taylor1)")
    o.add_argument("--no-probes", dest="probes", action="store_false",
                   help="leave out FBCache's and TeaCache's statistics: TeaCache's runs block 0's normalisation and "
                        "modulation at every step, a fifth of what a skipped stack costs on the bundled model")
    o.add_argument("--tokens", choices=["duca", "toca"],
                   help="compile token-level caching (top-k token gather/scatter per block) with this k schedule")
    o.add_argument("--motion-ratio", type=float, metavar="RHO",
                   help="compile FastCache's motion tokens: the stack can run on its ceil(RHO*N) most salient tokens "
                        "(sample with --policy fastcache:motion=1)")
    o.add_argument("--motion-context", action="store_true",
                   help="with --motion-ratio: the motion tokens also attend to every other token's keys and values, "
                        "cached at the step it was last computed (needs --regions stack)")
    o.add_argument("--token-merge", action="store_true",
                   help="with --motion-ratio: k-NN density merging of all tokens into ceil(RHO*N) instead of the top-k")
    o.add_argument("--merge-neighbours", type=int, default=5, metavar="K", help="token merging: neighbourhood size")
    o.add_argument("--merge-weight", type=float, default=1.0, metavar="LAMBDA", help="token merging: weight of motion")
    o.add_argument("--token-score", choices=["vnorm", "attention", "saliency", "random"], help="token scores (default vnorm)")
    o.add_argument("--calibrate", type=int, metavar="N",
                   help="fit approximations on N trajectories (default: none; 8 with --target-psnr)")
    o.add_argument("--calib-steps", "--steps", dest="calib_steps", type=int, default=50, help=CALIB_STEPS_HELP)
    o.add_argument("--calib-eps", type=float, default=0.05, help="relative error that counts as a good skip")
    calibration_runtime_args(o)
    ray_args(o, "the calibration's trajectories (as Ray tasks) and --target-psnr's trials (as Ray Tune trials)")
    o.add_argument("--block-pattern", help=BLOCK_PATTERN_HELP)
    o.add_argument("--inputs", help=INPUTS_HELP)
    o.add_argument("--batch", type=int, metavar="N",
                   help="the batch to compile a graph whose batch axis is dynamic at (default 2: one sample with "
                        "guidance per call); a static graph keeps its own")
    o.add_argument("--dims", metavar="NAME=N,...", help=DIMS_HELP)
    o.add_argument("--lowering", default="if", metavar="{if,segments}",
                   help="if: one .fc.onnx with an If per region; segments: -o names a folder of If-free "
                        "head/branch/tail graphs the host chooses between (no If: CUDA-graph friendly)")
    sampling_args(o, calibrating=True)
    search_args(o, target_default=None)
    o.set_defaults(func=cmd_optimize)



def cmd_optimize(args: argparse.Namespace) -> int:
    from fcpass.compiler.passes.motion_tokens import MergeOptions
    from fcpass.optimize import OptimizeOptions

    model_path = args.model or bundled_onnx()
    graph = {"regions": tuple(x.strip() for x in args.regions.split(",") if x.strip()), "taylor": args.taylor,
             "probes": args.probes, "tokens": args.tokens, "motion_ratio": args.motion_ratio}
    if args.for_policies:
        from fcpass.policy_graph import graph_for

        paths = [p for p in args.for_policies if p.endswith(".onnx") or Path(p).exists()]
        if paths:  # `--for` takes every word after it, the model's path too
            raise FcpassError(f"--for takes policies, not {paths[0]}; put the model first: "
                              f"fcpass optimize {paths[0]} -o OUT --for {' '.join(p for p in args.for_policies if p not in paths)}")

        flags = [flag for flag, given in (("--regions", args.regions != "blocks,tail,stack"), ("--taylor", args.taylor),
                                          ("--no-probes", not args.probes), ("--tokens", args.tokens)) if given]
        if flags:
            raise FcpassError(f"--for decides {', '.join(flags)}; drop {'them' if len(flags) > 1 else 'it'} or --for")
        graph = graph_for(args.for_policies, args.motion_ratio)
    options = OptimizeOptions(
        calibrate=args.calibrate or 0,
        calib_steps=args.calib_steps,
        calib_eps=args.calib_eps,
        calib_provider=args.provider,
        calib_threads=args.threads,
        block_pattern=args.block_pattern,
        inputs=args.inputs,
        token_score=args.token_score,
        motion_context=args.motion_context,
        token_merge=MergeOptions(args.merge_neighbours, args.merge_weight) if args.token_merge else None,
        lowering=args.lowering,
        batch=args.batch,
        dims=args.dims,
        for_policies=tuple(args.for_policies or ()),
        **graph,
    )
    if args.ray is not None and not args.calibrate and args.target_psnr is None:
        raise FcpassError("--ray runs the calibration's trajectories (and --target-psnr's trials) on Ray; add "
                          "--calibrate N, or drop --ray")
    with cluster_for(args) as options.cluster:
        return _optimize(args, model_path, options)


def _optimize(args: argparse.Namespace, model_path: Path, options: Any) -> int:
    from fcpass.contract.onnx_io import data_file
    from fcpass.optimize import optimize

    if args.target_psnr is not None:
        return _optimize_to_target(args, model_path, options)
    # Only calibration samples; without it a model needs no scheduler config to be optimized.
    setup = sampling_setup(args, model_path) if args.calibrate else None
    plan = optimize(model_path, args.output, options, setup)
    blocks = len({b for r in plan.regions for b in r.blocks})
    lowered = ""
    if options.lowering == "segments":
        from fcpass.contract.manifest import read_manifest

        lowered = f", lowered to {read_manifest(args.output)['segments']} If-free segments"
    elif (data := data_file(args.output)) is not None:
        lowered = f", its weights in {data} (keep the two files together)"
    print(f"wrote {args.output}: {len(plan.regions)} regions over {blocks} blocks"
          f"{', calibrated' if args.calibrate else ''}{lowered}")
    return 0


def _optimize_to_target(args: argparse.Namespace, model_path: Path, options: Any) -> int:
    from fcpass import tune
    from fcpass.contract.onnx_io import check_file_output
    from fcpass.optimize_to_target import optimize_to_target

    if args.for_policies:
        raise FcpassError("--target-psnr compiles the graph for the setting it finds; drop --for (name the policies "
                          "to search with --policies)")
    search = search_options(args, args.output.with_suffix(".search.png"))
    search.cluster = options.cluster
    for path in (search.plot, args.json):
        if path:
            check_file_output(path)
    if args.calibrate is None:
        options.calibrate = 8
        log.info("calibrating on 8 trajectories (--calibrate N for another count)")
    plan, result = optimize_to_target(model_path, args.output, options, sampling_setup(args, model_path), search)
    print(tune.table(result))
    write_search_json(args.json, result)
    t = plan.tuned
    print(f"wrote {search.plot}")
    print(f"wrote {args.output}: {len(plan.regions)} regions, tuned for {t['policy']} ({t['psnr']:.2f} dB, "
          f"{t['speedup']:.2f}x on the search's seeds); fcpass sample {args.output} runs it")
    return 0
