"""`fcpass tune`: the fastest setting of every policy that holds a PSNR target; with -o, a graph that runs it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fcpass.cli.common import (
    INPUTS_HELP,
    cluster_for,
    ray_args,
    sampling_args,
    sampling_setup,
    search_args,
    search_options,
    write_search_json,
)
from fcpass.contract.errors import FcpassError
from fcpass.search import SEARCH_SEED


def add_parser(sub: Any) -> None:
    t = sub.add_parser("tune", help="search a calibrated graph for the fastest setting that holds a PSNR target; "
                                    "-o writes the graph with that setting as its default")
    t.add_argument("model", type=Path, help="a graph written by fcpass optimize (calibrated)")
    t.add_argument("-o", "--output", type=Path,
                   help="write the graph, unchanged but for its plan, with the winner as the policy fcpass sample runs")
    search_args(t, target_default=30.0)
    t.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    t.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu or cuda")
    t.add_argument("--inputs", help=INPUTS_HELP)
    ray_args(t, "the search's trials (as Ray Tune trials; the baseline and the finalists' timing on one worker)")
    sampling_args(t)
    t.set_defaults(func=cmd_tune, seed=SEARCH_SEED)  # the search's own seeds, apart from sample's and calibration's


def cmd_tune(args: argparse.Namespace) -> int:
    from fcpass import tune
    from fcpass.contract.onnx_io import check_distinct, check_file_output
    from fcpass.optimize_to_target import search_graph, search_setup, write_tuned
    from fcpass.sampling import load_denoiser

    options = search_options(args, Path("tune.png"))
    for path in (options.plot, args.json, args.output):
        if path:
            check_file_output(path)
    if args.output:
        check_distinct(args.model, args.output)
    if args.threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    setup = sampling_setup(args, args.model)
    options.seed = args.seed
    setup = search_setup(setup, options)
    for spec in options.policies:
        tune.space_for(spec)  # unknown policies fail before any sampling
    denoiser = load_denoiser(args.model, "none", {}, provider=args.provider, inputs=setup.inputs, threads=args.threads)
    if not hasattr(denoiser, "plan"):
        raise FcpassError(f"{args.model} is not cache-aware; run: fcpass optimize {args.model} -o model.fc.onnx --calibrate 8")
    with cluster_for(args) as options.cluster:
        result = search_graph(denoiser, setup, options, str(args.model), args.model)
    print(tune.table(result))
    print(f"wrote {options.plot}")
    write_search_json(args.json, result)
    if args.output:
        write_tuned(args.model, args.output, result, setup)
        print(f"wrote {args.output}: fcpass sample {args.output} runs {result.winner.spec if result.winner else ''}")
    return 0
