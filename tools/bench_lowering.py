"""Wall time of the If lowering against the segments lowering of the same compiled graph (ONNX Runtime).

    fcpass optimize -o /tmp/x.fc.onnx --calibrate 4
    fcpass optimize /tmp/x.fc.onnx -o /tmp/x.fc --lowering segments
    python tools/bench_lowering.py /tmp/x.fc.onnx /tmp/x.fc --threads 1 --policies none fora:regions=stack

Runs are interleaved (if, segments, if, ...) so drift in machine load hits both; best of --repeats.
Also prints the largest difference between the two lowerings' samples.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from fcpass.sampling import load_denoiser
from models.digits import SCHEDULER_CONFIG
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config

log = logging.getLogger("bench_lowering")


def parse_policy(text: str) -> tuple[str, dict[str, object]]:
    name, _, rest = text.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    return name, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("if_graph")
    p.add_argument("segments")
    p.add_argument("--policies", nargs="+", default=["none", "fora:regions=stack"])
    p.add_argument("--threads", type=int)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    request = SampleRequest(classes=[k % 10 for k in range(args.samples)], steps=args.steps, guidance_scale=1.5,
                            uncond_class=10)
    scheduler = scheduler_from_config(SCHEDULER_CONFIG)
    graphs = {"if": args.if_graph, "segments": args.segments}
    runs = {(g, spec): load_denoiser(path, *parse_policy(spec), threads=args.threads)
            for g, path in graphs.items() for spec in args.policies}
    best = dict.fromkeys(runs, np.inf)
    images: dict[tuple[str, str], np.ndarray] = {}
    for _ in range(args.repeats):
        for key, denoiser in runs.items():
            result = sample(denoiser, scheduler, request, progress=False)
            best[key] = min(best[key], result.wall_seconds)
            images[key] = result.images
    print(f"{args.samples} samples x {args.steps} steps, threads {args.threads or 'default'}, best of {args.repeats}")
    for spec in args.policies:
        a, b = best[("if", spec)], best[("segments", spec)]
        diff = float(np.abs(images[("if", spec)] - images[("segments", spec)]).max())
        print(f"{spec:<20} if {a:.3f} s  segments {b:.3f} s  if/segments {a / b:.2f}x  max|diff| {diff:.1e}")


if __name__ == "__main__":
    main()
