"""Concrete shapes: dynamic axes fixed (`fix_dims`), and the symbols ONNX shape inference leaves
in a graph whose inputs are all static resolved (`resolve_static_shapes`).

Exporters compute some shapes in the graph: the legacy exporter writes `chunk` as a `Slice` whose
ends come from `Shape -> Gather -> Add -> Div -> Mul`, which ONNX's data propagation does not follow,
so every value downstream gets a symbolic batch axis (`unk__16`) although nothing in the graph is
dynamic. A cache state needs a buffer of a known size and a MAC count needs every dimension, so
such graphs are resolved here: every small value that static shapes and constants determine is
computed (ONNX's reference evaluator, node by node), the graph is inferred again with those values
as constants, and this repeats until nothing new is found.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from fcpass.contract.errors import FcpassError

log = logging.getLogger(__name__)

# Shapes, axes and indices are short; a value this large is data, not a shape.
_MAX_ELEMENTS = 64
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli", "Dropout", "If", "Loop", "Scan"}


def static_dims(value: onnx.ValueInfoProto) -> bool:
    tt = value.type.tensor_type
    return tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)


def dynamic_axes(model: onnx.ModelProto) -> list[tuple[str, int, str]]:
    """(input, axis, its name or "?") for every axis of a graph input that is not a number."""
    weights = {t.name for t in model.graph.initializer}
    return [(v.name, axis, d.dim_param or "?") for v in model.graph.input if v.name not in weights
            for axis, d in enumerate(v.type.tensor_type.shape.dim) if not d.HasField("dim_value")]


def parse_dims(text: str | None) -> dict[str, int]:
    """`height=64,width=64` -> {"height": 64, "width": 64}: sizes for named dynamic axes (`--dims`)."""
    out: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if not name.strip() or size < 1:
            raise FcpassError(f"--dims entry {item!r} is not NAME=N with N >= 1; write e.g. height=64,width=64")
        out[name.strip()] = size
    return out


def fix_dims(model: onnx.ModelProto, named: dict[str, int], batch: int | None) -> list[str]:
    """Fix the dynamic axes of `model`'s inputs and outputs, in place: each axis named in `named` to its
    number, any other axis 0 (the batch) to `batch` (None: it stays dynamic). Returns what was fixed,
    as NAME=VALUE.

    Invariant: nodes and weights are unchanged, so a run at those sizes computes what the dynamic graph
    computes; the value types inferred for the dynamic graph are dropped (inference finds the numbers).
    Any other dynamic axis is an error: image size and sequence length decide the token count, which the
    cache state and every token selection are compiled for.
    """
    axes = dynamic_axes(model)
    unknown = sorted(set(named) - {dim for _, _, dim in axes})
    if unknown:
        have = ", ".join(sorted({dim for _, _, dim in axes})) or "none"
        raise FcpassError(f"--dims {unknown[0]}: no input axis has that name; the dynamic axes are named: {have}")
    left = [(name, axis, dim) for name, axis, dim in axes if axis != 0 and dim not in named]
    if left:
        listed = ", ".join(f"{name} axis {axis} ({dim})" for name, axis, dim in left)
        fix = ",".join(dict.fromkeys(f"{dim}=N" for _, _, dim in left if dim != "?"))
        raise FcpassError(f"dynamic axes beyond the batch: {listed}; fcpass compiles one image size and sequence "
                          f"length: fix them with --dims {fix or 'NAME=N'}, or re-export with them fixed")
    fixed: dict[str, int] = {}
    for v in [*model.graph.input, *model.graph.output]:
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value") or (d.dim_param not in named and (axis != 0 or batch is None)):
                continue
            value = named.get(d.dim_param, batch)
            fixed[d.dim_param or f"{v.name}[{axis}]"] = value
            d.dim_value = value
    stale = [v for v in model.graph.value_info if not static_dims(v)]
    for v in stale:
        model.graph.value_info.remove(v)
    return [f"{name}={value}" for name, value in fixed.items()]


def needs_resolving(inferred: onnx.ModelProto) -> bool:
    """Static graph inputs, and some typed value with a symbolic or unknown dimension."""
    g = inferred.graph
    weights = {t.name for t in g.initializer}
    if not all(static_dims(v) for v in g.input if v.name not in weights):
        return False
    return any(v.type.tensor_type.elem_type and not static_dims(v) for v in [*g.value_info, *g.output])


def resolve_static_shapes(inferred: onnx.ModelProto, rounds: int = 16) -> onnx.ModelProto:
    """`inferred` (a model after shape inference, nodes unchanged) with the value types a run on its
    static inputs would show wherever constants and static shapes decide them.

    Invariant: the nodes, initializers and inputs of the result are `inferred`'s; only `value_info`
    changes, and only from a symbolic or unknown dimension to the number every run computes.
    """
    scratch = onnx.ModelProto()
    scratch.CopyFrom(inferred)
    folded: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        new = _fold_once(scratch, folded)
        if not new:
            break
        folded.update(new)
        scratch = _with_constants(scratch, new)
        try:
            scratch = shape_inference.infer_shapes(scratch, data_prop=True)
        except Exception as exc:  # noqa: BLE001  (keep what the previous round found)
            log.debug("shape inference of the resolved graph failed: %s", exc)
            break
    types = {v.name: v for v in [*scratch.graph.value_info, *scratch.graph.output] if v.type.tensor_type.elem_type}
    for name, array in folded.items():
        types[name] = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
    out = onnx.ModelProto()
    out.CopyFrom(inferred)
    own = {v.name for v in out.graph.value_info}
    for v in out.graph.value_info:
        if not static_dims(v) and v.name in types and static_dims(types[v.name]):
            v.type.CopyFrom(types[v.name].type)
    produced = {o for n in out.graph.node for o in n.output} - own - {o.name for o in out.graph.output}
    out.graph.value_info.extend(types[n] for n in sorted(produced & types.keys()) if static_dims(types[n]))
    log.debug("static shapes resolved through %d values computed from shapes and constants", len(folded))
    return out


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The small initializers with their data (the weightless stubs of large ones have none)."""
    out = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and np.prod(t.dims, dtype=np.int64) <= _MAX_ELEMENTS:
            out[t.name] = numpy_helper.to_array(t)
    return out


def _fold_once(model: onnx.ModelProto, known: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The small values of the graph that its constants and static shapes determine and `known` lacks."""
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*g.input, *g.value_info, *g.output] if static_dims(v)}
    values = {**_constants(model), **known}
    outputs = {o.name for o in g.output}
    new: dict[str, np.ndarray] = {}
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED or any(o in outputs for o in node.output):
            continue
        if all(o in values for o in node.output if o):
            continue
        result = _evaluate(node, values, shapes, model.opset_import)
        if result is None:
            continue
        for name, array in zip(node.output, result):
            if name and name not in values and array.size <= _MAX_ELEMENTS:
                values[name] = new[name] = array
    return new


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], shapes: dict[str, list[int]],
              opsets: list[onnx.OperatorSetIdProto]) -> list[np.ndarray] | None:
    """The node's outputs, where its inputs are known (a Shape or Size of a static shape needs no value)."""
    if node.op_type in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}  # start and end slice as Python does, negatives too
        return [np.array(shape[attrs.get("start", 0):attrs.get("end")], dtype=np.int64)]
    inputs = [i for i in node.input if i]
    if not all(i in values for i in inputs):
        return None
    feeds = {i: values[i] for i in inputs}
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for i, a in feeds.items()],
        [onnx.ValueInfoProto(name=o) for o in node.output if o])
    try:
        result = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(None, feeds)
    except Exception as exc:  # noqa: BLE001  (an op the evaluator lacks stays unresolved)
        log.debug("cannot evaluate %s %s: %s", node.op_type, node.name, exc)
        return None
    return [np.asarray(r) for r in result]


def _with_constants(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with the nodes whose every output is in `values` replaced by those values as initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [n for n in out.graph.node if not all(o in values for o in n.output if o)]
    dropped = {o for n in out.graph.node for o in n.output} - {o for n in keep for o in n.output}
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in sorted(dropped))
    return out
