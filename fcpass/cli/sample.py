"""`fcpass sample`: sample with an (optimized) graph, optionally timed against the uncached graph."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.cli.common import (
    DIMS_HELP,
    INPUTS_HELP,
    bundled_onnx,
    count,
    sampling_args,
    sampling_setup,
)
from fcpass.contract.errors import FcpassError

log = logging.getLogger(__name__)


class _Renamed(argparse.Action):
    """A flag under the name it had before a rename: sets the current flag and logs one deprecation warning."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = "--" + self.dest.replace("_", "-")
        log.warning("%s is deprecated: it is now %s (%s %s)", option_string, current, current, values)
        setattr(namespace, self.dest, values)


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sample", help="sample with an (optimized) graph on ONNX Runtime")
    s.add_argument("model", type=Path, nargs="?", help="ONNX graph (default: the bundled digits model)")
    s.add_argument("--policy", default=None, metavar="NAME[:KEY=VALUE,...]",
                   help="on cache-aware graphs: none, fora, fastcache, taylorseer, delta-dit, fbcache, teacache, "
                        "magcache, duca, toca; options after a colon, e.g. teacache:threshold=0.2 (default: the policy the graph "
                        "was tuned for by fcpass optimize --target-psnr, or the one it was compiled --for; else none)")
    s.add_argument("--alpha", type=float, help="fastcache: significance level of the chi-square test (default 0.05; "
                                                "smaller skips more)")
    s.add_argument("--dof", choices=["elements", "tokens"],
                   help="fastcache: degrees of freedom of the test, N*D (elements, default) or N (tokens)")
    s.add_argument("--max-skips", type=int, help="fastcache, magcache: consecutive skips of a region before it must "
                                                   "compute (default 3)")
    s.add_argument("--warmup", type=int, help="leading steps computed in full (default: the policy's own)")
    s.add_argument("--interval", type=int, help="FORA's interval")
    s.add_argument("--approx", choices=["reuse", "residual", "linear", "affine", "taylor1"],
                   help="fora, fastcache: what stands in for a skipped region (default: reuse for fora, linear for "
                        "fastcache; taylor1 needs a graph optimized with --taylor)")
    s.add_argument("--sigma-scale", type=float, help="fastcache: scale every calibrated sigma^2")
    s.add_argument("--regions", help="fastcache: the region sets that take the test, e.g. stack,blocks; fora, "
                                     "taylorseer: blocks (per block) or stack (the whole stack)")
    s.add_argument("--levels", "--level", dest="regions", action=_Renamed, help=argparse.SUPPRESS)
    s.add_argument("--threshold", type=float, help="fbcache, teacache, magcache: their skip threshold")
    s.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu or cuda")
    s.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's, one per core)")
    s.add_argument("--engine", type=Path, metavar="PATH",
                   help="run this TensorRT engine (fcpass build of MODEL) instead of ONNX Runtime; for a segments "
                        "folder, the folder of engines built from it")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="TensorRT segments: launch each engine directly instead of replaying captured CUDA graphs")
    s.add_argument("--inputs", help=INPUTS_HELP + " (plain graphs; a cache-aware graph keeps those it was optimized with)")
    s.add_argument("--dims", metavar="NAME=N,...", help=DIMS_HELP + " (plain graphs; a cache-aware graph has fixed sizes)")
    s.add_argument("--out", type=Path, help="PNG grid of the samples")
    s.add_argument("--out-npy", type=Path, help="final samples as .npy")
    s.add_argument("--report", type=Path, help="JSON report: timing, MACs, every step's decisions")
    s.add_argument("--baseline", action="store_true",
                   help="also run the uncached graph, print speedup (two runs of each, ABBA) and PSNR")
    sampling_args(s)
    s.set_defaults(func=cmd_sample)



def cmd_sample(args: argparse.Namespace) -> int:
    from fcpass.contract.onnx_io import check_file_output
    from fcpass.sampling import load_denoiser, run_sampling, time_against_baseline

    for path in (args.out, args.out_npy, args.report):  # before sampling, not after
        if path:
            check_file_output(path)
    model_path = args.model or bundled_onnx()
    setup = sampling_setup(args, model_path)
    options = {k: getattr(args, k) for k in ("alpha", "dof", "max_skips", "warmup", "interval", "approx",
                                             "sigma_scale", "regions", "threshold")}
    denoiser = load_denoiser(model_path, args.policy, options, provider=args.provider, inputs=setup.inputs,
                             engine=args.engine, cuda_graphs=args.cuda_graphs, threads=args.threads, dims=args.dims)
    if args.baseline and getattr(getattr(denoiser, "policy", None), "name", "none") == "none":
        raise FcpassError("--baseline compares a cache policy with the uncached graph; add --policy fastcache, or "
                          "optimize the graph with --target-psnr 30 so that it carries a tuned one")
    result, report = run_sampling(denoiser, setup, model_path, args.policy)
    if args.baseline:
        base = load_denoiser(model_path, "none", {}, provider=args.provider, inputs=setup.inputs, engine=args.engine,
                             cuda_graphs=args.cuda_graphs, threads=args.threads)
        time_against_baseline(denoiser, base, setup, result, model_path, report)
    _write_outputs(args, result, report)
    _print_summary(report)
    return 0


def _write_outputs(args: argparse.Namespace, result: Any, report: dict[str, Any]) -> None:
    from fcpass.contract.onnx_io import atomic_path

    if args.out:
        from fcpass.images import save_grid

        save_grid(result.clips(), args.out)
        print(f"wrote {args.out}")
    if args.out_npy:
        with atomic_path(args.out_npy, suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, result.images)  # through a handle: np.save(path) would append ".npy" to the temp name
        print(f"wrote {args.out_npy}")
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.report}")


def _print_summary(report: dict[str, Any]) -> None:
    steps = report["steps"]
    line = (f"{count(report['samples'], 'sample')} x {steps} steps on {report['provider']}: "
            f"{report['wall_seconds']:.3f} s, {report['macs'] / 1e9:.2f} GMACs "
            f"({report['macs_fraction'] * 100:.1f}% of uncached)")
    if report.get("accuracy") is not None:
        line += f", digit accuracy {report['accuracy']:.2f}"
    print(line)
    if "speedup" in report:
        b = report["baseline"]
        print(f"uncached (same graph, every region computing): {b['wall_seconds']:.3f} s -> speedup {report['speedup']:.2f}x "
              f"(MAC-ideal {report['mac_ideal_speedup']:.2f}x; two runs of each, ABBA), PSNR {b['psnr_mean']:.2f} dB, "
              f"SSIM {b['ssim_mean']:.4f}")
