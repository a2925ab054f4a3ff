"""Writes under faults: a process SIGKILLed mid-write (optimize, calibrate, tune -o, export, the segments
lowering), two writers of one output, a full disk.

Decided: every output is written under a hidden temporary name beside it (`.NAME.fcpass-PID-*.tmp`) and
renamed into place, so a killed run leaves the input intact and either the complete old output or
none; what it leaves beside it is hidden, and the next write of that output removes it (its writer's
process is gone: `fcpass.contract.onnx_io.clean_stale`).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcpass.contract.onnx_io import load_model
from fcpass.contract.plan import has_plan
from models.digits import ONNX, WEIGHTS
from tests.fuzz.harness import TALLY

ROOT = Path(__file__).resolve().parents[2]
KILLS_PER_COMMAND = int(os.environ.get("FCPASS_FUZZ_KILLS", "1"))  # tools/fuzz.py raises it


def fcpass(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fcpass.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def sha(path: Path) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


def complete(out: Path, kind: str) -> bool:
    """Whether `out` is a whole artefact of its kind."""
    if kind == "segments":
        from fcpass.contract.manifest import read_manifest, segment_files

        return all(load_model(out / f) is not None for f in segment_files(read_manifest(out)))
    model = load_model(out)
    if kind == "tuned":
        from fcpass.contract.plan import read_plan

        return read_plan(model, str(out)).tuned is not None
    return kind == "export" or has_plan(model)


COMMANDS = {  # name: (argv with {out} and {fc}, output kind)
    "optimize": (["optimize", "-o", "{out}"], "onnx"),
    "segments": (["optimize", "-o", "{out}", "--lowering", "segments", "--regions", "stack"], "segments"),
    "calibrate": (["calibrate", "{fc}", "-o", "{out}", "--for", "teacache", "--calibrate", "1", "--steps", "4"], "onnx"),
    "export": (["export", "--arch", "digits", "--weights", str(WEIGHTS), "--image-size", "16", "--no-verify",
                "-o", "{out}"], "export"),
    # the plot goes outside the output's folder: only -o is checked here
    "tune": (["tune", "{fc}", "-o", "{out}", "--policies", "fora", "--budget", "2", "--samples", "1", "--steps", "4",
              "--class", "1", "--plot", "{plot}"], "tuned"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_sigkill_leaves_old_or_new_output(name: str, tmp_path: Path, digits_fc: Path, fuzz_root: Path) -> None:
    argv, kind = COMMANDS[name]
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / ("out.seg" if kind == "segments" else "out.onnx")
    fill = [a.format(out=out, fc=digits_fc, plot=tmp_path / "tune.png") for a in argv]
    start = time.perf_counter()
    assert fcpass(fill).wait(timeout=300) == 0  # the old output, complete
    took = time.perf_counter() - start
    old, inputs = sha(out), {p: sha(p) for p in (ONNX, digits_fc)}
    rng = random.Random(f"{name}-{os.environ.get('FCPASS_FUZZ_SEED', '0')}")
    for _ in range(KILLS_PER_COMMAND):
        proc = fcpass(fill)
        try:
            proc.wait(timeout=rng.uniform(0.3, took))
            ended = "finished"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            ended = "killed"
        assert {p: sha(p) for p in inputs} == inputs, "an input changed"
        assert out.exists() and (sha(out) == old or complete(out, kind)), "neither the old output nor a whole new one"
        assert not [p for p in folder.iterdir() if not p.name.startswith(".") and p != out]
        TALLY[f"kill.{name}", "worked" if ended == "finished" else "error"] += 1
    # the next write clears what the killed ones left beside the output
    assert fcpass(fill).wait(timeout=300) == 0
    assert [p.name for p in folder.iterdir()] == [out.name]
    assert complete(out, kind)


def test_two_writers_of_one_output(tmp_path: Path) -> None:
    out = tmp_path / "m.fc.onnx"
    procs = [fcpass(["optimize", "-o", str(out), "--regions", regions]) for regions in ("stack", "blocks")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert complete(out, "onnx") and [p.name for p in tmp_path.iterdir()] == [out.name]
    TALLY["kill.concurrent", "worked"] += 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a full disk needs a tmpfs mounted as root (mount -t tmpfs); not root here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here ({done.stderr.decode().strip()[:80]}); the full-disk case needs it")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk(small_disk: Path) -> None:
    """The bundled graph compiled is 11 MB: on a 4 MB disk, one line, exit 2, and nothing left there."""
    proc = fcpass(["optimize", "-o", str(small_disk / "m.fc.onnx")])
    _, err = proc.communicate(timeout=300)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("fcpass: error: could not write") and "space" in lines[-1]
    assert list(small_disk.iterdir()) == []
    TALLY["kill.full_disk", "error"] += 1
