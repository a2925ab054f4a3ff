"""A short, seeded run of the coverage-guided targets (tests/fuzz/atheris_targets.py): every reader in one process.

`tools/fuzz.py --engine atheris --minutes N` runs each reader's target for longer. Skipped where atheris
is not installed (`pip install atheris`: wheels for CPython on Linux x86-64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import TALLY, examples

ROOT = Path(__file__).resolve().parents[2]
RUNS = examples(2500)  # tools/fuzz.py raises it (FCPASS_FUZZ_SCALE) and draws a fresh seed each round
SEED = int(os.environ.get("FCPASS_FUZZ_SEED", "0")) % (2**31 - 1) + 1


def test_atheris_targets_short_run(tmp_path: Path, tiny_onnx: Path, tiny_fc: Path, digits_segments: Path) -> None:
    pytest.importorskip("atheris")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for made in (tiny_onnx, tiny_fc, digits_segments):  # the seeds the targets would build, made once per session
        (seeds / made.name).symlink_to(made)
    tally = tmp_path / "tally.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz" / "atheris_targets.py"), "all", "--seeds",
                           str(seeds), "--tally", str(tally), f"-runs={RUNS}", f"-seed={SEED}", f"-artifact_prefix={tmp_path}/",
                           "-timeout=60", "-max_total_time=120"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    doc = json.loads(tally.read_text())
    for reader, outcome, n in doc["tally"]:
        TALLY[f"atheris.{reader}", outcome] += n
    assert doc["failures"] == {} and done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*")) and sum(n for _, _, n in doc["tally"]) >= RUNS - 1
