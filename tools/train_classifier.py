"""Train the small digit classifier that scores a bundled model's generated digits, and export it to ONNX.

    python tools/train_classifier.py                  # 16x16 digits: about a minute on 2 CPU cores
    python tools/train_classifier.py --model canvas   # digits placed on a 32x32 canvas: a few minutes

`--model canvas` trains on the same training digits placed afresh on a canvas at every step (random
positions and sizes, as `models.canvas` draws them) and holds out the same digits, placed once.

Trains a small CNN on scikit-learn's real digits (upsampled to 16x16, in [-1, 1]) with a fixed
seed, holding out a stratified 20% that it never trains on. Light augmentation (random 1-pixel
shifts, slight intensity noise and contrast changes) keeps it from relying on the exact pixel
statistics of the real digits, so it also scores generated digits fairly. Writes, atomically:

    models/digits/digit_classifier.onnx   input "image" (N, 1, 16, 16), output "logits" (N, 10)
    models/digits/digit_classifier.json   {"heldout_accuracy", "n_heldout", "seed", ...}

The held-out accuracy recorded is the exported ONNX model's, measured with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Run as a script from anywhere: the repository root holds the fcpass and models packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from fcpass.quality import (
    HELDOUT_FRACTION,
    HELDOUT_SEED,
    DigitClassifier,
    digits_heldout_split,
)
from models import canvas
from models.digits import CLASSIFIER, IMAGE_SIZE, NUM_CLASSES

log = logging.getLogger("train_classifier")

MIN_HELDOUT_ACCURACY = 0.97


class DigitCNN(nn.Module):
    """3x3 conv layers, halving the side down to 4, and one linear layer: ~25k parameters at 16x16."""

    def __init__(self, num_classes: int = NUM_CLASSES, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                   nn.MaxPool2d(2)]
        side = image_size // 2
        while side > 4:  # 16 -> 8 -> 4; a 32x32 canvas takes one more stage
            layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            side //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 4 * 4, num_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def augment(x: torch.Tensor, gen: torch.Generator, shift: bool = True) -> torch.Tensor:
    """Random shift of up to 1 pixel each way, slight contrast change and Gaussian pixel noise."""
    n, side = x.shape[0], x.shape[-1]
    shifted = x
    if shift:
        # Pad with the background value (-1) rather than rolling, so nothing wraps around the edges.
        padded = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
        dy = torch.randint(0, 3, (n,), generator=gen)
        dx = torch.randint(0, 3, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(side)[None, :])[:, :, None]
        cols = (dx[:, None] + torch.arange(side)[None, :])[:, None, :]
        shifted = padded[:, 0][torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)
    # Contrast around the background, so a blank pixel stays at -1 before the noise.
    scale = 1.0 + 0.15 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    shifted = (shifted + 1.0) * scale - 1.0
    sigma = 0.1 * torch.rand(n, 1, 1, 1, generator=gen)
    noisy = shifted + sigma * torch.randn(shifted.shape, generator=gen)
    return noisy.clamp(-1.0, 1.0)


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def training_data(model: str, seed: int, batch: int, gen: torch.Generator) -> tuple[
        Callable[[int], tuple[torch.Tensor, torch.Tensor]], np.ndarray, np.ndarray]:
    """A function drawing step `step`'s augmented training batch, and the held-out images and labels."""
    if model == "digits":
        x_tr, x_ho, y_tr, y_ho = digits_heldout_split(seed, HELDOUT_FRACTION)
        x_train, y_train = torch.from_numpy(x_tr), torch.from_numpy(y_tr)

        def draw(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.randint(0, len(x_train), (batch,), generator=gen)
            return augment(x_train[idx], gen), y_train[idx]

        return draw, x_ho, y_ho
    d_tr, y_tr, x_ho, y_ho = canvas.heldout_split(seed, HELDOUT_FRACTION)

    def draw_canvas(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((seed, step))
        idx = rng.integers(0, len(d_tr), size=batch)
        # The placement is the shift: a fresh position and size every step.
        return augment(torch.from_numpy(canvas.place(d_tr[idx], rng)), gen, shift=False), torch.from_numpy(y_tr[idx])

    return draw_canvas, x_ho, y_ho


def export_onnx(model: nn.Module, path: Path, side: int) -> None:
    """Export with a dynamic batch axis, writing to a temporary file first so a crash never
    leaves a half-written classifier in place."""
    model.eval()
    tmp = path.with_suffix(path.suffix + ".tmp")
    dummy = torch.zeros(2, 1, side, side)
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
        # One self-contained file: external weight files would not follow the os.replace below.
        external_data=False,
        dynamo=True,
        verbose=False,
    )
    os.replace(tmp, path)


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("digits", "canvas"), default="digits")
    ap.add_argument("--steps", type=int, help="default: 400 for digits, 1500 for canvas")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=HELDOUT_SEED)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, help="ONNX path (default: the model's); the .json goes next to it")
    args = ap.parse_args()
    # INFO for this tool only: the ONNX exporter's passes log every rewrite at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    args.steps = args.steps or (400 if args.model == "digits" else 1500)
    args.out = args.out or (CLASSIFIER if args.model == "digits" else canvas.CLASSIFIER)
    draw, x_ho, y_ho = training_data(args.model, args.seed, args.batch, gen)
    x_held, y_held = torch.from_numpy(x_ho), torch.from_numpy(y_ho)
    log.info("holding out %d digits (seed %d)", len(x_held), args.seed)

    model = DigitCNN(image_size=x_ho.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    start = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        x, y = draw(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            acc = torch_accuracy(model, x_held, y_held)
            log.info("step %d loss %.4f held-out acc %.4f (%.0f s)", step, loss.item(), acc, time.time() - start)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, args.out, x_ho.shape[-1])
    # Score the file that ships, not the torch model, so the recorded number is the one users get.
    onnx_acc = DigitClassifier(args.out).accuracy(x_ho, y_ho)
    torch_acc = torch_accuracy(model, x_held, y_held)
    if abs(onnx_acc - torch_acc) > 1.0 / len(x_ho):
        log.warning("ONNX and torch held-out accuracy differ: %.4f vs %.4f", onnx_acc, torch_acc)
    meta = {
        "heldout_accuracy": round(onnx_acc, 6),
        "n_heldout": len(x_ho),
        "seed": args.seed,
        "heldout_fraction": HELDOUT_FRACTION,
        "steps": args.steps,
        "model": args.model,
    }
    write_json_atomic(meta, args.out.with_suffix(".json"))
    log.info(
        "held-out accuracy %.4f on %d digits; wrote %s (%.0f KB) in %.0f s",
        onnx_acc, len(x_ho), args.out, args.out.stat().st_size / 1024, time.time() - start,
    )
    if onnx_acc < MIN_HELDOUT_ACCURACY:
        log.error("held-out accuracy %.4f is below %.2f; the classifier is not good enough", onnx_acc, MIN_HELDOUT_ACCURACY)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
