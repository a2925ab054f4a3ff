"""`fcpass tune`: knob sweeps, the early stop, the winner, the table, the plot and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcpass.cli import main
from fcpass.contract.errors import FcpassError
from fcpass.tune import KNOBS, Point, TuneResult, settings
from tests.conftest import SCHEDULER_CONFIG

ARGS = ["--scheduler-config", str(SCHEDULER_CONFIG), "--class", "1", "2", "--uncond-class", "10", "--steps", "6"]


def test_settings_sweep_the_knob_unless_the_spec_fixes_it() -> None:
    knob, values = KNOBS["fbcache"]
    assert settings("fbcache") == [f"fbcache:{knob}={v}" for v in values]
    assert settings("fora:level=stack")[0] == "fora:level=stack,interval=2"
    assert settings("fbcache:threshold=0.1") == ["fbcache:threshold=0.1"]
    with pytest.raises(FcpassError, match="no knob for policy 'none'"):
        settings("none")


def test_best_is_the_fastest_setting_that_holds() -> None:
    r = TuneResult("m", 30.0, 1.0, None)
    for value, speed, psnr in ((1, 1.5, 35.0), (2, 2.5, 31.0), (3, 3.5, 29.0)):
        r.points.append(Point(f"x:k={value}", "x", "k", value, 1 / speed, speed, speed, psnr, 0.9, None, psnr >= 30))
    r.points.append(Point("y:k=1", "y", "k", 1, 1.0, 1.0, 1.0, 20.0, 0.5, None, False))
    best = r.best()
    assert best["x"] is not None and best["x"].value == 2 and best["y"] is None


def test_the_table_has_a_digit_accuracy_column_only_where_a_classifier_scored() -> None:
    from fcpass.tune import table

    for accuracy in (None, 0.9):
        r = TuneResult("m.fc.onnx", 30.0, 1.0, accuracy)
        r.points.append(Point("x:k=1", "x", "k", 1, 0.5, 2.0, 2.2, 31.0, 0.9, accuracy, True))
        r.points.append(Point("y:k=1", "y", "k", 1, 1.0, 1.0, 1.0, 20.0, 0.5, accuracy, False))
        lines = table(r).splitlines()
        rows = [line for line in lines if line.startswith("|")]
        assert ("digit acc" in rows[0]) == (accuracy is not None)
        assert len({line.count("|") for line in rows}) == 1, rows  # every row has every column


def test_the_table_says_when_the_best_setting_is_the_sweep_s_last() -> None:
    from fcpass.tune import table

    knob, grid = KNOBS["fbcache"]
    for last, told in ((grid[-1], True), (grid[-2], False)):
        r = TuneResult("m.fc.onnx", 30.0, 1.0, None)
        for i, value in enumerate(grid[:-2] + [last]):  # each faster than the one before
            r.points.append(Point(f"fbcache:{knob}={value}", "fbcache", knob, value, 1 / (1 + i), 1 + i, 1 + i, 31.0, 0.9,
                                  None, True))
        assert ("sweep's most aggressive (threshold=" in table(r)) == told
    fixed = TuneResult("m.fc.onnx", 30.0, 1.0, None)  # a spec that fixes the knob sweeps nothing
    fixed.points.append(Point(f"fbcache:{knob}={grid[-1]}", f"fbcache:{knob}={grid[-1]}", knob, grid[-1], 0.5, 2.0, 2.2,
                              31.0, 0.9, None, True))
    assert "most aggressive" not in table(fixed)


def test_tune_cli_writes_table_plot_and_json(calibrated: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    plot, js = tmp_path / "t.png", tmp_path / "t.json"
    code = main(["tune", str(calibrated[1]), "--target-psnr", "20", "--policies", "fora:level=stack", "fbcache",
                 "--plot", str(plot), "--json", str(js), *ARGS])
    assert code == 0
    out = capsys.readouterr().out
    assert "| fora:level=stack |" in out and "| fbcache |" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    for name, best in data["best"].items():
        pts = [p for p in data["points"] if p["name"] == name]
        holding = [p for p in pts if p["psnr"] >= 20]
        assert (best is None) == (not holding)
        if best:
            assert best["speedup"] == max(p["speedup"] for p in holding)


def test_tune_stops_a_sweep_after_two_misses(calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    js = tmp_path / "t.json"
    assert main(["tune", str(calibrated[1]), "--target-psnr", "1000", "--policies", "fbcache", "--plot",
                 str(tmp_path / "t.png"), "--json", str(js), *ARGS]) == 0
    data = json.loads(js.read_text())
    assert len(data["points"]) == 2 and data["best"] == {"fbcache": None}


def test_tune_refuses_unknown_policies_and_plain_graphs(calibrated: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", str(calibrated[1]), "--policies", "teacup", "--plot", str(tmp_path / "t.png"), *ARGS]) == 2
    assert main(["tune", str(calibrated[0]), "--plot", str(tmp_path / "t.png"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "teacup" in err[0] and "not cache-aware" in err[1]
    assert not (tmp_path / "t.png").exists()


def test_tune_sweeps_what_the_graph_was_compiled_for_with_its_options(calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    """A graph compiled --for fastcache at stack level holds no block regions: fastcache's own default levels
    (blocks) cannot run there, the compiled options can."""
    fc, js = tmp_path / "stack.fc.onnx", tmp_path / "t.json"
    assert main(["optimize", str(calibrated[0]), "-o", str(fc), "--for", "fastcache:levels=stack,approx=taylor1",
                 "--calibrate", "1", "--calib-eps", "0.5", *ARGS]) == 0
    assert main(["tune", str(fc), "--target-psnr", "1000", "--plot", str(tmp_path / "t.png"), "--json", str(js), *ARGS]) == 0
    data = json.loads(js.read_text())
    assert data["skipped"] == {} and {p["name"] for p in data["points"]} == {"fastcache"}
    assert data["points"][0]["policy"] == "fastcache:sigma_scale=0.125"
