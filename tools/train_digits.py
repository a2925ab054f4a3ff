"""Train a bundled DiT and write its weights and scheduler config.

    python tools/train_digits.py --steps 4000 --out models/digits            # 64 tokens, about an hour
    python tools/train_digits.py --model canvas --resume models/canvas/train_state.pt
                                                       # 256 tokens, about 1.5 hours on 2 CPU cores

`digits` trains on scikit-learn's real digits upsampled to 16x16; `canvas` on the same digits placed
at random positions and scales on a 32x32 canvas, drawn afresh for every batch. With `--resume`
the whole training state is saved there every `--save-every` steps and training continues from it,
so a run can be stopped and picked up again with the same command.

DDPM training (linear betas, 1000 steps, epsilon prediction) with 10% label dropout for
classifier-free guidance and an EMA of the weights, which is what gets saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import canvas, digits
from models.dit import DiT, DiTConfig

log = logging.getLogger("train_digits")

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,  # clipping x0 to [-1, 1] costs this model 3 of 20 digits (docs/benchmarks.md)
    "clip_sample_range": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("digits", "canvas"), default="digits")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, help="default: 128 for digits, 64 for canvas")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="default: models/<model>")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--resume", type=Path, help="training state to continue from (written beside the weights)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = args.out or Path("models") / args.model
    out.mkdir(parents=True, exist_ok=True)
    batch = args.batch or (128 if args.model == "digits" else 64)
    weights = out / ("dit_digits.pt" if args.model == "digits" else "dit_canvas.pt")

    if args.model == "digits":
        images, labels = digits.load_digits_16()
        x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)

        def draw(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, len(x_all), (batch,))
            return x_all[idx], y_all[idx]
    else:
        sources, source_labels = canvas.source_digits()

        def draw(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            # A fresh layout every batch, seeded by the step so a resumed run draws what it would have.
            rng = np.random.default_rng((args.seed, step))
            idx = rng.integers(0, len(sources), size=batch)
            return torch.from_numpy(canvas.place(sources[idx], rng)), torch.from_numpy(source_labels[idx])

    model = DiT(DiTConfig(**(digits.DIGITS_DIT if args.model == "digits" else canvas.CANVAS_DIT)))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"], 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    (out / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    first = 1
    if args.resume and args.resume.exists():
        state = torch.load(args.resume, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        first = state["step"] + 1
    start = time.time()
    bar = tqdm(range(first, args.steps + 1), desc="train", mininterval=30)
    for step in bar:
        x0, y = draw(step)
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (model(xt, t.float(), y) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        if step % args.save_every == 0 or step == args.steps:
            save_atomic(ema.state_dict(), weights)
            if args.resume:
                save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "rng": torch.get_rng_state(), "step": step}, args.resume)
            log.info("step %d loss %.4f (%.0f s)", step, loss.item(), time.time() - start)


if __name__ == "__main__":
    main()
