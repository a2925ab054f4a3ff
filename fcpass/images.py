"""Sample grids as PNG (matplotlib), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcpass.contract.onnx_io import atomic_path


def to_display(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W) grey or (N, H, W, 3) colour in [0, 1] (first 3 channels)."""
    x = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
    if x.shape[1] == 1:
        return x[:, 0]
    return np.moveaxis(x[:, :3], 1, -1) if x.shape[1] >= 3 else x.mean(axis=1)


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, scale: int = 4) -> Path:
    """Tile the samples into one image, upscaled `scale` times with nearest neighbours; video samples
    (N, C, F, H, W) one to a row, frame after frame."""
    if images.ndim == 5:
        n, c, f, h, w = images.shape
        images, ncol = images.transpose(0, 2, 1, 3, 4).reshape(n * f, c, h, w), f
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = to_display(images)
    n = len(tiles)
    ncol = ncol or min(n, 10)
    nrow = -(-n // ncol)
    h, w = tiles.shape[1:3]
    pad = 1
    shape = (nrow * (h + pad) + pad, ncol * (w + pad) + pad) + tiles.shape[3:]
    canvas = np.ones(shape, dtype=np.float32)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_path(path, suffix=".png") as tmp:
        plt.imsave(tmp, canvas, cmap="gray" if canvas.ndim == 2 else None, vmin=0.0, vmax=1.0, format="png")
    return Path(path)
