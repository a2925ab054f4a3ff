"""A text-conditioned DiT end to end: caption embeddings, flow-matching Euler, guidance, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fcpass.cli import main


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    torch = pytest.importorskip("torch")
    from models.pixart import PixArt, pixart_config, randomize_

    d = tmp_path_factory.mktemp("pixart")
    model = randomize_(PixArt(pixart_config("pixart-tiny")).eval(), seed=5)
    weights = d / "pixart.pt"
    torch.save(model.state_dict(), weights)
    onnx_path = d / "pixart.onnx"
    assert main(["export", "--arch", "pixart-tiny", "--weights", str(weights), "--exporter", "legacy",
                 "-o", str(onnx_path)]) == 0
    sched = d / "scheduler_config.json"
    sched.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                 "shift": 3.0}))
    cfg = pixart_config("pixart-tiny")
    embeds = d / "prompts.npy"
    np.save(embeds, np.random.default_rng(0).standard_normal((3, cfg.caption_len, cfg.caption_channels)).astype(np.float32))
    return onnx_path, sched, embeds


def test_prompt_embeds_sample_and_cached_sample(pixart: tuple[Path, Path, Path], tmp_path: Path) -> None:
    onnx_path, sched, embeds = pixart
    common = ["--scheduler-config", str(sched), "--prompt-embeds", str(embeds), "--steps", "6", "--guidance-scale", "2"]
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["sample", str(onnx_path), *common, "--out-npy", str(a)]) == 0
    images = np.load(a)
    assert images.shape == (3, 4, 8, 8) and np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 1e-3  # different captions, different samples

    fc = tmp_path / "p.fc.onnx"
    assert main(["optimize", str(onnx_path), "-o", str(fc), *common]) == 0
    assert main(["sample", str(fc), "--policy", "none", *common, "--out-npy", str(b)]) == 0
    np.testing.assert_allclose(np.load(b), images, atol=1e-5)
    assert main(["sample", str(fc), "--policy", "fora", "--interval", "2", *common, "--out-npy", str(b)]) == 0
    cached = np.load(b)
    assert np.isfinite(cached).all() and np.abs(cached - images).max() > 0
