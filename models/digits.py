"""The bundled model: a small class-conditional DiT trained on scikit-learn's 8x8 handwritten digits.

The digits are upsampled to 16x16 and the diffusion runs in pixel space (1 channel, patch 2, so 64
tokens). Everything here is shipped inside the package: the weights, the diffusers-format scheduler
config, the exported ONNX graph and a small digit classifier used to score samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIGITS_DIR = Path(__file__).resolve().parent / "digits"
WEIGHTS = DIGITS_DIR / "dit_digits.pt"
ONNX = DIGITS_DIR / "dit_digits.onnx"
SCHEDULER_CONFIG = DIGITS_DIR / "scheduler_config.json"
CLASSIFIER = DIGITS_DIR / "digit_classifier.onnx"
IMAGE_SIZE = 16
NUM_CLASSES = 10

# Kept as plain keyword arguments so this module imports without torch.
DIGITS_DIT = {
    "input_size": IMAGE_SIZE,
    "patch_size": 2,
    "in_channels": 1,
    "hidden_size": 128,
    "depth": 8,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "class_dropout_prob": 0.1,
    "num_classes": NUM_CLASSES,
    "learn_sigma": False,
}


def load_digits_16() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real digits as float32 images in [-1, 1], shape (N, 1, 16, 16), and int64 labels."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    up = np.stack([zoom(img, IMAGE_SIZE / 8, order=1) for img in images])
    up = np.clip(up, 0.0, 1.0) * 2.0 - 1.0
    return up[:, None].astype(np.float32), data.target.astype(np.int64)
