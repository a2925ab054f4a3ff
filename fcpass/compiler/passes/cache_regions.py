"""Wrap blocks and block ranges in cache branches: `region(H) -> If(skip, region(H), approx(H, state))`.

Invariant: with every region forced to compute (`fc_ctl` all 0) the original outputs are produced by
exactly the original nodes, so they equal the original model's; the values the state takes are then
the true inputs and outputs of every region. A state takes its next value only where its region
computed (`fc_skip` 0; `runtimes.state.Commit`), so a region's input and output are exported as they
are (a block's output once, for it and the next block's input), not copied into the state by a branch.

Cases:
1. A region is every node on a path from its stream inputs to its stream outputs (see
   `fcpass.compiler.discover`), plus the outside nodes whose outputs only it reads (its own adaLN modulation,
   say; shared conditioning stays outside). Its nodes move into the compute branch unchanged; names it exports are renamed
   inside the branch so the `If` can produce them under their original names, and nothing
   downstream changes.
2. Regions nest (blocks inside the tail range inside the whole stack). A nested region's state
   values, statistic and decision leave through every enclosing `If`; when an enclosing region is
   skipped, they are NaN (statistic), -1 (decision: the host keeps the state) and a state passed
   through (any value of the right type would do).
3. The statistic (per sample, relative change of the stream inputs against the last computed ones)
   and the decision are computed before the `If`, outside its branches, inside the region's gate
   (an `If` on ctl >= 2, so a forced region measures nothing; `fcpass.compiler.passes.inline_gates` removes
   the gates for back ends that read every `If` condition on the host). A NaN or Inf statistic
   never skips (`stat <= thr` is false for NaN; Inf is tested explicitly, since thr may be Inf).
   Two regions also get a probe (`fcpass.contract.plan.PROBES`), tested instead under ctl 3: the range after
   the first block, the first block's residual (FBCache); the stack, block 0's modulated input
   (TeaCache), whose nodes then run before the stack's `If` rather than inside it (the stack is
   still one region; a skipped stack computes that one LayerNorm and modulation). Without a
   LayerNormalization reading the stream in block 0, the stack has no probe.
4. The else-branch is the approximation of `fcpass.contract.plan.APPROX_MIX` (`fcpass.compiler.passes.approximation`).
5. Declined: a region output that shape inference cannot type, and opsets below 13 (Unsqueeze and
   Slice take attributes there); both raise FcpassError naming the tensor or the opset.

Returns a copy; its input is left as it is. Checked after the pass: the controls are graph inputs and the
summaries graph outputs, and every value a node reads is defined before it where it was in the input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fcpass.compiler.discover import Block, BlockMap, boundary_of
from fcpass.compiler.graphinfo import GraphIndex, graph_macs, rename_values, replace_node_groups
from fcpass.compiler.passes.approximation import INPUT_COLUMNS, approximation_nodes
from fcpass.compiler.passes.base import PassResult, graph_pass, well_formed
from fcpass.compiler.passes.builder import (
    Region,
    RegionBuilder,
    RegionHooks,
    cond_info,
    copy_node,
    flatten_regions,
    region_summaries,
    toposort,
)
from fcpass.compiler.passes.inline_gates import gate_name
from fcpass.compiler.passes.motion_tokens import MergeOptions, MotionPass
from fcpass.compiler.passes.token_cache import TokenPass
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import (
    CTL_INPUT,
    MIX_INPUT,
    MIX_WIDTH,
    SKIP_OUTPUT,
    STAT_OUTPUT,
    THR_INPUT,
    CachePlan,
    StateSpec,
)
from fcpass.contract.tokens import TokenOptions

log = logging.getLogger(__name__)

REGION_SETS = ("blocks", "tail", "stack")


def region_if_name(region: str) -> str:
    """The name of a region's `If`: then-branch the approximation, else-branch the original nodes."""
    return f"fc/{region}/If"


@dataclass(frozen=True, kw_only=True)
class CacheRegions(PassResult):
    """`insert_cache_regions`' result: the cache-aware model, and its cache plan."""

    plan: CachePlan


def _cache_aware(model: onnx.ModelProto) -> list[str]:
    inputs, outputs = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    missing = [f"graph input {x} is missing" for x in (CTL_INPUT, THR_INPUT, MIX_INPUT) if x not in inputs]
    missing += [f"graph output {x} is missing" for x in (STAT_OUTPUT, SKIP_OUTPUT) if x not in outputs]
    return missing


@graph_pass(mutates_input=False, invariant=_cache_aware, preserves=well_formed)
def insert_cache_regions(
    model: onnx.ModelProto,
    block_map: BlockMap,
    roles: dict[str, str | None],
    region_sets: tuple[str, ...] = REGION_SETS,
    taylor: bool = False,
    tokens: TokenOptions | None = None,
    probes: bool = True,
    motion_ratio: float | None = None,
    merge: MergeOptions | None = None,
    motion_context: bool = False,
) -> CacheRegions:
    """Return a cache-aware copy of `model` and its plan (`count`: its regions); `model` itself is not modified.

    `taylor` adds each region's previous computed output to the state, which `taylor1` needs.
    `probes` adds FBCache's and TeaCache's statistics (case 3); without them a step that skips
    the stack costs a little less, and fbcache and teacache cannot run.
    `tokens` compiles token-level caching into every block (`fcpass.compiler.passes.token_cache`);
    `motion_ratio` FastCache's motion tokens into the stack (`fcpass.compiler.passes.motion_tokens`), or with
    `merge` its k-NN token merging at that ratio; `motion_context` lets the motion tokens attend to the
    other tokens' cached keys and values.
    """
    opset = _check_options(model, region_sets, tokens, motion_ratio, merge, motion_context)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    builder = _CacheRegionBuilder(out, index)
    regions = _plan_regions(index, block_map, block_map.latent, region_sets, builder, probes)
    flat = flatten_regions(regions)
    _settle_nodes(index, flat, block_map.latent)
    builder.add_constants()
    builder.add_control_inputs(flat)
    builder.add_unmeasured(regions[0].spec.inputs[0])
    for r in flat:  # the motion tokens' stack refreshes part of its state: all of it stays in its If
        builder.add_state(r, taylor, direct=motion_ratio is None or r.name != "stack")
    token_pass = motion_pass = None
    if tokens is not None:  # each block's token If, built inside its innermost region's compute branch
        token_pass = TokenPass(builder, index, block_map, flat, tokens, opset)
        for r in flat:
            r.states_tok = token_pass.add_state(r)
        builder.control_nodes += token_pass.conditions() + token_pass.select_all()
        builder.hooks.append(token_pass)
    if motion_ratio is not None:
        stack = next(r for r in flat if r.name == "stack")
        motion_pass = MotionPass(builder, index, stack, motion_ratio, block_map.latent, merge,
                                 block_map.blocks if motion_context else None)
        builder.hooks.append(motion_pass)
    _emit_regions(out, builder, regions, flat)
    plan = CachePlan(
        regions=[r.spec for r in flat],
        states=[s for r in flat for s in (*r.own_states(), *r.states_mod)],
        roles=roles,
        outputs=[o.name for o in model.graph.output],
        uncached_macs=graph_macs(index),
        discovery=block_map.method,
    )
    if token_pass is not None:
        plan.tokens = token_pass.spec()
    if motion_pass is not None:
        plan.motion = motion_pass.spec()
    return CacheRegions(out, True, len(flat), plan=plan)


def _check_options(model: onnx.ModelProto, region_sets: tuple[str, ...], tokens: TokenOptions | None,
                   motion_ratio: float | None, merge: MergeOptions | None, motion_context: bool) -> int:
    """Raise FcpassError for the declined cases and options that exclude each other; return the opset."""
    opset = _default_opset(model)
    if opset < 13:
        raise FcpassError(f"the model uses opset {opset}; fcpass needs opset >= 13 (re-export with --opset 18)")
    unknown = set(region_sets) - set(REGION_SETS)
    if unknown or not region_sets:
        raise FcpassError(f"--regions {','.join(region_sets)} is not a subset of {','.join(REGION_SETS)}")
    if (merge is not None or motion_context) and motion_ratio is None:
        raise FcpassError(f"{'token merging' if merge else '--motion-context'} needs --motion-ratio (the fraction of tokens kept)")
    if motion_ratio is not None:
        if "stack" not in region_sets:
            raise FcpassError("motion tokens run in the stack region; optimize with --regions including stack")
        if tokens is not None:
            raise FcpassError("--motion-ratio and --tokens cannot share a graph; optimize for one of them")
    return opset


def _settle_nodes(index: GraphIndex, flat: list[Region], latent: str) -> None:
    """Give each region its exclusive conditioning (case 1) and take out its hoisted probe (case 3);
    then count its MACs and number it."""
    dependent = index.descendants({latent})
    for r in sorted(flat, key=lambda r: len(r.nodes)):  # innermost first
        _sink_exclusive_nodes(index, r, dependent)
    for r in flat:
        if r.probe_input is not None:
            _hoist_probe(index, r, flat)
    for r in flat:
        r.spec.macs = graph_macs(index, sorted(r.nodes))
    for k, r in enumerate(flat):
        r.spec.index = k


def _emit_regions(out: onnx.ModelProto, builder: _CacheRegionBuilder, regions: list[Region], flat: list[Region]) -> None:
    """Replace the main graph's nodes by the controls, the regions' `If`s and the summary outputs."""
    new_nodes = builder.replace_regions(list(out.graph.node), regions)
    new_nodes = builder.control_nodes + new_nodes + builder.summary_nodes(flat)
    del out.graph.node[:]
    out.graph.node.extend(toposort(new_nodes))
    out.graph.value_info.extend(cond_info(regions))
    builder.export_direct(flat)
    builder.finish_value_info()
    builder.drop_unread_consts()


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _plan_regions(
    index: GraphIndex, block_map: BlockMap, latent: str, region_sets: tuple[str, ...], builder: _CacheRegionBuilder, probes: bool
) -> list[Region]:
    blocks = block_map.blocks
    per_block = [builder.region_for(f"block{b.index}", [b], latent) for b in blocks] if "blocks" in region_sets else []
    tail = builder.region_for("tail", blocks[1:], latent) if "tail" in region_sets and len(blocks) > 2 else None
    stack = builder.region_for("stack", blocks, latent) if "stack" in region_sets else None
    if tail is not None:
        tail.children = per_block[1:]
        for c in tail.children:
            c.spec.parent = "tail"
    top_blocks = per_block[:1] + ([tail] if tail else per_block[1:])
    if tail is not None and probes:
        head = boundary_of(index, blocks[0].inputs, blocks[0].outputs, latent)[1]
        tail.probe_pairs = _residual_pairs(builder, tail.spec.inputs, head)
        if tail.probe_pairs:
            tail.spec.probe = "head_residual"
    if stack is not None and probes:
        stack.probe_input = _modulated_input(index, blocks[0], stack.spec.inputs)
        if stack.probe_input is not None:
            stack.spec.probe = "modulated_input"
    if stack is not None:
        stack.children = top_blocks
        for c in top_blocks:
            c.spec.parent = "stack"
        return [stack]
    return top_blocks


def _residual_pairs(builder: _CacheRegionBuilder, inputs: list[str], head: list[str]) -> list[tuple[str, str]]:
    """Each stream input of the range after the first block, with the first block's input it updates."""
    pairs = []
    for x in inputs:
        match = next((h for h in head if h != x and builder.tensor_type(h) == builder.tensor_type(x)), None)
        if match is not None:
            pairs.append((x, match))
    return pairs


def _modulated_input(index: GraphIndex, block: Block, streams: list[str]) -> str | None:
    """Block 0's normalised, timestep-modulated input: LayerNormalization(H), then its Mul/Add chain.

    The chain follows single consumers that are Mul or Add of a conditioning (not latent-dependent)
    operand: adaLN's `x * (1 + scale) + shift`. None when no LayerNormalization reads a stream.
    """
    nodes = set(block.nodes)
    ln = next((i for i in sorted(nodes) if index.nodes[i].op_type == "LayerNormalization"
               and index.nodes[i].input[0] in streams), None)
    if ln is None:
        log.info("block 0 has no LayerNormalization on its input: the stack gets no modulated-input probe")
        return None
    streams_dependent = index.descendants(set(streams))
    t = index.nodes[ln].output[0]
    while True:
        readers = [r for r in index.consumers.get(t, []) if r in nodes]
        if len(readers) != 1 or index.nodes[readers[0]].op_type not in ("Mul", "Add"):
            return t
        node = index.nodes[readers[0]]
        other = [x for x in node.input if x != t]
        if any(index.producer.get(x) in streams_dependent for x in other):
            return t
        t = node.output[0]


def _hoist_probe(index: GraphIndex, region: Region, flat: list[Region]) -> None:
    """Move the probed tensor's producers out of the region (and the regions inside it).

    The probe is tested before the region's `If`, so its tensor must exist outside it. Its
    ancestors inside the region read only the stream inputs and conditioning, both outside.
    """
    assert region.probe_input is not None
    moved = index.ancestors({region.probe_input}) & region.nodes
    for r in flat:
        r.nodes -= moved


def _sink_exclusive_nodes(index: GraphIndex, region: Region, dependent: set[int]) -> None:
    """Move into the region every outside node whose outputs only the region reads (transitively).

    Such nodes compute conditioning for the region alone (a DiT block's adaLN modulation): a skipped
    region then does not compute them either. A node that another region or the rest of the graph
    also reads (a timestep embedding shared by all blocks, the legacy exporter's shared casts) stays
    outside, and so does anything on the latent's path (the statistic reads the stream inputs before
    the If). The outputs are unchanged: the moved nodes run exactly when their readers run.
    """
    changed = True
    while changed:
        changed = False
        outside = index.ancestors(set(_region_inputs(index, region))) - region.nodes - dependent
        for i in sorted(outside, reverse=True):
            outs = [o for o in index.nodes[i].output if o]
            readers = {r for o in outs for r in index.consumers.get(o, [])}
            if readers and readers <= region.nodes and not any(o in index.graph_outputs for o in outs):
                region.nodes.add(i)
                changed = True


def _region_inputs(index: GraphIndex, region: Region) -> list[str]:
    """Every tensor the region's nodes read from outside it."""
    return [x for i in region.nodes for x in index.nodes[i].input if index.producer.get(x) not in region.nodes]


class _CacheRegionBuilder(RegionBuilder):
    """The region builder with what only cache regions emit: controls, states, statistics, probes and
    each region's `If`; `hooks` are the passes that rewrite inside the regions."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex) -> None:
        super().__init__(model, index)
        self.control_nodes: list[onnx.NodeProto] = []
        self.hooks: list[RegionHooks] = []

    def add_control_inputs(self, flat: list[Region]) -> None:
        """Graph inputs fc_ctl, fc_thr, fc_mix, and per region its gate's condition (ctl >= 2).

        The control logic runs once for all regions (vectorised over R) so its cost does not grow
        with the number of regions; each gate's branches gather what they use from it:
        force = (ctl == 1); thr_eff = ctl >= 2 ? min(thr, FLT_MAX) : -1;
        a region with a probe tests it instead of its statistic when ctl == 3. A statistic is >= 0
        or NaN, so thr_eff = -1 never skips, and clamping thr keeps an Inf statistic from passing an
        Inf threshold (fail closed).
        """
        r = len(flat)
        self.graph.input.extend([
            helper.make_tensor_value_info(CTL_INPUT, TensorProto.INT64, [r]),
            helper.make_tensor_value_info(THR_INPUT, TensorProto.FLOAT, [r]),
            helper.make_tensor_value_info(MIX_INPUT, TensorProto.FLOAT, [r, MIX_WIDTH]),
        ])
        one = self.const("fc.one", np.array(1, dtype=np.int64))
        three = self.const("fc.three", np.array(3, dtype=np.int64))
        fmax = self.const("fc.fmax", np.array(np.finfo(np.float32).max, dtype=np.float32))
        never = self.const("fc.never", np.array(-1.0, dtype=np.float32))
        self.control_nodes += [
            helper.make_node("Equal", [CTL_INPUT, one], ["fc.force"], name="fc/force"),
            helper.make_node("Greater", [CTL_INPUT, one], ["fc.decide"], name="fc/decide"),
            helper.make_node("Min", [THR_INPUT, fmax], ["fc.thr_finite"], name="fc/thr_finite"),
            helper.make_node("Where", ["fc.decide", "fc.thr_finite", never], ["fc.thr_eff"], name="fc/thr_eff"),
        ]
        if any(region.spec.probe for region in flat):
            self.control_nodes.append(helper.make_node("Equal", [CTL_INPUT, three], ["fc.use_probe"], name="fc/use_probe"))
        # One Split hands every gate its condition (a one-element tensor, which an If accepts), where a
        # Gather per region would cost ONNX Runtime a node's overhead each at every step. The rest of a
        # region's controls are gathered inside its gate's branches.
        by_index = sorted(flat, key=lambda region: region.spec.index)
        for region in by_index:
            n, i = region.name, region.spec.index
            self.const(f"fc.{n}.idx", np.array(i, dtype=np.int64))
            self.const(f"fc.{n}.idx1", np.array([i], dtype=np.int64))
        self.control_nodes += [
            helper.make_node("Split", ["fc.decide", self.const("fc.decide.split", np.ones(r, dtype=np.int64))],
                             [f"fc.{region.name}.decide" for region in by_index], name="fc/decide/split", axis=0),
            # a Where, not a Cast: ONNX Runtime's optimizer tries to drop that Cast and warns where it cannot
            helper.make_node("Where", ["fc.force", "fc.one_f", self.const("fc.zero_f", np.array(0.0, dtype=np.float32))],
                             ["fc.forcef"], name="fc/forcef"),
        ]

    def add_unmeasured(self, like: str) -> None:
        """fc.nan_b (B,), B the batch of `like`: the statistic of a region not measured this step."""
        self.const("fc.batch_lo", np.array([0], dtype=np.int64))
        self.const("fc.batch_hi", np.array([1], dtype=np.int64))
        self.control_nodes += [
            helper.make_node("Shape", [like], ["fc.shape"], name="fc/shape"),
            helper.make_node("Slice", ["fc.shape", "fc.batch_lo", "fc.batch_hi"], ["fc.batch"], name="fc/batch"),
            helper.make_node("ConstantOfShape", ["fc.batch"], ["fc.nan_b"], name="fc/nan_b",
                             value=numpy_helper.from_array(np.array([np.nan], dtype=np.float32))),
        ]

    def add_state(self, region: Region, taylor: bool, direct: bool) -> None:
        """The region's state inputs, and where each one's next value comes from.

        With `direct`, a state that tracks a value the graph computes anyway takes that value itself
        as its next value: the last computed input is the region's input, the last computed output
        its output (the `If`'s), the previous output the output state (the host moves it), the
        modulated input the probed tensor. Such values are valid only where the region computed
        (fc_skip 0); the host keeps the old state elsewhere, so no branch copies a state. Values
        only a branch defines, and graph inputs (which the segments lowering cannot export), are
        `If` outputs named `<state>.next`, which a skipped region passes through.
        """
        n = region.name
        spec = region.spec
        graph_inputs = {i.name for i in self.graph.input}

        def state(kind: str, k: int, source: str, value: str | None = None) -> StateSpec:
            elem, shape = self.tensor_type(source)
            name = f"fc.{n}.{kind}{k}"
            self.graph.input.append(helper.make_tensor_value_info(name, elem, shape))
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
            if direct and value is not None and value not in graph_inputs:
                region.direct.add(name)
                return StateSpec(name, value, n, kind, source, shape, dtype)
            self.graph.output.append(helper.make_tensor_value_info(name + ".next", elem, shape))
            return StateSpec(name, name + ".next", n, kind, source, shape, dtype)

        region.states_in = [state("in", j, t, t) for j, t in enumerate(spec.inputs)]
        region.states_out = [state("out", k, t, t) for k, t in enumerate(spec.outputs)]
        if taylor:
            region.states_prev = [state("prev", k, t, o.name if o.name in region.direct else None)
                                  for k, (t, o) in enumerate(zip(spec.outputs, region.states_out))]
        region.states_res = [state("res", j, x) for j, (x, _) in enumerate(region.probe_pairs)]
        if region.probe_input is not None:
            region.states_mod = [state("mod", 0, region.probe_input, region.probe_input)]
        for k, (o, j) in enumerate(zip(spec.outputs, spec.pairs)):
            if j is None:
                continue
            elem, shape = self.tensor_type(o)
            d = shape[-1]
            dtype = helper.tensor_dtype_to_np_dtype(elem)
            self.const(f"fc.{n}.V{k}", np.zeros((d, d), dtype=dtype))
            self.const(f"fc.{n}.b{k}", np.zeros((d,), dtype=dtype))
            self.const(f"fc.{n}.A{k}", np.eye(d, dtype=dtype))
            self.const(f"fc.{n}.c{k}", np.zeros((d,), dtype=dtype))

    def replace_regions(self, nodes: list[onnx.NodeProto], regions: list[Region]) -> list[onnx.NodeProto]:
        """`nodes` with each region's nodes replaced by its statistic, decision and If nodes."""
        owner = {i: r for r in regions for i in r.nodes}
        return replace_node_groups(self.index, nodes, owner, self.build)

    def build(self, region: Region) -> list[onnx.NodeProto]:
        n = region.name
        spec = region.spec
        pre = self.statistic_nodes(region)
        for mod in region.states_mod:  # the previous step's modulated input, whatever the step does
            if mod.name not in region.direct:
                pre.append(helper.make_node("Identity", [region.probe_input], [mod.next], name=f"fc/{mod.next}"))
        body_src = [self.index.nodes[i] for i in sorted(region.nodes)]
        body = self.replace_regions(body_src, region.children)
        for hook in self.hooks:
            body = hook.rewrite_body(body, region)
        body = [copy_node(x) for x in body]
        exported = list(spec.outputs) + self.exports(region)
        # A value the body computes leaves the compute branch under its branch-output name directly:
        # an Identity there would copy it once per enclosing If (a nested region's state crosses every
        # level). Only outer values and values exported twice need an Identity.
        produced = {o for node in body for o in node.output}
        rename = {x: f"{x}@{n}.run" if x in produced else f"{x}~{n}" for x in exported}
        for node in body:
            rename_values(node, rename)
        run_out: list[onnx.ValueInfoProto] = []
        approx_out: list[onnx.ValueInfoProto] = []
        run_nodes = list(body)
        approx_nodes: list[onnx.NodeProto] = []

        def emit(target: list[onnx.NodeProto], infos: list[onnx.ValueInfoProto], src: str, out_name: str, like: str) -> None:
            if src != out_name:
                target.append(helper.make_node("Identity", [src], [out_name], name=f"fc/{out_name}"))
            infos.append(self.value_info(out_name, like))

        def own(states: list[StateSpec], run_src: list[str]) -> None:
            for s, src in zip(states, run_src):
                if s.name not in region.direct:
                    emit(run_nodes, run_out, src, f"{s.next}@{n}.run", s.source)
                    emit(approx_nodes, approx_out, s.name, f"{s.next}@{n}.approx", s.source)

        for k, o in enumerate(spec.outputs):
            emit(run_nodes, run_out, rename[o], f"{o}@{n}.run", o)
            approx = approximation_nodes(self, region, k, approx_nodes, f"{o}@{n}.approx")
            emit(approx_nodes, approx_out, approx, f"{o}@{n}.approx", o)
        own(region.states_in, spec.inputs)
        own(region.states_out, [rename[o] for o in spec.outputs])
        own(region.states_prev, [s.name for s in region.states_out])
        for (x, h), s in zip(region.probe_pairs, region.states_res):
            run_nodes.append(helper.make_node("Sub", [x, h], [f"{s.next}@{n}.run"], name=f"fc/{s.next}@{n}.run"))
            run_out.append(self.value_info(f"{s.next}@{n}.run", s.source))
            emit(approx_nodes, approx_out, s.name, f"{s.next}@{n}.approx", s.source)
        own(region.states_tok, [rename[s.next] for s in region.states_tok])
        own(region.states_kv, [s.source for s in region.states_kv])
        batch = self.tensor_type(spec.inputs[0])[1][0]
        like, summary = self.state_sources(region), region_summaries(region)
        for x in self.child_exports(region):
            if x in summary:
                assert rename[x] == f"{x}@{n}.run"
                shape = [batch] if summary[x] == "stat" else [1]
                run_out.append(helper.make_tensor_value_info(f"{x}@{n}.run", TensorProto.FLOAT, shape))
            else:
                emit(run_nodes, run_out, rename[x], f"{x}@{n}.run", like[x][0])
        self.unreached_children(region, f"{n}.approx", approx_nodes, approx_out)
        run_graph = helper.make_graph(toposort(run_nodes), f"fc_{n}_compute", [], run_out)
        self.move_value_info(run_graph, body, rename)
        run_graph.value_info.extend(cond_info(region.children))
        for hook in self.hooks:
            run_graph = hook.wrap_compute(run_graph, region)
        approx_graph = helper.make_graph(approx_nodes, f"fc_{n}_approx", [], approx_out)
        if_node = helper.make_node(
            "If", [f"fc.{n}.cond"], exported, name=region_if_name(n), then_branch=approx_graph, else_branch=run_graph
        )
        return [*pre, if_node]

    def statistic_nodes(self, region: Region) -> list[onnx.NodeProto]:
        """stat (B,) = sqrt(sum_j ||H_j - H_ref_j||^2 / sum_j ||H_ref_j||^2); cond = skip this step; skip
        (1,) = cond as a float, the region's entry of fc_skip (made here, so a forced region runs no node
        for it outside its gate).

        Skip iff forced, or iff every sample's stat <= thr_eff (see add_control_inputs). The statistic
        is measured inside the region's gate, an `If` on ctl >= 2: a region the host forced pays that
        `If` instead of passes over its inputs, and its statistic is NaN (not measured).
        """
        n = region.name
        idx = f"fc.{n}.idx"
        measure = [
            helper.make_node("Gather", ["fc.force", idx], [f"fc.{n}.force"]),
            helper.make_node("Gather", ["fc.thr_eff", idx], [f"fc.{n}.thr"]),
        ]
        if region.spec.probe:
            measure.append(helper.make_node("Gather", ["fc.use_probe", idx], [f"fc.{n}.use_probe"]))
        terms = [(h, st.name, h) for h, st in zip(region.spec.inputs, region.states_in)]
        change, num, den = self.reduced_change(f"fc.{n}.d", terms, "sq")
        measure += change
        rel = f"fc.{n}.rel" if region.spec.probe else f"fc.{n}.stat@gate"
        measure += [
            helper.make_node("Div", [num, den], [f"fc.{n}.ratio"]),
            helper.make_node("Sqrt", [f"fc.{n}.ratio"], [rel]),
        ]
        if region.spec.probe:
            measure += self.probe_nodes(region)
            measure.append(helper.make_node("Where", [f"fc.{n}.use_probe", f"fc.{n}.probe", rel], [f"fc.{n}.stat@gate"]))
        measure += [
            helper.make_node("LessOrEqual", [f"fc.{n}.stat@gate", f"fc.{n}.thr"], [f"fc.{n}.ok"]),
            helper.make_node("Cast", [f"fc.{n}.ok"], [f"fc.{n}.okf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMin", [f"fc.{n}.okf"], [f"fc.{n}.allok"], keepdims=0),
            helper.make_node("Greater", [f"fc.{n}.allok", "fc.half"], [f"fc.{n}.pass"]),
            # force is false where the gate measures; the Or keeps the branch exact on its own, for
            # back ends that measure at every step (`fcpass.compiler.passes.inline_gates`).
            helper.make_node("Or", [f"fc.{n}.force", f"fc.{n}.pass"], [f"fc.{n}.cond@gate"]),
        ]
        measure += [
            helper.make_node("Cast", [f"fc.{n}.cond@gate"], [f"fc.{n}.skip0"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"fc.{n}.skip0", "fc.axis0"], [f"fc.{n}.skip@gate"]),
        ]
        forced = [
            helper.make_node("Identity", ["fc.nan_b"], [f"fc.{n}.stat@forced"]),
            helper.make_node("Gather", ["fc.force", idx], [f"fc.{n}.cond@forced"]),
            helper.make_node("Gather", ["fc.forcef", f"{idx}1"], [f"fc.{n}.skip@forced"]),
        ]
        for node in measure + forced:
            node.name = f"fc/{n}/{node.output[0]}"
        batch = self.tensor_type(region.spec.inputs[0])[1][0]

        def branch(nodes: list[onnx.NodeProto], tag: str) -> onnx.GraphProto:
            return helper.make_graph(nodes, f"fc_{n}_{tag}", [], [
                helper.make_tensor_value_info(f"fc.{n}.stat@{tag}", TensorProto.FLOAT, [batch]),
                helper.make_tensor_value_info(f"fc.{n}.cond@{tag}", TensorProto.BOOL, []),
                helper.make_tensor_value_info(f"fc.{n}.skip@{tag}", TensorProto.FLOAT, [1]),
            ])

        gate = helper.make_node("If", [f"fc.{n}.decide"], [f"fc.{n}.stat", f"fc.{n}.cond", f"fc.{n}.skip"],
                                name=gate_name(n), then_branch=branch(measure, "gate"), else_branch=branch(forced, "forced"))
        return [gate]

    def probe_nodes(self, region: Region) -> list[onnx.NodeProto]:
        """probe (B,) = sum |a - a_ref| / sum |a_ref| over the probed tensors (rel_L1 per sample).

        head_residual: a = H_region - H_head (the first block's residual), a_ref its state, which the
        region's `If` updates when it computes. modulated_input: a = the probed tensor, a_ref its value
        at the previous step, updated here at every step.
        """
        n = region.name
        nodes: list[onnx.NodeProto] = []
        terms: list[tuple[str, str, str]] = []  # (a, a_ref, the tensor whose type they have)
        for j, (x, h) in enumerate(region.probe_pairs):
            nodes.append(helper.make_node("Sub", [x, h], [f"fc.{n}.R{j}"]))
            terms.append((f"fc.{n}.R{j}", region.states_res[j].name, x))
        if region.probe_input is not None:
            terms.append((region.probe_input, region.states_mod[0].name, region.probe_input))
        reduce_nodes, num, den = self.reduced_change(f"fc.{n}.p", terms, "abs")
        return [*nodes, *reduce_nodes, helper.make_node("Div", [num, den], [f"fc.{n}.probe"])]

    def reduced_change(self, tag: str, terms: list[tuple[str, str, str]], reduce: str) -> tuple[list[onnx.NodeProto], str, str]:
        """Per sample, sum_j reduce(a_j - ref_j) and sum_j reduce(ref_j) over every axis but the batch,
        for terms (a_j, ref_j, like_j), where reduce is "sq" (sum of squares) or "abs" (sum of absolute
        values); fp16/bf16 tensors are summed in fp32. Returns (nodes, num, den)."""
        op, arity = {"sq": ("Mul", 2), "abs": ("Abs", 1)}[reduce]
        nodes: list[onnx.NodeProto] = []
        num, den = [], []
        for j, (a, ref, like) in enumerate(terms):
            elem, shape = self.tensor_type(like)
            axes = self.const(self.fresh(f"{tag}.axes"), np.arange(1, len(shape), dtype=np.int64))
            d = f"{tag}{j}"
            nodes.append(helper.make_node("Sub", [a, ref], [d]))
            if elem != TensorProto.FLOAT:
                nodes.append(helper.make_node("Cast", [d], [d + ".f"], to=TensorProto.FLOAT))
                nodes.append(helper.make_node("Cast", [ref], [f"{d}.ref.f"], to=TensorProto.FLOAT))
                d, ref = d + ".f", f"{d}.ref.f"
            for x, out in ((d, f"{tag}{j}.num"), (ref, f"{tag}{j}.den")):
                # ReduceSum of the elementwise square/abs, not ReduceSumSquare/ReduceL1: ONNX Runtime's CPU
                # kernels for those take 2-3x as long on a (B, N, D) tensor, once per region per step.
                nodes.append(helper.make_node(op, [x] * arity, [out + ".e"]))
                nodes.append(helper.make_node("ReduceSum", [out + ".e", axes], [out], keepdims=0))
            num.append(f"{tag}{j}.num")
            den.append(f"{tag}{j}.den")
        if len(num) == 1:
            return nodes, num[0], den[0]
        nodes.append(helper.make_node("Sum", num, [f"{tag}.num"]))
        nodes.append(helper.make_node("Sum", den, [f"{tag}.den"]))
        return nodes, f"{tag}.num", f"{tag}.den"

    def summary_nodes(self, flat: list[Region]) -> list[onnx.NodeProto]:
        """fc_stat (R, B) and fc_skip (R,) from every region's statistic and decision."""
        batch = self.tensor_type(flat[0].spec.inputs[0])[1][0]
        self.const("fc.stat_shape", np.array([len(flat), -1], dtype=np.int64))
        nodes = [
            helper.make_node("Concat", [f"fc.{r.name}.stat" for r in flat], ["fc.stats_flat"], axis=0),
            helper.make_node("Reshape", ["fc.stats_flat", "fc.stat_shape"], [STAT_OUTPUT]),
            helper.make_node("Concat", [f"fc.{r.name}.skip" for r in flat], [SKIP_OUTPUT], axis=0),
        ]
        self.graph.output.extend([
            helper.make_tensor_value_info(STAT_OUTPUT, TensorProto.FLOAT, [len(flat), batch]),
            helper.make_tensor_value_info(SKIP_OUTPUT, TensorProto.FLOAT, [len(flat)]),
        ])
        return nodes

    def add_constants(self) -> None:
        self.const("fc.half", np.array(0.5, dtype=np.float32))
        self.const("fc.minus_one", np.array([-1.0], dtype=np.float32))  # a decision: (1,), as fc_skip concatenates them
        self.const("fc.axis0", np.array([0], dtype=np.int64))
        for j in range(MIX_WIDTH):
            self.const(f"fc.c{j}", np.array(j, dtype=np.int64))
        self.const("fc.one_f", np.array(1.0, dtype=np.float32))
        self.const("fc.cols_input", np.array(INPUT_COLUMNS, dtype=np.int64))

