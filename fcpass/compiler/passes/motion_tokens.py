"""FastCache's spatial token selection (ALGORITHMS 2b), compiled into the stack's compute branch.

With `--motion-ratio rho` the stack's compute branch becomes `If(fc_motion, motion, full)`:
- full: the original nodes (with their nested regions), exactly as without motion tokens;
- motion: per token j the saliency s_j = ||X_j - X_j_ref||^2 of the stack input against its value
  when token j was last computed; the k = ceil(rho N) most salient tokens are gathered (TopK +
  GatherND, `fcpass.compiler.token_rows`) and run through every block specialised to k tokens (`fcpass.compiler.token_axis`, mixing
  mode: attention runs among those k tokens, as FastCache's transformer does); every token takes the
  stack's approximation (the host's fc_mix row, e.g. the fitted `linear`) and the k computed outputs
  are scattered over it (ScatterND). Shapes are static throughout.

With `context` (`--motion-context`, an fcpass extension) the motion tokens' attention also reads the
other tokens: every block's keys and values are cache state (refreshed by a full step), and a motion
step scatters the k tokens' fresh keys and values into them before Q K^T and P V, so the k queries
attend to all N tokens; MLPs and projections still run on k tokens only.

With `merge` (ALGORITHMS 2c, `--token-merge`) the reduced step is k-NN density merging instead: all
N tokens are merged into k per sample, the blocks run on the k merged tokens, and every token takes
the residual of its nearest kept token (`_merge_graph`); no state is refreshed on such a step.

Invariant: with fc_motion = 0 the stack runs exactly the graph it would without this pass. With
fc_motion = 1 the k gathered tokens' outputs equal the blocks run on those k tokens alone (in
PyTorch, say) and the other tokens' outputs equal the stack's approximation; with k = N the outputs
equal the full blocks' (attention is permutation-equivariant) up to rounding.

State: the stack's cached input and output (and previous output, for taylor1) are refreshed at the k
computed tokens only, so each token's reference is the step it was last computed at; the static
tokens keep theirs, which their approximation reads. Regions nested in the stack are not reached on a
motion step: their statistics are NaN, decisions -1 (their state is kept), as when the stack skips.
Both halves of classifier-free guidance (an even batch, [cond; uncond]) share one selection.

Declined (FcpassError): no stack region, a stack with more than one token stream (double-stream
blocks), a stream that is not statically (B, N, D), token-level caching in the same graph, a ratio
outside (0, 1], merging where the stack reads the tokens through a second tensor (TeaCache's hoisted
probe), `context` with regions nested in the stack or without unfused (B, H, ., .) attention, and any op the token-axis follower cannot specialise (it names the node: SD3's joint
attention concatenates caption and image tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from fcpass.compiler.branches import find_branches
from fcpass.compiler.graphinfo import GraphIndex, node_inputs, node_macs, node_outputs, rename_values
from fcpass.compiler.passes.approximation import approximation_nodes
from fcpass.compiler.passes.builder import RegionHooks
from fcpass.compiler.token_axis import Axes, clone_on_tokens
from fcpass.compiler.token_rows import TokenRows
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import MOTION_INPUT, StateSpec

if TYPE_CHECKING:
    from fcpass.compiler.discover import Block
    from fcpass.compiler.passes.builder import Region, RegionBuilder

TOPK_MAX = 3840  # TensorRT's TopK limit


@dataclass(frozen=True)
class MergeOptions:
    """k-NN density token merging (ALGORITHMS 2c) in place of the saliency top-k.

    neighbours: K, the neighbourhood of the density estimate and of each merge.
    weight: lambda, how much a token's motion raises its importance.
    """

    neighbours: int = 5
    weight: float = 1.0


class MotionPass(RegionHooks):
    """Builds the stack's motion branch, as a hook of the region builder (`RegionHooks.wrap_compute`)."""

    def __init__(self, builder: RegionBuilder, index: GraphIndex, stack: Region, ratio: float, latent: str,
                 merge: MergeOptions | None = None, context: list[Block] | None = None) -> None:
        if not 0.0 < ratio <= 1.0:
            raise FcpassError(f"--motion-ratio {ratio} must be in (0, 1]")
        self.merge = merge
        self.builder = builder
        self.index = index
        self.stack = stack
        self.ratio = ratio
        spec = stack.spec
        streams = [j for j, p in enumerate(spec.pairs) if p is not None]
        if len(spec.outputs) != 1 or len(streams) != 1:
            raise FcpassError(f"motion tokens need a single-stream stack; this one has outputs {spec.outputs} "
                              "(double-stream blocks carry a second token stream)")
        self.stream = spec.inputs[spec.pairs[0]]  # type: ignore[index]
        shape = index.shape(self.stream)
        if not shape or len(shape) != 3 or not all(isinstance(d, int) for d in shape):
            raise FcpassError(f"motion tokens need the stack input {self.stream!r} statically shaped (B, N, D); found {shape}")
        self.batch, self.tokens, self.width = (int(d) for d in shape)
        self.k = min(self.tokens, math.ceil(ratio * self.tokens))
        if self.k > TOPK_MAX:
            raise FcpassError(f"motion tokens: k = {self.k} exceeds TensorRT's TopK limit {TOPK_MAX}; lower --motion-ratio")
        dependent = index.descendants({latent})
        outside = {x for i in stack.nodes for x in index.nodes[i].input
                   if x and index.producer.get(x) not in stack.nodes}
        # Every tensor the blocks read that carries the tokens (the stream, a hoisted probe's
        # modulated input) is gathered; conditioning and weights are read as they are.
        self.sources = sorted(x for x in outside if x == latent or index.producer.get(x) in dependent)
        for x in self.sources:
            s = index.shape(x)
            if not s or len(s) < 2 or s[0] != self.batch or s[1] != self.tokens:
                raise FcpassError(f"motion tokens: the stack reads {x!r} (shape {s}), which depends on the latent "
                                  f"but is not token-major (B={self.batch}, N={self.tokens}, ...)")
        if merge is not None:
            if self.sources != [self.stream]:
                raise FcpassError(f"token merging needs the stack to read the tokens only through {self.stream!r}, and it "
                                  f"also reads {[x for x in self.sources if x != self.stream]}; optimize with --no-probes")
            if not 1 <= merge.neighbours < self.tokens:
                raise FcpassError(f"--merge-neighbours {merge.neighbours} must be in [1, {self.tokens - 1}]")
        self.context: list[tuple[StateSpec, StateSpec]] = []
        if context is not None:
            if merge is not None:
                raise FcpassError("--motion-context and --token-merge exclude each other: merged tokens have no own keys")
            if stack.children:
                raise FcpassError("--motion-context caches keys and values inside the stack's own branch; "
                                  "optimize with --regions stack")
            self._add_context(context, index.descendants({latent}))
        self.macs = 0
        builder.graph.input.append(helper.make_tensor_value_info(MOTION_INPUT, TensorProto.INT64, []))
        builder.const("fc.motion.zero", np.array(0, np.int64))
        builder.const("fc.motion.k", np.array([self.k], np.int64))
        builder.const("fc.motion.ax2", np.array([2], np.int64))
        builder.const("fc.motion.half", np.array(0.5, np.float32))

    def _add_context(self, blocks: list[Block], dependent: set[int]) -> None:
        """Per block, the keys (the second operand of Q K^T) and values (of P V) of its self-attention
        as cache state, (B, H, d, N) and (B, H, N, d): a computing step refreshes them."""
        region = self.stack
        for blk in blocks:
            split = find_branches(self.index, blk, dependent)
            att = next((br for br in split.mixing() if br.probs and br.value and not br.value_fused), None)
            if att is None:
                raise FcpassError(f"block {blk.scope!r}: --motion-context needs unfused self-attention (Softmax, MatMul)")
            key = _key_operand(self.index, att.probs, set(att.nodes))
            k_shape, v_shape = self.index.shape(key or ""), self.index.shape(att.value)
            if key is None or not k_shape or len(k_shape) != 4 or k_shape[-1] != self.tokens \
                    or not v_shape or len(v_shape) != 4 or v_shape[2] != self.tokens:
                raise FcpassError(f"block {blk.scope!r}: --motion-context needs keys (B, H, d, N) and values (B, H, N, d); "
                                  f"found {k_shape} and {v_shape}")
            pair = tuple(self._state(kind, blk.index, src) for kind, src in (("key", key), ("value", att.value)))
            self.context.append(pair)  # type: ignore[arg-type]
        region.states_kv = [s for pair in self.context for s in pair]

    def _state(self, kind: str, block: int, source: str) -> StateSpec:
        b = self.builder
        elem, shape = b.tensor_type(source)
        name = f"fc.{self.stack.name}.{kind}{block}"
        b.graph.input.append(helper.make_tensor_value_info(name, elem, shape))
        b.graph.output.append(helper.make_tensor_value_info(name + ".next", elem, shape))
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
        return StateSpec(name, name + ".next", self.stack.name, kind, source, shape, dtype)

    def wrap_compute(self, run_graph: onnx.GraphProto, region: Region) -> onnx.GraphProto:
        """The stack's compute branch as `If(fc_motion > 0, motion, run_graph)`, with run_graph's outputs
        (any other region's, as it is).

        run_graph's values are renamed `@stack.full` (a nested graph may not redefine a name its
        parent defines); the If defines the original names.
        """
        if region is not self.stack:
            return run_graph
        n = self.stack.name
        outputs = [_copy_info(vi, vi.name) for vi in run_graph.output]
        rename = {vi.name: vi.name.replace(f"@{n}.run", f"@{n}.full") for vi in outputs}
        for node in run_graph.node:
            rename_values(node, rename)
        for vi in (*run_graph.output, *run_graph.value_info):
            vi.name = rename.get(vi.name, vi.name)
        motion = self._motion_graph(outputs)
        nodes = [
            helper.make_node("Greater", [MOTION_INPUT, "fc.motion.zero"], ["fc.motion.on"], name="fc/motion/on"),
            helper.make_node("If", ["fc.motion.on"], [vi.name for vi in outputs], name=f"fc/{n}/motion/If",
                             then_branch=motion, else_branch=run_graph),
        ]
        graph = helper.make_graph(nodes, f"fc_{n}_compute", [], outputs)
        graph.value_info.append(helper.make_tensor_value_info("fc.motion.on", TensorProto.BOOL, []))
        return graph

    def _motion_graph(self, run_out: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
        b = self.builder
        region, spec = self.stack, self.stack.spec
        nodes: list[onnx.NodeProto] = []

        def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
            nodes.append(helper.make_node(op, inputs, [output], name=f"fc/{output}", **attrs))
            return output

        j_stream = spec.inputs.index(self.stream)
        x, x_ref = self.stream, region.states_in[j_stream].name
        if self.merge is not None:
            return self._merge_graph(run_out, nodes, node, x, x_ref)
        idx = self._select(nodes, node, x, x_ref)
        rows = TokenRows.of(node, b.const, idx, self.batch, self.k, "fc.motion")
        gathered = {src: rows.gather(src, b.fresh("fc.motion.xk")) for src in self.sources}
        axes: dict[str, Axes | None] = {}
        names: dict[str, str] = {}
        clones, out_k = clone_on_tokens(self.index, sorted(region.nodes), gathered, spec.outputs[0], self.tokens, self.k,
                                        "~motion", b.const, mixing=True, axes_out=axes, names_out=names)
        context = self._attend_to_cache(clones, names, idx) if self.context else []
        nodes.extend(clones)
        self.macs = self._macs(sorted(region.nodes), axes) + spec.approx_macs

        approx_nodes: list[onnx.NodeProto] = []
        approx = approximation_nodes(b, region, 0, approx_nodes)
        # The same builder names the skip branch's nodes: suffix them, a name is defined once per model.
        mine = {o: f"{o}~motion" for nd in approx_nodes for o in node_outputs(nd)}
        for nd in approx_nodes:
            rename_values(nd, mine)
        nodes.extend(approx_nodes)
        out = rows.scatter(mine.get(approx, approx), out_k, "fc.motion.out")

        values: list[str] = [out]
        for j, s in enumerate(region.states_in):
            values.append(rows.scatter(s.name, gathered[x], f"{s.next}@m") if j == j_stream else spec.inputs[j])
        o_ref = region.states_out[0].name
        values.append(rows.scatter(o_ref, out_k, f"{region.states_out[0].next}@m"))
        for s in region.states_prev:
            values.append(rows.scatter(s.name, rows.gather(o_ref, f"{s.next}@m.k"), f"{s.next}@m"))
        values += [s.name for s in region.states_res]
        return self._finish(run_out, nodes, values + context)

    def _attend_to_cache(self, clones: list[onnx.NodeProto], names: dict[str, str], idx: str) -> list[str]:
        """Rewire each cloned attention to read keys and values of all N tokens: the cached ones with
        the k motion tokens' fresh ones scattered in. Returns those full tensors (the next state)."""
        b, c = self.builder, self.builder.const
        bn, k = self.batch, self.k
        out: list[str] = []
        for key, value in self.context:
            full = {}
            for s, axis in ((key, 3), (value, 2)):
                shape = [int(d) for d in s.shape]  # type: ignore[arg-type]
                small = names[s.source]
                where = [bn, 1, 1, k] if axis == 3 else [bn, 1, k, 1]
                gshape = [*shape[:axis], k, *shape[axis + 1:]]
                pre = [
                    helper.make_node("Reshape", [idx, c(b.fresh("fc.motion.ish"), np.array(where, np.int64))],
                                     [f"{s.name}.i4"]),
                    helper.make_node("Expand", [f"{s.name}.i4", c(b.fresh("fc.motion.ishape"), np.array(gshape, np.int64))],
                                     [f"{s.name}.ie"]),
                    helper.make_node("ScatterElements", [s.name, f"{s.name}.ie", small], [f"{s.name}.full"], axis=axis),
                ]
                at = next(j for j, nd in enumerate(clones) if small in nd.output) + 1
                for nd in clones[at:]:
                    for j, x in enumerate(nd.input):
                        if x == small:
                            nd.input[j] = f"{s.name}.full"
                clones[at:at] = pre
                full[axis] = f"{s.name}.full"
            out += [full[3], full[2]]
        return out

    def _finish(self, run_out: list[onnx.ValueInfoProto], nodes: list[onnx.NodeProto], values: list[str]) -> onnx.GraphProto:
        """The branch graph: `values` as the compute branch's outputs, nested regions not reached."""
        b, region = self.builder, self.stack
        n = region.name
        outs: list[onnx.ValueInfoProto] = []
        for src, vi in zip(values, run_out):
            name = vi.name.replace(f"@{n}.run", f"@{n}.motion")
            nodes.append(helper.make_node("Identity", [src], [name], name=f"fc/{name}"))
            outs.append(_copy_info(vi, name))
        b.unreached_children(region, f"{n}.motion", nodes, outs)
        if [o.name.replace(".motion", ".run") for o in outs] != [vi.name for vi in run_out]:
            raise AssertionError("the motion branch's outputs are out of step with the compute branch's")
        return helper.make_graph(_live(nodes, {o.name for o in outs}), f"fc_{n}_motion", [], outs)

    def _merge_graph(self, run_out: list[onnx.ValueInfoProto], nodes: list[onnx.NodeProto], node: Any, x: str,
                     x_ref: str) -> onnx.GraphProto:
        """k-NN density merging (ALGORITHMS 2c), per sample: merge N tokens into k, run the blocks on
        them, unmerge. Nothing is refreshed in the state: no output belongs to one token alone.

        Neighbours are the K nearest other tokens (squared L2 in the stream's space). Importance
        log S_j = -mean_K d^2 + log(1 + lambda * rho_tm_j), rho_tm_j = ||X_j - X_j_ref|| / max_j, in
        log space (exp(-mean d^2) underflows at real widths); the k most important tokens are kept,
        each replaced by the S-weighted mean of itself and its K neighbours. Unmerging gives token j
        the *residual* of its nearest kept token, O_j = X_j + (O_m - X~_m): copying that token's
        output instead would overwrite j's own content (and its position) with its neighbour's.
        """
        b, region, spec = self.builder, self.stack, self.stack.spec
        m = self.merge
        assert m is not None
        bn, n, k, d, nb = self.batch, self.tokens, self.k, self.width, m.neighbours
        c = b.const
        d2, log_s, weight = self._importance(nodes, node, x, x_ref)
        nodes.append(helper.make_node("TopK", [log_s, "fc.motion.k"], ["fc.merge.keptv", "fc.merge.kept"],
                                      name="fc/merge/kept", axis=1, largest=1, sorted=1))
        kept = "fc.merge.kept"
        # The kept tokens' neighbourhoods (B, k, K+1), their weights and features.
        kept3 = node("Expand", [node("Unsqueeze", [kept, "fc.motion.ax2"], "fc.merge.kept_u"),
                                c("fc.merge.kshape", np.array([bn, k, nb + 1], np.int64))], "fc.merge.kept_e")
        hood = node("GatherElements", ["fc.merge.ni", kept3], "fc.merge.hood", axis=1)
        flat = node("Reshape", [hood, c("fc.merge.flat", np.array([bn, k * (nb + 1)], np.int64))], "fc.merge.hood_flat")
        w = node("GatherElements", [weight, flat], "fc.merge.hw", axis=1)
        w = node("Reshape", [w, c("fc.merge.wshape", np.array([bn, k, nb + 1, 1], np.int64))], "fc.merge.hw4")
        flat_e = node("Expand", [node("Unsqueeze", [flat, "fc.motion.ax2"], "fc.merge.flat_u"),
                                 c("fc.merge.fshape", np.array([bn, k * (nb + 1), d], np.int64))], "fc.merge.flat_e")
        feats = node("GatherElements", [x, flat_e], "fc.merge.hx", axis=1)
        feats = node("Reshape", [feats, c("fc.merge.xshape", np.array([bn, k, nb + 1, d], np.int64))], "fc.merge.hx4")
        if self.index.dtype(x) != np.float32:
            feats = node("Cast", [feats], "fc.merge.hx32", to=TensorProto.FLOAT)
        num = node("ReduceSum", [node("Mul", [feats, w], "fc.merge.wx"), "fc.motion.ax2"], "fc.merge.num", keepdims=0)
        den = node("ReduceSum", [w, "fc.motion.ax2"], "fc.merge.den", keepdims=0)
        merged = node("Div", [num, den], "fc.merge.xm32")
        elem = self.builder.tensor_type(x)[0]
        if elem != TensorProto.FLOAT:
            merged = node("Cast", [merged], "fc.merge.xm", to=elem)
        axes: dict[str, Axes | None] = {}
        clones, out_k = clone_on_tokens(self.index, sorted(region.nodes), {x: merged}, spec.outputs[0], self.tokens, k,
                                        "~merge", b.const, mixing=True, axes_out=axes)
        nodes.extend(clones)
        # Unmerge: every token takes the residual of its nearest kept token.
        kept_n = node("Expand", [node("Unsqueeze", [kept, "fc.merge.ax1"], "fc.merge.kept_r"),
                                 c("fc.merge.nshape", np.array([bn, n, k], np.int64))], "fc.merge.kept_n")
        to_kept = node("GatherElements", [d2, kept_n], "fc.merge.dk", axis=2)
        nearest = node("ArgMin", [to_kept], "fc.merge.nearest", axis=2, keepdims=1)
        nearest = node("Expand", [nearest, c("fc.merge.ushape", np.array([bn, n, d], np.int64))], "fc.merge.nearest_e")
        delta = node("Sub", [out_k, merged], "fc.merge.delta")
        out = node("Add", [x, node("GatherElements", [delta, nearest], "fc.merge.spread", axis=1)], "fc.merge.out")
        self.macs = self._macs(sorted(region.nodes), axes) + bn * n * n * d + bn * k * (nb + 1) * d
        values = [out, *[s.name for s in (*region.states_in, *region.states_out, *region.states_prev, *region.states_res)]]
        return self._finish(run_out, nodes, values)

    def _importance(self, nodes: list[onnx.NodeProto], node: Any, x: str, x_ref: str) -> tuple[str, str, str]:
        """Token merging's pairwise squared distances d^2 (B, N, N), log importance log S (B, N) and
        weights S / max S; the nearest neighbours' indices are `fc.merge.ni` (B, N, K + 1)."""
        m = self.merge
        assert m is not None
        c, nb = self.builder.const, m.neighbours
        xf = node("Cast", [x], "fc.merge.x32", to=TensorProto.FLOAT) if self.index.dtype(x) != np.float32 else x
        # Pairwise squared distances within each sample, (B, N, N).
        sq = node("ReduceSumSquare", [xf, "fc.motion.ax2"], "fc.merge.sq", keepdims=1)
        gram = node("MatMul", [xf, node("Transpose", [xf], "fc.merge.xt", perm=[0, 2, 1])], "fc.merge.gram")
        d2 = node("Add", [sq, node("Transpose", [sq], "fc.merge.sqt", perm=[0, 2, 1])], "fc.merge.sqsum")
        d2 = node("Sub", [d2, node("Mul", [gram, c("fc.merge.two", np.array(2.0, np.float32))], "fc.merge.g2")], "fc.merge.d2r")
        d2 = node("Max", [d2, c("fc.merge.zero", np.array(0.0, np.float32))], "fc.merge.d2")
        # The K + 1 nearest (the token itself first, at distance 0); the density ignores the token itself.
        nodes.append(helper.make_node("TopK", [d2, c("fc.merge.k1", np.array([nb + 1], np.int64))],
                                      ["fc.merge.nd", "fc.merge.ni"], name="fc/merge/TopK", axis=-1, largest=0, sorted=1))
        rest = node("Slice", ["fc.merge.nd", c("fc.merge.s1", np.array([1], np.int64)),
                              c("fc.merge.s2", np.array([nb + 1], np.int64)), c("fc.merge.sax", np.array([2], np.int64))],
                    "fc.merge.nd_rest")
        mean_d2 = node("ReduceMean", [rest, "fc.motion.ax2"], "fc.merge.md2", keepdims=0)
        diff = node("Sub", [x, x_ref], "fc.merge.dx")
        if self.index.dtype(x) != np.float32:
            diff = node("Cast", [diff], "fc.merge.dx32", to=TensorProto.FLOAT)
        motion = node("Sqrt", [node("ReduceSumSquare", [diff, "fc.motion.ax2"], "fc.merge.m2", keepdims=0)], "fc.merge.m")
        top = node("ReduceMax", [motion, c("fc.merge.ax1", np.array([1], np.int64))], "fc.merge.mmax", keepdims=1)
        eps = c("fc.merge.eps", np.array(1e-12, np.float32))
        rho_tm = node("Div", [motion, node("Max", [top, eps], "fc.merge.mmaxe")], "fc.merge.rho_tm")
        boost = node("Mul", [rho_tm, c("fc.merge.lambda", np.array(m.weight, np.float32))], "fc.merge.lrho")
        one = c("fc.merge.one", np.array(1.0, np.float32))
        log_s = node("Sub", [node("Log", [node("Add", [one, boost], "fc.merge.1lrho")], "fc.merge.logtm"), mean_d2],
                     "fc.merge.logs")
        # Weights relative to each sample's largest importance: the same ratios, no overflow.
        s_max = node("ReduceMax", [log_s, "fc.merge.ax1"], "fc.merge.lsmax", keepdims=1)
        weight = node("Exp", [node("Sub", [log_s, s_max], "fc.merge.lsrel")], "fc.merge.w")
        return d2, log_s, weight

    def _select(self, nodes: list[onnx.NodeProto], node: Any, x: str, x_ref: str) -> str:
        """TopK indices (B, k) of the tokens' saliency ||X_j - X_j_ref||^2; CFG halves select alike."""
        b = self.builder
        d = node("Sub", [x, x_ref], "fc.motion.d")
        if self.index.dtype(x) != np.float32:
            d = node("Cast", [d], "fc.motion.d32", to=TensorProto.FLOAT)
        s = node("ReduceSumSquare", [d, "fc.motion.ax2"], "fc.motion.sal", keepdims=0)
        pair = self.batch % 2 == 0
        if pair:
            h = self.batch // 2
            lo, mid, hi = (b.const(f"fc.motion.h{i}", np.array([v], np.int64)) for i, v in enumerate((0, h, self.batch)))
            c0 = node("Slice", [s, lo, mid, lo], "fc.motion.cond")
            c1 = node("Slice", [s, mid, hi, lo], "fc.motion.uncond")
            s = node("Mul", [node("Add", [c0, c1], "fc.motion.pairsum"), "fc.motion.half"], "fc.motion.pair")
        top = "fc.motion.top"
        nodes.append(helper.make_node("TopK", [s, "fc.motion.k"], ["fc.motion.topv", top], name="fc/motion/TopK",
                                      axis=1, largest=1, sorted=1))
        return node("Concat", [top, top], "fc.motion.idx", axis=0) if pair else top

    def _macs(self, nodes: list[int], axes: dict[str, Axes | None]) -> int:
        """MACs of the blocks on k tokens: a term scales by (k/N) per token axis it spans."""
        f = self.k / self.tokens
        total = 0.0
        for i in nodes:
            nd = self.index.nodes[i]
            macs = node_macs(nd, self.index)
            if not macs:
                continue
            if nd.op_type == "MatMul":
                a, c = axes.get(nd.input[0]) or frozenset(), axes.get(nd.input[1]) or frozenset()
                ra = len(self.index.shape(nd.input[0]) or ())
                span = len(a) + len(c) - (1 if ra - 1 in a else 0)
                if a and c and self.context:  # k queries against all N cached keys and values
                    span = 1
            else:
                span = len(axes.get(nd.output[0]) or ())
            total += macs * f ** span
        return int(total)

    def spec(self) -> dict[str, Any]:
        """The plan's record of the motion branch (`CachePlan.motion`)."""
        return {"input": MOTION_INPUT, "ratio": self.ratio, "k": self.k, "tokens": self.tokens,
                "region": self.stack.name, "macs": self.macs, "merge": asdict(self.merge) if self.merge else None,
                "context": bool(self.context)}


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those nobody reads: clones of the shape constants that k replaced."""
    needed = set(outputs)
    keep = []
    for nd in reversed(nodes):
        if any(o in needed for o in nd.output):
            keep.append(nd)
            needed.update(node_inputs(nd))
    return keep[::-1]


def _key_operand(index: GraphIndex, probs: str, body: set[int]) -> str | None:
    """The keys of an attention: the second operand of the MatMul that the Softmax's input comes
    from, through the scaling, casting and masking ops that may sit between them."""
    t = index.nodes[index.producer[probs]].input[0]
    for _ in range(6):
        p = index.producer.get(t)
        if p is None or p not in body:
            return None
        nd = index.nodes[p]
        if nd.op_type == "MatMul":
            return nd.input[1]
        if nd.op_type not in ("Mul", "Div", "Add", "Sub", "Cast", "Identity", "Where"):
            return None
        t = nd.input[0] if nd.op_type != "Where" else nd.input[1]
    return None


def _copy_info(vi: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    c = onnx.ValueInfoProto()
    c.CopyFrom(vi)
    c.name = name
    return c
