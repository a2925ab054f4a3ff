"""`fcpass tune` and `fcpass optimize --target-psnr`: the fastest cache setting that holds a quality target.

Every policy named (by default those in `DEFAULT_POLICIES`, FastCache first) is searched over all
of its knobs that matter (`SPACES`) by `fcpass.search`, on one compiled graph and one ONNX Runtime
session: a trial samples the calibration set (seeds of its own, disjoint from calibration's and from
`fcpass sample`'s) under one setting and compares it with the uncached samples of the same seeds
(PSNR, SSIM; digit accuracy on the bundled model, which a setting may not lower). The finalists are
timed against the uncached graph in one interleaved run; the winner, its figures and the table of
every trial are what `winner_record` stores in the cache plan for `fcpass sample` to run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import atomic_path
from fcpass.policy_graph import compiled_defaults
from fcpass.quality import compare_batches
from fcpass.search import Knob, Measurement, SearchResult, Space, Trial, choose, search
from runtimes.policies import make_policy, parse_policy_spec
from runtimes.sampler import SampleRequest, SampleResult, sample
from runtimes.schedulers import config_identity, scheduler_from_config

if TYPE_CHECKING:
    from fcpass.sampling import SamplingSetup

log = logging.getLogger(__name__)

_SKIPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
_WARMUP = (1, 2, 3, 4, 5, 6)
# Each policy's grid: knob values conservative -> aggressive (or a choice), and the start of the search.
SPACES: dict[str, tuple[tuple[Knob, Any], ...]] = {
    "fastcache": ((Knob("regions", ("stack", "blocks", "stack,blocks"), ordered=False), "stack"),
                  (Knob("approx", ("taylor1", "linear", "residual"), ordered=False), "taylor1"),
                  (Knob("sigma_scale", (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)), 64),
                  (Knob("max_skips", _SKIPS), 6),
                  (Knob("warmup", _WARMUP), 3)),
    "taylorseer": ((Knob("regions", ("stack", "blocks"), ordered=False), "stack"),
                   (Knob("interval", tuple(range(2, 17))), 7),
                   (Knob("warmup", _WARMUP), 3),
                   (Knob("phase", tuple(range(16))), 1),
                   (Knob("last", (1, 0)), 1)),
    "fora": ((Knob("regions", ("stack", "blocks"), ordered=False), "stack"),
             (Knob("interval", tuple(range(2, 11))), 4),
             (Knob("warmup", _WARMUP), 2)),
    "fbcache": ((Knob("threshold", (0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48)), 0.04),
                (Knob("warmup", _WARMUP), 1)),
    "teacache": ((Knob("threshold", (0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6)), 0.04),
                 (Knob("warmup", _WARMUP), 1)),
    "magcache": ((Knob("threshold", (0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6)), 0.06),
                 (Knob("max_skips", _SKIPS), 3)),
    "delta-dit": ((Knob("interval", (2, 3, 4, 6)), 2),),
}
DEFAULT_POLICIES = ["fastcache", "taylorseer", "fora", "fbcache", "teacache", "magcache"]
# The knobs that change what a graph must hold (its region sets, the previous outputs for taylor1).
STRUCTURAL = ("regions", "approx")


def space_for(spec: str) -> Space:
    """The search space of a policy spec: its policy's knobs, less those the spec fixes."""
    name, fixed = parse_policy_spec(spec)
    if name not in SPACES:
        raise FcpassError(f"fcpass tune cannot search policy {name!r}; search one of {', '.join(SPACES)}")
    knobs = [(k, start) for k, start in SPACES[name] if k.name not in fixed]
    return Space(spec, tuple(k for k, _ in knobs), tuple(k.values.index(start) for k, start in knobs))


def spaces_for(specs: list[str]) -> list[Space]:
    spaces = [space_for(spec) for spec in specs]
    if len({s.name for s in spaces}) < len(spaces):
        raise FcpassError(f"--policies names one policy spec twice: {' '.join(specs)}")
    return spaces


def graph_specs(spaces: list[Space]) -> list[str]:
    """One spec per combination of the structural knobs' values: `policy_graph.graph_for` of these compiles a
    graph that every trial of the search can run on."""
    out = []
    for space in spaces:
        combos: list[tuple[int, ...]] = [space.start]
        for axis, knob in enumerate(space.knobs):
            if knob.name in STRUCTURAL:
                combos = [c[:axis] + (j,) + c[axis + 1:] for c in combos for j in range(len(knob.values))]
        out += [space.spec(c) for c in combos]
    return out


def default_policies(plan: Any) -> list[str]:
    """The policies a graph compiled --for some policies was made for, their structural options fixed (the
    graph holds nothing else), else DEFAULT_POLICIES."""
    out = []
    for name, options in plan.compiled_for.items():
        if name in SPACES:
            fixed = ",".join(f"{k}={v}" for k, v in options.items() if k in STRUCTURAL)
            out.append(f"{name}:{fixed}" if fixed else name)
    return out or list(DEFAULT_POLICIES)


def runnable(space: Space, plan: Any, steps: int) -> Space | str:
    """`space` taking only the settings its policy can run on `plan` (the region sets, probes and previous
    outputs the graph holds), started from the first that can where its own start cannot; the policy's
    reason where no choice of its structural knobs can."""

    @functools.cache
    def fails(spec: str) -> str | None:
        try:
            make_policy(spec, **compiled_defaults(plan, spec)).reset(plan, steps)
        except FcpassError as exc:
            return str(exc)
        return None

    space = dataclasses.replace(space, valid=lambda spec: fails(spec) is None)
    axes = [a for a, k in enumerate(space.knobs) if k.name in STRUCTURAL]
    starts = [space.start]
    for axis in axes:
        starts = [p[:axis] + (j,) + p[axis + 1:] for p in starts for j in range(len(space.knobs[axis].values))]
    start = next((p for p in starts if space.takes(p)), None)
    if start is None:
        return fails(space.spec(space.start)) or "no setting of it runs on this graph"
    return dataclasses.replace(space, start=start)


@dataclass
class Baseline:
    clips: np.ndarray  # the uncached samples, as quality reads them (SampleResult.clips)
    wall_seconds: float
    macs: int
    accuracy: float | None


@dataclass
class TuneResult:
    model: str
    target_psnr: float
    samples: int
    steps: int
    seed: int
    baseline: Baseline
    search: SearchResult
    timed_on: str | None = None  # the one worker that timed the finalists, where they ran on a cluster

    @property
    def winner(self) -> Trial | None:
        return self.search.winner


class Tuner:
    """Samples the calibration set on `denoiser` (a CachedDenoiser whose policy is swapped per run)."""

    def __init__(self, denoiser: Any, setup: SamplingSetup, classifier: Any = None) -> None:
        self.denoiser, self.setup, self.classifier = denoiser, setup, classifier
        self.request: SampleRequest = setup.request

    def run(self, spec: str) -> SampleResult:
        self.denoiser.policy = make_policy(spec, **compiled_defaults(self.denoiser.plan, spec))
        return sample(self.denoiser, scheduler_from_config(self.setup.scheduler_config), self.request, progress=False)

    def accuracy(self, images: np.ndarray) -> float | None:
        if self.classifier is None or not self.request.classes:
            return None
        return float(self.classifier.accuracy(images, self.request.classes))

    def baseline(self) -> Baseline:
        base = self.run("none")
        return Baseline(base.clips(), base.wall_seconds, base.macs_executed, self.accuracy(base.images))

    def measure(self, spec: str, base: Baseline) -> Measurement:
        got = self.run(spec)
        if not np.isfinite(got.images).all():
            raise FcpassError(f"{spec} drew non-finite samples")
        q = compare_batches(base.clips, got.clips())
        return Measurement(q["psnr_mean"], q["ssim_mean"], base.macs / max(got.macs_executed, 1), got.wall_seconds,
                           self.accuracy(got.images))

    def time(self, specs: list[str], passes: int = 1) -> tuple[dict[str, float], float]:
        """Each spec's speedup over the uncached graph, timed as uncached, every spec, uncached, every spec in
        reverse, uncached (times `passes`), so that a drift of the machine's speed weighs on all alike; and the
        uncached run's mean wall time."""
        base: list[float] = []
        walls: dict[str, list[float]] = {s: [] for s in specs}
        for _ in range(passes):
            for order in (specs, specs[::-1]):
                base.append(self.run("none").wall_seconds)
                for s in order:
                    walls[s].append(self.run(s).wall_seconds)
        base.append(self.run("none").wall_seconds)
        mean = float(np.mean(base))
        return {s: mean / float(np.mean(w)) for s, w in walls.items()}, mean


class Trials(Protocol):
    """Where a search's runs happen: `LocalTrials` (this process), or `fcpass.cluster.RayTrials` (a Ray cluster).
    `where` names what timed the finalists, once `time` ran."""

    where: str

    def baseline(self) -> Baseline: ...

    def search(self, spaces: Sequence[Space], base: Baseline, holds: Callable[[Measurement], bool], budget: int,
               seed: int, progress: bool) -> SearchResult: ...

    def time(self, specs: list[str]) -> dict[str, float]: ...


class LocalTrials:
    """Every run of the search on this process's `tuner`, one after another."""

    where = "this machine"

    def __init__(self, tuner: Tuner, repeats: int = 1) -> None:
        self.tuner, self.repeats = tuner, repeats

    def baseline(self) -> Baseline:
        return self.tuner.baseline()

    def search(self, spaces: Sequence[Space], base: Baseline, holds: Callable[[Measurement], bool], budget: int,
               seed: int, progress: bool) -> SearchResult:
        return search(spaces, lambda spec: self.tuner.measure(spec, base), holds, budget, seed, base.wall_seconds,
                      progress)

    def time(self, specs: list[str]) -> dict[str, float]:
        return self.tuner.time(specs, self.repeats)[0]


def tune(denoiser: Any, setup: SamplingSetup, policies: list[str], target_psnr: float, budget: int,
         classifier: Any = None, model: str = "", repeats: int = 1, seed: int = 0,
         progress: bool = True, named: bool = False, trials: Trials | None = None) -> TuneResult:
    """Search `policies` on `denoiser` for the fastest setting at >= `target_psnr` (and no loss of digit
    accuracy where `classifier` scores), in at most `budget` trials. A policy the graph cannot run is left out
    with a warning, or refused where the user `named` the policies. `trials` (default: this process) runs the
    baseline, the trials and the finalists' timing."""
    if not math.isfinite(target_psnr):
        raise FcpassError(f"--target-psnr {target_psnr} must be a finite number of dB, e.g. 30")
    tuner = Tuner(denoiser, setup, classifier)
    trials = trials or LocalTrials(tuner, repeats)
    spaces, skipped = [], {}
    for space in spaces_for(policies):
        if isinstance(left := runnable(space, denoiser.plan, tuner.request.steps), str):
            if named:
                raise FcpassError(f"--policies {space.name}: {left}")
            skipped[space.name] = left
            log.warning("%s: not searched (%s)", space.name, left)
        else:
            spaces.append(left)
    base = trials.baseline()

    def holds(m: Measurement) -> bool:
        lost = m.accuracy is not None and base.accuracy is not None and m.accuracy < base.accuracy
        return m.psnr >= target_psnr and not lost

    found = trials.search(spaces, base, holds, budget, seed, progress)
    found.skipped.update(skipped)
    request = tuner.request
    result = TuneResult(model, target_psnr, request.count, request.steps, request.seed, base, found)
    if choose(found, trials.time) is None:
        raise FcpassError(_none_holds(result))
    result.timed_on = None if isinstance(trials, LocalTrials) else trials.where
    return result


def _none_holds(result: TuneResult) -> str:
    trials = result.search.trials
    if not trials:
        why = "; ".join(f"{k}: {v}" for k, v in result.search.skipped.items())
        return f"no policy could run on {Path(result.model).name} ({why}); optimize it --for the policies to search"
    best = max(trials, key=lambda t: (t.measured.psnr, t.measured.mac_ideal))
    return (f"no setting holds {result.target_psnr:g} dB on the search's seeds in {len(trials)} trials: the best "
            f"reached {best.measured.psnr:.2f} dB ({best.spec}); lower --target-psnr or raise --budget")


def winner_record(result: TuneResult, setup: SamplingSetup) -> dict[str, Any]:
    """What the cache plan keeps of a search (`CachePlan.tuned`): the winner, the figures it held on the
    calibration seeds, what it was measured under, and every trial."""
    w = result.winner
    assert w is not None
    return {
        "policy": w.spec, "target_psnr": result.target_psnr, "psnr": w.measured.psnr, "ssim": w.measured.ssim,
        "accuracy": w.measured.accuracy, "baseline_accuracy": result.baseline.accuracy, "speedup": w.timed,
        "mac_ideal": w.measured.mac_ideal, "samples": result.samples, "steps": result.steps, "seed": result.seed,
        "guidance_scale": setup.request.guidance_scale, **config_identity(setup.scheduler_config),
        "trials": [_trial_json(t) for t in result.search.trials], "skipped": result.search.skipped,
    }


def _trial_json(t: Trial) -> dict[str, Any]:
    return {"spec": t.spec, "space": t.space, **asdict(t.measured), "holds": t.holds,
            "speedup": None if math.isnan(t.speedup) else t.speedup, "timed": t.timed}


def to_json(result: TuneResult) -> dict[str, Any]:
    return {"model": result.model, "target_psnr": result.target_psnr, "samples": result.samples,
            "steps": result.steps, "baseline_seconds": result.baseline.wall_seconds,
            "baseline_accuracy": result.baseline.accuracy,
            "winner": _trial_json(result.winner) if result.winner else None, "timed_on": result.timed_on,
            "trials": [_trial_json(t) for t in result.search.trials], "skipped": result.search.skipped}


def table(result: TuneResult) -> str:
    """The best setting per policy as a markdown table, the winner first; digit accuracy where scored."""
    acc = result.baseline.accuracy
    columns = ["policy", "best setting", "speedup", "MAC-ideal", "PSNR dB", "SSIM", "trials"]
    columns += ["digit acc"] if acc is not None else []
    lines = [
        f"Fastest setting per policy at >= {result.target_psnr:g} dB mean PSNR against the uncached samples "
        f"({Path(result.model).name}, {result.samples} samples x {result.steps} steps, the search's own seeds; "
        f"speedup = the uncached graph's wall time, {result.baseline.wall_seconds:.3f} s, over the setting's, "
        "timed in one interleaved run" + (f" on {result.timed_on}" if result.timed_on else "")
        + (f"; uncached digit accuracy {acc:.2f})" if acc is not None else ")"),
        "",
        "| " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * (len(columns) - 2),
    ]
    best = result.search.best_per_space()
    order = sorted(best, key=lambda name: best[name] is not result.winner)
    for name in order:
        count = sum(t.space == name for t in result.search.trials)
        p = best[name]
        if p is None:
            lines.append(f"| {name} | none holds the target |" + " |" * 4 + f" {count} |" + (" |" if acc is not None else ""))
            continue
        speed = f"{p.timed:.2f}x" if p.timed is not None else f"~{p.speedup:.2f}x"
        row = [name, f"`{p.spec}`" + (" (chosen)" if p is result.winner else ""), speed, f"{p.measured.mac_ideal:.2f}x",
               f"{p.measured.psnr:.2f}", f"{p.measured.ssim:.4f}", str(count)]
        if acc is not None:
            row.append(f"{p.measured.accuracy:.2f}" if p.measured.accuracy is not None else "")
        lines.append("| " + " | ".join(row) + " |")
    for spec, why in result.search.skipped.items():
        lines.append(f"| {spec} | not run: {why} |" + " |" * (len(columns) - 2))
    return "\n".join(lines) + "\n"


def plot_trials(result: TuneResult, path: Path, title: str) -> None:
    """Every trial's speedup (its own run against the uncached run) against its PSNR, one colour per policy,
    the target as a line and the chosen setting (at its timed speedup) as a star."""
    curves = {}
    for t in result.search.trials:
        curves.setdefault(t.space, []).append((t.speedup, t.measured.psnr))
    w = result.winner
    chosen = (w.timed or w.speedup, w.measured.psnr, w.spec) if w is not None else None
    plot(curves, result.target_psnr, path, title, chosen=chosen, lines=False)


def plot(curves: dict[str, list[tuple[float, float]]], target_psnr: float, path: Path, title: str,
         chosen: tuple[float, float, str] | None = None, lines: bool = True) -> None:
    """Speedup against PSNR, one series per method (joined in order where `lines`); the uncached run is the
    point (1x, identical) and `chosen` (speedup, PSNR, label) a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    # Near-identical settings (PSNR far above the target) sit on the top edge: the region of
    # interest is around the target.
    top = target_psnr + 15
    low = min([q for pts in curves.values() for _, q in pts] + [target_psnr])
    colors = plt.get_cmap("tab20").colors
    for i, (label, pts) in enumerate(curves.items()):
        style = ("--" if label.startswith("diffusers") else "-") if lines else "none"
        ax.plot([s for s, _ in pts], [min(q, top) for _, q in pts], linestyle=style, marker="o", ms=3, label=label,
                color=colors[i % len(colors)])
    ax.plot([1.0], [top], marker="*", ms=14, color="black", linestyle="none", label="uncached (identical)")
    if chosen is not None:
        ax.plot([chosen[0]], [min(chosen[1], top)], marker="*", ms=18, color="red", linestyle="none",
                label=f"chosen: {chosen[2]}")
    ax.set_ylim(max(low, target_psnr - 12) - 1, top + 1)
    ax.axhline(target_psnr, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("speedup over uncached (wall time)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
