"""The second bundled model: real handwritten digits at random positions and scales on a 32x32 canvas.

scikit-learn's 8x8 digits are resized to 10-18 pixels and placed anywhere on a blank 32x32 frame,
so the content fills part of the image as objects do in real photographs and most tokens are
background. The diffusion runs in pixel space (1 channel, patch 2): 256 tokens, the token count of
DiT-XL/2 at 256px. A small class-conditional adaLN-Zero DiT, trained by `tools/train_digits.py
--model canvas`, with its scheduler config, ONNX export and a classifier of its own beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.digits import DIGITS_DIT

CANVAS_DIR = Path(__file__).resolve().parent / "canvas"
WEIGHTS = CANVAS_DIR / "dit_canvas.pt"
ONNX = CANVAS_DIR / "dit_canvas.onnx"
SCHEDULER_CONFIG = CANVAS_DIR / "scheduler_config.json"
CLASSIFIER = CANVAS_DIR / "digit_classifier.onnx"
IMAGE_SIZE = 32
NUM_CLASSES = 10
# Side of a placed digit, in pixels (inclusive): a third to a half of the frame.
MIN_SIDE, MAX_SIDE = 10, 18

# The digits DiT's, on a 32x32 canvas, narrower and shallower so that 256 tokens train on two CPU cores.
CANVAS_DIT = {**DIGITS_DIT, "input_size": IMAGE_SIZE, "hidden_size": 96, "depth": 6}


def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real 8x8 digits as float32 in [0, 1], shape (N, 8, 8), and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def place(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each 8x8 digit in [0, 1], resized to a random side and put at a random place on a blank canvas.

    Returns float32 images in [-1, 1] (background -1), shape (N, 1, 32, 32); the whole digit is always
    inside the frame.
    """
    from scipy.ndimage import zoom

    out = np.full((len(digits), 1, IMAGE_SIZE, IMAGE_SIZE), -1.0, dtype=np.float32)
    sides = rng.integers(MIN_SIDE, MAX_SIDE + 1, size=len(digits))
    for i, (digit, side) in enumerate(zip(digits, sides)):
        patch = np.clip(zoom(digit, side / 8, order=1), 0.0, 1.0)
        h, w = patch.shape
        y, x = rng.integers(0, IMAGE_SIZE - h + 1), rng.integers(0, IMAGE_SIZE - w + 1)
        out[i, 0, y : y + h, x : x + w] = patch * 2.0 - 1.0
    return out


def load_canvas(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` placed digits drawn (with repeats) from the real ones, with a seeded layout, and their labels."""
    rng = np.random.default_rng(seed)
    digits, labels = source_digits()
    pick = rng.integers(0, len(digits), size=n)
    return place(digits[pick], rng), labels[pick]


def heldout_split(seed: int = 0, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The canvas classifier's split: 8x8 training digits and labels, held-out digits placed on canvases
    (seeded, one layout each) and their labels. The same stratified split of the real digits as the 16x16
    classifier's, so neither classifier ever sees its held-out digits."""
    from sklearn.model_selection import train_test_split

    digits, labels = source_digits()
    d_tr, d_ho, y_tr, y_ho = train_test_split(digits, labels, test_size=fraction, random_state=seed, stratify=labels)
    return d_tr, y_tr, place(d_ho, np.random.default_rng(seed)), y_ho
