"""`fcpass check --target tensorrt`: static rules for whether TensorRT 10.x/11.x can build a graph.

Each rule walks the main graph and every nested subgraph (If branches, Loop/Scan bodies) and yields
one `Violation` per offending node, naming the node, the path to it through enclosing subgraphs
(e.g. `fc/stack/If > else_branch > fc/tail/If`) and the fix.

Rules (sources: onnx/onnx-tensorrt `docs/operators.md` for TensorRT 10.15, TensorRT's API reference,
NVIDIA/TensorRT and onnx-tensorrt issues, as cited at each rule):

1. `op-support`: every op is in the default ONNX domain and in the parser's operator table
   (`TRT_ONNX_OPS`). Any other domain is a violation (plugins and local functions are not verified).
2. `attention-in-if`: no opset-23 `Attention` op anywhere inside an If branch; TensorRT 10.16 fails
   the engine build for it (NVIDIA/TensorRT#4739, #4757; no version documents a fix).
3. `topk`: TopK's K is a build-time constant (initializer or Constant) <= 3840 (ITopKLayer::setK:
   "only values up to 3840 are supported") and `sorted` is 1 (operators.md, TensorRT 10.15).
   TensorRT >= 8.6 also accepts a K computed at run time, but then the 3840 limit cannot be verified
   statically, so this check asks for a constant.
4. `scatternd-reduction`: ScatterND carries no `reduction` attribute at all, not even "none": the
   parser up to TensorRT 10.7 asserts `!attrs.count("reduction")` (microsoft/onnxruntime#23618,
   onnx/onnx-tensorrt#957); onnx-tensorrt#1013 later accepted "none", which the 10.15 table reflects
   ("`reduction` other than `none` is not supported").
5. `if-branches`: then/else branches have equally many outputs (and as many as the If node), each
   pair of equal rank ("must have the same rank", operators.md 10.15; an unknown rank is a violation)
   and different names (same row), every branch output is produced by a node inside its branch (never
   an outer-scope value passed straight through), and If outputs have a type the If row lists:
   FP32, FP16, BF16, INT32, INT64, BOOL (TensorRT 10.15; BOOL and INT32 are listed since 8.x, so
   integer/bool outputs are allowed, not only floats).
6. `dynamic-dims`: of the main graph's inputs and outputs only axis 0 (the batch) may be dynamic;
   `fcpass build` makes an optimization profile over the batch only.
7. `if-condition`: an If condition is a bool tensor with 0 dimensions or a single element
   (IIfConditional: "Condition is a 0D boolean tensor", TensorRT 10.0 API; ONNX allows one element).

Ranks and shapes come from the declared types (graph inputs/outputs, value_info, initializers) and,
where a type is missing, from ONNX's per-node shape inference run here scope by scope, with the
values of constants from enclosing graphs visible inside subgraphs (ONNX's whole-model inference
does not pass them in, which leaves e.g. a ReduceSumSquare with outer-scope `axes` untyped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fcpass.contract.errors import FcpassError

TARGETS = ("tensorrt",)

# ONNX operators that TensorRT's ONNX parser supports ("Y" rows of onnx/onnx-tensorrt docs/operators.md
# for TensorRT 10.15, opset 9..24). Attention (TensorRT 10.x late) and RMSNormalization, RotaryEmbedding,
# TensorScatter (added in 10.15 per the onnx-tensorrt changelog) are not in 10.0's table.
TRT_ONNX_OPS: frozenset[str] = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow",
    "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN",
    "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min",
    "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad",
    "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape",
    "Resize", "ReverseSequence", "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round", "STFT",
    "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign",
    "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Upsample", "Where", "Xor",
})

# Output types of the If row (operators.md, TensorRT 10.15).
IF_OUTPUT_TYPES: frozenset[int] = frozenset({
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL,
})

TOPK_MAX_K = 3840  # ITopKLayer::setK, TensorRT 10.x/11.x API reference

_DEFAULT_DOMAINS = ("", "ai.onnx")
_MAX_CONST_ELEMENTS = 4096  # constants passed to shape inference (shapes, axes); never the weights


@dataclass(frozen=True)
class Violation:
    """One broken rule: the node (or graph tensor), where it sits, what is wrong and how to fix it."""

    node: str
    path: str  # enclosing subgraphs, e.g. "fc/stack/If > else_branch"; "" in the main graph
    rule: str
    message: str
    fix: str

    @property
    def where(self) -> str:
        return f"{self.path} > {self.node}" if self.path else self.node

    def format(self) -> str:
        return f"[{self.rule}] {self.where}: {self.message}; fix: {self.fix}"

    def to_json(self) -> dict[str, str]:
        return {**asdict(self), "where": self.where}


class _Scope:
    """Value types and small constant values of one graph, falling back to the enclosing graphs'."""

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.types: dict[str, onnx.TypeProto] = {}
        self.consts: dict[str, TensorProto] = {}

    def type_of(self, name: str) -> onnx.TypeProto | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.types:
                return scope.types[name]
            scope = scope.parent
        return None

    def const_of(self, name: str) -> TensorProto | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.consts:
                return scope.consts[name]
            if name in scope.types:  # defined here by something else: shadows outer constants
                return None
            scope = scope.parent
        return None

    def declare(self, name: str, tp: onnx.TypeProto) -> None:
        """Record a type; an inferred one replaces an existing entry only if that has no shape."""
        old = self.types.get(name)
        if old is None or (_rank(old) is None and (_rank(tp) is not None or not _elem(old))):
            self.types[name] = tp


@dataclass
class GraphCtx:
    """One graph (main or nested) with what the rules need to judge its nodes."""

    graph: onnx.GraphProto
    path: tuple[str, ...]
    scope: _Scope
    opset: int
    base_dir: Path | None
    is_main: bool = False
    in_if: bool = False  # inside some If branch, at any depth
    subgraphs: dict[tuple[int, str], GraphCtx] = field(default_factory=dict)

    def label(self, index: int) -> str:
        node = self.graph.node[index]
        return node.name or f"{node.op_type}#{index}"

    def violation(self, node: str, rule: str, message: str, fix: str) -> Violation:
        return Violation(node=node, path=" > ".join(self.path), rule=rule, message=message, fix=fix)

    def rank(self, name: str) -> int | None:
        tp = self.scope.type_of(name)
        return None if tp is None else _rank(tp)


Rule = Callable[[GraphCtx], Iterator[Violation]]


# --- the rules -------------------------------------------------------------------------------

def rule_op_support(ctx: GraphCtx) -> Iterator[Violation]:
    """Rule 1: default-domain ops from the parser's table only."""
    for i, node in enumerate(ctx.graph.node):
        if node.domain not in _DEFAULT_DOMAINS:
            yield ctx.violation(
                ctx.label(i), "op-support",
                f"{node.domain}::{node.op_type} is not a default-domain ONNX op (plugins and local functions are "
                "not verified by fcpass check)",
                "re-export it as standard ONNX ops, or build with trtexec and the plugin library instead",
            )
        elif node.op_type not in TRT_ONNX_OPS:
            yield ctx.violation(
                ctx.label(i), "op-support",
                f"{node.op_type} is not supported by TensorRT's ONNX parser (onnx-tensorrt operators.md, TensorRT 10.15)",
                f"re-export the model so that {node.op_type} is written as supported ops (e.g. another opset or "
                "a decomposed module)",
            )


def rule_attention_in_if(ctx: GraphCtx) -> Iterator[Violation]:
    """Rule 2: no opset-23 Attention inside an If branch."""
    if not ctx.in_if:
        return
    for i, node in enumerate(ctx.graph.node):
        if node.op_type == "Attention" and node.domain in _DEFAULT_DOMAINS:
            yield ctx.violation(
                ctx.label(i), "attention-in-if",
                "an opset-23 Attention op inside an If branch fails TensorRT's engine build "
                "(TensorRT 10.16, NVIDIA/TensorRT#4739)",
                "export at opset <= 22 (fcpass export --opset 18) so attention is MatMul/Softmax",
            )


def rule_topk(ctx: GraphCtx) -> Iterator[Violation]:
    """Rule 3: TopK's K is a constant <= 3840 and the output is sorted."""
    for i, node in enumerate(ctx.graph.node):
        if node.op_type != "TopK" or node.domain not in _DEFAULT_DOMAINS:
            continue
        attrs = {a.name: a for a in node.attribute}
        if "sorted" in attrs and attrs["sorted"].i == 0:
            yield ctx.violation(ctx.label(i), "topk", "TopK has sorted=0; TensorRT requires sorted=1",
                                "set sorted=1 (the ONNX default)")
        if ctx.opset < 10:
            k: int | None = attrs["k"].i if "k" in attrs else None
            what = "attribute k"
        else:
            name = node.input[1] if len(node.input) > 1 else ""
            what = f"K ({name})"
            k = _const_int(ctx, name)
            if k is None:
                yield ctx.violation(
                    ctx.label(i), "topk",
                    f"{what} is not a single-value initializer or Constant, so the TensorRT limit K <= {TOPK_MAX_K} "
                    "cannot be verified",
                    "make K a constant (an initializer or a Constant node)",
                )
                continue
        if k is not None and k > TOPK_MAX_K:
            yield ctx.violation(ctx.label(i), "topk", f"{what} is {k}; TensorRT's TopK supports K <= {TOPK_MAX_K}",
                                f"reduce K to at most {TOPK_MAX_K} (e.g. split the TopK into chunks)")


def rule_scatternd_reduction(ctx: GraphCtx) -> Iterator[Violation]:
    """Rule 4: ScatterND without any `reduction` attribute."""
    for i, node in enumerate(ctx.graph.node):
        if node.op_type != "ScatterND" or node.domain not in _DEFAULT_DOMAINS:
            continue
        for a in node.attribute:
            if a.name == "reduction":
                value = a.s.decode(errors="replace")
                yield ctx.violation(
                    ctx.label(i), "scatternd-reduction",
                    f"ScatterND carries reduction={value!r}; TensorRT 10.x's parser (up to 10.7) rejects the attribute "
                    "whatever its value, and no version supports a reduction other than 'none'",
                    ("remove the attribute (the same result); fcpass optimize drops it from the graph it compiles"
                     if value == "none" else "avoid the reducing scatter"),
                )


def rule_if_branches(ctx: GraphCtx) -> Iterator[Violation]:
    """Rule 5: If branches agree in count, rank and names; outputs come from inside; supported types."""
    for i, node in enumerate(ctx.graph.node):
        if node.op_type != "If" or node.domain not in _DEFAULT_DOMAINS:
            continue
        label = ctx.label(i)
        then_ctx, else_ctx = ctx.subgraphs.get((i, "then_branch")), ctx.subgraphs.get((i, "else_branch"))
        if then_ctx is None or else_ctx is None:
            yield ctx.violation(label, "if-branches", "the If lacks a then_branch or else_branch graph",
                                "give the If both branch graphs")
            continue
        t_out, e_out = list(then_ctx.graph.output), list(else_ctx.graph.output)
        if not (len(t_out) == len(e_out) == len(node.output)):
            yield ctx.violation(
                label, "if-branches",
                f"then_branch has {len(t_out)} outputs, else_branch {len(e_out)}, the If {len(node.output)}",
                "make both branches produce exactly one value per If output",
            )
        for branch, bctx in (("then_branch", then_ctx), ("else_branch", else_ctx)):
            produced = {o for n in bctx.graph.node for o in n.output}
            for o in bctx.graph.output:
                if o.name not in produced:
                    yield ctx.violation(
                        label, "if-branches",
                        f"{branch} output {o.name!r} is not produced by a node inside the branch (an outer-scope "
                        "value passed straight through)",
                        "produce it inside the branch, e.g. with an Identity node",
                    )
        for k, (t, e) in enumerate(zip(t_out, e_out)):
            rt, re = then_ctx.rank(t.name), else_ctx.rank(e.name)
            unknown = [f"{b} output {k} ({v.name!r})" for b, v, r in (("then_branch", t, rt), ("else_branch", e, re))
                       if r is None]
            if unknown:
                yield ctx.violation(
                    label, "if-branches", f"cannot determine rank of {' and '.join(unknown)}",
                    "declare the branch output's shape (a typed graph output or value_info), or run onnx shape "
                    "inference on the model",
                )
            elif rt != re:
                yield ctx.violation(
                    label, "if-branches",
                    f"output {k}: then_branch {t.name!r} has rank {rt}, else_branch {e.name!r} rank {re}; TensorRT "
                    "needs the same rank",
                    "reshape one branch's output to the other's rank",
                )
            if t.name == e.name and t.name in {o for n in then_ctx.graph.node for o in n.output}:
                yield ctx.violation(label, "if-branches", f"both branches name output {k} {t.name!r}; TensorRT needs "
                                    "different names", "rename the output of one branch")
            te = _elem(then_ctx.scope.type_of(t.name)) or _elem(t.type)
            ee = _elem(else_ctx.scope.type_of(e.name)) or _elem(e.type)
            if te and ee and te != ee:
                yield ctx.violation(
                    label, "if-branches",
                    f"output {k}: then_branch gives {_type_name(te)}, else_branch {_type_name(ee)}",
                    "cast one branch's output to the other's type",
                )
            elif te and te not in IF_OUTPUT_TYPES:
                yield ctx.violation(
                    label, "if-branches",
                    f"output {k} ({node.output[k] if k < len(node.output) else t.name!r}) is {_type_name(te)}; "
                    "TensorRT's If supports FLOAT, FLOAT16, BFLOAT16, INT32, INT64 and BOOL outputs (TensorRT 10.15)",
                    "cast the value inside both branches to a supported type (e.g. FLOAT)",
                )


def rule_dynamic_dims(ctx: GraphCtx) -> Iterator[Violation]:
    """Rule 6: only axis 0 of the main graph's inputs and outputs may be dynamic."""
    if not ctx.is_main:
        return
    initializers = {t.name for t in ctx.graph.initializer}
    values = [("graph input", v) for v in ctx.graph.input if v.name not in initializers]
    values += [("graph output", v) for v in ctx.graph.output]
    for kind, v in values:
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            yield ctx.violation(
                f"{kind} {v.name}", "dynamic-dims", "has no declared shape",
                "export with static shapes (only the batch axis 0 may be dynamic)",
            )
            continue
        dims = [(a, d.dim_param) for a, d in enumerate(v.type.tensor_type.shape.dim) if a > 0 and not d.HasField("dim_value")]
        if dims:
            named = [name for _, name in dims if name]
            sizes = (f"compile it at fixed sizes (fcpass optimize --dims {','.join(f'{n}=N' for n in named)}) or "
                     if kind == "graph input" and len(named) == len(dims) else "")
            axes = ", ".join(f"axis {a} ({name or '?'})" for a, name in dims)
            yield ctx.violation(
                f"{kind} {v.name}", "dynamic-dims",
                f"{axes} {'is' if len(dims) == 1 else 'are'} dynamic; only the batch axis 0 may be",
                f"{sizes}re-export with a fixed image size and sequence length (fcpass export --image-size N)",
            )


def rule_if_condition(ctx: GraphCtx) -> Iterator[Violation]:
    """Rule 7: an If condition is a 0-d or single-element bool."""
    for i, node in enumerate(ctx.graph.node):
        if node.op_type != "If" or node.domain not in _DEFAULT_DOMAINS or not node.input:
            continue
        cond = node.input[0]
        tp = ctx.scope.type_of(cond)
        elem = _elem(tp)
        fix = "reduce the condition to one bool (e.g. ReduceMin/ReduceMax with keepdims=0, then Cast to BOOL)"
        if elem and elem != TensorProto.BOOL:
            yield ctx.violation(ctx.label(i), "if-condition", f"condition {cond!r} is {_type_name(elem)}, not BOOL", fix)
            continue
        dims = _dims(tp)
        if dims is None:
            yield ctx.violation(ctx.label(i), "if-condition", f"cannot determine the shape of condition {cond!r}",
                                "declare its shape (value_info) or run onnx shape inference on the model")
        elif any(d != 1 for d in dims):
            shown = "x".join("?" if d is None else str(d) for d in dims)
            yield ctx.violation(ctx.label(i), "if-condition",
                                f"condition {cond!r} has shape {shown}; TensorRT needs a 0-d (or one-element) bool", fix)


RULES: tuple[Rule, ...] = (
    rule_op_support, rule_attention_in_if, rule_topk, rule_scatternd_reduction, rule_if_branches,
    rule_dynamic_dims, rule_if_condition,
)


def check_graph(model: onnx.ModelProto, target: str = "tensorrt", base_dir: str | Path | None = None) -> list[Violation]:
    """Every violation of the target's rules in `model` (main graph and all subgraphs), in graph order.

    `base_dir` is the model's folder, to read a TopK K stored as external data.
    """
    if target.lower() not in TARGETS:
        raise FcpassError(f"unknown check target {target!r}; use --target {' or '.join(TARGETS)}")
    contexts = _contexts(model, Path(base_dir) if base_dir is not None else None)
    return [v for ctx in contexts for rule in RULES for v in rule(ctx)]


# --- graph contexts and type propagation ------------------------------------------------------

def _contexts(model: onnx.ModelProto, base_dir: Path | None) -> list[GraphCtx]:
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
    main = GraphCtx(model.graph, (), _Scope(None), opset, base_dir, is_main=True)
    out: list[GraphCtx] = []
    _propagate(main, model, out)
    return out


def _propagate(ctx: GraphCtx, model: onnx.ModelProto, out: list[GraphCtx]) -> None:
    """Seed ctx's scope with declared types, walk its nodes in order, recursing into subgraphs."""
    out.append(ctx)
    g, scope = ctx.graph, ctx.scope
    inputs = {v.name for v in g.input}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        if v.type.HasField("tensor_type"):
            scope.declare(v.name, v.type)
    for t in g.initializer:
        scope.declare(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
        if not (ctx.is_main and t.name in inputs):  # an initializer that is also an input can be overridden
            scope.consts[t.name] = t
    for i, node in enumerate(g.node):
        graphs = [(a.name, a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        for attr_name, sub in graphs:
            child = GraphCtx(
                sub, (*ctx.path, ctx.label(i), attr_name), _Scope(scope), ctx.opset, ctx.base_dir,
                in_if=ctx.in_if or node.op_type == "If",
            )
            ctx.subgraphs[(i, attr_name)] = child
            _propagate(child, model, out)
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        if node.op_type == "If":
            _type_if_outputs(ctx, i)
        elif node.op_type == "Constant":
            _record_constant(scope, node)
        elif not graphs:
            _infer_node(ctx, node, model)


def _type_if_outputs(ctx: GraphCtx, index: int) -> None:
    node = ctx.graph.node[index]
    branches = [ctx.subgraphs.get((index, b)) for b in ("then_branch", "else_branch")]
    for k, name in enumerate(node.output):
        for b in branches:
            if b is not None and k < len(b.graph.output):
                tp = b.scope.type_of(b.graph.output[k].name)
                if tp is not None and _rank(tp) is not None:
                    ctx.scope.declare(name, tp)
                    break


def _record_constant(scope: _Scope, node: onnx.NodeProto) -> None:
    attr = node.attribute[0] if node.attribute else None
    if attr is None or not node.output:
        return
    value: TensorProto | None = None
    if attr.name == "value":
        value = attr.t
    elif attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
        raw = helper.get_attribute_value(attr)
        dtype = np.int64 if "int" in attr.name else np.float32
        value = numpy_helper.from_array(np.array(raw, dtype=dtype), node.output[0])
    if value is not None:
        scope.consts[node.output[0]] = value
        scope.declare(node.output[0], helper.make_tensor_type_proto(value.data_type, list(value.dims)))


def _infer_node(ctx: GraphCtx, node: onnx.NodeProto, model: onnx.ModelProto) -> None:
    """Type node's outputs with ONNX's per-node inference, given the types and constants in scope."""
    types: dict[str, onnx.TypeProto] = {}
    data: dict[str, TensorProto] = {}
    for name in node.input:
        if not name:
            continue
        tp = ctx.scope.type_of(name)
        if tp is None or not _elem(tp):
            return
        types[name] = tp
        const = ctx.scope.const_of(name)
        if const is not None and _small(const):
            data[name] = const
    try:
        schema = onnx.defs.get_schema(node.op_type, ctx.opset, node.domain)
        result = onnx.shape_inference.infer_node_outputs(
            schema, node, types, data, opset_imports=list(model.opset_import), ir_version=model.ir_version,
        )
    except Exception:  # noqa: BLE001  (unknown schema, or inference rejects the node: outputs stay as declared)
        return
    for name, tp in result.items():
        if tp.HasField("tensor_type"):
            ctx.scope.declare(name, tp)


def _const_int(ctx: GraphCtx, name: str) -> int | None:
    t = ctx.scope.const_of(name) if name else None
    if t is None:
        return None
    try:
        arr = numpy_helper.to_array(t, base_dir=str(ctx.base_dir) if ctx.base_dir else "")
    except Exception:  # noqa: BLE001  (external data missing or unreadable: K is then not verifiable)
        return None
    return int(arr.reshape(-1)[0]) if arr.size == 1 else None


def _small(t: TensorProto) -> bool:
    return t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims, dtype=np.int64)) <= _MAX_CONST_ELEMENTS


def _elem(tp: onnx.TypeProto | None) -> int:
    return tp.tensor_type.elem_type if tp is not None and tp.HasField("tensor_type") else 0


def _rank(tp: onnx.TypeProto) -> int | None:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    return len(tp.tensor_type.shape.dim)


def _dims(tp: onnx.TypeProto | None) -> list[int | None] | None:
    if tp is None or _rank(tp) is None:
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tp.tensor_type.shape.dim]


def _type_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem)

