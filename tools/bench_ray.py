"""Calibration on a local Ray cluster against one process, and what Ray itself costs.

    python tools/bench_ray.py --trajectories 8 --workers 2

Compiles the bundled model (every region set) and calibrates it three times in this run: in this process with ONNX
Runtime's default threads, in this process with one thread, and on a local Ray cluster of `--workers` CPUs (one
task per trajectory, one thread each), and prints the calibration times and their ratios, with Ray's own costs measured alongside: starting the
cluster, putting the graph into the object store, and dispatching a task (the mean round trip of `--workers` x 4
empty tasks, after a warm-up). The plans are checked to agree (the same sigma^2). numpy's BLAS runs on one thread
here (OMP_NUM_THREADS=1 unless set), as Ray runs it in a one-CPU worker: on a loaded host its default threads
spin against ONNX Runtime's and slow the one-process run several-fold, which is not what is measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads its BLAS
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fcpass import optimize as optimize_module
from fcpass.cli import build_parser
from fcpass.cli.common import sampling_setup
from fcpass.cluster import graph_files, import_ray, ray_cluster
from fcpass.optimize import OptimizeOptions, optimize
from models.digits import ONNX


def _noop() -> None:
    return None


def timed_calibrations(options: OptimizeOptions, setup: Any, folder: Path, name: str) -> tuple[float, Any]:
    """Compile and calibrate; the seconds the calibration alone took, and the plan."""
    spent: list[float] = []
    real = optimize_module.calibrate

    def calibrate(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        real(*args, **kwargs)
        spent.append(time.perf_counter() - start)

    optimize_module.calibrate = calibrate
    try:
        plan = optimize(ONNX, folder / f"{name}.fc.onnx", options, setup)
    finally:
        optimize_module.calibrate = real
    return spent[0], plan


def ray_overheads(ray: Any, workers: int, model_bytes: dict[str, bytes]) -> dict[str, float]:
    start = time.perf_counter()
    ref = ray.put(model_bytes)
    put = time.perf_counter() - start
    del ref
    noop = ray.remote(num_cpus=1)(_noop)
    ray.get([noop.remote() for _ in range(workers)])  # workers started
    n = workers * 4
    start = time.perf_counter()
    for _ in range(n):
        ray.get(noop.remote())
    return {"put": put, "dispatch": (time.perf_counter() - start) / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trajectories", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="calibration steps per trajectory (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster (default %(default)s)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup = sampling_setup(build_parser().parse_args(["optimize", "-o", "x"]), ONNX)
    options = OptimizeOptions(calibrate=args.trajectories, calib_steps=args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        folder = Path(tmp)
        local, local_plan = timed_calibrations(options, setup, folder, "local")
        single, _ = timed_calibrations(dataclasses.replace(options, calib_threads=1), setup, folder, "single")
        ray = import_ray()
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        started = time.perf_counter() - start
        try:
            from fcpass.contract.onnx_io import load_model

            overhead = ray_overheads(ray, args.workers, graph_files(load_model(folder / "local.fc.onnx")))
            with ray_cluster() as cluster:
                distributed, ray_plan = timed_calibrations(dataclasses.replace(options, cluster=cluster), setup,
                                                           folder, "ray")
        finally:
            ray.shutdown()
    agree = all(np.isclose(a.calibration["sigma2"] or 0.0, b.calibration["sigma2"] or 0.0, rtol=1e-9)
                for a, b in zip(local_plan.regions, ray_plan.regions))
    print(f"calibration of the bundled model, {args.trajectories} trajectories x {args.steps} steps (fit and test "
          "passes):")
    print(f"  one process, ONNX Runtime's default threads: {local:.2f} s")
    print(f"  one process, 1 thread: {single:.2f} s")
    print(f"  local Ray cluster, {args.workers} workers x 1 thread: {distributed:.2f} s")
    print(f"  ratio one process / Ray: {local / distributed:.2f}x (default threads), {single / distributed:.2f}x "
          f"(1 thread); sigma^2 {'agree' if agree else 'DIFFER'}")
    print(f"Ray's own costs: cluster start {started:.2f} s (not in the Ray time above), graph put into the object "
          f"store {overhead['put'] * 1e3:.1f} ms, one task's dispatch round trip {overhead['dispatch'] * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
