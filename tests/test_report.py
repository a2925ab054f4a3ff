"""Tests for fcpass.report: the decisions plot of a sampling report, its input checks and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap, to_rgb
from matplotlib.figure import Figure

from fcpass.cli import main
from fcpass.contract.errors import FcpassError
from fcpass.report import DPI, MOTION_COLOR, STATE_COLORS, TOKEN_COLORS, build_figure, plot_report

COMPUTED, SKIPPED, NOT_REACHED = STATE_COLORS[0], STATE_COLORS[1], STATE_COLORS[-1]


def _report(blocks: int = 4, steps: int = 12, chunks: int = 1, null_at: int | None = 5,
            skip_stack_at: int | None = 3, skip_tail_at: int | None = 4, **extra: Any) -> dict[str, Any]:
    """A report shaped like `fcpass sample --report` writes, with regions in plan order (ranges first)."""
    regions = ["stack", "block0", "tail", *[f"block{i}" for i in range(1, blocks)]]
    idx = {name: i for i, name in enumerate(regions)}
    records = []
    for chunk in range(chunks):
        for step in range(steps):
            ctl = [0] * len(regions)
            thr = [0.0] * len(regions)
            skip = [0.0] * len(regions)
            stat: list[float | None] = [None if step == 0 else 0.01 * (1 + step % 4)] * len(regions)
            if 2 <= step < steps - 1:
                for b in range(blocks):
                    k = idx[f"block{b}"]
                    ctl[k], thr[k] = 2, 0.025
                    skip[k] = 1.0 if (step + b + chunk) % 3 else 0.0
            if step == null_at:
                stat[idx["block0"]] = None  # the graph saw NaN/Inf and computed (fail-closed)
                skip[idx["block0"]] = 0.0
            if step == skip_tail_at:  # a forced skip of blocks 1..L-1: they are not reached
                ctl[idx["tail"]], skip[idx["tail"]] = 1, 1.0
                for b in range(1, blocks):
                    skip[idx[f"block{b}"]] = -1.0
            if step == skip_stack_at:  # everything inside the stack is not reached
                ctl[idx["stack"]], skip[idx["stack"]] = 1, 1.0
                for name in regions[1:]:
                    skip[idx[name]] = -1.0
            records.append({"step": step, "chunk": chunk, "macs": 1000, "ctl": ctl, "thr": thr, "skip": skip,
                            "stat": stat})
    return {
        "model": "m.fc.onnx",
        "policy": {"name": "fastcache", "alpha": 0.05, "warmup": 2, "max_skips": 3},
        "provider": "CPUExecutionProvider",
        "steps": steps,
        "samples": chunks,
        "wall_seconds": 1.0,
        "step_seconds": [0.01] * steps * chunks,
        "macs": 600,
        "macs_uncached": 1000,
        "macs_fraction": 0.6,
        "regions": regions,
        "records": records,
        "accuracy": None,
        **extra,
    }


def _has_color(img: np.ndarray, color: str | tuple[float, float, float], tol: float = 0.02) -> bool:
    rgb = np.asarray(to_rgb(color) if isinstance(color, str) else color)
    return bool((np.abs(img[..., :3] - rgb).max(axis=-1) < tol).any())


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --- the figure ---------------------------------------------------------------------------------

def test_single_chunk_writes_a_png_with_the_three_states(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "decisions.png"
    assert plot_report(_report(), out) == out
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] > 300 and img.shape[1] > 600
    width, height = build_figure(_report()).get_size_inches()
    assert img.shape[:2] == pytest.approx((height * DPI, width * DPI), abs=2)
    for color in (COMPUTED, SKIPPED, NOT_REACHED):
        assert _has_color(img, color), color
    assert _leftovers(out.parent, {"decisions.png"}) == []


def _axes(fig: Figure, label: str) -> Axes:
    return next(ax for ax in fig.axes if ax.get_label() == label)


def _cell_colors(report: dict[str, Any] | Figure) -> np.ndarray:
    """The heatmap's RGB cells, (rows, steps, 3), as drawn."""
    fig = report if isinstance(report, Figure) else build_figure(report)
    return np.asarray(_axes(fig, "decisions").get_images()[0].get_array())[..., :3]


def _cells_of(cells: np.ndarray, color: str | tuple[float, ...]) -> np.ndarray:
    return np.abs(cells - np.asarray(to_rgb(color))).max(axis=-1) < 1e-6


def test_single_chunk_cells_follow_the_skip_values() -> None:
    cells = _cell_colors(_report(blocks=4, steps=12))
    rows = ["block0", "block1", "block2", "block3", "tail", "stack"]
    col = {name: i for i, name in enumerate(rows)}
    assert _cells_of(cells[:, 0], COMPUTED).all()  # step 0 computes everything
    assert _cells_of(cells[col["stack"], 3], SKIPPED) and _cells_of(cells[:col["stack"], 3], NOT_REACHED).all()
    assert _cells_of(cells[col["tail"], 4], SKIPPED) and _cells_of(cells[col["block1"]:col["tail"], 4], NOT_REACHED).all()
    assert _cells_of(cells[col["block1"], 2], COMPUTED) and _cells_of(cells[col["block2"], 2], SKIPPED)
    plain = _cell_colors(_report(skip_stack_at=None, skip_tail_at=None))
    assert not _cells_of(plain, NOT_REACHED).any() and _cells_of(plain, SKIPPED).any()


def test_multi_chunk_shows_the_fraction_of_chunks_skipped(tmp_path: Path) -> None:
    report = _report(chunks=3, skip_stack_at=None)
    # Chunk 1 computes the tail at step 4 and skips blocks 1..3 on their own; chunks 0 and 2 skip the tail.
    rec = next(r for r in report["records"] if r["chunk"] == 1 and r["step"] == 4)
    rec["ctl"][2], rec["skip"][2] = 0, 0.0
    rec["skip"][3:] = [1.0, 1.0, 1.0]
    fig = build_figure(report)
    heat = _axes(fig, "decisions")
    assert "fraction of the 3 chunks" in heat.get_title(loc="left")
    cells = _cell_colors(fig)
    fraction = LinearSegmentedColormap.from_list("f", [COMPUTED, SKIPPED])
    # block1 at step 2: (2 + 1 + chunk) % 3 is 0, 1, 2, so it was skipped in two chunks of three.
    assert _cells_of(cells[1, 2], fraction(2 / 3)[:3])
    assert _cells_of(cells[:, 0], COMPUTED).all()  # fraction 0
    # Step 4: the tail was skipped in two chunks of three; blocks 1..3 were skipped in the third and not
    # reached in the other two, which count as not skipped.
    assert _cells_of(cells[4, 4], fraction(2 / 3)[:3])
    assert all(_cells_of(cells[row, 4], fraction(1 / 3)[:3]) for row in (1, 2, 3))
    # Step 3 with the stack skipped in every chunk: everything inside it was never reached.
    stacked = _cell_colors(_report(chunks=2, skip_stack_at=3))
    assert _cells_of(stacked[:5, 3], NOT_REACHED).all() and _cells_of(stacked[5, 3], SKIPPED)
    out = tmp_path / "multi.png"
    plot_report(report, out)
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and _has_color(img, fraction(2 / 3)[:3], tol=0.03)


def test_rows_put_blocks_in_order_then_tail_and_stack() -> None:
    heat = _axes(build_figure(_report(blocks=12)), "decisions")
    labels = [t.get_text() for t in heat.get_yticklabels()]
    assert labels == [f"block{i}" for i in range(12)] + ["tail", "stack"]


def test_ratio_lines_and_fail_closed_marks() -> None:
    report = _report(blocks=3, steps=10, null_at=5, skip_stack_at=None, skip_tail_at=None)
    lines_ax = _axes(build_figure(report), "ratios")
    assert lines_ax.get_yscale() == "log"
    traces = [ln for ln in lines_ax.get_lines() if ln.get_marker() == "o"]
    assert len(traces) == 3  # one per decided block, none for the never-decided tail and stack
    y = np.asarray(traces[0].get_ydata(), dtype=float)
    expected = np.full(10, np.nan)
    for step in range(2, 9):
        expected[step] = 0.01 * (1 + step % 4) / 0.025
    expected[5] = np.nan  # null statistic: no ratio, an x instead
    np.testing.assert_allclose(y, expected, rtol=1e-9)
    marks = [ln for ln in lines_ax.get_lines() if ln.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [5]
    assert any(np.allclose(ln.get_ydata(), 1.0) for ln in lines_ax.get_lines() if ln.get_linestyle() == "--")


def test_no_graph_decisions_says_so() -> None:
    report = _report(null_at=None)
    for rec in report["records"]:
        rec["ctl"] = [1 if s == 1 else 0 for s in rec["skip"]]  # a fixed schedule (FORA-like)
    lines_ax = _axes(build_figure(report), "ratios")
    assert not [ln for ln in lines_ax.get_lines() if ln.get_marker() == "o"]
    assert any("no region was decided" in t.get_text() for t in lines_ax.texts)


def test_title_names_policy_settings_and_results() -> None:
    report = _report(speedup=2.0, mac_ideal_speedup=2.5, baseline={"psnr_mean": 31.2, "ssim_mean": 0.9})
    title = build_figure(report)._suptitle.get_text()
    for part in ("fastcache", "alpha=0.05", "max_skips=3", "12 steps", "1 sample ", "60.0% of MACs",
                 "speedup 2.00x", "MAC-ideal 2.50x", "PSNR 31.20 dB"):
        assert part in title, (part, title)
    plain = build_figure(_report())._suptitle.get_text()
    assert "speedup" not in plain and "PSNR" not in plain


def test_many_blocks_grow_the_figure() -> None:
    small = build_figure(_report(blocks=8)).get_size_inches()
    large = build_figure(_report(blocks=28, steps=50)).get_size_inches()
    assert large[1] > small[1] + 3 and large[0] > small[0]


def test_reads_a_report_file(tmp_path: Path) -> None:
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_report()))
    out = plot_report(src, tmp_path / "d.png")
    assert out.stat().st_size > 0
    assert _leftovers(tmp_path, {"r.json", "d.png"}) == []


# --- bad input ----------------------------------------------------------------------------------

def _bad(tmp_path: Path, kind: str) -> Path | dict[str, Any]:
    path = tmp_path / "r.json"
    if kind == "missing":
        return path
    if kind == "not json":
        path.write_text("{not json")
    elif kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif kind == "list":
        path.write_text("[1, 2]")
    elif kind == "no records":
        report = _report()
        del report["records"]
        path.write_text(json.dumps(report))
    elif kind == "uncached":
        path.write_text(json.dumps({**_report(), "regions": [], "records": [{"step": 0, "chunk": 0, "macs": 1}]}))
    elif kind == "no steps":
        return {**_report(), "records": []}
    elif kind == "short record":
        report = _report()
        report["records"][3]["skip"] = [0.0]
        return report
    elif kind == "bad step":
        report = _report()
        report["records"][0]["step"] = "zero"
        return report
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", r"report .*r\.json not found: no such file; write one with: fcpass sample"),
    ("not json", r"report .*r\.json is not JSON: .*; pass the file that fcpass sample --report wrote"),
    ("binary", r"is not JSON"),
    ("list", r"is not a sampling report: its JSON is a list"),
    ("no records", r"is not a sampling report: it has no 'records'"),
    ("uncached", r"has no cache decisions \(it comes from an uncached run\); sample a cache-aware graph .*--policy"),
    ("no steps", r"the report has no step records"),
    ("short record", r"record 3 \(step 3\) has 1 values for 'skip' where 6 regions need one each"),
    ("bad step", r"record 0 has step 'zero'"),
])
def test_bad_input_raises_and_writes_nothing(tmp_path: Path, kind: str, message: str) -> None:
    source = _bad(tmp_path, kind)
    out = tmp_path / "out" / "d.png"
    with pytest.raises(FcpassError, match=message) as info:
        plot_report(source, out)
    assert "\n" not in str(info.value)
    assert not out.parent.exists() or _leftovers(out.parent, set()) == []


def test_failed_save_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_savefig(self: Figure, fname: Any, **kwargs: Any) -> None:
        Path(fname).write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError, match="disk on fire"):
        plot_report(_report(), tmp_path / "d.png")
    assert _leftovers(tmp_path, {"keep.txt"}) == []


@pytest.mark.parametrize(("where", "message"), [
    ("file/d.png", r"cannot write .*file/d\.png: "),  # the parent is a file
    ("folder", r"output .*folder is a directory"),
])
def test_unwritable_output_is_an_fcpass_error(tmp_path: Path, where: str, message: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FcpassError, match=message):
        plot_report(_report(), tmp_path / where)
    assert _leftovers(tmp_path, {"file", "folder"}) == [] and not any((tmp_path / "folder").iterdir())


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_missing_report_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.png"
    assert main(["report", str(tmp_path / "nope.json"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fcpass: error: report ") and "not found" in err
    assert not out.exists()


def test_cli_writes_the_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "r.json", tmp_path / "d.png"
    src.write_text(json.dumps(_report(chunks=2)))
    assert main(["report", str(src), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert matplotlib.image.imread(out).shape[0] > 0


def test_motion_steps_are_marked_on_their_region() -> None:
    data = _report(blocks=4, steps=12)
    for rec in data["records"]:
        rec["motion"] = rec["step"] in (2, 3, 6)  # step 3 skips the stack: not a motion computation
    cells = _cell_colors({**data, "motion_region": "stack"})
    stack = 5  # rows: block0..3, tail, stack
    assert [bool(x) for x in _cells_of(cells[stack], MOTION_COLOR)] == [s in (2, 6) for s in range(12)]
    assert not _cells_of(cells[:stack], MOTION_COLOR).any()
    assert not _cells_of(_cell_colors(data), MOTION_COLOR).any()  # no motion region named: nothing marked


def test_token_modes_are_marked_on_the_regions_that_computed() -> None:
    """DuCa's F / C / A at a glance: computed, computed on top-k tokens, approximated."""
    data = _report(blocks=4, steps=12)
    data["token_regions"] = ["block0", "block1", "block2", "block3"]  # the records' `tok` order
    conservative, recomputed = {2, 3, 6, 7, 8}, {9}
    for rec in data["records"]:
        step = rec["step"]
        rec["tok"] = [1 if step in conservative else 2 if step in recomputed and b == 0 else 0 for b in range(4)]
    cells = _cell_colors(data)
    skip = {name: np.array([r["skip"][data["regions"].index(name)] for r in data["records"]])
            for name in data["token_regions"]}
    for row, name in enumerate(data["token_regions"]):  # heatmap rows: block0..3 first
        want = [s in conservative and skip[name][s] == 0 for s in range(12)]
        assert [bool(x) for x in _cells_of(cells[row], TOKEN_COLORS[1])] == want
        assert any(want) and not all(skip[name][s] == 0 for s in conservative)  # both cases occur
    assert [bool(x) for x in _cells_of(cells[0], TOKEN_COLORS[2])] == [s in recomputed and skip["block0"][s] == 0
                                                                        for s in range(12)]
    assert not _cells_of(cells[4:], TOKEN_COLORS[1]).any()  # tail and stack hold no token-cache block
    assert not _cells_of(_cell_colors(_report()), TOKEN_COLORS[1]).any()
    data["records"][3]["tok"] = [1, 1]
    with pytest.raises(FcpassError, match="record 3 has 2 token modes for 4 token-cache blocks"):
        build_figure(data)


def test_a_long_policy_title_wraps_inside_the_figure() -> None:
    data = _report()
    data["policy"] = {"name": "fastcache", **{f"option{i}": i for i in range(30)}}
    fig = build_figure(data)
    title = fig._suptitle.get_text()
    assert "option29=29" in title and len(title.splitlines()) > 2
    assert max(len(line) for line in title.splitlines()) <= int(fig.get_size_inches()[0] * 11)
