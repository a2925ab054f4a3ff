"""`fcpass tune`: for each policy, the fastest setting of its main knob that holds a quality target.

Each policy's knob is swept from its conservative end to its aggressive end (`KNOBS`) on one
compiled graph, with one ONNX Runtime session: per setting, the whole sampling loop is timed and
its samples are compared with the uncached samples of the same seeds (PSNR, SSIM; digit accuracy
on the bundled model). The sweep of a policy stops after two settings in a row miss the target,
since quality falls as the knob rises. The winner is the setting with the highest measured
speedup among those at or above the target; the MAC-ideal speedup is reported beside it so the
cost of the cache machinery stays visible.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import atomic_path
from fcpass.policy_graph import compiled_defaults
from fcpass.quality import compare_batches
from runtimes.policies import make_policy, parse_policy_spec
from runtimes.sampler import SampleRequest, SampleResult, sample
from runtimes.schedulers import scheduler_from_config

if TYPE_CHECKING:
    from fcpass.sampling import SamplingSetup

log = logging.getLogger(__name__)

# Main knob per policy, conservative -> aggressive.
KNOBS: dict[str, tuple[str, list[Any]]] = {
    "fora": ("interval", [2, 3, 4, 5, 6, 8]),
    "taylorseer": ("interval", [2, 3, 4, 5, 6, 7, 8, 10]),
    "delta-dit": ("interval", [2, 3, 4, 6]),
    "fastcache": ("sigma_scale", [0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]),
    "fbcache": ("threshold", [0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48]),
    "teacache": ("threshold", [0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6]),
    "magcache": ("threshold", [0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6]),
}
DEFAULT_POLICIES = ["fora:level=stack", "fastcache", "fbcache", "teacache", "magcache", "taylorseer:level=stack"]


def default_policies(plan: Any) -> list[str]:
    """The policies a graph compiled --for some policies was made for (each with its options, its knob swept),
    else DEFAULT_POLICIES."""
    compiled = [name for name in plan.compiled_for if name in KNOBS]
    return compiled or DEFAULT_POLICIES


@dataclass
class Point:
    policy: str  # the full spec that ran, e.g. "fbcache:threshold=0.08"
    name: str  # the spec it sweeps, e.g. "fbcache"
    knob: str | None
    value: Any
    wall_seconds: float
    speedup: float
    mac_ideal: float
    psnr: float
    ssim: float
    accuracy: float | None
    holds: bool


@dataclass
class TuneResult:
    model: str
    target_psnr: float
    baseline_seconds: float
    baseline_accuracy: float | None
    points: list[Point] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # policy -> why it could not run on this graph

    def best(self) -> dict[str, Point | None]:
        out: dict[str, Point | None] = {}
        for p in self.points:
            out.setdefault(p.name, None)
            current = out[p.name]
            if p.holds and (current is None or p.speedup > current.speedup):
                out[p.name] = p
        return out


def settings(spec: str) -> list[str]:
    """The specs to try for `spec`: its knob swept, unless the spec fixes the knob itself."""
    name, options = parse_policy_spec(spec)
    if name not in KNOBS:
        raise FcpassError(f"fcpass tune has no knob for policy {name!r}; tune one of {', '.join(KNOBS)}")
    knob, values = KNOBS[name]
    if knob in options:
        return [spec]
    prefix = spec + ("," if ":" in spec else ":")
    return [f"{prefix}{knob}={v}" for v in values]


def tune(denoiser: Any, setup: SamplingSetup, policies: list[str], target_psnr: float, repeats: int = 1,
         classifier: Any = None, model: str = "") -> TuneResult:
    """Sweep every policy of `policies` on `denoiser` (a CachedDenoiser whose policy is swapped)."""
    request: SampleRequest = setup.request
    scheduler_config = setup.scheduler_config

    def run(policy: str) -> SampleResult:
        denoiser.policy = make_policy(policy, **compiled_defaults(denoiser.plan, policy))
        best: SampleResult | None = None
        for _ in range(repeats):
            result = sample(denoiser, scheduler_from_config(scheduler_config), request, progress=False)
            if best is None or result.wall_seconds < best.wall_seconds:
                best = result
        assert best is not None
        return best

    def accuracy(images: np.ndarray) -> float | None:
        return classifier.accuracy(images, request.classes) if classifier is not None and request.classes else None

    base = run("none")
    result = TuneResult(model, target_psnr, base.wall_seconds, accuracy(base.images))
    specs = [(spec, s) for spec in policies for s in settings(spec)]
    misses: dict[str, int] = {}
    for spec, setting in tqdm(specs, desc="tune", unit="setting"):
        policy, options = parse_policy_spec(setting)
        if spec in result.skipped or misses.get(spec, 0) >= 2:
            continue
        try:
            got = run(setting)
        except FcpassError as exc:  # the policy cannot run on this graph (no tail region, no taylor state...)
            result.skipped[spec] = str(exc)
            log.warning("%s: skipped (%s)", spec, exc)
            continue
        q = compare_batches(base.clips(), got.clips())
        knob = KNOBS[policy][0]
        point = Point(setting, spec, knob, options.get(knob), got.wall_seconds, base.wall_seconds / got.wall_seconds,
                      base.macs_executed / max(got.macs_executed, 1), q["psnr_mean"], q["ssim_mean"],
                      accuracy(got.images), q["psnr_mean"] >= target_psnr)
        result.points.append(point)
        misses[spec] = 0 if point.holds else misses.get(spec, 0) + 1
        log.debug("%s: %.2fx, %.2f dB", setting, point.speedup, point.psnr)
    # The baseline again, so slow drift of the machine does not flatter the last policies.
    base.wall_seconds = min(base.wall_seconds, run("none").wall_seconds)
    for p in result.points:
        p.speedup = base.wall_seconds / p.wall_seconds
    result.baseline_seconds = base.wall_seconds
    return result


def table(result: TuneResult) -> str:
    """The best setting per policy as a markdown table; a digit-accuracy column where a classifier scored them."""
    acc = result.baseline_accuracy
    columns = ["policy", "best setting", "speedup", "MAC-ideal", "PSNR dB", "SSIM"] + (["digit acc"] if acc is not None else [])
    blank = " |" * (len(columns) - 2)
    lines = [
        f"Fastest setting per policy at >= {result.target_psnr:g} dB mean PSNR against the uncached samples "
        f"({Path(result.model).name}; speedup = the same graph with every region computing, "
        f"{result.baseline_seconds:.3f} s, over the policy's wall time"
        + (f"; uncached digit accuracy {acc:.2f})" if acc is not None else ")"),
        "",
        "| " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * (len(columns) - 2),
    ]
    for name, p in result.best().items():
        if p is None:
            lines.append(f"| {name} | none holds the target |{blank}")
            continue
        row = [name, f"`{p.policy}`", f"{p.speedup:.2f}x", f"{p.mac_ideal:.2f}x", f"{p.psnr:.2f}", f"{p.ssim:.4f}"]
        if acc is not None:
            row.append(f"{p.accuracy:.2f}" if p.accuracy is not None else "")
        lines.append("| " + " | ".join(row) + " |")
    for spec, why in result.skipped.items():
        lines.append(f"| {spec} | not run: {why} |{blank}")
    for name, p in result.best().items():
        if p is not None and _at_sweep_end(result, p):
            lines.append(f"\n{name}: its fastest holding setting is the sweep's most aggressive ({p.knob}={p.value}); "
                         f"fix a larger {p.knob} in the spec, or loosen its other options, to look further.")
    return "\n".join(lines) + "\n"


def _at_sweep_end(result: TuneResult, point: Point) -> bool:
    """Whether `point` is the last value its policy's knob was swept through (not a value the spec fixed)."""
    swept = [p for p in result.points if p.name == point.name]
    grid = KNOBS.get(parse_policy_spec(point.policy)[0], (None, []))[1]
    return len(swept) > 1 and bool(grid) and point.value == grid[-1]


def plot(curves: dict[str, list[tuple[float, float]]], target_psnr: float, path: Path, title: str) -> None:
    """Speedup against PSNR, one curve per method; the uncached run is the point (1x, identical)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    # Near-identical settings (PSNR far above the target) sit on the top edge: the region of
    # interest is around the target.
    top = target_psnr + 15
    low = min([q for pts in curves.values() for _, q in pts] + [target_psnr])
    colors = plt.get_cmap("tab20").colors
    for i, (label, pts) in enumerate(curves.items()):  # points in sweep order: conservative -> aggressive
        style = "--" if label.startswith("diffusers") else "-"
        ax.plot([s for s, _ in pts], [min(q, top) for _, q in pts], style, marker="o", ms=3, label=label,
                color=colors[i % len(colors)])
    ax.plot([1.0], [top], marker="*", ms=14, color="black", linestyle="none", label="uncached (identical)")
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


def curves_of(result: TuneResult) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    for p in result.points:
        curves.setdefault(p.name, []).append((p.speedup, p.psnr))
    return curves


def to_json(result: TuneResult) -> dict[str, Any]:
    return {**asdict(result), "best": {k: (asdict(v) if v else None) for k, v in result.best().items()}}
