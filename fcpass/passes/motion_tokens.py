"""FastCache's spatial token selection (ALGORITHMS 2b), compiled into the stack's compute branch.

With `--motion-ratio rho` the stack's compute branch becomes `If(fc_motion, motion, full)`:
- full: the original nodes (with their nested regions), exactly as without motion tokens;
- motion: per token j the saliency s_j = ||X_j - X_j_ref||^2 of the stack input against its value
  when token j was last computed; the k = ceil(rho N) most salient tokens are gathered (TopK +
  GatherElements) and run through every block specialised to k tokens (`fcpass.token_axis`, mixing
  mode: attention runs among those k tokens, as FastCache's transformer does); every token takes the
  stack's approximation (the host's fc_mix row, e.g. the fitted `linear`) and the k computed outputs
  are scattered over it (ScatterElements). Shapes are static throughout.

Invariant: with fc_motion = 0 the stack runs exactly the graph it would without this pass. With
fc_motion = 1 the k gathered tokens' outputs equal the blocks run on those k tokens alone (in
PyTorch, say) and the other tokens' outputs equal the stack's approximation; with k = N the outputs
equal the full blocks' (attention is permutation-equivariant) up to rounding.

State: the stack's cached input and output (and previous output, for taylor1) are refreshed at the k
computed tokens only, so each token's reference is the step it was last computed at; the static
tokens keep theirs, which their approximation reads. Regions nested in the stack are not reached on a
motion step: their statistics are NaN, decisions -1, states passed through, as when the stack skips.
Both halves of classifier-free guidance (an even batch, [cond; uncond]) share one selection.

Declined (FcpassError): no stack region, a stack with more than one token stream (double-stream
blocks), a stream that is not statically (B, N, D), token-level caching in the same graph, a ratio
outside (0, 1], and any op the token-axis follower cannot specialise (it names the node).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from fcpass.errors import FcpassError
from fcpass.graphinfo import GraphIndex, node_macs, rename_values
from fcpass.plan import MOTION_INPUT
from fcpass.token_axis import Axes, clone_on_tokens

if TYPE_CHECKING:
    from fcpass.passes.cache_regions import _Builder, _Region

TOPK_MAX = 3840  # TensorRT's TopK limit


class MotionPass:
    """Builds the stack's motion branch; `fcpass.passes.cache_regions` calls `wrap` while it builds."""

    def __init__(self, builder: _Builder, index: GraphIndex, stack: _Region, ratio: float, latent: str) -> None:
        if not 0.0 < ratio <= 1.0:
            raise FcpassError(f"--motion-ratio {ratio} must be in (0, 1]")
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
        self.macs = 0
        builder.graph.input.append(helper.make_tensor_value_info(MOTION_INPUT, TensorProto.INT64, []))
        builder.const("fc.motion.zero", np.array(0, np.int64))
        builder.const("fc.motion.k", np.array([self.k], np.int64))
        builder.const("fc.motion.ax2", np.array([2], np.int64))
        builder.const("fc.motion.half", np.array(0.5, np.float32))

    def wrap(self, run_graph: onnx.GraphProto) -> onnx.GraphProto:
        """The stack's compute branch as `If(fc_motion > 0, motion, run_graph)`, with run_graph's outputs.

        run_graph's values are renamed `@stack.full` (a nested graph may not redefine a name its
        parent defines); the If defines the original names.
        """
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
        n = region.name
        nodes: list[onnx.NodeProto] = []

        def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
            nodes.append(helper.make_node(op, inputs, [output], name=f"fc/{output}", **attrs))
            return output

        j_stream = spec.inputs.index(self.stream)
        x, x_ref = self.stream, region.states_in[j_stream].name
        idx = self._select(nodes, node, x, x_ref)
        gathered: dict[str, str] = {}
        for src in self.sources:
            shape = list(self.index.shape(src))  # type: ignore[arg-type]
            gshape = b.const(b.fresh("fc.motion.gshape"), np.array([self.batch, self.k, *shape[2:]], np.int64))
            e = node("Unsqueeze", [idx, b.const(b.fresh("fc.motion.axes"), np.arange(2, len(shape), dtype=np.int64))],
                     b.fresh("fc.motion.idx_u"))
            e = node("Expand", [e, gshape], b.fresh("fc.motion.idx_e"))
            gathered[src] = node("GatherElements", [src, e], b.fresh("fc.motion.xk"), axis=1)
            if src == x:
                idx_e = e
        axes: dict[str, Axes | None] = {}
        clones, out_k = clone_on_tokens(self.index, sorted(region.nodes), gathered, spec.outputs[0], self.tokens, self.k,
                                        "~motion", b.const, mixing=True, axes_out=axes)
        nodes.extend(clones)
        self.macs = self._macs(sorted(region.nodes), axes) + spec.approx_macs

        approx_nodes: list[onnx.NodeProto] = []
        approx = b.approximation_nodes(region, 0, approx_nodes)
        # The same builder names the skip branch's nodes: suffix them, a name is defined once per model.
        mine = {o: f"{o}~motion" for nd in approx_nodes for o in nd.output}
        for nd in approx_nodes:
            rename_values(nd, mine)
        nodes.extend(approx_nodes)
        out = node("ScatterElements", [mine.get(approx, approx), idx_e, out_k], "fc.motion.out", axis=1)

        values: list[str] = [out]
        for j, s in enumerate(region.states_in):
            values.append(node("ScatterElements", [s.name, idx_e, gathered[x]], f"{s.next}@m", axis=1) if j == j_stream
                          else spec.inputs[j])
        o_ref = region.states_out[0].name
        values.append(node("ScatterElements", [o_ref, idx_e, out_k], f"{region.states_out[0].next}@m", axis=1))
        for s in region.states_prev:
            was = node("GatherElements", [o_ref, idx_e], f"{s.next}@m.k", axis=1)
            values.append(node("ScatterElements", [s.name, idx_e, was], f"{s.next}@m", axis=1))
        values += [s.name for s in region.states_res]
        outs: list[onnx.ValueInfoProto] = []
        for src, vi in zip(values, run_out):
            name = vi.name.replace(f"@{n}.run", f"@{n}.motion")
            nodes.append(helper.make_node("Identity", [src], [name], name=f"fc/{name}"))
            outs.append(_copy_info(vi, name))
        b.unreached_children(region, f"{n}.motion", nodes, outs)
        if [o.name.replace(".motion", ".run") for o in outs] != [vi.name for vi in run_out]:
            raise AssertionError("the motion branch's outputs are out of step with the compute branch's")
        return helper.make_graph(nodes, f"fc_{n}_motion", [], outs)

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
            else:
                span = len(axes.get(nd.output[0]) or ())
            total += macs * f ** span
        return int(total)

    def spec(self) -> dict[str, Any]:
        """The plan's record of the motion branch (`CachePlan.motion`)."""
        return {"input": MOTION_INPUT, "ratio": self.ratio, "k": self.k, "tokens": self.tokens,
                "region": self.stack.name, "macs": self.macs}


def _copy_info(vi: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    c = onnx.ValueInfoProto()
    c.CopyFrom(vi)
    c.name = name
    return c
