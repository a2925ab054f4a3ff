"""Tests for fcpass.quality: PSNR, SSIM, batch comparison, .npy loading and the digit classifier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fcpass.contract.errors import FcpassError
from fcpass.quality import (
    PSNR_CAP_DB,
    DigitClassifier,
    compare_batches,
    digits_heldout_split,
    load_npy,
    psnr,
    ssim,
)
from models.digits import CLASSIFIER


def _image(seed: int, shape: tuple[int, ...] = (1, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --- PSNR ---------------------------------------------------------------------------------------


def test_psnr_hand_computed() -> None:
    # MSE = 0.2^2, so PSNR = 10*log10(range^2 / 0.04) = 20*log10(range / 0.2).
    ref = np.zeros((1, 16, 16))
    test = np.full((1, 16, 16), 0.2)
    assert psnr(ref, test) == pytest.approx(20.0, abs=1e-9)
    assert psnr(ref, test, data_range=1.0) == pytest.approx(20 * math.log10(5.0), abs=1e-9)


def test_psnr_identical_is_inf() -> None:
    img = _image(0)
    assert psnr(img, img.copy()) == float("inf")


def test_psnr_2d_and_3d_agree() -> None:
    a, b = _image(1, (16, 16)), _image(2, (16, 16))
    assert psnr(a, b) == pytest.approx(psnr(a[None], b[None]))


def test_psnr_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(FcpassError) as err:
        psnr(np.zeros((1, 16, 16)), np.zeros((1, 8, 8)))
    assert "(1, 16, 16)" in str(err.value) and "(1, 8, 8)" in str(err.value)


def test_psnr_rejects_non_finite() -> None:
    bad = _image(3)
    bad[0, 0, 0] = np.nan
    with pytest.raises(FcpassError, match="non-finite"):
        psnr(_image(4), bad)


# --- SSIM ---------------------------------------------------------------------------------------


def test_ssim_identical_is_one() -> None:
    img = _image(5)
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_drops_with_noise() -> None:
    ref = _image(6)
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 1, ref.shape)
    slight = np.clip(ref + 0.05 * noise, -1, 1)
    heavy = np.clip(ref + 0.5 * noise, -1, 1)
    s_slight, s_heavy = ssim(ref, slight), ssim(ref, heavy)
    assert 0.0 < s_heavy < s_slight < 1.0


def test_ssim_symmetric() -> None:
    a, b = _image(8), _image(9)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)


def test_ssim_multichannel_is_mean_of_channels() -> None:
    a, b = _image(10, (3, 16, 16)), _image(11, (3, 16, 16))
    per_channel = [ssim(a[c], b[c]) for c in range(3)]
    assert ssim(a, b) == pytest.approx(float(np.mean(per_channel)), abs=1e-12)


def test_ssim_small_images() -> None:
    # 5x5 is below skimage's default 7x7 window, so the window must shrink to fit.
    a = _image(12, (5, 5))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(FcpassError, match="window"):
        ssim(_image(13, (2, 2)), _image(14, (2, 2)))
    with pytest.raises(FcpassError, match="window"):
        ssim(_image(15), _image(16), win_size=4)


# --- compare_batches ----------------------------------------------------------------------------


def test_compare_batches_caps_identical_samples() -> None:
    ref = np.zeros((3, 1, 16, 16))
    test = ref.copy()
    test[1] = 0.2  # 20 dB, as in test_psnr_hand_computed
    test[2] = -0.02  # 40 dB
    out = compare_batches(ref, test)
    assert out["n"] == 3
    assert out["psnr"][0] == float("inf")
    assert out["psnr"][1:] == pytest.approx([20.0, 40.0])
    assert out["psnr_mean"] == pytest.approx((PSNR_CAP_DB + 20.0 + 40.0) / 3)
    assert len(out["ssim"]) == 3 and out["ssim"][0] == pytest.approx(1.0)
    assert out["ssim_mean"] == pytest.approx(float(np.mean(out["ssim"])))


def test_compare_batches_all_identical_is_finite() -> None:
    batch = np.stack([_image(s) for s in range(4)])
    out = compare_batches(batch, batch.copy())
    assert out["psnr_mean"] == PSNR_CAP_DB
    assert out["ssim_mean"] == pytest.approx(1.0)


def test_compare_batches_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(FcpassError) as err:
        compare_batches(np.zeros((4, 1, 16, 16)), np.zeros((3, 1, 16, 16)))
    assert "(4, 1, 16, 16)" in str(err.value) and "(3, 1, 16, 16)" in str(err.value)
    with pytest.raises(FcpassError, match="N, C, H, W"):
        compare_batches(np.zeros((1, 16, 16)), np.zeros((1, 16, 16)))


# --- load_npy -----------------------------------------------------------------------------------


def test_load_npy_round_trip(tmp_path: Path) -> None:
    arr = _image(17, (2, 1, 16, 16))
    np.save(tmp_path / "x.npy", arr)
    np.testing.assert_array_equal(load_npy(tmp_path / "x.npy"), arr)


def test_load_npy_missing(tmp_path: Path) -> None:
    with pytest.raises(FcpassError, match="not found"):
        load_npy(tmp_path / "nope.npy")


def test_load_npy_invalid(tmp_path: Path) -> None:
    (tmp_path / "junk.npy").write_text("not an array")
    with pytest.raises(FcpassError, match="junk.npy is not a .npy file"):
        load_npy(tmp_path / "junk.npy")
    np.save(tmp_path / "cut.npy", np.zeros(1000))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:200])  # a header, then too few bytes
    with pytest.raises(FcpassError, match="could not read .*cut.npy as a .npy array"):
        load_npy(tmp_path / "cut.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.ones(2))
    with pytest.raises(FcpassError, match="npz"):
        load_npy(tmp_path / "two.npz")


# --- DigitClassifier ----------------------------------------------------------------------------


def test_classifier_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FcpassError, match=r"tools/train_classifier\.py"):
        DigitClassifier(tmp_path / "missing.onnx")


needs_classifier = pytest.mark.skipif(
    not CLASSIFIER.is_file(),
    reason=f"{CLASSIFIER} is missing; run `python tools/train_classifier.py` to create it",
)


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return DigitClassifier()


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    # Recreate the exact split the classifier was trained with, from what the trainer recorded.
    meta = json.loads(CLASSIFIER.with_suffix(".json").read_text())
    _, x_ho, _, y_ho = digits_heldout_split(meta["seed"], meta["heldout_fraction"])
    assert len(y_ho) == meta["n_heldout"]
    return x_ho, y_ho


@needs_classifier
def test_classifier_heldout_accuracy(classifier: DigitClassifier, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = heldout
    assert classifier.accuracy(x, y) >= 0.95


@needs_classifier
def test_classifier_batch_size_is_dynamic(classifier: DigitClassifier, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = heldout
    batched = classifier.predict(x[:7])
    one_by_one = np.concatenate([classifier.predict(x[i : i + 1]) for i in range(7)])
    np.testing.assert_array_equal(batched, one_by_one)
    assert batched.dtype == np.int64


@needs_classifier
def test_classifier_not_confident_on_noise(
    classifier: DigitClassifier, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    noise = np.random.default_rng(18).uniform(-1, 1, (200, 1, 16, 16)).astype(np.float32)
    conf_noise = classifier.predict_proba(noise).max(axis=1)
    conf_real = classifier.predict_proba(heldout[0]).max(axis=1)
    # A scorer that is sure every noise image is some digit would pass garbage samples.
    assert conf_noise.mean() < 0.8
    assert conf_noise.mean() < conf_real.mean() - 0.2


@needs_classifier
def test_classifier_rejects_wrong_shape(classifier: DigitClassifier) -> None:
    with pytest.raises(FcpassError, match=r"\(N, 1, 16, 16\)"):
        classifier.predict(np.zeros((2, 16, 16), dtype=np.float32))
    with pytest.raises(FcpassError, match="label"):
        classifier.accuracy(np.zeros((2, 1, 16, 16), dtype=np.float32), [1, 2, 3])
