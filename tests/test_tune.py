"""`fcpass tune` and `fcpass optimize --target-psnr`: the search on real compiled graphs, the winner in the plan,
and `fcpass sample` running it with no flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpass.cli import main
from fcpass.contract.plan import read_plan
from fcpass.tune import graph_specs, runnable, space_for, spaces_for
from tests.conftest import SCHEDULER_CONFIG

ARGS = ["--scheduler-config", str(SCHEDULER_CONFIG), "--class", "1", "2", "--uncond-class", "10"]
SAMPLE = [*ARGS, "--steps", "6"]
SEARCH = ["--samples", "2", "--budget", "6"]


def test_a_spec_fixes_the_knobs_it_names() -> None:
    space = space_for("fastcache:regions=stack,max_skips=4")
    names = [k.name for k in space.knobs]
    assert "regions" not in names and "max_skips" not in names and "sigma_scale" in names
    assert space.spec(space.start).startswith("fastcache:regions=stack,max_skips=4,approx=taylor1,")


def test_the_search_graph_serves_every_structural_choice() -> None:
    specs = graph_specs(spaces_for(["fastcache", "taylorseer:regions=stack"]))
    assert {s.partition(",approx=")[2].split(",")[0] for s in specs if s.startswith("fastcache")} == {
        "taylor1", "linear", "residual"}
    assert all("regions=stack" in s for s in specs if s.startswith("taylorseer"))


def test_a_graph_narrows_what_the_search_tries(calibrated: tuple[Path, Path]) -> None:
    """The calibrated graph has every region set but no previous outputs: taylor1 is dropped, TaylorSeer is not
    searchable at all, and the reason is the policy's own."""
    plan = read_plan(onnx.load(str(calibrated[1]), load_external_data=False))
    space = runnable(space_for("fastcache"), plan, 6)
    assert not isinstance(space, str)
    assert space.settings(space.start)["approx"] == "linear"  # its own start, taylor1, cannot run here
    taylor = space.start[:1] + (0,) + space.start[2:]
    assert space.settings(taylor)["approx"] == "taylor1" and not space.takes(taylor)
    assert "optimize with --taylor" in runnable(space_for("taylorseer"), plan, 6)


def test_tune_writes_table_plot_json_and_a_graph_that_runs_the_winner(calibrated: tuple[Path, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    plot, js, out = tmp_path / "t.png", tmp_path / "t.json", tmp_path / "tuned.fc.onnx"
    assert main(["tune", str(calibrated[1]), "-o", str(out), "--target-psnr", "20", "--policies", "fora:regions=stack",
                 "fbcache", "--plot", str(plot), "--json", str(js), *SEARCH, *SAMPLE]) == 0
    stdout = capsys.readouterr().out
    assert "| fora:regions=stack |" in stdout and "(chosen)" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert len(data["trials"]) <= 6 and data["winner"]["psnr"] >= 20 and data["winner"]["holds"]
    tuned = read_plan(onnx.load(str(out))).tuned
    assert tuned["policy"] == data["winner"]["spec"] and len(tuned["trials"]) == len(data["trials"])
    # the graph is the input's but for its plan
    before, after = onnx.load(str(calibrated[1])), onnx.load(str(out))
    assert before.graph == after.graph


def test_sample_with_no_flags_runs_the_winner_bit_for_bit(calibrated: tuple[Path, Path], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "tuned.fc.onnx"
    assert main(["tune", str(calibrated[1]), "-o", str(out), "--target-psnr", "20", "--policies", "fora:regions=stack",
                 "--plot", str(tmp_path / "t.png"), *SEARCH, *SAMPLE]) == 0
    winner = read_plan(onnx.load(str(out))).tuned["policy"]
    caplog.set_level("INFO")
    a, b, c = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npy"
    assert main(["sample", str(out), "--out-npy", str(a), *SAMPLE]) == 0
    assert f"sampling with {winner}" in caplog.text and "--policy overrides" in caplog.text
    assert main(["sample", str(out), "--policy", winner, "--out-npy", str(b), *SAMPLE]) == 0
    assert main(["sample", str(out), "--policy", "none", "--out-npy", str(c), *SAMPLE]) == 0
    assert np.array_equal(np.load(a), np.load(b))
    assert not np.array_equal(np.load(a), np.load(c))  # the winner skips: its samples differ from uncached ones


def test_a_flag_overrides_the_tuned_setting(calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "tuned.fc.onnx"
    assert main(["tune", str(calibrated[1]), "-o", str(out), "--target-psnr", "5", "--policies",
                 "fora:regions=stack,warmup=1", "--plot", str(tmp_path / "t.png"), *SEARCH, *SAMPLE]) == 0
    winner = read_plan(onnx.load(str(out))).tuned["policy"]
    report = tmp_path / "r.json"
    assert main(["sample", str(out), "--warmup", "4", "--report", str(report), *SAMPLE]) == 0
    policy = json.loads(report.read_text())["policy"]
    assert policy["name"] == "fora" and policy["warmup"] == 4
    assert f"interval={policy['interval']}" in winner


def test_optimize_to_a_target_compiles_for_the_winner_alone(calibrated: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.fc.onnx"
    assert main(["optimize", str(calibrated[0]), "-o", str(out), "--target-psnr", "1", "--calibrate", "1",
                 "--calib-steps", "6", "--calib-eps", "0.5", "--policies", "fora", *SEARCH, *ARGS]) == 0
    assert f"wrote {out}: " in capsys.readouterr().out
    plan = read_plan(onnx.load(str(out)))
    name, _, options = plan.tuned["policy"].partition(":")
    assert name == "fora" and set(plan.compiled_for) == {"fora"}
    regions = dict(kv.split("=") for kv in options.split(","))["regions"]
    assert {r.region_set for r in plan.regions} == {regions}  # compiled --for the winner: its region set only
    assert plan.tuned["psnr"] >= 1 and plan.tuned["speedup"] > 0
    assert (tmp_path / "m.fc.search.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fc.onnx", "m.fc.search.png"]


def test_a_target_no_setting_holds_names_the_best_and_writes_nothing(calibrated: tuple[Path, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.fc.onnx"
    assert main(["optimize", str(calibrated[0]), "-o", str(out), "--target-psnr", "1000", "--calibrate", "1",
                 "--calib-steps", "6", "--calib-eps", "0.5", "--policies", "fora:regions=stack", *SEARCH, *ARGS]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fcpass:")]  # not the progress
    assert len(err) == 1 and "no setting holds 1000 dB" in err[0] and "the best reached" in err[0]
    assert "(fora:regions=stack," in err[0] and "lower --target-psnr or raise --budget" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--budget", "0"], "--budget 0 must be at least 1 trial"),
    (["--target-psnr", "nan"], "--target-psnr nan must be a finite number of dB"),
    (["--target-psnr", "inf"], "--target-psnr inf must be a finite number of dB"),
    (["--policies", "teacup"], "cannot search policy 'teacup'"),
    (["--policies", "fora", "fora"], "names one policy spec twice"),
    (["--for", "fora"], "drop --for"),
    (["--lowering", "segments"], "lower the result afterwards"),
])
def test_bad_search_flags_are_one_line(calibrated: tuple[Path, Path], tmp_path: Path, flags: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.fc.onnx"
    argv = ["optimize", str(calibrated[0]), "-o", str(out), "--calibrate", "1", "--calib-steps", "6", *ARGS]
    if "--target-psnr" not in flags:
        argv += ["--target-psnr", "30"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_tune_searches_what_the_graph_was_compiled_for(calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    """A graph compiled --for FastCache at stack level with taylor1 has nothing else: the search keeps those
    choices and tries the other knobs."""
    fc, js = tmp_path / "stack.fc.onnx", tmp_path / "t.json"
    assert main(["optimize", str(calibrated[0]), "-o", str(fc), "--for", "fastcache:regions=stack,approx=taylor1",
                 "--calibrate", "1", "--calib-eps", "0.5", "--calib-steps", "6", *ARGS]) == 0
    assert main(["tune", str(fc), "--target-psnr", "1", "--plot", str(tmp_path / "t.png"), "--json", str(js),
                 *SEARCH, *SAMPLE]) == 0
    data = json.loads(js.read_text())
    assert data["skipped"] == {} and {t["space"] for t in data["trials"]} == {"fastcache:regions=stack,approx=taylor1"}
    assert all(t["spec"].startswith("fastcache:regions=stack,approx=taylor1,") for t in data["trials"])


def test_tune_refuses_a_named_policy_the_graph_cannot_run(calibrated: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The calibrated graph keeps no previous outputs: TaylorSeer cannot run on it."""
    out = tmp_path / "t.fc.onnx"
    assert main(["tune", str(calibrated[1]), "-o", str(out), "--policies", "fora", "taylorseer", "--plot",
                 str(tmp_path / "t.png"), *SEARCH, *SAMPLE]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fcpass:")]
    assert len(err) == 1 and "--policies taylorseer:" in err[0] and "optimize with --taylor" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_tune_refuses_plain_graphs(calibrated: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", str(calibrated[0]), "--plot", str(tmp_path / "t.png"), *SEARCH, *SAMPLE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not cache-aware" in err[0]
    assert not (tmp_path / "t.png").exists()
