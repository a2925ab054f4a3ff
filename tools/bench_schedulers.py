"""What a scheduler's step costs the host: numpy time per step on a latent of a given shape.

    python tools/bench_schedulers.py --shape 1 16 21 60 104

A cached step can cost the device a few percent of a full one; the scheduler's own arithmetic on the host
comes on top of every step, skipped or not. Prints milliseconds per step (the median of `--steps`-step
trajectories, `--repeats` of them) for the configs `--configs` names (default: the bundled model's DDIM,
flow-matching Euler, and Sana's, Wan's and CogVideoX's own).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.digits import SCHEDULER_CONFIG
from runtimes.schedulers import scheduler_from_config

# The families' own configs, as tools/export_diffusers.py writes them (importing it would need torch).
DEFAULT_CONFIGS = {
    "ddim (bundled)": str(SCHEDULER_CONFIG),
    "flow-match euler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
    "dpm-solver++ (sana)": {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0,
                            "prediction_type": "flow_prediction"},
    "unipc (wan)": {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0,
                    "prediction_type": "flow_prediction"},
    "cogvideox ddim": {"_class_name": "CogVideoXDDIMScheduler", "prediction_type": "v_prediction",
                       "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}


def step_ms(config: dict[str, Any] | str, shape: tuple[int, ...], steps: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(shape).astype(np.float32)
    out = rng.standard_normal(shape).astype(np.float32)
    scheduler = scheduler_from_config(config)
    scheduler.set_timesteps(steps)
    times = []
    for _ in range(repeats):
        x = x0
        start = time.perf_counter()
        for i in range(len(scheduler.timesteps)):
            x = scheduler.step(out, i, x)
        times.append((time.perf_counter() - start) / len(scheduler.timesteps))
    return float(np.median(times)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 16, 21, 60, 104],
                    help="the latent, batch first (default: Wan's 480p, 81 frames)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", type=Path, nargs="*", help="scheduler_config.json files instead of the defaults")
    args = ap.parse_args()
    configs = {str(p): str(p) for p in args.configs} if args.configs else DEFAULT_CONFIGS
    shape = tuple(args.shape)
    print(f"latent {shape} ({np.prod(shape) / 1e6:.1f}M floats), {args.steps} steps, median of {args.repeats}:")
    for name, config in configs.items():
        print(f"  {name:<24} {step_ms(config, shape, args.steps, args.repeats):7.1f} ms/step")


if __name__ == "__main__":
    main()
