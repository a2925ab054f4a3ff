"""Rewrite `Where` on booleans as `And`, `Or` and `Not`: ONNX Runtime's CPU kernels have no `Where` for
bool, and torch exports one for `masked_fill` on a bool tensor (HunyuanVideo's caption attention mask),
so such a graph does not load there.

Mutates its input. Invariant: the graph computes the same values: where(c, x, y) = (c and x) or
(not c and y), with the same multidirectional broadcasting; it defines every value it reads before
reading it (checked after the pass). Only the main graph is rewritten (an export has no subgraphs here).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from fcpass.compiler.graphinfo import infer_shapes
from fcpass.compiler.passes.base import PassResult, graph_pass, well_formed


@graph_pass(mutates_input=True, preserves=well_formed)
def rewrite_bool_where(model: onnx.ModelProto) -> PassResult:
    """Replace every bool `Where` of the main graph (in place); `count`: how many were replaced."""
    graph = model.graph
    if not any(n.op_type == "Where" for n in graph.node):
        return PassResult(model, False)
    inferred = infer_shapes(model, weights=False).graph
    bools = {v.name for v in [*inferred.value_info, *inferred.input, *inferred.output]
             if v.type.tensor_type.elem_type == TensorProto.BOOL}
    bools |= {t.name for t in graph.initializer if t.data_type == TensorProto.BOOL}
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        if node.op_type != "Where" or node.output[0] not in bools:
            nodes.append(node)
            continue
        c, x, y = node.input
        base = f"{node.name or node.output[0]}/bool_where"
        new = [helper.make_node("Not", [c], [f"{base}/not_c"], name=f"{base}/not"),
               helper.make_node("And", [c, x], [f"{base}/c_x"], name=f"{base}/and_x"),
               helper.make_node("And", [f"{base}/not_c", y], [f"{base}/not_c_y"], name=f"{base}/and_y"),
               helper.make_node("Or", [f"{base}/c_x", f"{base}/not_c_y"], list(node.output), name=f"{base}/or")]
        for n in new:  # the exporter's scopes, which block discovery reads
            n.metadata_props.extend(node.metadata_props)
        nodes += new
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
    return PassResult(model, replaced > 0, replaced)
