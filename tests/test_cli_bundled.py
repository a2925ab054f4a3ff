"""The CLI end to end on the bundled digits model: sample, optimize, sample cached, report, compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fcpass.cli import main
from fcpass.contract.roles import ROLES
from models.digits import ONNX

pytestmark = pytest.mark.skipif(not ONNX.exists(), reason="bundled model missing (run tools/train_digits.py)")


def test_inspect_finds_eight_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ONNX)]) == 0
    assert "  as latent=latent, timestep=timestep, class=class_labels (--inputs" in capsys.readouterr().out
    assert main(["inspect", str(ONNX), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["blocks"]["count"] == 8
    assert list(info["roles"]) == list(ROLES)
    assert {k: v for k, v in info["roles"].items() if v} == {"latent": "latent", "timestep": "timestep",
                                                             "class": "class_labels"}
    assert sum(b["macs"] for b in info["blocks"]["blocks"]) < info["macs_per_call"]


def test_sample_optimize_sample_cached_report_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid, plain, report = tmp_path / "g.png", tmp_path / "a.npy", tmp_path / "r.json"
    assert main(["sample", "--steps", "8", "--class", "3", "7", "--out", str(grid), "--out-npy", str(plain),
                 "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["steps"] == 8 and r["samples"] == 2 and len(r["step_seconds"]) == 16  # 2 samples, one per call
    assert r["scheduler"] == "DDIMScheduler" and len(r["scheduler_digest"]) == 16
    assert r["macs"] == r["macs_uncached"] > 0 and r["wall_seconds"] > 0
    assert grid.stat().st_size > 0 and np.load(plain).shape == (2, 1, 16, 16)

    fc = tmp_path / "d.fc.onnx"
    assert main(["optimize", "-o", str(fc), "--calibrate", "2", "--calib-steps", "8"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(fc)]) == 0
    text = capsys.readouterr().out
    assert "cache plan" in text and "calibrated on 2 trajectories x 8 steps of DDIMScheduler, guidance 1.5" in text
    outputs = text.split("outputs:\n")[1].split("MACs")[0].splitlines()
    # The model's own output, then the block values the state takes under their export names, counted
    assert outputs[0].split()[0] == "noise_pred" and "block values the cache state takes" in outputs[1], outputs

    cached, report2 = tmp_path / "b.npy", tmp_path / "r2.json"
    assert main(["sample", str(fc), "--policy", "fora", "--interval", "2", "--steps", "8", "--class", "3", "7",
                 "--out-npy", str(cached), "--report", str(report2), "--baseline", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "two runs of each, ABBA" in out and "PSNR" in out
    r2 = json.loads(report2.read_text())
    assert r["threads"] is None and r2["threads"] == 1  # ONNX Runtime's default, then --threads
    assert r2["macs"] < r2["macs_uncached"] and r2["mac_ideal_speedup"] > 1
    assert any(1 in rec["skip"] for rec in r2["records"])

    png = tmp_path / "decisions.png"
    assert main(["report", str(report2), "-o", str(png)]) == 0 and png.stat().st_size > 0
    assert main(["compare", str(plain), str(cached)]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_arguments_samples_the_bundled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert "10 samples x 50 steps" in capsys.readouterr().out


def test_export_says_what_it_did_and_nothing_else(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The dynamo exporter's own chatter (torchvision's ops unregistered) does not reach the user."""
    from models.digits import WEIGHTS

    out = tmp_path / "digits.onnx"
    assert main(["export", "--arch", "digits", "--weights", str(WEIGHTS), "-o", str(out)]) == 0
    stdout, stderr = capfd.readouterr()
    assert "torchvision" not in stderr, stderr
    assert stdout.splitlines()[-1] == f"wrote {out}"
