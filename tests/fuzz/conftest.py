"""Fixtures of the fuzz cases (real graphs, made once per session) and the per-reader tally."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.conftest import export_tiny_dit
from tests.fuzz.harness import FAILURES, TALLY, table

# Seeded and bounded: the same cases at every CI run; tools/fuzz.py draws fresh ones (FCPASS_FUZZ_SEED).
settings.register_profile(
    "fuzz", derandomize=os.environ.get("FCPASS_FUZZ_SEED") is None, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
settings.load_profile("fuzz")


def write_tally() -> None:
    if out := os.environ.get("FCPASS_FUZZ_TALLY"):  # tools/fuzz.py sums its rounds from these
        doc = {"tally": [[r, o, n] for (r, o), n in TALLY.items()], "failures": FAILURES}
        Path(out).write_text(json.dumps(doc))


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    write_tally()  # after every test: a round stopped at tools/fuzz.py's deadline still counts what it ran


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY:
        terminalreporter.write_sep("-", "fuzz cases per reader")
        terminalreporter.write_line(table())
    write_tally()


@pytest.fixture(scope="session")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="session")
def tiny_onnx(fuzz_root: Path) -> Path:
    """The tiny DiT's legacy export (a few hundred KB): the protobuf the byte-level cases mutate."""
    return export_tiny_dit(fuzz_root / "tiny.onnx", "legacy")


@pytest.fixture(scope="session")
def tiny_fc(fuzz_root: Path, tiny_onnx: Path) -> Path:
    """The tiny DiT compiled (no calibration): the plan the plan cases mutate."""
    from fcpass.cli import main

    out = fuzz_root / "tiny.fc.onnx"
    assert main(["optimize", str(tiny_onnx), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def digits_fc(fuzz_root: Path) -> Path:
    """The bundled digits model compiled and calibrated on two short trajectories."""
    from fcpass.cli import main

    out = fuzz_root / "digits.fc.onnx"
    assert main(["optimize", "-o", str(out), "--calibrate", "2", "--calib-steps", "4"]) == 0
    return out


@pytest.fixture(scope="session")
def digits_segments(fuzz_root: Path) -> Path:
    """The bundled digits model lowered to a segments folder: two regions (stack, tail), calibrated on one short
    trajectory, so that FORA, FBCache, TeaCache and MagCache sample it and the graph decides its branches."""
    from fcpass.cli import main

    out = fuzz_root / "digits.seg"
    assert main(["optimize", "-o", str(out), "--lowering", "segments", "--regions", "stack,tail", "--calibrate", "1",
                 "--calib-steps", "4"]) == 0
    return out


def copy_to(src: Path, folder: Path) -> Path:
    dst = folder / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst
