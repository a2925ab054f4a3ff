"""Measure every region's statistic at every step: each gate `If` becomes its measuring branch.

Invariant: every output keeps its value for a region the graph decides (ctl >= 2); for a forced
region (ctl 0 or 1) the decision is unchanged and the statistic is measured instead of NaN.

A gate (`fcpass.passes.cache_regions.gate_name`) spares a forced region the passes over its inputs
on ONNX Runtime, where an `If` costs about a microsecond. TensorRT reads every `If` condition on the
host (a sync each), and the segments lowering would make each gate a host branch, so both take the
graph without gates: there the statistic's few kernels cost less than the `If`.
"""

from __future__ import annotations

import re

import onnx

from fcpass.graphinfo import rename_values, subgraphs

_GATE = re.compile(r"^fc/(.+)/gate$")


def inline_gates(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose gates, at any depth, are replaced by their measuring (then) branches."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _inline(out.graph)
    return out


def _inline(graph: onnx.GraphProto) -> None:
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if _is_gate(node):
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            rename = {o.name: target for o, target in zip(then.output, node.output)}
            for inner in then.node:
                copy = onnx.NodeProto()
                copy.CopyFrom(inner)
                rename_values(copy, rename)
                nodes.append(copy)
            graph.initializer.extend(then.initializer)  # constants localized into the branch
            graph.value_info.extend(then.value_info)
        else:
            for g in subgraphs(node):
                _inline(g)
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _is_gate(node: onnx.NodeProto) -> bool:
    return node.op_type == "If" and node.domain in ("", "ai.onnx") and bool(_GATE.match(node.name))

