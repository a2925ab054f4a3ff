"""fcpass's policies against diffusers' own cache hooks on the bundled digits DiT, in one run.

    python tools/bench_peers.py --readme docs/benchmarks.md --plot docs/peers.png

Both sides draw the same samples (classes 0..9 cycled, the same seeds), with the same numpy
scheduler (the bundled DDIM, or `--scheduler-config`), guidance and host loop (`runtimes.sampler.sample`): fcpass's compiled graphs on ONNX
Runtime, diffusers' `DiTTransformer2DModel` (the same weights, through the converter) in PyTorch
with its hooks (`tools/peers_diffusers.py`). Each method sweeps its main knob, conservative to
aggressive, and stops after two settings in a row below the PSNR target; its row is its fastest
setting at or above the target. Speedup is over the method's *own* uncached baseline (the original
ONNX graph for fcpass, the hook-free PyTorch model for diffusers), wall time of the whole sampling
loop, best of --repeats; absolute wall times are listed too. PSNR/SSIM are against that baseline's
samples; digit accuracy is the bundled classifier's. fcpass graphs are calibrated on separate seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcpass.contract.onnx_io import atomic_path, replace_marked_block
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.optimize_to_target import SearchOptions, optimize_to_target
from fcpass.policy_graph import graph_needs
from fcpass.quality import DigitClassifier, compare_batches
from fcpass.sampling import SamplingSetup, load_denoiser
from fcpass.tune import plot, space_for
from models.digits import ONNX, SCHEDULER_CONFIG
from runtimes.policies import make_policy
from runtimes.sampler import SampleRequest, SampleResult, sample
from runtimes.schedulers import scheduler_from_config

log = logging.getLogger("bench_peers")

# fcpass policy specs (each swept along its main knob) and the region sets of the graph each runs on.
FCPASS = [
    "tuned:30",  # the no-flags path: fcpass optimize --target-psnr 30, sampled with the policy it carries
    "fbcache@tail",
    "teacache@stack",
    "magcache@stack",
    "fora:regions=stack@stack",
    "taylorseer:regions=stack,warmup=2@stack",
    "fastcache@blocks,stack",
    "fastcache:approx=taylor1,regions=stack,max_skips=8,warmup=3@stack",
]
DIFFUSERS = ["fbcache", "taylorseer", "magcache", "fastercache", "pab", "seacache"]
MARK_START, MARK_END = "<!-- peers:start -->", "<!-- peers:end -->"


def settings(spec: str) -> list[str]:
    """`spec` swept along its policy's main knob (the first ordered knob of its `fcpass.tune` space),
    conservative to aggressive; just `spec` where it fixes that knob."""
    knob = next((k for k in space_for(spec).knobs if k.ordered), None)
    if knob is None:
        return [spec]
    return [spec + ("," if ":" in spec else ":") + f"{knob.name}={v}" for v in knob.values]


@dataclass
class Row:
    side: str  # "fcpass (ONNX Runtime)" or "diffusers (PyTorch)"
    method: str
    setting: str
    wall_seconds: float
    baseline_seconds: float
    speedup: float
    psnr: float
    ssim: float
    accuracy: float
    holds: bool


def _best_of(run: Any, repeats: int) -> SampleResult:
    best = None
    for _ in range(repeats):
        r = run()
        if best is None or r.wall_seconds < best.wall_seconds:
            best = r
    assert best is not None
    return best


def sweep(side: str, method: str, specs: list[tuple[str, Any]], base: SampleResult, request: SampleRequest,
          target: float, repeats: int, classifier: DigitClassifier) -> list[Row]:
    """Run (label, run) settings in order until two in a row miss the target."""
    rows: list[Row] = []
    misses = 0
    for label, run in specs:
        got = _best_of(run, repeats)
        q = compare_batches(base.images, got.images)
        row = Row(side, method, label, got.wall_seconds, base.wall_seconds, base.wall_seconds / got.wall_seconds,
                  q["psnr_mean"], q["ssim_mean"], classifier.accuracy(got.images, request.classes), q["psnr_mean"] >= target)
        rows.append(row)
        log.info("%-10s %-60s %.2fx  %.2f dB", side.split()[0], label, row.speedup, row.psnr)
        misses = 0 if row.holds else misses + 1
        if misses >= 2:
            break
    return rows


def fcpass_rows(args: argparse.Namespace, request: SampleRequest, classifier: DigitClassifier, tmp: Path) -> list[Row]:
    scheduler = scheduler_from_config(args.scheduler_config)
    calib_setup = SamplingSetup(args.scheduler_config, request)
    graphs: dict[str, Path] = {}
    for spec in args.fcpass:
        if spec.startswith("tuned:"):  # the no-flags path: fcpass optimize --target-psnr T
            graphs[spec] = tmp / f"digits.{len(graphs)}.fc.onnx"
            optimize_to_target(args.model, graphs[spec], OptimizeOptions(calibrate=args.calibrate),
                               dataclasses.replace(calib_setup, arch="digits"),
                               SearchOptions(target_psnr=float(spec.partition(":")[2]), threads=args.threads))
            continue
        policy, regions = spec.split("@", 1)
        if spec not in graphs:  # each policy's graph holds what it needs and nothing more
            graphs[spec] = tmp / f"digits.{len(graphs)}.fc.onnx"
            options = OptimizeOptions(regions=tuple(regions.split(",")), calibrate=args.calibrate, **graph_needs(policy))
            optimize(args.model, graphs[spec], options, calib_setup)
    original = load_denoiser(args.model, None, {}, threads=args.threads)
    base = _best_of(lambda: sample(original, scheduler, request, progress=False), args.repeats)
    log.info("fcpass uncached original graph: %.3f s", base.wall_seconds)
    rows: list[Row] = []
    for spec in args.fcpass:
        if spec.startswith("tuned:"):  # sampled with the policy its plan carries, as fcpass sample does
            den = load_denoiser(graphs[spec], None, {}, threads=args.threads)
            run = functools.partial(sample, den, scheduler, request, progress=False)
            rows += sweep("fcpass (ONNX Runtime)", spec, [(den.plan.tuned["policy"], run)], base, request,
                          args.target_psnr, args.repeats, classifier)
            continue
        policy, regions = spec.split("@", 1)
        den = load_denoiser(graphs[spec], "none", {}, threads=args.threads)

        def runner(setting: str, den: Any = den) -> Any:
            def run() -> SampleResult:
                den.policy = make_policy(setting)
                return sample(den, scheduler, request, progress=False)
            return run

        specs = [(f"{s}@{regions}", runner(s)) for s in settings(policy)]
        rows += sweep("fcpass (ONNX Runtime)", policy, specs, base, request, args.target_psnr,
                      args.repeats, classifier)
    return rows


def diffusers_rows(args: argparse.Namespace, request: SampleRequest, classifier: DigitClassifier) -> list[Row]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers_diffusers as peers

    scheduler = scheduler_from_config(args.scheduler_config)
    plain = peers.DiffusersDenoiser(peers.load_diffusers_digits(args.threads), scheduler_config=args.scheduler_config)
    base = _best_of(lambda: sample(plain, scheduler, request, progress=False), args.repeats)
    log.info("diffusers uncached: %.3f s", base.wall_seconds)
    ratios = peers.calibrate_magcache(steps=request.steps, guidance_scale=request.guidance_scale, threads=args.threads,
                                      scheduler_config=args.scheduler_config)
    rows: list[Row] = []
    for method in args.diffusers:
        def runner(options: dict[str, Any], method: str = method) -> Any:
            model = peers.load_diffusers_digits(args.threads)
            extra = {"mag_ratios": ratios, "num_inference_steps": request.steps} if method == "magcache" else {}
            peers.apply_hook(model, method, **options, **extra)
            den = peers.DiffusersDenoiser(model, scheduler_config=args.scheduler_config)
            return lambda: sample(den, scheduler, request, progress=False)

        specs = [(f"{method}:" + ",".join(f"{k}={v}" for k, v in o.items()), runner(o)) for o in peers.KNOBS[method]]
        rows += sweep("diffusers (PyTorch)", method, specs, base, request, args.target_psnr, args.repeats, classifier)
    return rows


def best_rows(rows: list[Row]) -> list[Row | tuple[str, str]]:
    out: list[Row | tuple[str, str]] = []
    for key in dict.fromkeys((r.side, r.method) for r in rows):
        holding = [r for r in rows if (r.side, r.method) == key and r.holds]
        out.append(max(holding, key=lambda r: r.speedup) if holding else key)
    return out


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        (f"Bundled digits DiT, {args.samples} samples x {args.steps} {_solver(args.scheduler_config)} steps, guidance "
         f"{args.guidance_scale}, "
         f"{args.threads} CPU thread(s). Each method's fastest swept setting holding >= {args.target_psnr:g} dB "
         f"mean PSNR against its own uncached samples; speedup over its own uncached run, best of {args.repeats}."),
        "",
        "| runtime | method | best setting | speedup | wall s | uncached s | PSNR dB | SSIM | digit acc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    best = best_rows(rows)
    ranked = sorted((b for b in best if isinstance(b, Row)), key=lambda r: -r.speedup)
    for r in ranked:
        lines.append(f"| {r.side} | {r.method} | `{r.setting}` | {r.speedup:.2f}x | {r.wall_seconds:.3f} | "
                     f"{r.baseline_seconds:.3f} | {r.psnr:.2f} | {r.ssim:.4f} | {r.accuracy:.2f} |")
    for b in best:
        if not isinstance(b, Row):
            lines.append(f"| {b[0]} | {b[1]} | no setting holds the target | | | | | | |")
    lines += ["", "Command: `python tools/bench_peers.py " + " ".join(_cli_args(args)) + "`"]
    return "\n".join(lines) + "\n"


def _cli_args(args: argparse.Namespace) -> list[str]:
    out = []
    for key in ("samples", "steps", "repeats", "threads", "calibrate", "target_psnr"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.scheduler_config != SCHEDULER_CONFIG:
        out += ["--scheduler-config", str(args.scheduler_config)]
    if args.fcpass != FCPASS:
        out += ["--fcpass", *[f"'{p}'" for p in args.fcpass]]
    if args.diffusers != DIFFUSERS:
        out += ["--diffusers", *args.diffusers]
    return out


def _solver(config: Path) -> str:
    return type(scheduler_from_config(config)).__name__.removesuffix("Scheduler")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ONNX)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scheduler-config", type=Path, default=SCHEDULER_CONFIG,
                    help="diffusers scheduler config both sides sample with (default: the bundled model's DDIM)")
    ap.add_argument("--guidance-scale", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-psnr", type=float, default=30.0)
    ap.add_argument("--calibrate", type=int, default=8, help="calibration trajectories of every fcpass graph")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the fastest counts")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime and PyTorch threads")
    ap.add_argument("--fcpass", nargs="*", default=FCPASS, metavar="POLICY@REGIONS")
    ap.add_argument("--diffusers", nargs="*", default=DIFFUSERS, metavar="METHOD")
    ap.add_argument("--out", type=Path, default=Path("out/bench_peers.md"))
    ap.add_argument("--plot", type=Path, default=Path("out/bench_peers.png"))
    ap.add_argument("--readme", type=Path, help="replace the table between the peers markers of this README")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    request = SampleRequest(classes=[i % 10 for i in range(args.samples)], steps=args.steps,
                            guidance_scale=args.guidance_scale, uncond_class=10, seed=args.seed)
    classifier = DigitClassifier()
    with tempfile.TemporaryDirectory() as tmp:
        rows = fcpass_rows(args, request, classifier, Path(tmp))
    rows += diffusers_rows(args, request, classifier) if args.diffusers else []
    text = table(rows, args)
    print(text)
    with atomic_path(args.out, suffix=".md") as tmp_md:
        tmp_md.write_text(text)
    with atomic_path(args.out.with_suffix(".json"), suffix=".json") as tmp_json:
        tmp_json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault(f"{r.side.split()[0]} {r.method}", []).append((r.speedup, r.psnr))
    plot(curves, args.target_psnr, args.plot, f"bundled digits DiT, {args.samples} samples x {args.steps} steps; "
         "each method over its own uncached run")
    if args.readme:
        replace_marked_block(args.readme, text, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
