"""Running part of a graph on k of its N tokens: follow the token axis, rewrite the constants carrying N.

`clone_on_tokens` clones a list of nodes so that they read gathered (B, k, D) tensors instead of
(B, N, D) ones. The token axis is followed from each source (axis 1) through every node; a tensor
may carry it on several axes (an attention map, (B, H, N, N)). A shape constant that carries N on
the token axis is replaced by k; a shape computed from Shape ops follows the gathered tensor.

Two modes:
- token-local (`mixing=False`, DuCa's token-local branches): every op must treat tokens
  independently, so the k outputs equal the full branch's outputs at those tokens. An op that mixes
  tokens raises FcpassError naming the node.
- mixing (`mixing=True`, FastCache's motion tokens): attention between tokens is allowed too; the
  clones are then the subgraph specialised to sequence length k, which is exactly the same subgraph
  run on those k tokens alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fcpass.compiler.graphinfo import GraphIndex
from fcpass.contract.errors import FcpassError

Axes = frozenset[int]
ConstFn = Callable[[str, np.ndarray], str]

_UNARY = frozenset({
    "Identity", "Cast", "Relu", "Gelu", "FastGelu", "Tanh", "Sigmoid", "Erf", "Sqrt", "Exp", "Log", "Neg", "Abs",
    "Softplus", "Softsign", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Mish", "Clip",
    "Dropout", "Reciprocal", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "QuickGelu",
})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Where", "Equal", "Less",
                          "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Sum", "Mean", "PRelu"})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                     "ReduceSumSquare", "ReduceLogSumExp"})


def clone_node(node: onnx.NodeProto, ren: dict[str, str], suffix: str) -> onnx.NodeProto:
    """A copy of `node` reading renamed inputs; its outputs get `suffix` (recorded in `ren`)."""
    c = onnx.NodeProto()
    c.CopyFrom(node)
    if c.name:
        c.name += suffix
    for j, x in enumerate(c.input):
        if x in ren:
            c.input[j] = ren[x]
    for j, x in enumerate(c.output):
        if x:
            ren[x] = x + suffix
            c.output[j] = x + suffix
    return c


def const_value(index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output; None for anything computed."""
    for t in index.model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    p = index.producer.get(name)
    if p is not None and index.nodes[p].op_type == "Constant":
        for a in index.nodes[p].attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def clone_on_tokens(index: GraphIndex, nodes: list[int], sources: dict[str, str], output: str, n: int, k: int,
                    suffix: str, const: ConstFn, outer: dict[str, str] | None = None,
                    mixing: bool = False, axes_out: dict[str, Axes | None] | None = None,
                    names_out: dict[str, str] | None = None) -> tuple[list[onnx.NodeProto], str]:
    """Clones of `nodes` (in topological order) that read `sources`' gathered tensors.

    `sources` maps each (B, N, ...) tensor to its gathered (B, k, ...) stand-in; `outer` renames
    other inputs. Returns the clones and the name of `output`'s clone; `axes_out` receives the token
    axes of every original tensor the clones compute, `names_out` its clone's name. Raises FcpassError at a node
    that the mode forbids or that the follower does not know, or when `output` lost the token axis.
    """
    axis: dict[str, Axes | None] = {s: frozenset({1}) for s in sources}
    ren: dict[str, str] = dict(outer or {})
    ren.update(sources)
    out_nodes: list[onnx.NodeProto] = []
    for i in nodes:
        node = index.nodes[i]
        t_in = {j: a for j, x in enumerate(node.input) if (a := axis.get(x))}
        c = clone_node(node, ren, suffix)
        t_out = _follow(index, node, c, t_in, n, k, const, mixing) if t_in else None
        for o in node.output:
            axis[o] = t_out
        if node.op_type == "LayerNormalization":
            for o in node.output[1:]:
                axis[o] = None
        out_nodes.append(c)
    if axes_out is not None:
        axes_out.update(axis)
    if names_out is not None:
        names_out.update(ren)
    if axis.get(output) != frozenset({1}) and output not in sources:
        raise FcpassError(f"output {output!r} does not carry the tokens on axis 1; cannot scatter it back")
    return out_nodes, ren.get(output, output)


def _fail(node: onnx.NodeProto, why: str, mixing: bool) -> FcpassError:
    allowed = ("per-token ops and attention between the tokens" if mixing else
               "per-token ops (elementwise, MatMul with weights or captions, LayerNorm, Softmax and reshapes off the token axis)")
    return FcpassError(
        f"cannot run {node.op_type} node {node.name or node.output[0]!r} on a subset of tokens: {why}; "
        f"only {allowed} can be specialised to k tokens"
    )


def _single(node: onnx.NodeProto, t: Axes, mixing: bool) -> int:
    if len(t) != 1:
        raise _fail(node, "its input carries the tokens on several axes", mixing)
    return next(iter(t))


@dataclass
class _Step:
    """One node being followed: its inputs' token axes, its clone, and what its rules read."""

    index: GraphIndex
    node: onnx.NodeProto
    clone: onnx.NodeProto
    t_in: dict[int, Axes]
    n: int
    k: int
    const: ConstFn
    mixing: bool
    r_out: int

    def fail(self, why: str) -> FcpassError:
        return _fail(self.node, why, self.mixing)

    def rank(self, x: str) -> int:
        s = self.index.shape(x)
        if s is None:
            raise self.fail(f"the shape of {x!r} is unknown")
        return len(s)

    def axis_attr(self, default: int, r: int) -> int:
        """The node's `axis` attribute, non-negative for rank r."""
        a = int(attr(self.node, "axis", default))
        return a + r if a < 0 else a

    def axes_of(self, values: Any, r: int) -> set[int]:
        """Axes given as a constant or attribute, non-negative for rank r."""
        return {int(a) + r if int(a) < 0 else int(a) for a in np.ravel(values)}


def _follow(index: GraphIndex, node: onnx.NodeProto, clone: onnx.NodeProto, t_in: dict[int, Axes], n: int, k: int,
            const: ConstFn, mixing: bool) -> Axes:
    """The token axes of `node`'s output, given its inputs'; rewrites `clone`'s shape inputs."""
    op = node.op_type
    out_shape = index.shape(node.output[0])
    if out_shape is None:
        raise _fail(node, "its output shape is unknown", mixing)
    step = _Step(index, node, clone, t_in, n, k, const, mixing, len(out_shape))
    if op in _UNARY:
        if set(t_in) != {0}:
            raise step.fail("the token axis reaches a parameter input")
        return t_in[0]
    if op in _ELEMENTWISE:
        return _elementwise(step)
    if op in _REDUCE:
        return _reduce(step)
    if op == "MatMul":
        return _matmul(node, t_in, step.rank(node.input[0]), step.rank(node.input[1]), step.r_out, step.fail, mixing)
    if op == "Reshape":
        return frozenset({_reshape(index, node, clone, t_in, n, k, const, mixing)})
    if op in ("Shape", "Size"):
        return None  # type: ignore[return-value]
    rule = _RULES.get(op)
    if rule is None:
        raise step.fail("the token-axis follower does not know this op")
    return rule(step)


def _elementwise(step: _Step) -> Axes:
    """Broadcasting ops: every operand that carries the tokens carries them at one output axis, and an
    operand that does not has size 1 there."""
    node, r_out = step.node, step.r_out
    aligned = {frozenset(a + r_out - step.rank(node.input[j]) for a in t) for j, t in step.t_in.items()}
    if len(aligned) != 1:
        raise step.fail("its operands carry the token axis at different positions")
    axes = aligned.pop()
    for j, x in enumerate(node.input):
        if j in step.t_in or not x:
            continue
        s = step.index.shape(x) or ()
        for a in axes:
            pos = a - (r_out - len(s))
            # A symbolic dim (shape inference could not resolve it) is accepted: ORT then rejects a
            # real mismatch at run time rather than computing something wrong, except for k = 1.
            if 0 <= pos < len(s) and isinstance(s[pos], int) and s[pos] != 1:
                raise step.fail(f"operand {x!r} (shape {list(s)}) has the token axis without depending on the stream")
    return axes


def _normalization(step: _Step) -> Axes:
    ax = step.axis_attr(-1, step.rank(step.node.input[0]))
    if set(step.t_in) != {0} or max(step.t_in[0]) >= ax:
        raise step.fail("it normalises over the token axis")
    return step.t_in[0]


def _softmax(step: _Step) -> Axes:
    if step.axis_attr(-1, step.r_out) in step.t_in[0] and not step.mixing:
        raise step.fail("its softmax runs over the tokens")
    return step.t_in[0]


def _transpose(step: _Step) -> Axes:
    perm = list(attr(step.node, "perm", list(range(step.r_out))[::-1]))
    return frozenset(perm.index(a) for a in next(iter(step.t_in.values())))


def _expand(step: _Step) -> Axes:
    node, clone, r_out = step.node, step.clone, step.r_out
    t = _single(node, step.t_in[0], step.mixing) + r_out - step.rank(node.input[0])
    shape = const_value(step.index, node.input[1])
    if shape is None:
        raise step.fail("its target shape is not a constant")
    pos = t - (r_out - len(shape))
    if 0 <= pos < len(shape) and shape[pos] == step.n:
        new = shape.copy()
        new[pos] = step.k
        clone.input[1] = step.const(f"{clone.output[0]}.shape", new.astype(np.int64))
    return frozenset({t})


def _gather(step: _Step) -> Axes:
    node, t_in = step.node, step.t_in
    if 0 not in t_in or 1 in t_in:
        raise step.fail("it gathers with token-dependent indices")
    ax = step.axis_attr(0, step.rank(node.input[0]))
    if ax in t_in[0]:
        raise step.fail("it gathers along the token axis")
    return frozenset(t if t < ax else t - 1 + step.rank(node.input[1]) for t in t_in[0])


def _split_concat(step: _Step) -> Axes:
    ax = step.axis_attr(0, step.r_out)
    if any(ax in t for t in step.t_in.values()):
        raise step.fail("it splits or concatenates along the token axis")
    if len({*step.t_in.values()}) != 1:
        raise step.fail("its operands carry the token axis at different positions")
    return next(iter(step.t_in.values()))


def _slice(step: _Step) -> Axes:
    node, index, r_out = step.node, step.index, step.r_out
    axes = const_value(index, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    starts = const_value(index, node.input[1])
    if axes is None:
        axes = np.arange(len(starts) if starts is not None else r_out)
    if set(step.t_in) != {0} or step.t_in[0] & step.axes_of(axes, r_out):
        raise step.fail("it slices the token axis")
    return step.t_in[0]


def _squeeze_unsqueeze(step: _Step) -> Axes:
    node, t0 = step.node, step.t_in[0]
    axes = const_value(step.index, node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(attr(node, "axes", []))
    if node.op_type == "Squeeze":
        ax = step.axes_of(axes, step.rank(node.input[0]))
        if t0 & ax:
            raise step.fail("it squeezes the token axis")
        return frozenset(t - sum(a < t for a in ax) for t in t0)
    unsqueezed = step.axes_of(axes, step.r_out)
    kept = [d for d in range(step.r_out) if d not in unsqueezed]
    return frozenset(kept[t] for t in t0)


def _reduce(step: _Step) -> Axes:
    node = step.node
    r_in = step.rank(node.input[0])
    axes = const_value(step.index, node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes", None)
    ax = set(range(r_in)) if axes is None else step.axes_of(axes, r_in)
    if step.t_in[0] & ax:
        raise step.fail("it reduces over the tokens")
    return frozenset(t if attr(node, "keepdims", 1) else t - sum(a < t for a in ax) for t in step.t_in[0])


# The follower's rule per op type, where one rule serves a few op types.
_RULES: dict[str, Callable[[_Step], Axes]] = {
    "LayerNormalization": _normalization, "SimplifiedLayerNormalization": _normalization,
    "RMSNormalization": _normalization, "Softmax": _softmax, "LogSoftmax": _softmax, "Transpose": _transpose,
    "Expand": _expand, "Gather": _gather, "Split": _split_concat, "Concat": _split_concat, "Slice": _slice,
    "Squeeze": _squeeze_unsqueeze, "Unsqueeze": _squeeze_unsqueeze,
}


def _matmul(node: onnx.NodeProto, t_in: dict[int, Axes], ra: int, rb: int, r_out: int,
            fail: Callable[[str], FcpassError], mixing: bool) -> Axes:
    """Token axes of a (batched) MatMul: a's rows and b's columns survive, the contraction does not.

    Both operands carrying tokens is attention: Q K^T puts tokens on both output axes, P V contracts
    them; either is allowed only in mixing mode. A contraction of tokens against a dimension that
    does not carry them (a weight over the N tokens) cannot be specialised at all.
    """
    a, b = t_in.get(0, frozenset()), t_in.get(1, frozenset())
    if min(ra, rb) < 2:
        raise fail("a vector operand of MatMul")
    contract_a, contract_b = ra - 1 in a, rb - 2 in b
    if contract_a != contract_b:
        raise fail("it contracts over the token axis against a dimension that does not carry the tokens")
    if a and b and not mixing:
        raise fail("both operands depend on the tokens (attention between them)")
    out: set[int] = set()
    for t in a - {ra - 1}:
        out.add(r_out - 2 if t == ra - 2 else t + r_out - ra)
    for t in b - {rb - 2}:
        out.add(r_out - 1 if t == rb - 1 else t + r_out - rb)
    if not out:
        raise fail("the tokens are contracted away")
    return frozenset(out)


def _reshape(index: GraphIndex, node: onnx.NodeProto, clone: onnx.NodeProto, t_in: dict[int, Axes], n: int, k: int,
             const: ConstFn, mixing: bool) -> int:
    """Where the token axis lands in a Reshape, and the shape constant rewritten to k tokens."""
    if 1 in t_in:
        raise _fail(node, "its target shape depends on the token values", mixing)
    s_in = index.shape(node.input[0])
    s_out = index.shape(node.output[0])
    if not s_in or not s_out or any(not isinstance(d, int) for d in (*s_in, *s_out)):
        raise _fail(node, "its shapes are not static", mixing)
    t = _single(node, t_in[0], mixing)
    before = int(np.prod(s_in[:t], dtype=np.int64))
    after = int(np.prod(s_in[t + 1:], dtype=np.int64))
    u = next((j for j in range(len(s_out)) if s_out[j] == n and int(np.prod(s_out[:j], dtype=np.int64)) == before
              and int(np.prod(s_out[j + 1:], dtype=np.int64)) == after), None)
    if u is None:
        raise _fail(node, f"it merges or splits the token axis ({list(s_in)} -> {list(s_out)})", mixing)
    shape = const_value(index, node.input[1])
    if shape is None:
        producer = index.producer.get(node.input[1])
        if producer is None:
            raise _fail(node, "its target shape is neither a constant nor computed in the subgraph", mixing)
        return u  # computed from Shape ops: it follows the gathered tensor
    shape = shape.astype(np.int64).copy()
    allow_zero = int(attr(node, "allowzero", 0))
    if shape[u] == n:
        shape[u] = k
        clone.input[1] = const(f"{clone.output[0]}.shape", shape)
    elif shape[u] == 0 and not allow_zero and u != t:
        raise _fail(node, "its target shape copies the token axis from another position", mixing)
    elif shape[u] not in (-1, 0):
        raise _fail(node, f"its target shape has {shape[u]} where the {n} tokens go", mixing)
    return u
