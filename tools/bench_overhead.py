"""What the cache machinery costs when nothing is skipped: original graph vs compiled graph, all computing.

    python tools/bench_overhead.py --arch dit-s-2 --image-size 256 --iters 10

Exports the architecture (random weights, legacy exporter), compiles it with every region set
(blocks, tail, stack), and times one graph call of each on ONNX Runtime CPU, alternating the two
so machine load hits both alike. Prints the per-call times and the ratio compiled / original, for
the bare graph call (every output back to the host) and for a sampler step as `fcpass sample` runs
it (policy `none`: the cache state bound where the session runs, the host's bookkeeping included;
the uncached step is called through I/O binding too, as `fcpass sample` calls it).

Alternating single calls puts the other session's data in the caches at the start of every call,
which overstates small host work. `--runs P` therefore also times P pairs of whole sampling runs
(`--samples` classes x `--steps` DDIM steps, guidance 1.5, the order alternated from pair to pair)
and prints the median ratio of the pairs with its quartiles: what a user of `fcpass sample` sees.
`--no-exports` also times the compiled graph with its state outputs dropped (every `If` and gate
still in it): the part of the overhead that is the cache state's export. `--no-gates` also times it
with each region's gate replaced by the gate's forced branch (right only for forced regions, which
is what these calls run): the part that is the gates' `If`s. `--no-ifs` replaces each region's `If`
by its compute branch as well: the forced path with no `If` left on it. `--processes P` runs the
whole benchmark in P fresh processes and prints each ratio's median and quartiles over them.
`--inline SETS` times, in place of the compiled graph, the compiled graph with those region sets'
gates and `If`s replaced by the branch a forced compute takes: what the forced path would cost without
them, measured as the compiled graph is (sessions sharing a process slow each other, so a variant
timed alongside the compiled graph reads differently from one timed in its place). `--pass-ifs K`
times, in its place too, the compiled graph with K more `If`s on the skipped stack's path, each
passing the stack's output through: what a flattened nesting would add to a skipped stack, where
every nested region's gate and `If` would still run. `--against ARGS` (with `--processes P`)
alternates the P processes with P of the same benchmark plus ARGS and prints, per ratio, both
medians and the paired difference: the machine's state moves a whole batch of processes by more
than the effects it compares, and alternating cancels that.

With the stack among the regions, a skipped step is timed too: the stack skipped under each
approximation the graph holds (`--taylor` adds taylor1), against the original graph's call. What a
skipped step costs caps a stack-level policy's speedup: with a share s of steps skipped at cost c
of a full step, the speedup is 1 / (1 - s + s c).

With --motion-ratio RHO (and --regions including stack) the graph also holds FastCache's motion
tokens, and a third call is timed: a motion step (fc_motion = 1: the blocks on ceil(RHO N) tokens,
the rest approximated), with its MAC-ideal speedup over the original (`plan.motion`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from fcpass.compiler.passes.bool_where import rewrite_bool_where
from fcpass.compiler.passes.cache_regions import region_if_name
from fcpass.compiler.passes.inline_gates import gate_name, inline_ifs
from fcpass.contract.onnx_io import save_model
from fcpass.contract.plan import read_plan, write_plan
from fcpass.contract.plan import (
    APPROX_MIX,
    CTL_INPUT,
    CTL_SKIP,
    MIX_INPUT,
    MIX_WIDTH,
    MOTION_INPUT,
    SKIP_OUTPUT,
    STAT_OUTPUT,
    THR_INPUT,
    read_plan,
)
from fcpass.contract.roles import graph_inputs
from fcpass.export import ExportSpec, export
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import load_denoiser
from models.digits import SCHEDULER_CONFIG
from runtimes.backend import OrtBackend
from runtimes.policies import taylor1_mix
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config

log = logging.getLogger("bench_overhead")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dit-s-2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--model", type=Path, help="an exported graph instead of --arch")
    ap.add_argument("--regions", default="blocks,tail,stack")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    ap.add_argument("--taylor", action="store_true", help="compile with --taylor (and time a taylor1 skip)")
    ap.add_argument("--motion-ratio", type=float, help="also time a motion step with this token ratio")
    ap.add_argument("--motion-context", action="store_true", help="the motion tokens attend to cached keys and values")
    ap.add_argument("--runs", type=int, default=0, help="also time this many pairs of whole sampling runs")
    ap.add_argument("--no-probes", dest="probes", action="store_false",
                    help="compile without FBCache's and TeaCache's statistics, as fcpass optimize --no-probes")
    ap.add_argument("--no-exports", action="store_true",
                    help="also time the compiled graph without the state it exports (what those exports cost)")
    ap.add_argument("--no-gates", action="store_true",
                    help="also time the compiled graph with each region's gate replaced by its forced branch")
    ap.add_argument("--no-ifs", action="store_true",
                    help="also time the compiled graph with each region's gate and If replaced by the branch a "
                         "forced compute takes (no If left on that path)")
    ap.add_argument("--inline", metavar="SETS",
                    help="time the compiled graph with these region sets' (comma-separated) gates and Ifs replaced by "
                         "their forced branch, in place of the compiled graph")
    ap.add_argument("--pass-ifs", type=int, default=0, metavar="K",
                    help="time the compiled graph with K pass-through Ifs on the skipped stack's path, in its place")
    ap.add_argument("--against", metavar="ARGS",
                    help="with --processes P: alternate the P processes with P more run with ARGS added, and compare")
    ap.add_argument("--samples", type=int, default=2, help="samples per sampling run (--runs)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per sampling run (--runs)")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the whole benchmark in this many fresh processes and print each ratio's median over them")
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)  # one process's ratios, for --processes
    args = _parsed(ap, sys.argv[1:])
    if args.against is not None:
        if not shlex.split(args.against):
            ap.error("--against needs the options to add, e.g. --against='--inline stack,tail'")
        argv = _without_option(sys.argv[1:], "--against")
        against = [*argv, *shlex.split(args.against)]
        _parsed(ap, against)  # refuse a bad variant before the first process runs
        compare_processes(argv, against, args.processes)
        return
    if args.processes > 1:
        across_processes(sys.argv[1:], args.processes)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = measure(args)
    if args.json_out:
        args.json_out.write_text(json.dumps(found))


def _parsed(ap: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`argv` parsed and checked; exits with `ap`'s usage error where the options do not go together."""
    args = ap.parse_args(argv)
    if args.processes < 1:
        ap.error(f"--processes {args.processes} must be at least 1")
    args.inline = args.inline.split(",") if args.inline else []
    unknown = set(args.inline) - set(args.regions.split(","))
    if unknown:
        ap.error(f"--inline {','.join(args.inline)}: {', '.join(sorted(unknown))} not among --regions {args.regions}")
    if args.inline and args.motion_ratio is not None:
        ap.error("--inline times the forced path only; drop --motion-ratio")
    if args.pass_ifs < 0:
        ap.error(f"--pass-ifs {args.pass_ifs} must be at least 0")
    if args.pass_ifs and ("stack" not in args.regions.split(",") or "stack" in args.inline):
        ap.error("--pass-ifs needs a stack that can skip: --regions with stack, and no --inline stack")
    return args


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Compile, time, print the table; returns every ratio printed, by its label."""
    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            src = Path(tmp) / "model.onnx"
            export(ExportSpec(args.arch, args.image_size, exporter="legacy"), src)
        fc = Path(tmp) / "model.fc.onnx"
        options = OptimizeOptions(regions=tuple(args.regions.split(",")), taylor=args.taylor, motion_ratio=args.motion_ratio,
                                  motion_context=args.motion_context, probes=args.probes and not args.motion_context)
        optimize(src, fc, options, None)  # localizes weights too
        if args.inline:  # a graph that computes those regions whatever it is fed: no skipped stack is timed then
            fc = _forced_inlined(fc, read_plan(onnx.load(str(fc), load_external_data=False)), Path(tmp) / "model.inlined.onnx",
                                 ifs=True, sets=args.inline)
        if args.pass_ifs:
            fc = _with_pass_ifs(fc, read_plan(onnx.load(str(fc), load_external_data=False)), Path(tmp) / "model.pass.onnx",
                                args.pass_ifs)
        # One session per graph for both the bare calls and the sampler steps: more sessions would
        # evict each other's weights from the cache between calls.
        steps = {key: load_denoiser(path, policy, {}, threads=args.threads or None)
                 for key, path, policy in (("original step", _loadable(src, Path(tmp)), None),
                                           ("compiled step", fc, "none"))}
        base, comp = (den.backend for den in steps.values())
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in graph_inputs(base.model):
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            feeds[spec.name] = (rng.integers(0, 10, shape) if np.issubdtype(spec.dtype, np.integer)
                                else rng.standard_normal(shape)).astype(spec.dtype)
        plan = read_plan(comp.model)
        r = len(plan.regions)
        comp_feeds = {**feeds, CTL_INPUT: np.zeros(r, np.int64), THR_INPUT: np.zeros(r, np.float32),
                      MIX_INPUT: np.zeros((r, MIX_WIDTH), np.float32)}
        comp_feeds.update({s.name: rng.standard_normal([int(d) for d in s.shape]).astype(s.dtype) for s in plan.states})
        calls = [("original", lambda: base.run(feeds)), ("compiled, all computing", lambda: comp.run(comp_feeds))]
        if args.no_exports:
            bare = _without_state_outputs(fc, plan, Path(tmp) / "model.bare.onnx")
            bare_backend = OrtBackend(bare, threads=args.threads or None)
            calls.append(("compiled, no state export", lambda: bare_backend.run(comp_feeds)))
        for flag, key, stem, ifs in ((args.no_gates, "compiled, no region gate", "ungated", False),
                                     (args.no_ifs, "compiled, no region If", "flat", True)):
            if flag:
                inlined = OrtBackend(_forced_inlined(fc, plan, Path(tmp) / f"model.{stem}.onnx", ifs),
                                     threads=args.threads or None)
                calls.append((key, lambda backend=inlined: backend.run(comp_feeds)))
        if plan.motion:
            comp_feeds[MOTION_INPUT] = np.array(0, np.int64)
            motion_feeds = {**comp_feeds, MOTION_INPUT: np.array(1, np.int64)}
            calls.append(("compiled, motion step", lambda: comp.run(motion_feeds)))
        for den in steps.values():
            den.reset(args.iters + 2)
        calls += [(key, lambda den=den: den(feeds, 0)) for key, den in steps.items()]
        skips = {} if "stack" in args.inline else _skip_feeds(plan, comp_feeds)
        skipped = [(f"skipped stack, {approx}", lambda f=f: comp.run(f)) for approx, f in skips.items()]
        times: dict[str, list[float]] = {name: [] for name, _ in calls + skipped}
        for _ in range(2):  # warm-up
            for _, call in calls + skipped:
                call()
        for i in range(args.iters):
            # The skipped calls take turns to follow the full ones, whose data the first finds in the caches.
            j = i % max(len(skipped), 1)
            for name, call in calls + skipped[j:] + skipped[:j]:
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        runs = sampling_ratios(steps["original step"], steps["compiled step"], args) if args.runs else []
    med = {k: float(np.median(v)) * 1000 for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        # The median of per-round ratios: the calls of one round are adjacent in time, so the machine's
        # drift in speed cancels in each ratio.
        return float(np.median(np.asarray(times[a]) / np.asarray(times[b])))
    label = args.model.name if args.model else f"{args.arch} at {args.image_size}x{args.image_size}"
    print(f"{label}, batch {feeds[next(iter(feeds))].shape[0]}, {r} regions ({args.regions}), ONNX Runtime "
          f"{base.provider}, median of {args.iters} calls each, alternated; ratios: median of the per-round ratios:")
    for k, v in med.items():
        print(f"  {k:<26} {v:9.2f} ms")
    found: dict[str, float] = {}

    def show(key: str, value: float, note: str = "") -> None:
        found[key] = value
        print(f"  {key:<26} {value:9.3f}{'  ' + note if note else ''}")
    show("compiled / original", ratio("compiled, all computing", "original"))
    if args.no_exports:
        show("no state export / original", ratio("compiled, no state export", "original"),
             "(the same graph, its state outputs dropped)")
    if args.no_gates:
        show("no region gate / original", ratio("compiled, no region gate", "original"),
             "(the same graph, each region's gate replaced by its forced branch)")
    if args.no_ifs:
        show("no region If / original", ratio("compiled, no region If", "original"),
             "(the same graph, each region's gate and If replaced by its forced-compute branch)")
    show("sampler step, policy none", ratio("compiled step", "original step"), "(compiled / original)")
    if runs:
        q1, q2, q3 = np.percentile(runs, [25, 50, 75])
        show("sampling runs, policy none", float(q2), f"(compiled / original wall time, median of {len(runs)} pairs of "
             f"{args.samples} samples x {args.steps} steps; quartiles {q1:.3f}-{q3:.3f})")
    for approx in skips:
        show(f"skipped stack, {approx}", 1 / ratio("original", f"skipped stack, {approx}"),
             "(of the original call: what a stack-level policy's skipped step costs)")
    if plan.motion:
        stack = plan.region(plan.motion["region"])
        ideal = plan.uncached_macs / (plan.uncached_macs - stack.macs + plan.motion["macs"])
        speedup = ratio("original", "compiled, motion step")
        found["motion step speedup"] = speedup
        print(f"  motion step (k = {plan.motion['k']} of {plan.motion['tokens']}"
              f"{', cached keys and values' if plan.motion.get('context') else ''}): speedup {speedup:.2f}x, "
              f"MAC-ideal {ideal:.2f}x, realised/ideal {speedup / ideal:.2f}")
    return found


def across_processes(argv: list[str], processes: int) -> None:
    """Run this benchmark in `processes` fresh processes, one after another, and print each ratio's median
    and quartiles over them.

    Where ONNX Runtime places a session's weights and buffers is fixed for the life of a process and
    moves the ratios of one process by +-1% on the bundled model (the same two graphs read 1.015 to
    1.035 in eight processes): a single process cannot resolve effects of that size.
    """
    per_key = _run_processes([argv] * processes, "processes")[0]
    print(f"median over {processes} processes (quartiles):")
    for key, values in per_key.items():
        q1, q2, q3 = np.percentile(values, [25, 50, 75])
        print(f"  {key:<26} {q2:9.3f}  ({q1:.3f}-{q3:.3f})")


def compare_processes(argv: list[str], against: list[str], pairs: int) -> None:
    """Run `argv` and `against` in `pairs` pairs of fresh processes, the order alternated from pair to pair,
    and print per ratio both medians and the median of the paired differences (`argv` minus `against`)
    with the number of pairs in which `argv` reads higher."""
    runs = [cmd for i in range(pairs) for cmd in ((argv, against) if i % 2 == 0 else (against, argv))]
    a, b = _run_processes(runs, "processes", keys=[tuple(argv), tuple(against)])
    extra = " ".join(against[len(argv):])
    print(f"{pairs} pairs of processes, alternated; A: as given, B: with {extra}; median (quartiles):")
    for key in [k for k in a if k in b]:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        d = x - y
        qa, qb = np.percentile(x, [25, 50, 75]), np.percentile(y, [25, 50, 75])
        print(f"  {key:<26} A {qa[1]:.3f} ({qa[0]:.3f}-{qa[2]:.3f})  B {qb[1]:.3f} ({qb[0]:.3f}-{qb[2]:.3f})  "
              f"A - B {np.median(d):+.4f}, A higher in {int((d > 0).sum())} of {len(d)}")


def _run_processes(runs: list[list[str]], desc: str, keys: list[tuple[str, ...]] | None = None,
                   ) -> list[dict[str, list[float]]]:
    """Run the benchmark once per argv in `runs`, each in a fresh process; per distinct argv in `keys`
    (default: the one argv), each ratio's values in run order."""
    keys = keys or [tuple(runs[0])]
    found: list[dict[str, list[float]]] = [{} for _ in keys]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ratios.json"
        for i, argv in enumerate(tqdm(runs, desc=desc, unit="process")):
            child = [sys.executable, __file__, *argv, "--processes", "1", "--json-out", str(out)]
            done = subprocess.run(child, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"bench_overhead: process {i + 1} ({' '.join(argv)}) failed:\n{done.stderr.strip()}")
            if i < len(keys):
                tqdm.write(done.stdout.split("\n", 1)[0])
            for key, value in json.loads(out.read_text()).items():
                found[keys.index(tuple(argv))].setdefault(key, []).append(value)
    return found


def _without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (given as `option VALUE` or `option=VALUE`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _skip_feeds(plan: Any, feeds: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per approximation the graph holds, feeds that skip the stack with it (none without a stack)."""
    if not any(r.name == "stack" for r in plan.regions):
        return {}
    k = plan.region("stack").index
    taylor = any(s.kind == "prev" for s in plan.states)
    out = {}
    for approx, row in APPROX_MIX.items():
        if approx == "taylor1" and not taylor:
            continue
        ctl, mix = feeds[CTL_INPUT].copy(), feeds[MIX_INPUT].copy()
        ctl[k] = CTL_SKIP
        mix[k] = taylor1_mix(2, [0, 1]) if approx == "taylor1" else row  # one interval past the last two computed
        out[approx] = {**feeds, CTL_INPUT: ctl, MIX_INPUT: mix}
    return out


def _without_state_outputs(path: Path, plan: Any, out: Path) -> Path:
    """The compiled graph with only the model's outputs, the statistics and the decisions as outputs."""
    model = onnx.load(str(path))
    keep = {*plan.outputs, STAT_OUTPUT, SKIP_OUTPUT}
    outputs = [o for o in model.graph.output if o.name in keep]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    write_plan(model, read_plan(model))  # stamped for the edited graph: the bench edits it on purpose
    onnx.save(model, str(out))
    return out


def _forced_inlined(path: Path, plan: Any, out: Path, ifs: bool, sets: list[str] | None = None) -> Path:
    """The compiled graph with every region's gate (not the approximations' gates) replaced by its
    else-branch, and with `ifs` every region's `If` by its compute branch too: what a forced region
    would run without them. `sets` limits both to the regions of those region sets."""
    regions = [r for r in plan.regions if sets is None or r.region_set in sets]
    names = {gate_name(r.name) for r in regions} | ({region_if_name(r.name) for r in regions} if ifs else set())
    model = onnx.load(str(path))
    inline_ifs(model.graph, lambda node: "else_branch" if node.op_type == "If" and node.name in names else None, prune=False)
    write_plan(model, read_plan(model))  # stamped for the edited graph: the bench edits it on purpose
    onnx.save(model, str(out))
    return out


def _with_pass_ifs(path: Path, plan: Any, out: Path, k: int) -> Path:
    """The compiled graph with `k` `If`s after the stack's skip branch computes the stack's first output,
    each passing it through (an Identity in either branch, on the stack's decision): the `If`s a
    flattened nesting would run on a skipped stack, where the nested regions would still be reached."""
    model = onnx.load(str(path))
    stack_if = next(n for n in model.graph.node if n.name == region_if_name("stack"))
    skip = next(a.g for a in stack_if.attribute if a.name == "then_branch")
    value = skip.output[list(stack_if.output).index(plan.region("stack").outputs[0])]
    elem = value.type.tensor_type.elem_type
    x = value.name + ".pass"
    for node in skip.node:
        node.output[:] = [x if o == value.name else o for o in node.output]
    for j in range(k):
        y = value.name if j == k - 1 else f"{value.name}.pass{j}"
        branches = {f"{tag}_branch": helper.make_graph([helper.make_node("Identity", [x], [f"{y}.{tag}"])], f"pass{j}_{tag}", [],
                                                        [helper.make_tensor_value_info(f"{y}.{tag}", elem, None)])
                    for tag in ("then", "else")}
        skip.node.append(helper.make_node("If", ["fc.stack.cond"], [y], name=f"fc/pass{j}", **branches))
        x = y
    write_plan(model, read_plan(model))  # stamped for the edited graph: the bench edits it on purpose
    onnx.save(model, str(out))
    return out


def _loadable(src: Path, tmp: Path) -> Path:
    """`src`, or where it holds a bool `Where` (ONNX Runtime's CPU kernels have none, so it does not load) a copy
    that computes it with And/Or/Not, as the compiled graph does: the original's own nodes otherwise."""
    model = onnx.load(str(src))
    if not rewrite_bool_where(model).modified:
        return src
    log.warning("%s holds a bool Where that ONNX Runtime's CPU kernels lack: timing the original with it as "
                "And/Or/Not, as fcpass optimize compiles it", src.name)
    return save_model(model, tmp / "original.and_or_not.onnx")


def sampling_ratios(original: Any, compiled: Any, args: argparse.Namespace) -> list[float]:
    """Per pair of whole sampling runs, compiled / original wall time; the order alternates by pair."""
    request = SampleRequest(classes=[i % 10 for i in range(args.samples)], steps=args.steps, guidance_scale=1.5,
                            uncond_class=10)
    scheduler = scheduler_from_config(SCHEDULER_CONFIG)

    def wall(den: Any) -> float:
        return sample(den, scheduler, request, progress=False).wall_seconds

    wall(original), wall(compiled)  # warm-up
    ratios = []
    for pair in range(args.runs):
        if pair % 2:
            c, o = wall(compiled), wall(original)
        else:
            o, c = wall(original), wall(compiled)
        ratios.append(c / o)
    return ratios


if __name__ == "__main__":
    main()
