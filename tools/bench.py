"""Benchmark cache policies against the uncached graph, in one process, on ONNX Runtime.

    python tools/bench.py                       # the bundled digits model, 50 DDIM steps, guidance 1.5
    python tools/bench.py --policies none fora:interval=3 fastcache 'fastcache:regions=stack,sigma_scale=30@stack'
    python tools/bench.py --policies tuned:30     # what `fcpass optimize --target-psnr 30` writes, sampled with no flags

A policy runs on a graph optimized with --regions blocks,stack, or with the region sets named after
`@` (e.g. `@stack`: one region, the cheapest graph for stack-level policies), compiled with what the
policy needs and nothing more (`fcpass.policy_graph.graph_needs`: probes, previous outputs, token caching,
motion tokens at --motion-ratio).
Every graph is calibrated on the same trajectories. `tuned:T` is the no-flags path: the graph
`fcpass optimize --target-psnr T` writes (its own search, on its own seeds), sampled with the policy its plan
carries.

For every policy: end-to-end wall time of the whole sampling loop (median of --repeats), the
speedup over the uncached *original* graph (the median over repeats of the ratio to an uncached run
made just before, so drift in machine load hits both sides of a ratio), the MAC-ideal speedup (uncached MACs / MACs executed) and realised/ideal,
PSNR and SSIM of each sample against the uncached sample of the same seed and class, and the digit
classifier's accuracy at recognising the requested class. Writes a markdown table (--out) and JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.compiler.passes.motion_tokens import MergeOptions
from fcpass.contract.onnx_io import atomic_path, load_model, replace_marked_block
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.policy_graph import graph_needs
from fcpass.quality import compare_batches
from fcpass.sampling import SamplingSetup, classifier_for, load_denoiser
from models import bundled
from models.digits import ONNX
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import load_config, scheduler_from_config

log = logging.getLogger("bench")

DEFAULT_POLICIES = [
    # The no-flags path: `fcpass optimize --target-psnr 30`, then `fcpass sample` with no policy flags.
    "tuned:30",
    # The cost of the cache machinery: the cheapest graph (one stack region), every step computing.
    "none@stack",
    # Each policy at a published or usual setting, on a graph compiled for it alone.
    "fastcache@blocks",
    "fora:interval=3,regions=stack@stack",
    "taylorseer:interval=7,warmup=3,regions=stack@stack",
    "fbcache:threshold=0.08@tail",
    "teacache:threshold=0.15@stack",
    "magcache@stack",
    "duca@stack",
    "toca@stack",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ONNX,
                    help="a bundled model's export: models/digits/dit_digits.onnx (default) or models/canvas/dit_canvas.onnx")
    ap.add_argument("--calibrate", type=int, default=8, help="calibration trajectories when optimizing here")
    ap.add_argument("--regions", default="blocks,stack", help="region sets of the graph optimized here")
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    ap.add_argument("--motion-ratio", type=float, default=0.5, help="k/N of the graphs for fastcache with motion=1")
    ap.add_argument("--token-merge", action="store_true", help="those graphs merge tokens by k-NN density instead")
    ap.add_argument("--motion-context", action="store_true",
                    help="in those graphs the motion tokens attend to all tokens' cached keys and values")
    ap.add_argument("--samples", type=int, default=20, help="samples: classes 0..9 cycled")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scheduler-config", type=Path,
                    help="diffusers scheduler config to calibrate and sample with (default: the bundled model's DDIM)")
    ap.add_argument("--guidance-scale", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed pairs (uncached, policy); the median ratio counts")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--out", type=Path, default=Path("out/bench.md"))
    ap.add_argument("--readme", type=Path, help="also replace the table between the bench markers of this README")
    ap.add_argument("--grid", type=Path, help="PNG grid: uncached samples, then each policy's, one row each")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    request = SampleRequest(classes=[i % 10 for i in range(args.samples)], steps=args.steps,
                            guidance_scale=args.guidance_scale, uncond_class=10, seed=args.seed)
    args.arch = arch = export_arch(args.model)
    if bundled(arch) is None:  # the digit classifier scores the samples: only the bundled models have one
        raise SystemExit(f"error: {args.model} is not a bundled model's export; pass models/digits/dit_digits.onnx "
                         "or models/canvas/dit_canvas.onnx")
    args.scheduler_config = args.scheduler_config or bundled(arch).scheduler_config
    setup = SamplingSetup(load_config(args.scheduler_config), request, arch=arch)  # read once
    with tempfile.TemporaryDirectory() as tmp:
        graphs: dict[Any, Path] = {}
        for spec in args.policies:
            if spec.startswith("tuned:"):
                graphs[spec] = _tuned(args, spec, setup, Path(tmp) / f"tuned.{len(graphs)}.fc.onnx")
                continue
            key = _graph_of(spec, args)
            if key not in graphs:
                graphs[key] = Path(tmp) / f"model.{len(graphs)}.fc.onnx"
                regions, needs = key
                optimize(args.model, graphs[key], OptimizeOptions(regions=regions, calibrate=args.calibrate, **dict(needs)),
                         setup)
        rows, images = run(args, request, graphs, setup.scheduler_config)
    write(rows, args)
    if args.grid:
        from fcpass.images import save_grid

        n = min(10, args.samples)
        save_grid(np.concatenate([img[:n] for img in images.values()]), args.grid, ncol=n)
        print("grid rows: " + ", ".join(images))


def export_arch(model: Path) -> str | None:
    """The architecture the export recorded (`digits`, `canvas`, ...), which picks the classifier and sampler."""
    from fcpass.cli.common import export_meta

    return export_meta(load_model(model, load_weights=False)).get("arch")


def _tuned(args: argparse.Namespace, spec: str, setup: SamplingSetup, path: Path) -> Path:
    """`fcpass optimize --target-psnr T` of the model, with this run's calibration and threads."""
    from fcpass.optimize_to_target import SearchOptions, optimize_to_target

    target = float(spec.partition(":")[2])
    optimize_to_target(args.model, path, OptimizeOptions(calibrate=args.calibrate), setup,
                       SearchOptions(target_psnr=target, threads=args.threads))
    return path


def _time(denoiser: Any, request: SampleRequest, config: dict[str, Any]) -> Any:
    return sample(denoiser, scheduler_from_config(config), request, progress=False)


def _graph_of(spec: str, args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[tuple[str, Any], ...]]:
    """The graph a policy runs on: its region sets and what it needs compiled (`fcpass.policy_graph.graph_needs`)."""
    regions = tuple(_regions_of(spec, args.regions).split(","))
    needs = graph_needs(spec.split("@")[0], args.motion_ratio)
    if needs["motion_ratio"] is not None:
        needs["token_merge"] = MergeOptions() if args.token_merge else None
        needs["motion_context"] = args.motion_context
    return regions, tuple(sorted(needs.items()))


def _regions_of(spec: str, default: str) -> str:
    return spec.split("@", 1)[1] if "@" in spec else default


def run(
    args: argparse.Namespace, request: SampleRequest, graphs: dict[Any, Path], config: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    classifier = classifier_for(SamplingSetup(config, request, arch=args.arch))
    base = load_denoiser(args.model, None, {}, threads=args.threads)
    denoisers = {"uncached": base}
    for spec in args.policies:
        if spec.startswith("tuned:"):  # no policy named: the one its plan carries
            den = load_denoiser(graphs[spec], None, {}, threads=args.threads)
            denoisers[f"{spec} = {den.plan.tuned['policy']}"] = den
            continue
        den = load_denoiser(graphs[_graph_of(spec, args)], spec.split("@")[0], {}, threads=args.threads)
        denoisers[spec] = den
    # Each policy run is paired with an uncached run next to it; the speedup is the median of the
    # pairs' ratios, so slow phases of a shared machine hit both sides of a ratio alike. The order
    # within a pair alternates by repeat: whichever runs second finds the machine warmer.
    walls: dict[str, list[float]] = {key: [] for key in denoisers}
    ratios: dict[str, list[float]] = {key: [] for key in denoisers}
    last: dict[str, Any] = {}
    for rep in range(args.repeats):
        for key, den in denoisers.items():
            if key == "uncached":
                base_run, result = None, _time(den, request, config)
            elif rep % 2:
                result = _time(den, request, config)
                base_run = _time(base, request, config)
            else:
                base_run = _time(base, request, config)
                result = _time(den, request, config)
            last[key] = result
            walls[key].append(result.wall_seconds)
            ratios[key].append((base_run or result).wall_seconds / result.wall_seconds)
            log.info("repeat %d  %-40s %.3f s", rep, key, result.wall_seconds)
    reference = last["uncached"]
    rows = []
    for key, result in last.items():
        q = compare_batches(reference.images, result.images)
        ideal = reference.macs_executed / max(result.macs_executed, 1)
        speedup = float(np.median(ratios[key]))
        rows.append({
            "policy": key,
            "wall_seconds": float(np.median(walls[key])),
            "speedup": speedup,
            "mac_ideal_speedup": ideal,
            "realised_over_ideal": speedup / ideal,
            "psnr": q["psnr_mean"],
            "ssim": q["ssim_mean"],
            "accuracy": classifier.accuracy(result.images, request.classes),
        })
    return rows, {key: result.images for key, result in last.items()}


def markers(arch: str | None) -> tuple[str, str]:
    """The README markers around a bundled model's table: `bench` for digits, `bench:canvas` for canvas."""
    name = "bench" if arch == "digits" else f"bench:{arch}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _cli_args(args: argparse.Namespace) -> list[str]:
    out = [] if args.model == ONNX else ["--model", str(args.model)]
    for key in ("samples", "steps", "repeats", "threads", "calibrate", "regions", "motion_ratio"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out += [flag for flag, on in (("--token-merge", args.token_merge), ("--motion-context", args.motion_context)) if on]
    if args.scheduler_config != bundled(args.arch).scheduler_config:
        out += ["--scheduler-config", str(args.scheduler_config)]
    return out + ["--policies", *[f"'{p}'" for p in args.policies]]


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    solver = scheduler_from_config(args.scheduler_config).__class__.__name__.removesuffix("Scheduler")
    head = (f"Bundled {args.arch} DiT ({args.model.name}), {args.samples} samples, {args.steps} {solver} steps, guidance "
            f"{args.guidance_scale}, ONNX Runtime CPU, {args.threads} thread(s); speedup = median over {args.repeats} "
            "repeats of (uncached original graph's wall time / policy's), each pair run back to back, in "
            "alternating order.")
    lines = [head, "", "| policy | wall s | speedup | MAC-ideal | realised/ideal | PSNR dB | SSIM | digit acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['policy']}` | {r['wall_seconds']:.3f} | {r['speedup']:.2f}x | {r['mac_ideal_speedup']:.2f}x | "
                     f"{r['realised_over_ideal']:.2f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['accuracy']:.2f} |")
    lines += ["", "Command: `python tools/bench.py " + " ".join(_cli_args(args)) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_path(args.out, suffix=".md") as tmp:
        tmp.write_text(text)
    if args.readme:
        replace_marked_block(args.readme, text, *markers(args.arch))
    with atomic_path(args.out.with_suffix(".json"), suffix=".json") as tmp:
        tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
