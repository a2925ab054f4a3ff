"""Drop `reduction="none"` from ScatterND and ScatterElements: the attribute's default, spelled out.

The dynamo exporter writes it on every scatter it emits (torch's `slice_scatter`, in the rotary
embeddings of Wan and others), and TensorRT's ONNX parser up to 10.7 refuses a ScatterND that carries
the attribute at all (`fcpass check --target tensorrt`, rule `scatternd-reduction`).

Mutates its input. Invariant: the graph computes the same values; only an attribute equal to its default
is removed, in the main graph and in every subgraph, and none is left (checked after the pass).
"""

from __future__ import annotations

import onnx

from fcpass.compiler.passes.base import PassResult, all_nodes, graph_pass
from fcpass.contract.onnx_io import subgraphs

SCATTERS = ("ScatterND", "ScatterElements")


def _no_default_reduction(model: onnx.ModelProto) -> list[str]:
    return [f"{n.op_type} {n.name or n.output[0]!r} still carries reduction='none'" for n in all_nodes(model.graph)
            if n.op_type in SCATTERS and any(a.name == "reduction" and a.s == b"none" for a in n.attribute)]


@graph_pass(mutates_input=True, invariant=_no_default_reduction)
def drop_default_reductions(model: onnx.ModelProto) -> PassResult:
    """Remove `reduction="none"` from the model's scatters (in place); `count`: how many nodes changed."""
    changed = 0
    graphs = [model.graph]
    while graphs:
        for node in graphs.pop().node:
            graphs.extend(subgraphs(node))
            keep = [a for a in node.attribute if not (a.name == "reduction" and a.s == b"none")]
            if node.op_type in SCATTERS and len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)
                changed += 1
    return PassResult(model, changed > 0, changed)
