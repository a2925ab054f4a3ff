"""tools/bench_overhead.py's graph variants compute what the compiled graph computes, on the path they time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fcpass.contract.onnx_io import subgraphs
from fcpass.contract.plan import CTL_INPUT, MIX_INPUT, MIX_WIDTH, THR_INPUT, read_plan
from fcpass.optimize import OptimizeOptions, optimize
from tests.conftest import tiny_feeds
from tools import bench_overhead
from tools.bench_overhead import _forced_inlined, _skip_feeds, _with_pass_ifs, _without_option


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _ifs(graph: onnx.GraphProto) -> int:
    return sum(n.op_type == "If" for n in graph.node) + sum(_ifs(sub) for n in graph.node for sub in subgraphs(n))


@pytest.fixture(scope="module")
def compiled(tiny_dit: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict[str, np.ndarray]]:
    fc = tmp_path_factory.mktemp("overhead") / "m.fc.onnx"
    optimize(tiny_dit, fc, OptimizeOptions(), None)
    plan = read_plan(onnx.load(str(fc), load_external_data=False))
    r = len(plan.regions)
    rng = np.random.default_rng(1)
    feeds = {**tiny_feeds(0), CTL_INPUT: np.zeros(r, np.int64), THR_INPUT: np.zeros(r, np.float32),
             MIX_INPUT: np.zeros((r, MIX_WIDTH), np.float32)}
    feeds.update({s.name: rng.standard_normal([2 if isinstance(d, str) else int(d) for d in s.shape]).astype(s.dtype)
                  for s in plan.states})
    return fc, plan, feeds


def test_pass_ifs_add_ifs_to_the_skipped_stack_and_change_no_output(compiled, tmp_path: Path) -> None:
    fc, plan, feeds = compiled
    out = _with_pass_ifs(fc, plan, tmp_path / "pass.onnx", 5)
    assert _ifs(onnx.load(str(out)).graph) == _ifs(onnx.load(str(fc)).graph) + 5
    skips = _skip_feeds(plan, feeds)
    assert skips
    for f in [feeds, *skips.values()]:  # forced, and the stack skipped under each approximation
        for got, want in zip(_run(out, f), _run(fc, f)):
            np.testing.assert_array_equal(got, want)


def test_inlined_sets_compute_the_forced_path(compiled, tmp_path: Path) -> None:
    fc, plan, feeds = compiled
    for sets in (["stack", "tail"], None):
        out = _forced_inlined(fc, plan, tmp_path / "inlined.onnx", ifs=True, sets=sets)
        names = {n.name for n in onnx.load(str(out)).graph.node}
        assert "fc/stack/If" not in names and "fc/tail/If" not in names
        assert ("fc/block1/If" in names) == (sets is not None)  # a block's If left at the top level
        for got, want in zip(_run(out, feeds), _run(fc, feeds)):
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_against_alternates_the_two_commands_and_pairs_them(monkeypatch, capsys) -> None:
    seen: list[list[str]] = []

    def fake(runs, desc, keys):
        seen.extend(runs)
        return [{"r": [1.03, 1.02, 1.01]}, {"r": [1.02, 1.03, 1.00]}]
    monkeypatch.setattr(bench_overhead, "_run_processes", fake)
    bench_overhead.compare_processes(["--x"], ["--x", "--inline", "stack"], 3)
    assert seen == [["--x"], ["--x", "--inline", "stack"], ["--x", "--inline", "stack"], ["--x"],
                    ["--x"], ["--x", "--inline", "stack"]]
    out = capsys.readouterr().out
    assert "B: with --inline stack" in out and "A higher in 2 of 3" in out
    assert _without_option(["--a", "1", "--against", "--b c", "--d", "--against=--e"], "--against") == ["--a", "1", "--d"]
