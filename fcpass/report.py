"""Plot a sampling report's cache decisions: `fcpass report r.json -o decisions.png`.

The report is the JSON that `fcpass sample model.fc.onnx --policy ... --report r.json` writes. Its
`records` hold one entry per model call (step, chunk) with, per region of `regions`, the control the
policy sent (`ctl`: 0 compute, 1 forced skip, 2 decided in the graph), the threshold (`thr`), the
graph's decision (`skip`: 1 skipped, 0 computed, -1 not reached) and the statistic (`stat`: the
largest relative input change over the batch, null when NaN/Inf).

The figure has two panels sharing the step axis:

* a step x region heatmap of the decisions: blocks in order, then the block ranges (`tail`,
  `stack`); with one chunk each cell shows computed / approximated / not reached (and, for a graph
  with motion tokens, the steps its region computed on them alone; for a graph with token caches,
  the steps a region computed with its blocks in a token mode: DuCa's conservative steps, where the
  blocks reused attention and recomputed the top-k tokens), with several it shows the fraction of
  chunks in which the region was skipped;
* for every region the graph decided on, the statistic divided by its threshold (chunk 0, log
  scale): the graph skips where the ratio is at or below 1, and an x marks a decision whose
  statistic was NaN/Inf (the graph then computes: fail-closed).
"""

from __future__ import annotations

import json
import logging
import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

COMPUTED, SKIPPED, NOT_REACHED = 0, 1, -1
CTL_DECIDE = 2
STATE_COLORS = {COMPUTED: "#253b52", SKIPPED: "#f28e2b", NOT_REACHED: "#c7c7c7"}
STATE_LABELS = {
    COMPUTED: "computed",
    SKIPPED: "approximated (skipped)",
    NOT_REACHED: "not reached (an enclosing region was skipped)",
}
MOTION_COLOR = "#59a14f"  # computed on its motion tokens only (fastcache motion=1)
# A computing region whose blocks ran in a token mode (the record's `tok`, per token-cache block):
# 1 reused self-attention and recomputed the top-k tokens (DuCa's C steps, ToCa), 2 recomputed
# attention in full and the token-local branches on the top-k tokens.
TOKEN_COLORS = {1: "#76b7b2", 2: "#b07aa1"}
TOKEN_LABELS = {1: "computed on top-k tokens, attention reused", 2: "computed on top-k tokens, attention recomputed"}
MISSING_COLOR = "#ffffff"
BLOCK_CMAP = "plasma"
BLOCK_CMAP_RANGE = (0.0, 0.85)  # plasma's last stretch is too pale to read as a line on white
DPI = 120
_BLOCK = re.compile(r"block(\d+)$")
_RANGE_ORDER = {"tail": 0, "stack": 1}


def plot_report(report: str | Path | dict[str, Any], output: str | Path) -> Path:
    """Draw the decisions of `report` (a path to a sampling report, or its parsed dict) into the PNG `output`.

    Raises FcpassError, naming the problem and the fix, when the report cannot be read or holds no
    cache decisions (a report of an uncached run); `atomic_path` raises it when the PNG cannot be written.
    """
    fig = build_figure(report)
    out = Path(output)
    with atomic_path(out, suffix=".png") as tmp:  # turns OSErrors into FcpassError, removes the temp file
        fig.savefig(tmp, format="png", dpi=DPI)
    log.debug("wrote the decisions plot %s", out)
    return out


def build_figure(report: str | Path | dict[str, Any]) -> Figure:
    """The decisions figure of `report` (a path or the parsed dict), on an Agg canvas, not yet saved."""
    data, name = _load(report)
    decisions = _Decisions.from_report(data, name)
    log.debug("plotting %d steps x %d regions in %d chunk(s)", decisions.steps, len(decisions.regions),
              decisions.chunks)
    return _figure(data, decisions)


# --- reading ------------------------------------------------------------------------------------

def _load(report: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(report, dict):
        return report, "the report"
    path = Path(report)
    fix = f"write one with: fcpass sample model.fc.onnx --policy fastcache --report {path}"
    if not path.is_file():
        raise FcpassError(f"report {path} not found: no such file; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FcpassError(f"report {path} cannot be read: {exc.strerror or exc}; check its permissions") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FcpassError(f"report {path} is not JSON: {exc}; pass the file that fcpass sample --report wrote") from exc
    if not isinstance(data, dict):
        raise FcpassError(f"report {path} is not a sampling report: its JSON is a {type(data).__name__}, not an "
                          "object; pass the file that fcpass sample --report wrote")
    return data, f"report {path}"


class _Decisions:
    """The records as arrays: `skip[c, s, r]`, `ctl`, `thr`, `stat` (NaN where absent or null)."""

    def __init__(self, regions: list[str], skip: np.ndarray, ctl: np.ndarray, thr: np.ndarray,
                 stat: np.ndarray, motion: np.ndarray, motion_region: str | None = None,
                 tok: np.ndarray | None = None) -> None:
        self.regions = regions
        self.skip, self.ctl, self.thr, self.stat = skip, ctl, thr, stat
        self.motion, self.motion_region = motion, motion_region  # motion[c, s]: a motion step
        # tok[c, s, r]: the highest token mode of region r's blocks (0: every block in full)
        self.tok = tok if tok is not None else np.zeros(skip.shape, np.int64)
        self.chunks, self.steps = skip.shape[0], skip.shape[1]

    @classmethod
    def from_report(cls, data: dict[str, Any], name: str) -> _Decisions:
        resample = "sample a cache-aware graph with: fcpass sample model.fc.onnx --policy fastcache --report r.json"
        missing = [k for k in ("regions", "records") if k not in data]
        if missing:
            raise FcpassError(f"{name} is not a sampling report: it has no {' or '.join(map(repr, missing))}; "
                              "pass the file that fcpass sample --report wrote")
        regions, records = data["regions"], data["records"]
        if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
            raise FcpassError(f"{name} has malformed 'regions' (expected a list of names); {resample}")
        if not regions:
            raise FcpassError(f"{name} has no cache decisions (it comes from an uncached run); {resample}")
        if not isinstance(records, list) or not records:
            raise FcpassError(f"{name} has no step records; {resample}")
        parsed = [_parse_record(rec, i, len(regions), name) for i, rec in enumerate(records)]
        chunk_ids = sorted({c for c, _, _ in parsed})
        chunk_pos = {c: k for k, c in enumerate(chunk_ids)}
        steps = max(max(s for _, s, _ in parsed) + 1, _int_or(data.get("steps"), 0))
        shape = (len(chunk_ids), steps, len(regions))
        arrays = {key: np.full(shape, np.nan) for key in ("skip", "ctl", "thr", "stat")}
        motion = np.zeros(shape[:2], bool)
        tok = np.zeros(shape, np.int64)
        owner = [regions.index(r) if r in regions else -1 for r in data.get("token_regions") or []]
        for i, ((chunk, step, values), rec) in enumerate(zip(parsed, records)):
            for key, row in values.items():
                arrays[key][chunk_pos[chunk], step] = row
            motion[chunk_pos[chunk], step] = rec.get("motion") is True
            modes = rec.get("tok")
            if owner and isinstance(modes, list):
                if len(modes) != len(owner):
                    raise FcpassError(f"{name} record {i} has {len(modes)} token modes for {len(owner)} token-cache "
                                      "blocks; the report is damaged or hand-edited; write it again with fcpass sample --report")
                for r, mode in zip(owner, modes):
                    if r >= 0 and isinstance(mode, int):
                        tok[chunk_pos[chunk], step, r] = max(tok[chunk_pos[chunk], step, r], mode)
        region = data.get("motion_region")
        return cls(list(regions), **arrays, motion=motion, motion_region=region if region in regions else None, tok=tok)

    def row_order(self) -> list[int]:
        """Indices of `regions` for the heatmap rows: blocks by number, then tail, stack, anything else."""
        def key(i: int) -> tuple[int, int, int]:
            name = self.regions[i]
            block = _BLOCK.match(name)
            if block:
                return (0, int(block.group(1)), i)
            return (1, _RANGE_ORDER.get(name, len(_RANGE_ORDER)), i)

        return sorted(range(len(self.regions)), key=key)

    def decided(self) -> list[int]:
        """Regions the graph decided on (ctl == 2) at some step of some chunk, in row order."""
        return [i for i in self.row_order() if np.any(self.ctl[:, :, i] == CTL_DECIDE)]


def _parse_record(rec: Any, i: int, n_regions: int, name: str) -> tuple[int, int, dict[str, np.ndarray]]:
    damaged = "the report is damaged or hand-edited; write it again with fcpass sample --report"
    if not isinstance(rec, dict):
        raise FcpassError(f"{name} record {i} is a {type(rec).__name__}, not an object; {damaged}")
    step, chunk = rec.get("step"), rec.get("chunk", 0)
    if not isinstance(step, int) or not isinstance(chunk, int) or step < 0 or chunk < 0:
        raise FcpassError(f"{name} record {i} has step {step!r} and chunk {chunk!r}, not counts; {damaged}")
    values: dict[str, np.ndarray] = {}
    for key in ("skip", "ctl", "thr", "stat"):
        row = rec.get(key)
        if not isinstance(row, list) or len(row) != n_regions:
            found = f"{len(row)} values" if isinstance(row, list) else repr(row)
            raise FcpassError(f"{name} record {i} (step {step}) has {found} for {key!r} where {n_regions} regions "
                              f"need one each; {damaged}")
        try:
            values[key] = np.array([np.nan if v is None else float(v) for v in row], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise FcpassError(f"{name} record {i} (step {step}) has a non-number in {key!r}: {exc}; {damaged}") from exc
    return chunk, step, values


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# --- drawing ------------------------------------------------------------------------------------

def _figure(data: dict[str, Any], d: _Decisions) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = d.row_order()
    decided = d.decided()
    width = float(np.clip(4.0 + 0.11 * d.steps, 9.0, 18.0))
    heat_h = 0.6 + 0.24 * len(rows)
    line_h = 3.2
    fig = Figure(figsize=(width, heat_h + line_h + 1.3), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[heat_h, line_h], width_ratios=[1.0, 0.018])
    heat = fig.add_subplot(grid[0, 0], label="decisions")
    lines = fig.add_subplot(grid[1, 0], sharex=heat, label="ratios")
    _draw_heatmap(fig, heat, fig.add_subplot(grid[0, 1]), d, rows)
    _draw_ratios(fig, lines, fig.add_subplot(grid[1, 1]), d, decided)
    fig.suptitle(_title(data, d, width), fontsize=11)
    return fig


def _draw_heatmap(fig: Any, ax: Any, cax: Any, d: _Decisions, rows: list[int]) -> None:
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.patches import Patch

    skip = np.rint(d.skip[:, :, rows])  # (C, S, R')
    present = ~np.isnan(skip)
    img = np.empty((len(rows), d.steps, 4))
    img[:] = to_rgba(MISSING_COLOR)
    if d.chunks == 1:
        state = skip[0].T
        for value, color in STATE_COLORS.items():
            img[state == value] = to_rgba(color)
        handles = [Patch(facecolor=STATE_COLORS[v], edgecolor="none", label=STATE_LABELS[v]) for v in STATE_COLORS]
        if d.motion_region is not None:
            row = rows.index(d.regions.index(d.motion_region))
            on_motion = d.motion[0] & (state[row] == COMPUTED)
            if on_motion.any():
                img[row, on_motion] = to_rgba(MOTION_COLOR)
                handles.append(Patch(facecolor=MOTION_COLOR, edgecolor="none", label="computed on its motion tokens"))
        modes = d.tok[0][:, rows].T
        for mode, color in TOKEN_COLORS.items():
            cells = (modes == mode) & (state == COMPUTED)
            if cells.any():
                img[cells] = to_rgba(color)
                handles.append(Patch(facecolor=color, edgecolor="none", label=TOKEN_LABELS[mode]))
        if (~present[0]).any():
            handles.append(Patch(facecolor=MISSING_COLOR, edgecolor="#999999", label="no record"))
        # One row up to three entries; beyond that two rows, so the legend stays clear of the title.
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0),
                  ncol=len(handles) if len(handles) <= 3 else math.ceil(len(handles) / 2),
                  frameon=False, fontsize=8, handlelength=1.2, borderaxespad=0.2)
        ax.set_title("region decisions per step", loc="left", fontsize=10)
        cax.set_visible(False)
    else:
        import matplotlib
        from matplotlib.colors import LinearSegmentedColormap

        # From "computed" to "skipped" in the single-chunk colours: dark to light, so it reads as sequential.
        cmap = LinearSegmentedColormap.from_list("fraction", [STATE_COLORS[COMPUTED], STATE_COLORS[SKIPPED]])
        n_present = present.sum(axis=0)
        fraction = np.divide((skip == SKIPPED).sum(axis=0), n_present, out=np.zeros(n_present.shape),
                             where=n_present > 0).T
        img[:] = cmap(fraction)
        never_reached = ((skip == NOT_REACHED) | ~present).all(axis=0).T & (n_present.T > 0)
        img[never_reached] = to_rgba(STATE_COLORS[NOT_REACHED])
        img[(n_present == 0).T] = to_rgba(MISSING_COLOR)
        sm = matplotlib.cm.ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        cbar = fig.colorbar(sm, cax=cax)
        cbar.set_label("fraction skipped", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        if never_reached.any():
            ax.legend(handles=[Patch(facecolor=STATE_COLORS[NOT_REACHED], edgecolor="none",
                                     label="not reached in any chunk")],
                      loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8, borderaxespad=0.2)
        ax.set_title(f"fraction of the {d.chunks} chunks in which each region was skipped, per step",
                     loc="left", fontsize=10)
    ax.imshow(img, aspect="auto", interpolation="nearest", origin="upper",
              extent=(-0.5, d.steps - 0.5, len(rows) - 0.5, -0.5))
    names = [d.regions[i] for i in rows]
    every = max(1, math.ceil(len(rows) / 40))
    ax.set_yticks(range(0, len(rows), every), [names[i] for i in range(0, len(rows), every)], fontsize=8)
    n_blocks = sum(1 for n in names if _BLOCK.match(n))
    if 0 < n_blocks < len(names):
        ax.axhline(n_blocks - 0.5, color="white", linewidth=2.0)
    ax.tick_params(axis="x", labelbottom=False)
    ax.set_ylabel("region")


def _draw_ratios(fig: Any, ax: Any, cax: Any, d: _Decisions, decided: list[int]) -> None:
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    ax.set_xlabel("step")
    ax.set_xlim(-0.5, d.steps - 0.5)
    if not decided:
        ax.text(0.5, 0.5, "no region was decided in the graph (the policy fixed every skip and compute)",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#555555")
        ax.set_yticks([])
        cax.set_visible(False)
        return
    steps = np.arange(d.steps)
    blocks = [i for i in decided if _BLOCK.match(d.regions[i])]
    cmap = matplotlib.colormaps[BLOCK_CMAP].resampled(256)
    lo, hi = BLOCK_CMAP_RANGE
    cmap = matplotlib.colors.ListedColormap(cmap(np.linspace(lo, hi, 256)))
    norm = Normalize(0, max(len(blocks) - 1, 1))
    color = {i: cmap(norm(k)) for k, i in enumerate(blocks)}
    range_styles = ["--", ":", "-."]
    top = blended_transform_factory(ax.transData, ax.transAxes)
    handles: list[Any] = []
    any_null = False
    for k, i in enumerate(decided):
        ctl, thr, stat, skip = d.ctl[0, :, i], d.thr[0, :, i], d.stat[0, :, i], d.skip[0, :, i]
        use = (ctl == CTL_DECIDE) & (thr > 0) & (skip != NOT_REACHED)
        ratio = np.where(use & np.isfinite(stat), stat / np.where(use, thr, 1.0), np.nan)
        block = i in color
        style = {"color": color[i], "linestyle": "-"} if block else {
            "color": "black", "linestyle": range_styles[k % len(range_styles)]}
        ax.plot(steps, ratio, linewidth=1.1, marker="o", markersize=2.2, alpha=0.9, **style)
        if not block:
            handles.append(Line2D([], [], linewidth=1.1, label=d.regions[i], **style))
        nulls = steps[use & ~np.isfinite(stat)]
        if nulls.size:
            any_null = True
            ax.plot(nulls, np.full(nulls.shape, 0.96), linestyle="none", marker="x", markersize=6,
                    markeredgewidth=1.5, color=style["color"], transform=top, clip_on=False, zorder=5)
    ax.axhline(1.0, color="#d62728", linewidth=1.2, linestyle="--")
    handles.insert(0, Line2D([], [], color="#d62728", linestyle="--", label="threshold (skip at or below)"))
    if any_null:
        handles.append(Line2D([], [], color="#555555", linestyle="none", marker="x",
                              label="stat NaN/Inf: computed (fail-closed)"))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_log_formatter())
    ax.yaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("input change / threshold")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    # Below the step axis, where it can hide neither a line nor a fail-closed mark.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False,
              ncol=min(len(handles), 5))
    ax.set_title("chunk 0: each decided region's statistic over its threshold, at the steps the graph decided",
                 loc="left", fontsize=10)
    if blocks:
        sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        cbar = fig.colorbar(sm, cax=cax)
        labels = [d.regions[i] for i in blocks]
        ticks = np.unique(np.linspace(0, len(blocks) - 1, min(len(blocks), 8)).round().astype(int))
        cbar.set_ticks(ticks.tolist(), labels=[labels[t] for t in ticks])
        cbar.ax.tick_params(labelsize=7)
    else:
        cax.set_visible(False)


def _plain_log_formatter(**options: Any) -> Any:
    """Matplotlib's choice of log-axis labels, written as plain numbers (0.4, 1, 2) instead of 4e-01."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(**options)


def _title(data: dict[str, Any], d: _Decisions, width: float) -> str:
    policy = data.get("policy")
    if isinstance(policy, dict):
        name = str(policy.get("name", "?"))
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in policy.items() if k != "name")
        head = f"{name} ({settings})" if settings else name
    else:
        head = str(policy) if policy is not None else "unknown policy"
    parts = [head, f"{d.steps} steps"]
    samples = data.get("samples")
    if isinstance(samples, int):
        parts.append(f"{samples} sample{'s' if samples != 1 else ''}" + (f" in {d.chunks} chunks" if d.chunks > 1 else ""))
    fraction = _number(data.get("macs_fraction"))
    if fraction is not None:
        parts.append(f"{fraction * 100:.1f}% of MACs executed")
    speedup, ideal = _number(data.get("speedup")), _number(data.get("mac_ideal_speedup"))
    if speedup is not None:
        parts.append(f"speedup {speedup:.2f}x" + (f" (MAC-ideal {ideal:.2f}x)" if ideal is not None else ""))
    baseline = data.get("baseline")
    psnr = _number(baseline.get("psnr_mean")) if isinstance(baseline, dict) else None
    if psnr is not None:
        parts.append(f"PSNR {psnr:.2f} dB vs uncached")
    accuracy = _number(data.get("accuracy"))
    if accuracy is not None:
        parts.append(f"digit accuracy {accuracy:.2f}")
    # Greedy wrap on part boundaries so the title stays inside the figure; a part longer than a
    # line (a policy with many settings) is wrapped at its own commas.
    limit = int(width * 11)
    line = ""
    head_lines = textwrap.wrap(parts[0], limit, break_long_words=False)
    lines, parts = head_lines[:-1], [head_lines[-1], *parts[1:]]
    for part in parts:
        candidate = f"{line}  ·  {part}" if line else part
        if line and len(candidate) > limit:
            lines.append(line)
            candidate = part
        line = candidate
    lines.append(line)
    return "\n".join(lines)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
