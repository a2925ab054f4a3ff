"""What a token-level conservative step costs and saves: time and peak activation memory, one graph call.

    python tools/bench_tokens.py --arch dit-s-2 --image-size 256 --iters 10

Exports the architecture (random weights, legacy exporter, batch 2), compiles it with token-level
caching (`--tokens duca`: DuCa's k schedule, V-norm scores; `--regions stack` by default, the fewest
regions a token graph can have) and times one denoiser call of each, alternated in --iters rounds
(times: the median per call; speedups: the median of the per-round ratios, which cancels the
machine's drift in speed):
  original       the exported graph;
  full           the compiled graph, fc_tok all 0 (every block runs its original nodes);
  conservative   fc_tok all 1 (attention reused, the MLP on the top-k tokens, scattered into its cache);
  local_only     fc_tok all 2 (attention computed, the MLP on the top-k tokens).
Every call is made as the sampler makes it: through ONNX Runtime's I/O binding (`runtimes.state`), the
cache state bound where it lives, only the model output fetched. Each token mode has its own state,
filled by one full step on the same inputs, so a conservative step's output equals the full step's
(checked) and its caches are real ones; its timed calls are further steps of that mode.

MAC-ideal speedup of a mode: the plan's uncached MACs over the MACs the mode still runs (uncached minus
each block's saving recorded in `plan.tokens`, as `runtimes.cache.CachedDenoiser` counts them); TopK,
gathers and scatters count no MACs. realised/ideal divides the measured speedup by it.

What the kernels give at k rows ("token-local branches alone"): every block's token-local branches (the
MLP: its LayerNorm, modulation, fc1, activation, fc2) are cut out of the exported graph into one graph,
fed the activations the exported graph computes for them, and timed on the first k tokens (the k a
conservative step recomputes) against all N, alternated, in a session with the same settings. Its
realised/ideal is how far ONNX Runtime's kernels fall short of their MAC ratio at k rows on this
machine, before any gather, scatter, selection, gate or residual: roughly the best the conservative
step's realised/ideal can be, since those branches are most of its MACs.

Peak activation memory ("peak added"): each of original / full / conservative runs in a fresh
subprocess (`--child`, glibc's mmap threshold fixed at 64 KiB so that every tensor-sized allocation is
its own mapping and leaves the resident set when freed). It loads the session and the feeds, calls
`malloc_trim`, reads VmRSS, resets the kernel's resident high-water mark (/proc/self/clear_refs, 5),
runs --mem-iters calls of that one mode (each call's outputs freed before the next) and reports
VmHWM - VmRSS: the most resident memory one call adds on top of weights and feeds. That is the call's
intermediate tensors plus its outputs; for the compiled graph the outputs include the next cache state
(printed, the same in every token mode). Two settings:
  arena off  `enable_cpu_mem_arena = False` and one call of that mode before the reading: the live
             allocations of a steady-state call;
  arena on   ORT's default, read before the first call: how far the CPU arena grows (ORT extends it
             in power-of-two chunks and keeps it, so this rounds up and includes first-call buffers).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fcpass.compiler.branches import branches_of
from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.graphinfo import GraphIndex
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import (
    CTL_INPUT,
    MIX_INPUT,
    MIX_WIDTH,
    SKIP_OUTPUT,
    THR_INPUT,
    TOK_INPUT,
    TOK_RAND_INPUT,
    CachePlan,
    read_plan,
)
from fcpass.contract.roles import graph_inputs, infer_roles
from fcpass.export import ExportSpec, export
from fcpass.optimize import OptimizeOptions, optimize
from runtimes.backend import OrtBackend, open_session, session_setup
from runtimes.state import Commit

log = logging.getLogger("bench_tokens")

MODES = {"full": 0, "conservative": 1, "local_only": 2}  # fc_tok value of every block


@dataclass
class MemResult:
    """MiB, from /proc/self/status in a `--child` process."""

    mode: str
    arena: bool
    loaded_mb: float  # VmRSS before the measured calls (session, feeds and, arena off, one call made)
    peak_mb: float  # VmHWM during the measured calls minus loaded_mb
    retained_mb: float  # VmRSS after the calls minus loaded_mb


def saved_macs(plan: CachePlan, mode: int) -> int:
    """MACs a token mode saves over the whole graph, as `runtimes.cache.CachedDenoiser` counts them."""
    if mode == 0:
        return 0
    blocks = plan.tokens["blocks"]
    saved = sum(b["macs"] - b["conservative_macs"] for b in blocks)
    return saved - (sum(b["mixing_macs"] for b in blocks) if mode == 2 else 0)


def mac_ideal(plan: CachePlan, mode: int) -> float:
    return plan.uncached_macs / (plan.uncached_macs - saved_macs(plan, mode))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def session(graph: Path | onnx.ModelProto, threads: int, arena: bool = True, profile: str | None = None) -> Any:
    """A CPU session of a graph file or an in-memory model, warnings off."""
    ort, opts, providers = session_setup(["cpu"], threads or None)
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    if isinstance(graph, onnx.ModelProto):
        return ort.InferenceSession(graph.SerializeToString(), opts, providers=providers)
    return open_session(ort, graph, opts, providers, "re-export the model")


def run_child(args: argparse.Namespace) -> None:
    """One graph, one mode, a fresh process: print the memory it added as one JSON line."""
    with np.load(args.feeds) as z:
        feeds = {k: np.array(z[k]) for k in z.files}
    if args.child == "original":
        feeds = {k: v for k, v in feeds.items() if not k.startswith("fc")}
    else:
        feeds[TOK_INPUT] = np.full_like(feeds[TOK_INPUT], MODES[args.child])
    arena = args.arena == "on"
    sess = session(args.graph, args.threads, arena=arena)
    if not arena:  # one call first, so that one-time allocations (thread buffers, ORT's memory patterns) are made
        sess.run(None, feeds)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages go back to the kernel: RSS counts live memory
    loaded = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: forget session creation's peak
    out = None
    for _ in range(args.mem_iters):
        out = None  # the previous call's outputs are freed before the next call, as in a step loop
        out = sess.run(None, feeds)
    del out
    res = MemResult(args.child, arena, loaded / 1024, (_status_kb("VmHWM") - loaded) / 1024,
                    (_status_kb("VmRSS") - loaded) / 1024)
    print(json.dumps(res.__dict__))


def measure_memory(mode: str, graph: Path, feeds: Path, arena: bool, args: argparse.Namespace) -> MemResult:
    cmd = [sys.executable, __file__, "--child", mode, "--graph", str(graph), "--feeds", str(feeds),
           "--arena", "on" if arena else "off", "--mem-iters", str(args.mem_iters), "--threads", str(args.threads)]
    # A fixed mmap threshold: every allocation of 64 KiB or more is its own mapping, returned to the kernel
    # when freed, so resident memory follows the live tensors (glibc otherwise keeps freed ones resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    return MemResult(**json.loads(out))


RUN = "(session run, wall)"
NODES = "(nodes run, If included)"
SUMMARY = (RUN, NODES)


def op_times(profile_json: str, calls: int) -> dict[str, float]:
    """ms per call by op type from an ORT profile, the whole run under RUN and the nodes run per call under NODES.

    If is left out: its kernel time includes the kernels of its branches, which are listed themselves.
    """
    total: dict[str, float] = defaultdict(float)
    for ev in json.loads(Path(profile_json).read_text()):
        if ev.get("cat") == "Session" and ev["name"] == "model_run":
            total[RUN] += ev["dur"] / 1000 / calls
        elif ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            total[NODES] += 1 / calls
            if op != "If":
                total[op] += ev["dur"] / 1000 / calls
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def profile_modes(src: Path, fc: Path, feeds: dict[str, np.ndarray], modes: list[str], args: argparse.Namespace,
                  tmp: str) -> dict[str, dict[str, float]]:
    """Kernel ms per call by op type of each call kind, from ORT's profiler (a fresh session each)."""
    calls = max(3, args.iters // 2) + 1
    per_mode = {}
    modes = ["original", *modes]
    for mode in modes:
        sess = session(src if mode == "original" else fc, args.threads, profile=str(Path(tmp) / f"prof_{mode}"))
        if mode == "original":
            f = {k: v for k, v in feeds.items() if not k.startswith("fc")}
        else:
            f = {**feeds, TOK_INPUT: np.full_like(feeds[TOK_INPUT], MODES[mode])}
        for _ in range(calls):  # the first call (warm-up) is profiled and counted too
            sess.run(None, f)
        per_mode[mode] = op_times(sess.end_profiling(), calls)
    return per_mode


def print_profile(per_mode: dict[str, dict[str, float]], top: int) -> None:
    modes = list(per_mode)
    ops = sorted({op for t in per_mode.values() for op in t if op not in SUMMARY},
                 key=lambda op: -max(t.get(op, 0) for t in per_mode.values()))
    print("\nONNX Runtime profiler, kernel ms per call by op type (If left out: it includes its branches' kernels):\n")
    print("| op | " + " | ".join(modes) + " |\n|---|" + "---:|" * len(modes))
    for op in ops[:top]:
        print(f"| {op} | " + " | ".join(f"{per_mode[m].get(op, 0):.2f}" for m in modes) + " |")
    kernels = {m: sum(v for op, v in t.items() if op not in SUMMARY) for m, t in per_mode.items()}
    print("| **all kernels** | " + " | ".join(f"{kernels[m]:.2f}" for m in modes) + " |")
    print(f"| {RUN} | " + " | ".join(f"{per_mode[m].get(RUN, 0):.2f}" for m in modes) + " |")
    print(f"| {NODES} | " + " | ".join(f"{per_mode[m].get(NODES, 0):.0f}" for m in modes) + " |")


def median_ratio(num: list[float], den: list[float]) -> float:
    """The median of per-round ratios num[i] / den[i]: the calls of one round are adjacent in time, so
    the machine's drift in speed (tens of percent over a minute on a shared host) cancels in each ratio."""
    return float(np.median(np.asarray(num) / np.asarray(den)))


@dataclass
class LocalBranches:
    """The token-local branches alone, on all N tokens and on the k tokens a conservative step recomputes."""

    full_ms: float
    k_ms: float
    speedup: float  # median of per-round ratios, all N / k rows
    mac_ratio: float  # sum over branches of N / sum of k: their MACs scale with the rows they run on


def _from_constants(index: GraphIndex, name: str) -> list[int] | None:
    """The nodes (Constant, Identity) that compute `name` from initializers alone, or None if it is not constant."""
    chain: list[int] = []
    while name not in index.initializers:
        p = index.producer.get(name)
        if p is None or index.nodes[p].op_type not in ("Constant", "Identity"):
            return None
        chain.append(p)
        if index.nodes[p].op_type == "Constant":
            break
        name = index.nodes[p].input[0]
    return chain


def local_branches(src: Path, plan: CachePlan, feeds: dict[str, np.ndarray]) -> tuple[
        onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every block's token-local branches (those the plan gives a k) cut out of the exported graph `src`.

    Returns the cut graph, its inputs as `feeds` make them in `src` (each branch's stream input, and the
    values it reads from the rest of the graph, such as its modulation), and the same inputs with each
    stream cut to the first k tokens of its branch. The cut graph's token axis is free, and its
    outputs are the branches' outputs (before their gates), in block order.
    """
    model = onnx.load(str(src))
    roles = infer_roles(model)
    bmap = discover_blocks(model, roles.latent.name)
    ks = {(b["block"], br["output"]): br["k"] for b in plan.tokens["blocks"] for br in b["branches"]}
    index = GraphIndex(model)
    keep: set[int] = set()
    inputs: list[str] = []
    stream_k: dict[str, int] = {}
    outputs: list[str] = []
    for split in branches_of(index, bmap.blocks, roles.latent.name):
        if isinstance(split, str):
            raise FcpassError(split)
        for br in split.local():
            if (k := ks.get((split.block, br.output))) is None:
                continue
            keep.update(br.nodes)
            produced = {o for i in br.nodes for o in index.nodes[i].output}
            for name in sorted({x for i in br.nodes for x in index.nodes[i].input} - produced - index.initializers - {""}):
                chain = _from_constants(index, name)
                if chain is not None:
                    keep.update(chain)
                elif name not in inputs:
                    inputs.append(name)
            stream_k[br.stream_in] = int(k)
            outputs.append(br.output)
    if not outputs:
        raise FcpassError("no token-local branch with a k in the plan")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs)
    full = dict(zip(inputs, session(probe, 0).run(inputs, feeds)))
    few = {name: x[:, :stream_k[name]].copy() if name in stream_k else x for name, x in full.items()}
    nodes = [index.nodes[i] for i in sorted(keep)]
    read = {x for n in nodes for x in n.input}
    typed = [onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(x.dtype),
        ["tokens" if name in stream_k and j == 1 else d for j, d in enumerate(x.shape)]) for name, x in full.items()]
    graph = onnx.helper.make_graph(nodes, "token_local_branches", typed,
                                   [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
                                   [t for t in model.graph.initializer if t.name in read])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version), full, few


def time_local_branches(src: Path, plan: CachePlan, feeds: dict[str, np.ndarray], args: argparse.Namespace) -> LocalBranches:
    """Time the token-local branches alone on all N tokens and on k, alternated, fed the activations `feeds` produce."""
    cut, full, few = local_branches(src, plan, feeds)
    sess = session(cut, args.threads)
    times: dict[str, list[float]] = {"full": [], "k": []}
    for _ in range(2):
        sess.run(None, full), sess.run(None, few)
    for _ in range(args.iters):
        for key, f in (("full", full), ("k", few)):
            t0 = time.perf_counter()
            sess.run(None, f)
            times[key].append(time.perf_counter() - t0)
    streams = [v.name for v in cut.graph.input if v.type.tensor_type.shape.dim[1].dim_param == "tokens"]
    rows = [(full[name].shape[1], few[name].shape[1]) for name in streams]
    return LocalBranches(float(np.median(times["full"])) * 1000, float(np.median(times["k"])) * 1000,
                         median_ratio(times["full"], times["k"]),
                         sum(n for n, _ in rows) / sum(k for _, k in rows))


def build_feeds(base: OrtBackend, plan: CachePlan, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The model's inputs, and the compiled graph's extra inputs with every region computing, fc_tok 0, zero state."""
    rng = np.random.default_rng(seed)
    roles = infer_roles(base.model)
    feeds: dict[str, np.ndarray] = {}
    for spec in graph_inputs(base.model):
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        if spec == roles.timestep:
            feeds[spec.name] = np.full(shape, 500, spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    r, blocks = len(plan.regions), plan.tokens["blocks"]
    extra = {CTL_INPUT: np.zeros(r, np.int64), THR_INPUT: np.zeros(r, np.float32),
             MIX_INPUT: np.zeros((r, MIX_WIDTH), np.float32), TOK_INPUT: np.zeros(len(blocks), np.int64)}
    if plan.tokens["options"].get("score") == "random":
        extra[TOK_RAND_INPUT] = rng.random((len(blocks), int(blocks[0]["tokens"])), dtype=np.float32)
    extra.update({s.name: np.zeros([int(d) for d in s.shape], s.dtype) for s in plan.states})
    return feeds, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dit-s-2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--model", type=Path, help="an exported graph instead of --arch (random weights can flatter the "
                    "original: DiT's zero-initialised adaLN layers let ONNX Runtime fold them away)")
    ap.add_argument("--regions", default="stack", help="region sets to compile around the token Ifs")
    ap.add_argument("--tokens", default="duca", choices=["duca", "toca"], help="k schedule")
    ap.add_argument("--modes", default="full,conservative,local_only", help="token modes to time")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    ap.add_argument("--mem-iters", type=int, default=3, help="calls per memory subprocess")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    ap.add_argument("--also", type=Path, metavar="GRAPH.fc.onnx",
                    help="also time the token modes of this graph (the same model compiled with --tokens by another "
                    "fcpass version or with other options), alternated with the rest: a comparison the machine's "
                    "drift in speed does not blur")
    ap.add_argument("--profile", action="store_true", help="also print ORT kernel time by op type, and the nodes run, per mode")
    ap.add_argument("--profile-top", type=int, default=14)
    ap.add_argument("--child", choices=["original", *MODES], help=argparse.SUPPRESS)
    ap.add_argument("--graph", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--feeds", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--arena", default="on", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        src, fc = Path(tmp) / "model.onnx", Path(tmp) / "model.fc.onnx"
        if args.model is None:
            export(ExportSpec(args.arch, args.image_size, exporter="legacy"), src)
        else:
            src = args.model
        plan = optimize(src, fc, OptimizeOptions(regions=tuple(args.regions.split(",")), tokens=args.tokens), None)
        base, comp = OrtBackend(src, threads=args.threads or None), OrtBackend(fc, threads=args.threads or None)
        feeds, extra = build_feeds(base, plan, seed=0)
        reference = base.run(feeds)[plan.outputs[0]]
        first = comp.run({**feeds, **extra})  # a full step from zero state: its caches feed every timed call
        log.info("full step vs original graph: max abs diff %.3g", np.abs(first[plan.outputs[0]] - reference).max())
        comp_feeds = {**feeds, **Commit(plan)(extra, first, first[SKIP_OUTPUT], extra[TOK_INPUT])}
        output = plan.outputs[0]
        # Timed as the sampler calls: I/O binding, the state bound where it lives and never fed or fetched.
        calls: dict[str, Callable[[], dict[str, np.ndarray]]] = {"original": partial(base.bound_call(), feeds, [output])}
        graphs = [("", comp, plan)]  # (name in the table, backend, plan): this run's graph, then --also's
        if args.also:
            other = OrtBackend(args.also, threads=args.threads or None)
            other_plan = read_plan(other.model, str(args.also))
            if not other_plan.tokens:
                raise SystemExit(f"error: {args.also} has no token caching; compile it with --tokens")
            graphs.append((args.also.name, other, other_plan))
        for name, backend, graph_plan in graphs:
            tag = f"@{name}" if name else ""
            ctl = {k: v for k, v in build_feeds(base, graph_plan, seed=0)[1].items() if k.startswith("fc_")}
            for mode in modes:
                state = backend.state_binding(graph_plan)
                state.reset()
                state.step({**feeds, **ctl}, [output])  # a full step fills the caches
                calls[mode + tag] = partial(state.step, {**feeds, **ctl, TOK_INPUT: np.full_like(ctl[TOK_INPUT], MODES[mode])},
                                            [output])
                diff = np.abs(calls[mode + tag]()[output] - reference).max()
                log.info("%s%s step on those caches vs original graph: max abs diff %.3g", mode, tag, diff)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(2):  # warm-up
            for call in calls.values():
                call()
        for _ in range(args.iters):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        try:
            local: LocalBranches | None = time_local_branches(src, plan, feeds, args)
        except FcpassError as exc:
            log.warning("token-local branches not timed alone: %s", exc)
            local = None
        profile = profile_modes(src, fc, comp_feeds, modes, args, tmp) if args.profile else {}
        mem: list[MemResult] = []
        if args.memory:
            feeds_path = Path(tmp) / "feeds.npz"
            np.savez(feeds_path, **comp_feeds)
            for arena in (False, True):
                for mode in ("original", *[m for m in ("full", "conservative") if m in modes]):
                    mem.append(measure_memory(mode, src if mode == "original" else fc, feeds_path, arena, args))
                    log.info("memory %s", mem[-1])
    report(args, {name: graph_plan for name, _, graph_plan in graphs}, feeds, times, mem, local)
    if profile:
        print_profile(profile, args.profile_top)


def report(args: argparse.Namespace, plans: dict[str, CachePlan], feeds: dict[str, np.ndarray],
           times: dict[str, list[float]], mem: list[MemResult], local: LocalBranches | None) -> None:
    """Print the tables; `plans`: this run's graph's plan under "", --also's under its file name."""
    plan = plans[""]
    med = {k: float(np.median(v)) * 1000 for k, v in times.items()}

    def paired(base: str, name: str) -> float:
        return median_ratio(times[base], times[name])
    ks = [br["k"] for b in plan.tokens["blocks"] for br in b["branches"] if br["k"] is not None]
    n = plan.tokens["blocks"][0]["tokens"]
    batch = next(iter(feeds.values())).shape[0]
    threads = f"{args.threads} thread(s)" if args.threads else "intra-op threads = all cores"
    label = args.model.name if args.model else f"{args.arch} at {args.image_size}x{args.image_size} (random weights)"
    print(f"\n{label}, batch {batch}, regions "
          f"{args.regions}, --tokens {args.tokens} (MLP k = {min(ks)}..{max(ks)} of {n} tokens), ONNX Runtime CPU, "
          f"{threads}; ms: median of {args.iters} rounds of alternated calls; speedups: median of the "
          "per-round ratios. MAC-ideal = uncached MACs / MACs run.\n")
    print("| call | ms | speedup vs original | speedup vs full | MAC-ideal | realised/ideal (vs original) "
          "| realised/ideal (vs full) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in med.items():
        if name == "original":
            print(f"| original graph | {t:.2f} | 1.00x | | 1.00x | 1.00 | |")
            continue
        mode, _, graph = name.partition("@")  # "mode@graph": a mode of --also's graph, against its own full step
        ideal = mac_ideal(plans[graph], MODES[mode])
        vs_orig = paired("original", name)
        vs_full, of_full = "", ""  # empty where --modes left the full step out
        full = "full" + (f"@{graph}" if graph else "")
        if full in times:
            ratio = paired(full, name)
            vs_full, of_full = f"{ratio:.2f}x", f"{ratio / ideal:.2f}"
        label = f"{mode}, {graph}" if graph else mode
        print(f"| `fc_tok={MODES[mode]}` ({label}) | {t:.2f} | {vs_orig:.2f}x | {vs_full} | {ideal:.2f}x | "
              f"{vs_orig / ideal:.2f} | {of_full} |")
    if local:
        print(f"\nToken-local branches alone (every block's, cut out of the exported graph, fed its activations): "
              f"{local.full_ms:.2f} ms on all {n} tokens, {local.k_ms:.2f} ms on the k a conservative step runs: "
              f"{local.speedup:.2f}x against a {local.mac_ratio:.2f}x MAC ratio, realised/ideal "
              f"{local.speedup / local.mac_ratio:.2f}. That is the kernels' own shortfall at k rows, before any "
              "gather, scatter, selection, gate or residual.")
    if mem:
        state_mb = sum(np.prod([int(d) for d in s.shape]) * np.dtype(s.dtype).itemsize for s in plan.states) / 2**20
        print(f"\nPeak activation memory: resident high-water mark during {args.mem_iters} calls of one mode in a "
              "fresh process minus the resident memory before them (weights and feeds loaded; arena off: after one "
              "call of that mode, arena on: before the first). The compiled graph's outputs include the next cache "
              f"state, {state_mb:.1f} MiB, in every token mode.\n")
        print("| call | ORT CPU arena | loaded MiB | peak added MiB | retained after MiB | peak / full |")
        print("|---|---|---:|---:|---:|---:|")
        for m in mem:
            full = next((x.peak_mb for x in mem if x.mode == "full" and x.arena == m.arena), float("nan"))
            print(f"| {m.mode} | {'on' if m.arena else 'off'} | {m.loaded_mb:.1f} | {m.peak_mb:.1f} | "
                  f"{m.retained_mb:.1f} | {m.peak_mb / full:.2f} |")
    print(f"\nCommand: `{' '.join(['python tools/bench_tokens.py', *sys.argv[1:]])}`")


if __name__ == "__main__":
    main()
