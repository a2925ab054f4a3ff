"""Read-only facts about an ONNX graph: tensor shapes and dtypes, producers, consumers, MACs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import onnx
from onnx import helper, shape_inference

from fcpass.compiler.static_shapes import fix_dims, needs_resolving, resolve_static_shapes, static_dims
from fcpass.contract.onnx_io import WEIGHTLESS, initializer_tensors, subgraphs, weightless

log = logging.getLogger(__name__)


@dataclass
class GraphIndex:
    """Producer/consumer maps and inferred shapes of a model's main graph (subgraphs not entered)."""

    model: onnx.ModelProto

    @cached_property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    @cached_property
    def producer(self) -> dict[str, int]:
        return {out: i for i, n in enumerate(self.nodes) for out in n.output if out}

    @cached_property
    def consumers(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for name in node_inputs(n):
                out.setdefault(name, []).append(i)
        return out

    @cached_property
    def graph_outputs(self) -> set[str]:
        return {o.name for o in self.model.graph.output}

    @cached_property
    def initializers(self) -> set[str]:
        return {t.name for t in self.model.graph.initializer}

    @cached_property
    def value_types(self) -> dict[str, tuple[int, tuple[int | str | None, ...]]]:
        """name -> (onnx elem type, shape) for every tensor shape inference could type."""
        inferred = infer_shapes(self.model, weights=False)
        out: dict[str, tuple[int, tuple[int | str | None, ...]]] = {}
        g = inferred.graph
        for v in [*g.input, *g.value_info, *g.output]:
            tt = v.type.tensor_type
            if not tt.elem_type:
                continue
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            ) if tt.HasField("shape") else None
            out[v.name] = (tt.elem_type, dims)
        for t in g.initializer:
            out[t.name] = (t.data_type, tuple(t.dims))
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and n.output:  # (a damaged graph's Constant may have none)
                        out[n.output[0]] = (a.t.data_type, tuple(a.t.dims))
        return out

    def shape(self, name: str) -> tuple[int | str | None, ...] | None:
        entry = self.value_types.get(name)
        return entry[1] if entry else None

    def dtype(self, name: str) -> np.dtype | None:
        entry = self.value_types.get(name)
        return np.dtype(helper.tensor_dtype_to_np_dtype(entry[0])) if entry else None

    def descendants(self, sources: set[str]) -> set[int]:
        """Indices of nodes that (transitively) read any tensor in `sources`."""
        seen: set[int] = set()
        frontier = list(sources)
        while frontier:
            t = frontier.pop()
            for i in self.consumers.get(t, ()):
                if i not in seen:
                    seen.add(i)
                    frontier.extend(o for o in self.nodes[i].output if o)
        return seen

    def ancestors(self, targets: set[str]) -> set[int]:
        """Indices of nodes that (transitively) produce any tensor in `targets`."""
        seen: set[int] = set()
        frontier = list(targets)
        while frontier:
            t = frontier.pop()
            i = self.producer.get(t)
            if i is not None and i not in seen:
                seen.add(i)
                frontier.extend(node_inputs(self.nodes[i]))
        return seen


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including the outer-scope names its subgraphs (If, Loop, Scan) read."""
    names = [i for i in node.input if i]
    for g in subgraphs(node):
        names.extend(_outer_names(g))
    return names


def node_outputs(node: onnx.NodeProto) -> list[str]:
    """A node's outputs, with those of the nodes its subgraphs (If, Loop, Scan) hold, at any depth."""
    return [o for o in node.output if o] + [o for g in subgraphs(node) for inner in g.node for o in node_outputs(inner)]


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {o for n in graph.node for o in n.output}
    return [name for n in graph.node for name in node_inputs(n) if name not in local]


def infer_shapes(model: onnx.ModelProto, weights: bool = True) -> onnx.ModelProto:
    """A copy of `model` with the shapes ONNX shape inference finds, resolved to numbers where the inputs
    are static (`fcpass.compiler.static_shapes`); `model` itself where inference fails. Without `weights`, the
    copy's large weights hold no data (enough to read its types)."""
    light = weightless(model)
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:  # noqa: BLE001  (a partly unsupported graph still has useful exported value_info)
        log.warning("shape inference failed (%s); using the shapes stored in the model", exc)
        return model
    if needs_resolving(inferred):
        inferred = resolve_static_shapes(inferred)
    if weights:
        full = {t.name: t for t in initializer_tensors(model)}
        for t in initializer_tensors(inferred):
            if any(e.value == WEIGHTLESS for e in t.external_data):
                t.CopyFrom(full[t.name])
    return inferred


def sized(model: onnx.ModelProto, dims: dict[str, int], batch: int | None) -> onnx.ModelProto:
    """A weightless copy of `model` with its dynamic axes fixed (`fcpass.compiler.static_shapes.fix_dims`): enough
    to type it and count its MACs."""
    light = weightless(model)
    fix_dims(light, dims, batch)
    return light


def frames_axis(model: onnx.ModelProto, latent: str) -> int:
    """Where a video latent (rank 5) keeps its frames: 2 in Wan's and HunyuanVideo's (B, C, frames, H, W),
    1 in CogVideoX's (B, frames, C, H, W). Told by the first Conv the latent reaches (the patch embedding):
    its input channels are the latent's channel axis; 2 where nothing tells them apart."""
    spec = next((v for v in model.graph.input if v.name == latent), None)
    dims = [d.dim_value for d in spec.type.tensor_type.shape.dim] if spec is not None else []
    if len(dims) != 5:
        return 2
    weights = {t.name: t for t in model.graph.initializer}
    index = GraphIndex(model)
    for i in sorted(index.descendants({latent})):  # the graph's order: the first convolution comes first
        node = index.nodes[i]
        if node.op_type == "Conv" and node.input[1] in weights:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            channels = weights[node.input[1]].dims[1] * group
            return 1 if dims[2] == channels != dims[1] else 2
    return 2


def settle_outputs(model: onnx.ModelProto) -> None:
    """Give each graph output that declares a dynamic axis the static type inference finds for it, in place
    (an exporter names an output axis it computed; once the inputs are fixed, it is a number)."""
    open_axes = {o.name for o in model.graph.output if not static_dims(o)}
    if not open_axes:
        return
    # Inference keeps a declared axis name over the size it finds, and resolving static shapes settles the
    # values inside the graph, not its outputs: clear the outputs' shapes, resolve, then infer them again.
    light = weightless(model)
    for o in light.graph.output:
        if o.name in open_axes:
            o.type.tensor_type.ClearField("shape")
    resolved = infer_shapes(light, weights=False)
    try:
        resolved = shape_inference.infer_shapes(resolved, data_prop=True)
    except Exception as exc:  # noqa: BLE001  (the outputs keep their declared types)
        log.debug("shape inference of the outputs failed: %s", exc)
    inferred = {o.name: o for o in resolved.graph.output}
    for o in model.graph.output:
        if o.name in open_axes and o.name in inferred and static_dims(inferred[o.name]):
            o.type.CopyFrom(inferred[o.name].type)


def _numel(shape: tuple | None) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def node_macs(node: onnx.NodeProto, index: GraphIndex) -> int:
    """Multiply-accumulates of one node (MatMul, Gemm, Einsum without ellipses, Conv, and ONNX Runtime's
    FusedMatMul); 0 if unknown."""
    attrs = {x.name: x.i for x in node.attribute if x.type == onnx.AttributeProto.INT}
    if not node.input or not node.output:  # a damaged graph's node: the checks after say what is wrong
        return 0
    if node.op_type in ("MatMul", "Gemm") or (node.op_type == "FusedMatMul" and not attrs.get("transBatchA")):
        a = index.shape(node.input[0])
        out = index.shape(node.output[0])
        n_out = _numel(out)
        if not a or n_out is None:
            return 0
        k = a[-2] if node.op_type != "MatMul" and attrs.get("transA") else a[-1]
        return n_out * k if isinstance(k, int) else 0
    if node.op_type == "Einsum":  # a product: every combination of the indices is one multiply-accumulate
        equation = next((x.s.decode() for x in node.attribute if x.name == "equation"), "")
        terms = equation.replace(" ", "").split("->")[0].split(",")
        if len(terms) < 2:  # one operand (a transpose, a trace): no products
            return 0
        sizes: dict[str, int] = {}
        for term, name in zip(terms, node.input):
            shape = index.shape(name)
            if not shape or "." in term or len(term) != len(shape) or not all(isinstance(d, int) for d in shape):
                return 0
            sizes.update(zip(term, shape))
        return int(np.prod(list(sizes.values()), dtype=np.int64)) if sizes else 0
    if node.op_type == "Conv":
        w = index.shape(node.input[1])
        n_out = _numel(index.shape(node.output[0]))
        if not w or n_out is None or any(not isinstance(d, int) for d in w):
            return 0
        return n_out * int(np.prod(w[1:]))
    return 0


# Ops an exporter puts between a label input and its table's Gather that keep each label's value or index:
# the dynamo exporter's negative-index wrap (Where(labels < 0, labels + rows, labels)), casts and reshapes.
_INDEX_OPS = {"Cast", "Identity", "Where", "Add", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


def label_rows(model: onnx.ModelProto, labels: str) -> int | None:
    """Rows of the embedding table that graph input `labels` indexes (a main-graph Gather of a weight, reached
    from `labels` directly or through `_INDEX_OPS`), if any."""
    weights = {t.name: t for t in model.graph.initializer}
    reached, frontier = {labels}, [labels]
    while frontier:
        name = frontier.pop()
        for n in model.graph.node:
            if n.op_type in _INDEX_OPS and name in n.input and n.output[0] not in reached:
                reached.add(n.output[0])
                frontier.append(n.output[0])
    rows = [int(weights[n.input[0]].dims[0]) for n in model.graph.node
            if n.op_type == "Gather" and n.input[1] in reached and n.input[0] in weights
            and all(a.i == 0 for a in n.attribute if a.name == "axis")]
    return min(rows) if rows else None


def graph_macs(index: GraphIndex, nodes: list[int] | None = None) -> int:
    chosen = range(len(index.nodes)) if nodes is None else nodes
    return sum(node_macs(index.nodes[i], index) for i in chosen)


def param_count(index: GraphIndex, nodes: list[int]) -> int:
    """Elements of the initializers (and Constant tensors of rank >= 1) that `nodes` read."""
    seen: set[str] = set()
    total = 0
    for i in nodes:
        for name in index.nodes[i].input:
            if name in seen:
                continue
            seen.add(name)
            producer = index.producer.get(name)
            is_const = name in index.initializers or (
                producer is not None and index.nodes[producer].op_type == "Constant"
            )
            shape = index.shape(name) if is_const else None
            if shape:
                total += _numel(shape) or 0
    return total


def replace_node_groups(index: GraphIndex, nodes: list[onnx.NodeProto], owner: dict[int, Any],
                        build: Callable[[Any], list[onnx.NodeProto]]) -> list[onnx.NodeProto]:
    """`nodes` with each group's nodes replaced by `build(group)`, placed where its first node was.

    `owner` maps the index (in `index.nodes`) of every grouped node to its group; nodes outside every
    group, and copies not in `index.nodes`, stay as they are.
    """
    by_id = {id(n): i for i, n in enumerate(index.nodes)}
    result: list[onnx.NodeProto] = []
    placed: set[int] = set()
    for node in nodes:
        group = owner.get(by_id.get(id(node), -1))
        if group is None:
            result.append(node)
        elif id(group) not in placed:
            placed.add(id(group))
            result.extend(build(group))
    return result


def rename_values(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Rename every use and definition of the mapped names, into nested subgraphs too."""
    for i, name in enumerate(node.input):
        if name in mapping:
            node.input[i] = mapping[name]
    for i, name in enumerate(node.output):
        if name in mapping:
            node.output[i] = mapping[name]
    for g in subgraphs(node):
        for inner in g.node:
            rename_values(inner, mapping)
        for o in g.output:
            if o.name in mapping:
                o.name = mapping[o.name]
