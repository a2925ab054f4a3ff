"""Move each weight into the `If` branch that reads it: `main.initializer -> branch.initializer`.

ONNX Runtime prepacks constant weights (the B operand of Gemm/MatMul) once per session, but only
for initializers of the graph that runs the node: a branch reading a main-graph weight repacks it
on every call. On the bundled model that costs a compiled graph with every region computing about
10% of a step; after this pass the branch owns its weights and they are packed once.

Mutates its input. Invariant: the graph computes the same values (each weight keeps its name and
data; only its scope changes), and every weight is still in the scope of each node that reads it
(checked after the pass). Cases:
1. A weight read only inside If branches (at any depth) moves to the innermost branch holding every
   reader.
2. Declined: weights read by a main-graph node, by two sibling branches, or that are graph outputs;
   they stay where they are.
Run it last: passes that edit weights by name (calibration) look in the main graph.
"""

from __future__ import annotations

import onnx

from fcpass.compiler.passes.base import PassResult, graph_pass, well_formed
from fcpass.contract.onnx_io import subgraphs, tensor_nbytes

# Above this many bytes of weights inside If branches a compiled graph is saved with its weights in
# external data: ONNX Runtime holds a weight stored inline in a branch several times over (DiT-S/2,
# 125 MiB of weights, every region set: 815 MiB resident after loading against 265 MiB with external
# data; `tools/bench_memory.py`). Below it a single file is simpler to move and the copies cost little.
EXTERNAL_DATA_MIN_BYTES = 16 * 2**20


@graph_pass(mutates_input=True, preserves=well_formed)
def localize_weights(model: onnx.ModelProto) -> PassResult:
    """Move weights into the branches that read them (in place); `count`: how many moved."""
    graph = model.graph
    names = {t.name for t in graph.initializer}
    paths: dict[str, list[tuple[onnx.GraphProto, ...]]] = {}

    def walk(g: onnx.GraphProto, path: tuple[onnx.GraphProto, ...]) -> None:
        for node in g.node:
            for x in node.input:
                if x in names:
                    paths.setdefault(x, []).append(path)
            for sub in subgraphs(node):
                walk(sub, (*path, sub))
        for o in g.output:
            if o.name in names:
                paths.setdefault(o.name, []).append(path)

    walk(graph, ())
    keep, moved = [], 0
    for t in graph.initializer:
        readers = paths.get(t.name, [()])
        common = readers[0]
        for p in readers[1:]:
            n = 0
            while n < min(len(common), len(p)) and common[n] is p[n]:
                n += 1
            common = common[:n]
        if common:
            common[-1].initializer.append(t)
            moved += 1
        else:
            keep.append(t)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return PassResult(model, moved > 0, moved)


def branch_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held inside If branches (at any depth)."""
    total = 0

    def walk(g: onnx.GraphProto, inside: bool) -> None:
        nonlocal total
        if inside:
            total += sum(tensor_nbytes(t) for t in g.initializer)
        for node in g.node:
            for sub in subgraphs(node):
                walk(sub, True)

    walk(model.graph, False)
    return total
