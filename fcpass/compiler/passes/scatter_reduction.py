"""Drop `reduction="none"` from ScatterND and ScatterElements: the attribute's default, spelled out.

The dynamo exporter writes it on every scatter it emits (torch's `slice_scatter`, in the rotary
embeddings of Wan and others), and TensorRT's ONNX parser up to 10.7 refuses a ScatterND that carries
the attribute at all (`fcpass check --target tensorrt`, rule `scatternd-reduction`).

Invariant: the graph computes the same values; only an attribute equal to its default is removed,
in the main graph and in every subgraph.
"""

from __future__ import annotations

import onnx

from fcpass.contract.onnx_io import subgraphs

SCATTERS = ("ScatterND", "ScatterElements")


def drop_default_reductions(model: onnx.ModelProto) -> int:
    """Remove `reduction="none"` from the model's scatters (in place); returns how many nodes changed."""
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
    return changed
