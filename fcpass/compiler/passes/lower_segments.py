"""Lower a cache-aware graph to If-free segments: `If(c, A, B)` -> `host: run(A) if c else run(B)`.

TensorRT reads an If's condition on the host (one sync per If) and cannot capture a step that
contains one in a CUDA graph. This lowering cuts the compiled graph at its `If` nodes into standalone
models (head, per-branch, mid and tail segments) and leaves the choice of branch to the host loop
(`runtimes.segments_backend`), which reads each condition the graph already computes.

It lowers the *already optimized* (and calibrated) If graph rather than re-running the cache-region
pass with a different back end: calibration, fitted weights, statistics and the decision rule are then
shared, and the segments run exactly the If graph's nodes on the same values, so outputs are equal by
construction (up to rounding where ONNX Runtime fuses nodes differently across a segment boundary:
at most 2.7e-6 on the bundled model's samples after 50 steps). The
simpler alternative (let `insert_cache_regions` emit segments directly) would duplicate its region,
state and statistic logic.

Cases:
1. Straight-line nodes between `If`s (in the graph's topological order) form one segment: before the
   first If (head, which computes the controls and the first statistic and condition), between two
   (mid: the next region's statistic and condition) and after the last (tail: fc_stat / fc_skip).
   A region's statistic gate is inlined, not lowered: a host branch there would cost a segment.
2. Each `If` becomes a branch step: its condition (computed by the segment before it) and its two
   branches, lowered recursively, so an If nested in a compute branch is lowered too. A branch's
   outputs are renamed to the If's output names, so whichever branch runs defines them.
   Branch inputs are the outer-scope values the branch reads; initializers they read (block weights,
   the fitted V and b, fcpass constants) are embedded in the segment that reads them, nothing else.
3. An `Identity` whose input is a runtime value (not an initializer) is not run: the host binds its
   output name to the same value (the If graph copies a passed-through state at every enclosing If;
   here it costs nothing). A straight-line run made only of such Identities is no segment at all.
4. Values no later step reads are not exported from a segment, and nodes whose outputs nobody reads are
   dropped (ONNX Runtime would drop them too).
5. Declined (FcpassError naming what): an If inside a Loop or Scan body, sparse initializers, a graph
   output that no node produces, and a segment output that neither shape inference nor the source
   graph's value_info can type.

Invariant: for any feeds, running the steps in order, taking each branch step's `then` steps iff its
condition is true, defines every output of the source graph with the value the source graph gives.
The artefact is a directory: one `.onnx` file per segment and `manifest.json` (the step program, every
segment's inputs and outputs, the region each branch belongs to, the graph's interface and the cache
plan); it is written atomically.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from fcpass import __version__
from fcpass.compiler.graphinfo import infer_shapes, node_inputs, rename_values
from fcpass.compiler.passes.inline_gates import inline_gates
from fcpass.contract.errors import FcpassError
from fcpass.contract.manifest import FORMAT, FORMAT_VERSION, MANIFEST, is_segments_artefact
from fcpass.contract.onnx_io import atomic_dir, check_dir_output, save_model, subgraphs
from fcpass.contract.plan import PLAN_KEY

log = logging.getLogger(__name__)

LOWERINGS = ("if", "segments")
_REGION_IF = re.compile(r"^fc/(.+)/If$")  # the If node names of fcpass.compiler.passes.cache_regions


# --- the step program --------------------------------------------------------------------------

@dataclass
class Segment:
    """Straight-line nodes run as one model; `aliases` (dst, src) are bound on the host after it."""

    label: str
    nodes: list[onnx.NodeProto]
    consts: dict[str, onnx.TensorProto]
    aliases: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    model: onnx.ModelProto | None = None
    file: str = ""


@dataclass
class BranchStep:
    """A lowered If: run `then` if the value `cond` is true, else `orelse`; both define `outputs`."""

    region: str | None
    cond: str
    outputs: list[str]
    then: list[Step]
    orelse: list[Step]


Step = Segment | BranchStep


@dataclass
class Lowered:
    steps: list[Step]
    source: onnx.ModelProto  # the If graph (for its interface, opsets and metadata)

    def segments(self) -> list[Segment]:
        return [s for s in _walk(self.steps) if s.model is not None]


def _walk(steps: list[Step]) -> list[Segment]:
    out: list[Segment] = []
    for s in steps:
        if isinstance(s, BranchStep):
            out += _walk(s.then) + _walk(s.orelse)
        else:
            out.append(s)
    return out


# --- lowering ----------------------------------------------------------------------------------

@dataclass
class _Scope:
    """Constants visible at one nesting level: the main graph's initializers plus each branch's."""

    consts: dict[str, onnx.TensorProto]
    runtime: frozenset[str]  # main-graph inputs: fed at run time even if an initializer has the name

    def child(self, graph: onnx.GraphProto) -> _Scope:
        return _Scope({**self.consts, **{t.name: t for t in graph.initializer}}, self.runtime)

    def is_const(self, name: str) -> bool:
        return name in self.consts and name not in self.runtime


def lower_to_segments(model: onnx.ModelProto) -> Lowered:
    """Lower every If of `model` (an fcpass cache-aware graph, or any graph) to host-chosen segments;
    statistic gates are inlined first (`fcpass.compiler.passes.inline_gates`), not lowered."""
    model = inline_gates(model).model
    g = model.graph
    if g.sparse_initializer:
        raise FcpassError("the graph has sparse initializers, which --lowering segments does not carry; "
                          "densify them or use --lowering if")
    produced = {o for n in g.node for o in n.output}
    for o in g.output:
        if o.name not in produced:
            raise FcpassError(f"graph output {o.name!r} is not produced by any node; --lowering segments needs "
                              "one (wrap it in an Identity) or use --lowering if")
    scope = _Scope({t.name: t for t in g.initializer}, frozenset(i.name for i in g.input))
    counter = _Counter()
    steps = _lower_nodes(list(g.node), scope, "main", counter)
    _liveness(steps, {o.name for o in g.output})
    types = {v.name: v.type for v in g.input}
    _type_steps(steps, types, _known_types(g), model)
    _name_files(steps)
    lowered = Lowered(steps, model)
    log.info("lowered %d If nodes to %d segments", _count_branches(steps), len(lowered.segments()))
    return lowered


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n - 1


def _lower_nodes(nodes: list[onnx.NodeProto], scope: _Scope, label: str, counter: _Counter) -> list[Step]:
    steps: list[Step] = []
    run: list[onnx.NodeProto] = []
    part = 0

    def flush() -> None:
        nonlocal part, run
        if run:
            steps.append(_segment(run, scope, f"{label}.{part}"))
            part += 1
            run = []

    for node in nodes:
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            flush()
            steps.append(_lower_if(node, scope, counter))
        else:
            if _has_nested_if(node):
                raise FcpassError(f"node {node.name or node.op_type!r} ({node.op_type}) holds an If in its body; "
                                  "--lowering segments cannot lift it out: use --lowering if")
            run.append(node)
    flush()
    return steps


def _has_nested_if(node: onnx.NodeProto) -> bool:
    return any(n.op_type == "If" or _has_nested_if(n) for g in subgraphs(node) for n in g.node)


def _lower_if(node: onnx.NodeProto, scope: _Scope, counter: _Counter) -> BranchStep:
    match = _REGION_IF.match(node.name)
    region = match.group(1) if match else None
    base = region or f"if{counter.next()}"
    graphs = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    # For an fcpass region the condition is "skip", so then = the approximation, else = the compute branch.
    then_label, else_label = (f"{base}.approx", f"{base}.compute") if region else (f"{base}.then", f"{base}.else")
    then = _lower_branch(graphs["then_branch"], list(node.output), scope, then_label, counter)
    orelse = _lower_branch(graphs["else_branch"], list(node.output), scope, else_label, counter)
    return BranchStep(region, node.input[0], [o for o in node.output if o], then, orelse)


def _lower_branch(graph: onnx.GraphProto, targets: list[str], scope: _Scope, label: str, counter: _Counter) -> list[Step]:
    """The branch's nodes with its outputs renamed to the If's output names, lowered recursively."""
    nodes = [_copy(n) for n in graph.node]
    produced = {o for n in nodes for o in n.output}
    rename: dict[str, str] = {}
    extra: list[onnx.NodeProto] = []
    for out, target in zip(graph.output, targets):
        if not target:
            continue
        if out.name in produced and out.name not in rename:
            rename[out.name] = target
        else:  # an outer value, an initializer, or a value exported twice: the If copies it
            extra.append(helper.make_node("Identity", [out.name], [target], name=f"fc/lower/{target}"))
    for n in nodes:
        rename_values(n, rename)
    return _lower_nodes(nodes + extra, scope.child(graph), label, counter)


def _segment(nodes: list[onnx.NodeProto], scope: _Scope, label: str) -> Segment:
    """A straight-line run; Identities of runtime values become host aliases (case 3)."""
    resolve: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    aliases: list[tuple[str, str]] = []
    for node in nodes:
        node = _copy(node)
        rename_values(node, resolve)
        src = node.input[0] if node.input else ""
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and src and not scope.is_const(src):
            resolve[node.output[0]] = src
            aliases.append((node.output[0], src))
        else:
            kept.append(node)
    free = {x for n in kept for x in node_inputs(n)}
    consts = {k: v for k, v in scope.consts.items() if k in free and scope.is_const(k)}
    return Segment(label, kept, consts, aliases)


def _liveness(steps: list[Step], needed: set[str]) -> set[str]:
    """Fix each segment's outputs (what later steps read) and drop dead nodes; return what `steps` read."""
    needed = set(needed)
    for step in reversed(steps):
        if isinstance(step, BranchStep):
            outs = [o for o in step.outputs if o in needed]
            step.outputs = outs
            reads_then = _liveness(step.then, set(outs))
            reads_else = _liveness(step.orelse, set(outs))
            needed = (needed - set(outs)) | reads_then | reads_else | {step.cond}
            continue
        step.aliases = [(d, s) for d, s in step.aliases if d in needed]
        for d, s in reversed(step.aliases):
            needed.discard(d)
            needed.add(s)
        live = set(needed)
        kept: list[onnx.NodeProto] = []
        for node in reversed(step.nodes):
            if any(o in live for o in node.output if o):
                kept.append(node)
                live.update(node_inputs(node))
        step.nodes = kept[::-1]
        defined = {o for n in step.nodes for o in n.output if o}
        step.outputs = [o for n in step.nodes for o in n.output if o in needed]
        reads = [x for n in step.nodes for x in node_inputs(n) if x not in defined]
        step.consts = {k: v for k, v in step.consts.items() if k in reads}
        step.inputs = list(dict.fromkeys(x for x in reads if x not in step.consts))
        needed = (needed - defined) | set(step.inputs)
    return needed


def _known_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Types the source graph declares anywhere (fallback where shape inference gives nothing)."""
    out: dict[str, onnx.TypeProto] = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out[v.name] = v.type
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.update(_known_types(attr.g))
                if node.op_type == "If":  # a branch output's type is the If output's type
                    for o, target in zip(attr.g.output, node.output):
                        if target and o.type.tensor_type.elem_type:
                            out.setdefault(target, o.type)
    return out


def _type_steps(steps: list[Step], types: dict[str, onnx.TypeProto], known: dict[str, onnx.TypeProto],
                source: onnx.ModelProto) -> None:
    """Build each segment's model, typing its inputs from earlier steps and its outputs by inference."""
    for step in steps:
        if isinstance(step, BranchStep):
            t_then, t_else = dict(types), dict(types)
            _type_steps(step.then, t_then, known, source)
            _type_steps(step.orelse, t_else, known, source)
            for o in step.outputs:
                types[o] = t_else.get(o) or t_then[o]
            continue
        if step.nodes:
            step.model = _segment_model(step, types, known, source)
            for v in step.model.graph.output:
                types[v.name] = v.type
        for d, s in step.aliases:
            types[d] = types[s]


def _segment_model(seg: Segment, types: dict[str, onnx.TypeProto], known: dict[str, onnx.TypeProto],
                   source: onnx.ModelProto) -> onnx.ModelProto:
    inputs = []
    for name in seg.inputs:
        vi = onnx.ValueInfoProto(name=name)
        vi.type.CopyFrom(types[name])
        inputs.append(vi)
    graph = helper.make_graph(seg.nodes, seg.label, inputs, [onnx.ValueInfoProto(name=o) for o in seg.outputs],
                              initializer=list(seg.consts.values()))
    model = helper.make_model(graph, opset_imports=list(source.opset_import), ir_version=source.ir_version,
                              producer_name="fcpass", producer_version=__version__)
    model.functions.extend(_used_functions(seg.nodes, source))
    inferred = infer_shapes(model)
    found = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]
             if v.type.tensor_type.elem_type}
    model = inferred
    del model.graph.output[:]
    for name in seg.outputs:
        t = found.get(name) or known.get(name)
        if t is None:
            raise FcpassError(f"cannot type {name!r}, an output of segment {seg.label}; run onnx shape inference "
                              "on the model first or use --lowering if")
        vi = model.graph.output.add()
        vi.name = name
        vi.type.CopyFrom(t)
    io = set(seg.inputs) | set(seg.outputs)
    keep = [v for v in model.graph.value_info if v.name not in io]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return model


def _used_functions(nodes: list[onnx.NodeProto], source: onnx.ModelProto) -> list[onnx.FunctionProto]:
    """The model-local functions `nodes` call, transitively (the dynamo exporter may emit some)."""
    by_key = {(f.domain, f.name): f for f in source.functions}
    if not by_key:
        return []
    used: dict[tuple[str, str], onnx.FunctionProto] = {}
    frontier = list(nodes)
    while frontier:
        n = frontier.pop()
        key = (n.domain, n.op_type)
        if key in by_key and key not in used:
            used[key] = by_key[key]
            frontier.extend(by_key[key].node)
        for g in subgraphs(n):
            frontier.extend(g.node)
    return list(used.values())


def _name_files(steps: list[Step]) -> None:
    for k, seg in enumerate(s for s in _walk(steps) if s.nodes):
        seg.file = f"{k:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', seg.label)}.onnx"


def _count_branches(steps: list[Step]) -> int:
    return sum(1 + _count_branches(s.then) + _count_branches(s.orelse) for s in steps if isinstance(s, BranchStep))


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(node)
    return c


def _value_json(v: onnx.ValueInfoProto) -> dict[str, Any]:
    tt = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return {"name": v.name, "elem_type": tt.elem_type, "shape": dims}


def _steps_json(steps: list[Step]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in steps:
        if isinstance(s, BranchStep):
            roles = ("approx", "compute") if s.region else ("then", "else")
            out.append({"kind": "branch", "region": s.region, "cond": s.cond, "outputs": s.outputs,
                        "then": {"role": roles[0], "steps": _steps_json(s.then)},
                        "else": {"role": roles[1], "steps": _steps_json(s.orelse)}})
            continue
        if s.nodes:
            out.append({"kind": "segment", "file": s.file, "label": s.label, "inputs": s.inputs, "outputs": s.outputs})
        if s.aliases:
            out.append({"kind": "alias", "pairs": [list(p) for p in s.aliases]})
    return out


def manifest_json(lowered: Lowered) -> dict[str, Any]:
    g = lowered.source.graph
    meta = {p.key: p.value for p in lowered.source.metadata_props}
    plan_text = meta.pop(PLAN_KEY, None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fcpass_version": __version__,
        "inputs": [_value_json(v) for v in g.input if v.name not in {t.name for t in g.initializer}],
        "outputs": [_value_json(v) for v in g.output],
        "segments": len(lowered.segments()),
        "branches": _count_branches(lowered.steps),
        "steps": _steps_json(lowered.steps),
        "plan": json.loads(plan_text) if plan_text else None,
        "metadata": meta,
    }


# --- the artefact on disk ------------------------------------------------------------------------

def check_lowering(lowering: str) -> None:
    if lowering not in LOWERINGS:
        raise FcpassError(f"--lowering {lowering!r} is unknown; use one of {', '.join(LOWERINGS)}")


SEGMENTS_FOLDER = "an fcpass segments folder (the segments lowering writes a folder)"


def check_segments_output(path: str | Path) -> None:
    check_dir_output(path, is_segments_artefact, SEGMENTS_FOLDER)


def write_segments(lowered: Lowered, path: str | Path) -> Path:
    """Write the segments and the manifest into a temporary folder beside `path`, then rename it into place.

    A previous segments artefact at `path` is replaced; anything else there is refused.
    """
    dst = Path(path)
    with atomic_dir(dst, is_segments_artefact, SEGMENTS_FOLDER) as tmp:
        for seg in lowered.segments():
            assert seg.model is not None
            save_model(seg.model, tmp / seg.file)
        (tmp / MANIFEST).write_text(json.dumps(manifest_json(lowered), indent=1))
    log.info("wrote %s: %d segments", dst, len(lowered.segments()))
    return dst
