"""The tuning search: the fastest cache setting that holds a quality target, over every knob at once.

A policy's settings form a grid (`Space`: one `Knob` per option, its values from conservative to
aggressive, or unordered for a choice such as the approximation). A trial samples the calibration
set under one setting and measures its quality against the uncached samples and its MAC-ideal
speedup; both are deterministic for a seed, so the search's path is too. The search is a pattern
search with random restarts: from the policy's start point it takes the first move that improves the
score (one step along an ordered knob, then another value of a choice, then a step along two ordered
knobs at once), runs on along an improving knob with doubling steps, and stops where no move
improves; then it restarts from a random unseen setting of the most promising policy, until the
trial budget is spent. Before each round of moves it can tell a caller (`ahead`) the settings those moves
reach, in order: a cluster measures some of them meanwhile (`fcpass.cluster`), which changes nothing the
search does.

The score prefers, in order: holding the target; then, among settings that hold it, the larger
MAC-ideal speedup; among those that miss it, the higher PSNR (so a search that starts below the
target climbs towards it). Wall time is too noisy on a shared machine to steer by, so it decides
only at the end: the best few holding settings of each policy (`finalists`) are timed against the
uncached graph in one interleaved run, and the fastest wins, MAC-ideal breaking near-ties.

Invariant: `choose` never returns a trial that missed the target, and a search with budget B runs
at most B trials.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from fcpass.contract.errors import FcpassError

log = logging.getLogger(__name__)

SEARCH_SEED = 1234  # the trials' noise; calibration's trajectories start at 1000, fcpass sample's at 0


@dataclass(frozen=True)
class Knob:
    """One option of a policy: `values` from conservative to aggressive where `ordered`, else a choice."""

    name: str
    values: tuple[Any, ...]
    ordered: bool = True


@dataclass(frozen=True)
class Space:
    """A policy's grid. `base` is its spec before the knobs (it may fix options the search keeps);
    `start` holds, per knob, the index of the value the search starts from; `valid`, where given, says
    which specs the policy takes (TaylorSeer's phase must fall inside its interval)."""

    base: str
    knobs: tuple[Knob, ...]
    start: tuple[int, ...]
    valid: Callable[[str], bool] | None = None

    @property
    def name(self) -> str:
        return self.base

    def settings(self, point: tuple[int, ...]) -> dict[str, Any]:
        return {k.name: k.values[i] for k, i in zip(self.knobs, point)}

    def spec(self, point: tuple[int, ...]) -> str:
        options = ",".join(f"{key}={value}" for key, value in self.settings(point).items())
        if not options:
            return self.base
        return self.base + ("," if ":" in self.base else ":") + options

    def points(self) -> list[tuple[int, ...]]:
        """Every valid setting."""
        points: list[tuple[int, ...]] = [()]
        for knob in self.knobs:
            points = [p + (i,) for p in points for i in range(len(knob.values))]
        return [p for p in points if self.takes(p)]

    def takes(self, point: tuple[int, ...]) -> bool:
        inside = all(0 <= i < len(k.values) for k, i in zip(self.knobs, point))
        return inside and (self.valid is None or self.valid(self.spec(point)))

    def moves(self, point: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The steps from `point`, in the order they are tried: one along each ordered knob (the aggressive
        side first), every other value of each choice, then one along two ordered knobs at once (where two
        knobs trade against each other, e.g. a threshold against a cap on skips)."""
        ordered = [a for a, k in enumerate(self.knobs) if k.ordered]

        def unit(*by: tuple[int, int]) -> tuple[int, ...]:
            out = [0] * len(self.knobs)
            for axis, d in by:
                out[axis] = d
            return tuple(out)

        axes = [unit((a, d)) for a in ordered for d in (1, -1)]
        choices = [unit((a, j - point[a])) for a, k in enumerate(self.knobs) if not k.ordered
                   for j in range(len(k.values)) if j != point[a]]
        pairs = [unit((a, d), (b, e)) for i, a in enumerate(ordered) for b in ordered[i + 1:]
                 for d, e in ((1, -1), (-1, 1), (1, 1), (-1, -1))]
        return axes + choices + pairs


def _moved(point: tuple[int, ...], step: tuple[int, ...], times: int = 1) -> tuple[int, ...]:
    return tuple(p + times * d for p, d in zip(point, step))


@dataclass(frozen=True)
class Measurement:
    """What one trial measured on the calibration set."""

    psnr: float
    ssim: float
    mac_ideal: float
    wall_seconds: float
    accuracy: float | None = None


@dataclass
class Trial:
    space: str
    spec: str
    settings: dict[str, Any]
    measured: Measurement
    holds: bool
    speedup: float = float("nan")  # wall-time speedup of the trial's own run over the uncached run's
    timed: float | None = None  # the finalists' speedup, timed against the uncached graph in one run

    def score(self) -> tuple[bool, float, float]:
        m = self.measured
        return (self.holds, m.mac_ideal if self.holds else m.psnr, m.psnr)


@dataclass
class SearchResult:
    trials: list[Trial] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # space -> why its policy cannot run on this graph
    winner: Trial | None = None

    def best_per_space(self) -> dict[str, Trial | None]:
        out: dict[str, Trial | None] = {}
        for t in self.trials:
            current = out.setdefault(t.space, None)
            if t.holds and (current is None or _rank(t) > _rank(current)):
                out[t.space] = t
        return out


def _rank(t: Trial) -> tuple[float, float, float]:
    """Holding trials by timed speedup where timed, else MAC-ideal; MAC-ideal, then PSNR, break ties."""
    return (t.timed if t.timed is not None else -math.inf, t.measured.mac_ideal, t.measured.psnr)


Evaluate = Callable[[str], Measurement]


def search(spaces: Sequence[Space], evaluate: Evaluate, holds: Callable[[Measurement], bool], budget: int,
           seed: int = 0, baseline_seconds: float | None = None, progress: bool = True,
           ahead: Callable[[list[str]], None] | None = None) -> SearchResult:
    """Run at most `budget` trials over `spaces`, each first from its start point with a share of the
    budget in proportion to its knobs, then restarts for the policy with the best score so far.

    `evaluate(spec)` samples under one setting; an FcpassError from it (the policy cannot run on this
    graph) drops that space with the reason. `baseline_seconds` (the uncached run's) gives each trial its
    wall-time speedup, for the table and the plot. `ahead(specs)`, where given, hears what it may try next."""
    if budget < 1:
        raise FcpassError(f"--budget {budget} must be at least 1 trial")
    rng = random.Random(seed)
    result = SearchResult()
    seen: dict[str, Trial] = {}
    bar = tqdm(total=budget, desc="search", unit="trial", disable=not progress)

    def trial(space: Space, point: tuple[int, ...]) -> Trial | None:
        spec = space.spec(point)
        if spec in seen:
            return seen[spec]
        if len(seen) >= budget or space.name in result.skipped:
            return None
        try:
            m = evaluate(spec)
        except FcpassError as exc:
            result.skipped[space.name] = str(exc)
            log.warning("%s: not searched (%s)", space.name, exc)
            return None
        t = Trial(space.name, spec, space.settings(point), m, holds(m),
                  baseline_seconds / m.wall_seconds if baseline_seconds else float("nan"))
        seen[spec] = t
        result.trials.append(t)
        best = max((x for x in result.trials if x.holds), key=lambda x: x.measured.mac_ideal, default=None)
        bar.set_postfix_str(f"{space.name}: {t.measured.psnr:.1f} dB; best "
                            + (f"{best.measured.mac_ideal:.2f}x MAC-ideal ({best.space})" if best else "none holds yet"))
        bar.update(1)
        return t

    def descend(space: Space, point: tuple[int, ...], limit: int) -> None:
        """Coordinate search, first improvement: take the first move that scores better, then keep going
        that way with doubling steps while it does; stop where no move improves."""
        current = trial(space, point)
        while current is not None:
            if ahead is not None:
                ahead(_nearby(space, point, seen))
            for step in space.moves(point):
                if len(seen) >= limit:
                    return
                better = _better(space, _moved(point, step), current)
                if better is None:
                    continue
                point, current = _moved(point, step), better
                along = sum(1 for d in step if d) == 1 and space.knobs[next(a for a, d in enumerate(step) if d)].ordered
                times = 1
                while along and len(seen) < limit and (further := _better(space, _moved(point, step, times * 2), current)):
                    point, current, times = _moved(point, step, times * 2), further, times * 2
                break
            else:
                return

    def _better(space: Space, point: tuple[int, ...], than: Trial) -> Trial | None:
        t = trial(space, point) if space.takes(point) else None
        return t if t is not None and t.score() > than.score() else None

    weights = [max(len(s.knobs), 1) for s in spaces]
    spent = 0
    for i, space in enumerate(spaces):  # each policy from its start, with its share of what is left
        share = round((budget - spent) * weights[i] / sum(weights[i:]))
        descend(space, space.start, len(seen) + max(share, 1))
        spent = len(seen)
    grids = {s.name: s.points() for s in spaces} if len(seen) < budget else {}
    while len(seen) < budget and (restart := _restart(spaces, grids, seen, result)):
        descend(restart[0], rng.choice(restart[1]), budget)
    bar.close()
    return result


def _nearby(space: Space, point: tuple[int, ...], seen: dict[str, Trial]) -> list[str]:
    """The settings one move from `point` that the search has not tried, in the order it tries them."""
    nearby = [_moved(point, step) for step in space.moves(point)]
    return [spec for spec in (space.spec(p) for p in nearby if space.takes(p)) if spec not in seen]


def _restart(spaces: Sequence[Space], grids: dict[str, list[tuple[int, ...]]], seen: dict[str, Trial],
             result: SearchResult) -> tuple[Space, list[tuple[int, ...]]] | None:
    """Where the search restarts: the policy that holds the target fastest so far, with its untried settings."""
    fresh = {s.name: [p for p in grids[s.name] if s.spec(p) not in seen] for s in spaces if s.name not in result.skipped}
    live = [s for s in spaces if fresh.get(s.name)]
    if not live:
        return None
    best = {s.name: max((t.score() for t in result.trials if t.space == s.name), default=(False, -math.inf, 0.0))
            for s in live}
    space = max(live, key=lambda s: best[s.name])
    return space, fresh[space.name]


def finalists(result: SearchResult, per_space: int = 2, within: float = 0.8) -> list[Trial]:
    """The `per_space` holding trials of each space with the largest MAC-ideal speedup, of those within
    `within` of the largest of all (a policy far behind in MACs cannot win on wall time)."""
    holding = [t for t in result.trials if t.holds]
    if not holding:
        return []
    top = max(t.measured.mac_ideal for t in holding)
    out: list[Trial] = []
    for name in dict.fromkeys(t.space for t in holding):
        mine = sorted((t for t in holding if t.space == name and t.measured.mac_ideal >= within * top),
                      key=lambda t: (t.measured.mac_ideal, t.measured.psnr), reverse=True)
        out += mine[:per_space]
    return out


def choose(result: SearchResult, time: Callable[[list[str]], dict[str, float]], per_space: int = 2,
           tie: float = 0.02) -> Trial | None:
    """Time the finalists (`time(specs)` -> each spec's wall-time speedup over the uncached graph, measured
    in one run) and set `result.winner`: the fastest, except that a finalist within `tie` (relative) of it
    with a larger MAC-ideal speedup wins, since their difference is within the timing's noise. None if
    no trial holds the target."""
    chosen = finalists(result, per_space)
    if not chosen:
        return None
    timed = time([t.spec for t in chosen])
    for t in chosen:
        t.timed = timed[t.spec]
    fastest = max(t.timed for t in chosen if t.timed is not None)
    near = [t for t in chosen if t.timed is not None and t.timed >= fastest * (1 - tie)]
    result.winner = max(near, key=lambda t: (t.measured.mac_ideal, t.timed, t.measured.psnr))
    return result.winner
