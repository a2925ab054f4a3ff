"""Quality measures for generated images: PSNR, SSIM and a digit classifier's accuracy.

PSNR and SSIM compare a cached (approximate) run against the exact reference run, image by image;
the classifier checks that generated digits are still recognisable as the class they were asked for.
Images are float arrays in [-1, 1] by default, so the default ``data_range`` is 2.0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fcpass.contract.errors import FcpassError, first_clause
from models.digits import CLASSIFIER

log = logging.getLogger(__name__)

# Identical images have infinite PSNR; one such sample would make a batch mean infinite and hide
# every other sample, so each sample is capped here before averaging. 100 dB is far above anything
# an approximation reaches in float32 (~1e-5 RMS error on a range of 2) yet still finite.
PSNR_CAP_DB = 100.0

# skimage's default SSIM window; 16x16 digits fit it, smaller images get the largest odd window.
DEFAULT_SSIM_WIN = 7

HELDOUT_SEED = 0
HELDOUT_FRACTION = 0.2


def _as_image(array: Any, name: str) -> np.ndarray:
    """Validate one image shaped (C, H, W) or (H, W) and return it as float64."""
    a = np.asarray(array)
    if a.ndim not in (2, 3):
        raise FcpassError(
            f"{name} must be one image shaped (C, H, W) or (H, W): got shape {a.shape}; "
            "pass a single image, or use compare_batches for (N, C, H, W) batches"
        )
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise FcpassError(f"{name} must hold real numbers: got dtype {a.dtype}; pass a float array")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise FcpassError(
            f"{name} contains non-finite values: {int(np.sum(~np.isfinite(a)))} NaN/inf pixels; "
            "fix the run that produced it before measuring quality"
        )
    return a


def _check_pair(reference: Any, test: Any, data_range: float) -> tuple[np.ndarray, np.ndarray]:
    ref = _as_image(reference, "reference")
    tst = _as_image(test, "test")
    if ref.shape != tst.shape:
        raise FcpassError(
            f"reference and test images differ in shape: reference {ref.shape}, test {tst.shape}; "
            "compare images of the same size"
        )
    if not data_range > 0:
        raise FcpassError(f"data_range must be positive: got {data_range}; use 2.0 for images in [-1, 1]")
    return ref, tst


def psnr(reference: Any, test: Any, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio of ``test`` against ``reference`` in dB (higher is better).

    Images are shaped (C, H, W) or (H, W). Identical images return ``float("inf")``; use
    :func:`compare_batches` for a mean that stays finite.
    """
    ref, tst = _check_pair(reference, test, data_range)
    # skimage divides by the MSE and would warn about division by zero; the answer is known.
    if np.array_equal(ref, tst):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, tst, data_range=data_range))


def ssim(reference: Any, test: Any, data_range: float = 2.0, win_size: int | None = None) -> float:
    """Mean structural similarity of ``test`` against ``reference`` (1.0 for identical images).

    Images are shaped (C, H, W) or (H, W); channels are compared separately and averaged.
    ``win_size`` must be odd and at most the smaller side; by default it is 7, or the largest odd
    size that fits when the image is smaller than 7x7.
    """
    ref, tst = _check_pair(reference, test, data_range)
    channel_axis: int | None = None
    if ref.ndim == 3:
        if ref.shape[0] == 1:
            ref, tst = ref[0], tst[0]
        else:
            channel_axis = 0
    h, w = ref.shape[-2:]
    side = min(h, w)
    if win_size is None:
        win_size = min(DEFAULT_SSIM_WIN, side if side % 2 else side - 1)
    if win_size < 3 or win_size % 2 == 0 or win_size > side:
        raise FcpassError(
            f"SSIM window must be odd, at least 3 and at most the smaller image side: got win_size "
            f"{win_size} for {h}x{w} images; pass an odd win_size between 3 and {side} "
            "(images need to be at least 3x3)"
        )
    return float(
        structural_similarity(ref, tst, data_range=data_range, win_size=win_size, channel_axis=channel_axis)
    )


def compare_batches(reference: Any, test: Any, data_range: float = 2.0) -> dict[str, Any]:
    """Per-sample PSNR and SSIM of two (N, C, H, W) batches, and their means. Video batches (N, C, F, H, W)
    score each sample over all its frames: PSNR of the whole clip, SSIM averaged over frames.

    Returns ``{"n", "psnr", "ssim", "psnr_mean", "ssim_mean"}``. The per-sample ``psnr`` list keeps
    ``inf`` for identical samples, but ``psnr_mean`` caps every sample at ``PSNR_CAP_DB`` (100 dB)
    before averaging so that a few identical samples cannot make the mean infinite.
    """
    ref = np.asarray(reference)
    tst = np.asarray(test)
    if ref.shape != tst.shape or ref.ndim not in (4, 5):
        raise FcpassError(
            f"reference and test batches must have the same (N, C, H, W) or (N, C, F, H, W) shape: reference {ref.shape}, "
            f"test {tst.shape}; generate both with the same batch size and image size"
        )
    if ref.shape[0] == 0:
        raise FcpassError(f"batches are empty: shape {ref.shape}; pass at least one image per batch")
    if ref.ndim == 5:  # frames stacked into one tall image: the same pixels, so the same PSNR
        c, f, h, w = ref.shape[1:]
        psnrs = [psnr(r.reshape(c, f * h, w), t.reshape(c, f * h, w), data_range) for r, t in zip(ref, tst)]
        ssims = [float(np.mean([ssim(r[:, k], t[:, k], data_range) for k in range(f)])) for r, t in zip(ref, tst)]
    else:
        psnrs = [psnr(r, t, data_range) for r, t in zip(ref, tst)]
        ssims = [ssim(r, t, data_range) for r, t in zip(ref, tst)]
    return {
        "n": int(ref.shape[0]),
        "psnr": psnrs,
        "ssim": ssims,
        "psnr_mean": float(np.mean(np.minimum(psnrs, PSNR_CAP_DB))),
        "ssim_mean": float(np.mean(ssims)),
    }


def load_npy(path: str | Path, what: str = "image", source: str = "generate the images first") -> np.ndarray:
    """Load one array from a ``.npy`` file, with a clear error for a missing or unreadable file (`what`
    it holds, and where such a file comes from)."""
    p = Path(path)
    if not p.is_file():
        raise FcpassError(f"{what} file not found: {p}; check the path, or {source}")
    with open(p, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY" and magic[:2] != b"PK":
        raise FcpassError(f"{p} is not a .npy file (no numpy header); save the array with numpy.save")
    try:
        # No pickles: an image file must never be able to run code when loaded.
        data = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, TokenError, MemoryError) as exc:
        # (numpy parses the header with Python's tokenizer: a damaged one raises TokenError or SyntaxError)
        raise FcpassError(
            f"could not read {p} as a .npy array ({type(exc).__name__}: {first_clause(exc, 100)}); save it with numpy.save"
        ) from None
    if not isinstance(data, np.ndarray):
        data.close()
        raise FcpassError(f"{p} is a .npz archive, not a single .npy array; save one array with numpy.save")
    return data


def digits_heldout_split(
    seed: int = HELDOUT_SEED, fraction: float = HELDOUT_FRACTION
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The classifier's train/held-out split of the real 16x16 digits: x_train, x_heldout, y_train, y_heldout.

    Stratified, so every digit is represented in proportion; the training tool and the tests share
    this function so they cannot drift apart.
    """
    from sklearn.model_selection import train_test_split

    from models.digits import load_digits_16

    images, labels = load_digits_16()
    x_tr, x_ho, y_tr, y_ho = train_test_split(
        images, labels, test_size=fraction, random_state=seed, stratify=labels
    )
    return x_tr, x_ho, y_tr, y_ho


class DigitClassifier:
    """A bundled digit classifier (ONNX), used to check that generated digits are legible.

    The default is the 16x16 digits model's; the canvas model's (32x32) lies beside its graph. The image
    side is read from the classifier's input shape.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else CLASSIFIER
        # The canvas model's classifier lies in its own folder and trains with its own flag.
        self._train = "python tools/train_classifier.py" + (" --model canvas" if self.path.parent.name == "canvas" else "")
        if not self.path.is_file():
            raise FcpassError(f"digit classifier not found: no file at {self.path}; train it with `{self._train}`")
        # Imported here so PSNR/SSIM users don't pay for onnxruntime.
        import onnxruntime as ort

        try:
            # Explicit CPU provider: the classifier is tiny, and results must not depend on which
            # accelerators happen to be installed.
            self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own, unexported exception types
            raise FcpassError(
                f"could not load the digit classifier {self.path}: {exc}; "
                f"retrain it with `{self._train}`"
            ) from exc
        first = self._session.get_inputs()[0]
        self._input = first.name
        side = first.shape[-1]
        self.image_size = side if isinstance(side, int) else 16
        log.debug("loaded digit classifier %s (input %r)", self.path, self._input)

    def _check_images(self, images: Any) -> np.ndarray:
        x = np.asarray(images)
        side = self.image_size
        if x.ndim != 4 or x.shape[1:] != (1, side, side):
            raise FcpassError(
                f"digit classifier input must be shaped (N, 1, {side}, {side}): got {x.shape}; "
                f"pass a batch of single-channel {side}x{side} images in [-1, 1]"
            )
        return np.ascontiguousarray(x, dtype=np.float32)

    def logits(self, images: Any) -> np.ndarray:
        """Raw class scores, shape (N, 10), for images shaped (N, 1, side, side) in [-1, 1]."""
        x = self._check_images(images)
        if x.shape[0] == 0:
            return np.zeros((0, 10), dtype=np.float32)
        return self._session.run(None, {self._input: x})[0]

    def predict_proba(self, images: Any) -> np.ndarray:
        """Class probabilities (softmax of the logits), shape (N, 10)."""
        z = self.logits(images).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, images: Any) -> np.ndarray:
        """Predicted digit (int64) for each image shaped (N, 1, side, side) in [-1, 1]."""
        return np.argmax(self.logits(images), axis=1).astype(np.int64)

    def accuracy(self, images: Any, labels: Any) -> float:
        """Fraction of images classified as their label."""
        y = np.asarray(labels).reshape(-1)
        n = np.asarray(images).shape[0] if np.ndim(images) else 0
        if y.shape[0] != n or n == 0:
            raise FcpassError(
                f"need one label per image and at least one image: got {n} images and {y.shape[0]} labels; "
                "pass matching, non-empty images and labels"
            )
        return float(np.mean(self.predict(images) == y))


__all__ = [
    "PSNR_CAP_DB",
    "DigitClassifier",
    "compare_batches",
    "digits_heldout_split",
    "load_npy",
    "psnr",
    "ssim",
]
