"""Split a transformer block into its residual branches and find what token caching needs in each.

A DiT-style block is a chain on its residual stream: `x = x + [gate *] branch(x)` once per branch
(self-attention, cross-attention, MLP). `find_branches` recovers that chain from the graph alone:

1. The stream. Walking the block's nodes in topological order, a *cut* is a tensor that every
   path from the block input to its output passes through (the stream between two branches). The
   nodes between two consecutive cuts are one segment.
2. A segment that ends in `Add(stream, g)`, with `g` computed inside the segment, is a residual
   branch. If `g = Mul(gate, out)` and `gate` does not depend on the latent (adaLN's gate), the
   branch output *before its gate* is `out`; otherwise it is `g` (PixArt's ungated cross-attention).
   A segment of shape-preserving single-input nodes (Identity, Cast, Squeeze, ...) is a pass-through.
3. Classification. A branch is token-mixing if some MatMul (or fused attention op) has two operands
   that both depend on the stream (queries and keys from the image tokens: self-attention);
   otherwise it is token-local (an MLP; a cross-attention, whose keys and values come from the
   captions). Roles: `self_attention`, `cross_attention` (local, with a Softmax), `mlp`.
4. The value projection of a token-mixing branch: the second operand of the MatMul that reads the
   Softmax (the per-head values V, `(B, H, N, d)` or `(B*H, N, d)`), traced back through reshapes,
   transposes, gathers and splits to the MatMul/Gemm with a constant weight that projects it (for
   DiT's fused qkv projection, that MatMul). For a fused attention op, its V input. That Softmax's
   output is the attention map P (ToCa's attention-column scores read it); a fused op exposes none.

Declines (FcpassError naming the node and what was expected): a block with several stream inputs
or outputs (double-stream blocks), a segment that is neither a residual branch nor a pass-through,
a token-mixing branch whose attention has no Softmax/MatMul pair to read V from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx

from fcpass.compiler.discover import Block
from fcpass.compiler.graphinfo import GraphIndex
from fcpass.contract.errors import FcpassError

log = logging.getLogger(__name__)

PASSTHROUGH_OPS = frozenset({"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Dropout"})
# Ops on the way from V back to its projection: they move or split V, they do not compute it.
_V_TRACE_OPS = frozenset({"Reshape", "Transpose", "Gather", "Split", "Slice", "Squeeze", "Unsqueeze",
                          "Identity", "Cast", "Add", "Mul", "Div", "Dropout"})
_FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})


@dataclass
class Branch:
    """One residual branch: `stream_out = stream_in + [gate *] output`."""

    position: int
    kind: str  # "mixing" (self-attention) or "local" (MLP, cross-attention)
    role: str  # "self_attention", "cross_attention" or "mlp"
    stream_in: str  # the residual stream tensor the branch reads (shape (B, N, D))
    output: str  # the branch's output before its gate
    gate: str | None  # the gate the output is multiplied by (adaLN), if any
    stream_out: str  # the residual Add's output
    nodes: list[int]  # the branch's own nodes (not the gate Mul, not the residual Add)
    gate_node: int | None
    add_node: int
    value: str | None = None  # token-mixing: the per-head V tensor read after the Softmax
    value_proj: str | None = None  # the node that projects V (its name, or op type and output)
    value_fused: bool = False  # V is the input of a fused attention op, (B, N, H*d)
    probs: str | None = None  # token-mixing, unfused: the Softmax output P, (B, H, N, N) or (B*H, N, N)

    def describe(self) -> str:
        gate = "gated" if self.gate else "ungated"
        text = f"{self.role}({self.kind}, {gate}"
        if self.value_proj:
            text += f", V from {self.value_proj}"
        return text + ")"


@dataclass
class BlockBranches:
    """The residual chain of one block, in order, and the pass-through nodes between branches."""

    block: int
    scope: str
    stream_in: str
    stream_out: str
    branches: list[Branch]
    passthrough: list[int] = field(default_factory=list)

    def mixing(self) -> list[Branch]:
        return [b for b in self.branches if b.kind == "mixing"]

    def local(self) -> list[Branch]:
        return [b for b in self.branches if b.kind == "local"]

    def describe(self) -> str:
        return " -> ".join(b.describe() for b in self.branches)


def _label(index: GraphIndex, i: int) -> str:
    n = index.nodes[i]
    return f"{n.op_type} {n.name or n.output[0]!r}"


def find_branches(index: GraphIndex, block: Block, dependent: set[int] | None = None) -> BlockBranches:
    """The residual branches of `block` (see the module docstring); raises FcpassError when it cannot."""
    if len(block.inputs) != 1 or len(block.outputs) != 1:
        raise FcpassError(
            f"block {block.scope!r} has {len(block.inputs)} stream inputs and {len(block.outputs)} outputs; "
            "token caching handles single-stream blocks (DiT, PixArt), not double-stream ones"
        )
    if dependent is None:
        dependent = index.descendants({block.inputs[0]})
    nodes = sorted(block.nodes)
    node_set = set(nodes)
    cuts = _cuts(index, nodes, node_set, block.inputs[0], block.outputs[0])
    branches: list[Branch] = []
    passthrough: list[int] = []
    prev_pos, prev = -1, block.inputs[0]
    for pos, tensor in cuts:
        seg = [i for i in nodes if prev_pos < i <= pos]
        last = index.nodes[pos]
        if last.op_type == "Add" and prev in last.input and len(seg) > 1:
            branches.append(_branch(index, block, len(branches), seg, prev, pos, dependent))
        elif all(index.nodes[i].op_type in PASSTHROUGH_OPS for i in seg) and all(
            sum(index.producer.get(x) in node_set or x == prev for x in index.nodes[i].input) == 1 for i in seg
        ):
            passthrough.extend(seg)
        else:
            raise FcpassError(
                f"block {block.scope!r}: the stream segment ending at {_label(index, pos)} is not a residual branch; "
                f"expected Add(stream, [gate *] branch(stream)) reading the stream {prev!r}"
            )
        prev_pos, prev = pos, tensor
    if prev != block.outputs[0]:
        raise FcpassError(f"block {block.scope!r}: the residual chain ends at {prev!r}, not at the block output {block.outputs[0]!r}")
    if not branches:
        raise FcpassError(f"block {block.scope!r} has no residual branch (no Add of the stream and a function of it)")
    return BlockBranches(block.index, block.scope, block.inputs[0], block.outputs[0], branches, passthrough)


def _cuts(index: GraphIndex, nodes: list[int], node_set: set[int], start: str, end: str) -> list[tuple[int, str]]:
    """(node, tensor) for every tensor that is the only live stream value after that node."""
    live = {start}
    remaining = {start: sum(1 for r in index.consumers.get(start, []) if r in node_set)}
    cuts: list[tuple[int, str]] = []
    for i in nodes:
        node = index.nodes[i]
        for name in node.input:
            if name in live:
                remaining[name] -= 1
                if remaining[name] <= 0:
                    live.discard(name)
        for name in node.output:
            readers = sum(1 for r in index.consumers.get(name, []) if r in node_set)
            if readers or name == end:
                live.add(name)
                remaining[name] = readers + (name == end)
        if len(live) == 1 and (not cuts or cuts[-1][1] not in live):
            cuts.append((i, next(iter(live))))
    return cuts


def _branch(index: GraphIndex, block: Block, position: int, seg: list[int], stream: str, add: int,
            dependent: set[int]) -> Branch:
    add_node = index.nodes[add]
    g = next(x for x in add_node.input if x != stream) if add_node.input[0] != add_node.input[1] else stream
    seg_set = set(seg)
    gate: str | None = None
    gate_node: int | None = None
    output = g
    producer = index.producer.get(g)
    if producer is not None and index.nodes[producer].op_type == "Mul" and producer in seg_set:
        mul = index.nodes[producer]
        inner = [x for x in mul.input if index.producer.get(x) in seg_set]
        outer = [x for x in mul.input if index.producer.get(x) not in seg_set and x != stream]
        if len(inner) == 1 and len(outer) == 1 and index.producer.get(outer[0]) not in dependent:
            gate, gate_node, output = outer[0], producer, inner[0]
    body = [i for i in seg if i not in (add, gate_node)]
    streamed = _stream_dependent(index, body, stream)
    kind, role = _classify(index, body, streamed)
    br = Branch(position, kind, role, stream, output, gate, add_node.output[0], body, gate_node, add)
    if kind == "mixing":
        _locate_value(index, block, br, streamed)
    return br


def _stream_dependent(index: GraphIndex, body: list[int], stream: str) -> set[str]:
    """Tensors inside the branch whose values depend on the stream (the stream itself included).

    A Shape (or Size) of a stream tensor carries only its static shape, not its values: the legacy
    exporter reshapes the captions' keys with the image batch size read that way.
    """
    dep = {stream}
    for i in body:
        node = index.nodes[i]
        if node.op_type not in ("Shape", "Size") and any(x in dep for x in node.input):
            dep.update(o for o in node.output if o)
    return dep


def _classify(index: GraphIndex, body: list[int], streamed: set[str]) -> tuple[str, str]:
    has_softmax = False
    for i in body:
        node = index.nodes[i]
        if node.op_type in ("Softmax", "LogSoftmax"):
            has_softmax = True
        if node.op_type in ("MatMul", "Gemm", "Einsum", "MatMulInteger") and sum(x in streamed for x in node.input) >= 2:
            return "mixing", "self_attention"
        if node.op_type in _FUSED_ATTENTION:
            has_softmax = True
            keys = node.input[1] if len(node.input) > 1 else ""
            if node.input[0] in streamed and (keys in streamed or keys == ""):
                return "mixing", "self_attention"
    return "local", "cross_attention" if has_softmax else "mlp"


def _locate_value(index: GraphIndex, block: Block, br: Branch, streamed: set[str]) -> None:
    body = set(br.nodes)
    for i in br.nodes:
        node = index.nodes[i]
        if node.op_type in _FUSED_ATTENTION and len(node.input) > 2 and node.input[2]:
            br.value, br.value_fused = node.input[2], True
            br.value_proj = _trace_projection(index, node.input[2], body)
            return
    softmax = [i for i in br.nodes if index.nodes[i].op_type == "Softmax"]
    for s in softmax:
        t = index.nodes[s].output[0]
        # The probabilities may pass through a Cast or Dropout before the MatMul with V.
        for _ in range(4):
            readers = [r for r in index.consumers.get(t, []) if r in body]
            matmul = next((r for r in readers if index.nodes[r].op_type == "MatMul" and index.nodes[r].input[0] == t), None)
            if matmul is not None:
                v = index.nodes[matmul].input[1]
                br.value = v
                br.value_proj = _trace_projection(index, v, body)
                # The Softmax itself, not a Cast/Dropout after it: the probabilities as computed.
                br.probs = index.nodes[s].output[0]
                return
            nxt = [r for r in readers if index.nodes[r].op_type in ("Cast", "Dropout", "Identity")]
            if len(nxt) != 1:
                break
            t = index.nodes[nxt[0]].output[0]
    where = _label(index, softmax[0]) if softmax else "no Softmax"
    raise FcpassError(
        f"block {block.scope!r}: self-attention branch has {where} followed by no MatMul(probabilities, V); "
        "expected Softmax -> MatMul(P, V) or a fused Attention op (export attention unfused, opset <= 22)"
    )


def _trace_projection(index: GraphIndex, v: str, body: set[int]) -> str:
    """The MatMul/Gemm with a constant weight that computes V (through reshapes and splits)."""
    frontier = [v]
    seen: set[str] = set()
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        p = index.producer.get(t)
        if p is None:
            continue
        node = index.nodes[p]
        if node.op_type in ("MatMul", "Gemm") and any(_is_constant(index, x) for x in node.input):
            return node.name or f"{node.op_type}->{node.output[0]}"
        if node.op_type in _V_TRACE_OPS:
            frontier.extend(x for x in node.input if x and not _is_constant(index, x))
    return f"(not found from {v!r})"


def _is_constant(index: GraphIndex, name: str) -> bool:
    if name in index.initializers:
        return True
    p = index.producer.get(name)
    return p is not None and index.nodes[p].op_type == "Constant"


def branches_of(model: onnx.ModelProto | GraphIndex, blocks: list[Block], latent: str) -> list[BlockBranches | str]:
    """`find_branches` for every block; a block that cannot be split gives its explanation instead."""
    index = model if isinstance(model, GraphIndex) else GraphIndex(model)
    dependent = index.descendants({latent})
    out: list[BlockBranches | str] = []
    for b in blocks:
        try:
            out.append(find_branches(index, b, dependent))
        except FcpassError as exc:
            out.append(str(exc))
    return out
