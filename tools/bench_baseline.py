"""Baseline speed: one denoiser call on ONNX Runtime (CPU) against PyTorch eager, no caching.

    nice -n 19 python tools/bench_baseline.py --iters 20
    python tools/bench_baseline.py --arch dit-xl-2 --image-size 256 --batch 2 --iters 10 --threads 16

The model (default DiT-S/2 at 256x256, i.e. a 4x32x32 latent, batch 2 = one sample with guidance)
gets random non-zero weights, is exported once with `fcpass.export` (legacy exporter by default,
it is faster to run) to a temporary folder, and both runtimes are fed the same fp32 inputs. After
the warm-up calls, calls alternate between the two runtimes so that background load affects both
alike. PyTorch runs under `torch.inference_mode()`; PyTorch's intra-op threads and ONNX Runtime's
intra-op threads are set to the same number (all cores unless --threads), inter-op to 1.

The printed ratio is PyTorch time / ONNX Runtime time: above 1 means ONNX Runtime is faster.
This is the number fcpass's cached graphs have to be compared against, not a result in itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_baseline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dit-s-2", help="an fcpass export architecture (default dit-s-2)")
    ap.add_argument("--image-size", type=int, default=256, help="pixels; the latent is image-size / 8")
    ap.add_argument("--batch", type=int, default=2, help="static batch (2 = one sample with guidance)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per runtime")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per runtime first")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for both runtimes (0 = all cores)")
    ap.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 0:
        ap.error("--iters must be >= 1, --warmup and --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    threads = args.threads or os.cpu_count() or 1

    import onnxruntime as ort
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)

    from fcpass.export import ExportSpec, build_model, example_inputs, export
    from models.pixart import randomize_

    model, config = build_model(args.arch, args.image_size)
    randomize_(model, args.seed).eval()
    params = sum(p.numel() for p in model.parameters())
    spec = ExportSpec(args.arch, args.image_size, args.batch, args.exporter, args.opset)
    inputs = example_inputs(config, args.batch, seed=args.seed)
    feeds = {k: v.numpy() for k, v in inputs.items()}

    with tempfile.TemporaryDirectory(prefix="fcpass-bench-") as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        t0 = time.perf_counter()
        path = export(spec, Path(tmp) / "model.onnx", weights=weights, verify=False)
        log.info("exported %s (%s, opset %d) in %.1f s", args.arch, args.exporter, args.opset, time.perf_counter() - t0)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return model(*inputs.values()).numpy()

    def run_ort() -> np.ndarray:
        return session.run(None, feeds)[0]

    runners = {"PyTorch eager": run_torch, "ONNX Runtime": run_ort}
    diff = float(np.abs(run_torch() - run_ort()).max())
    log.info("same inputs, max abs diff PyTorch vs ONNX Runtime: %.3g", diff)
    log.info("warm-up: %d calls each; timing %d calls each on %d threads", args.warmup, args.iters, threads)
    for fn in runners.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(args.iters):
        for name in names if i % 2 == 0 else reversed(names):  # alternate who goes first
            t = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - t) * 1e3)

    mean = {k: statistics.fmean(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    pt, ox = names
    side = config["input_size"]
    print(
        f"Measured: one denoiser call (forward pass, fp32, batch {args.batch}) of {args.arch} "
        f"({params / 1e6:.1f} M params, random weights, {args.image_size}x{args.image_size} image -> "
        f"{config['in_channels']}x{side}x{side} latent); {args.iters} timed calls each after {args.warmup} warm-up. "
        f"ONNX Runtime {ort.__version__} CPUExecutionProvider ({args.exporter} export, opset {args.opset}) against "
        f"the baseline PyTorch {torch.__version__} eager under inference_mode; threads: torch intra-op = "
        f"ORT intra-op = {threads} (inter-op 1); max abs diff {diff:.2g}."
    )
    print(f"{'runtime':<26}{'mean ms':>10}{'median ms':>12}{'min ms':>10}")
    for name in names:
        print(f"{name:<26}{mean[name]:>10.2f}{median[name]:>12.2f}{min(times[name]):>10.2f}")
    print(f"{'ratio PyTorch / ORT':<26}{mean[pt] / mean[ox]:>9.2f}x{median[pt] / median[ox]:>11.2f}x")


if __name__ == "__main__":
    main()
