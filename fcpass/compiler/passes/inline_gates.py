"""Replace every gate `If` by its then-branch: a region's statistic is measured at every step, and a
skipped region's approximation computes every term of the mix row.

Returns a copy; its input is left as it is. Invariant: no gate is left, at any depth (checked after
the pass), and every output keeps its value for a region the graph decides (ctl >= 2); for a forced
region (ctl 0 or 1) the decision is unchanged and the statistic is measured instead of NaN. An
approximation's gate leaves every value as it is: its then-branch is right for every mix row, its
else-branch for the rows its condition leaves to it.

A gate (`gate_name`) spares ONNX Runtime work a step does not need, where
an `If` costs a few microseconds: a forced region's passes over its inputs, and an approximation's
terms that its mix row leaves at zero. TensorRT reads every `If` condition on the host (a sync each),
and the segments lowering would make each gate a host branch, so both take the graph without gates:
there those few kernels cost less than the `If`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import onnx

from fcpass.compiler.graphinfo import node_inputs, rename_values
from fcpass.compiler.passes.base import PassResult, all_nodes, graph_pass, well_formed
from fcpass.contract.onnx_io import subgraphs

_GATE = re.compile(r"^fc/(.+)/gate$")


def gate_name(scope: str) -> str:
    """The name of a gate: an `If` whose then-branch is right at every step. A region's gate (scope: the
    region) measures its statistic only when the graph decides it; an approximation's (scopes
    `<region>/a<k>`, `.../fitted`, `.../linear`) runs only the terms of the mix row that are set."""
    return f"fc/{scope}/gate"


def _no_gate(model: onnx.ModelProto) -> list[str]:
    return [f"gate {n.name!r} is left" for n in all_nodes(model.graph) if _is_gate(n)]


@graph_pass(mutates_input=False, invariant=_no_gate, preserves=well_formed)
def inline_gates(model: onnx.ModelProto) -> PassResult:
    """A copy of `model` whose gates, at any depth, are replaced by their then-branches (a region's
    measuring one, an approximation's general form), less what only their conditions and their other
    branches read; `count`: how many gates there were."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    gates = sum(1 for n in all_nodes(out.graph) if _is_gate(n))
    inline_ifs(out.graph, lambda node: "then_branch" if _is_gate(node) else None)
    return PassResult(out, gates > 0, gates)


def branch_body(node: onnx.NodeProto, branch: str) -> onnx.GraphProto:
    """A copy of an `If`'s `branch` ("then_branch" or "else_branch") whose outputs carry the `If`'s
    output names, with the constants localized into it and its shapes: nodes for the enclosing graph."""
    graph = next(a.g for a in node.attribute if a.name == branch)
    rename = {o.name: target for o, target in zip(graph.output, node.output)}
    body = onnx.GraphProto()
    for inner in graph.node:
        copy = body.node.add()
        copy.CopyFrom(inner)
        rename_values(copy, rename)
    body.initializer.extend(graph.initializer)
    body.value_info.extend(graph.value_info)
    return body


def inline_ifs(graph: onnx.GraphProto, pick: Callable[[onnx.NodeProto], str | None], prune: bool = True) -> None:
    """Replace in place, at any depth, every `If` for which `pick` names a branch ("then_branch" or
    "else_branch") by that branch's nodes (`branch_body`), `If`s inside it included. With `prune`,
    each graph that lost an `If` also drops what only its condition and its other branch read."""
    def walk(g: onnx.GraphProto, prune_here: bool) -> None:
        nodes: list[onnx.NodeProto] = []
        inlined = False
        for node in g.node:
            branch = pick(node)
            if branch:
                body = branch_body(node, branch)
                walk(body, False)  # its nodes join `g`, which prunes them with its own
                nodes.extend(body.node)
                g.initializer.extend(body.initializer)
                g.value_info.extend(body.value_info)
                inlined = True
            else:
                for sub in subgraphs(node):
                    walk(sub, prune)
                nodes.append(node)
        del g.node[:]
        g.node.extend(_without_unread(nodes, {o.name for o in g.output}) if inlined and prune_here else nodes)
    walk(graph, prune)


def _without_unread(nodes: list[onnx.NodeProto], kept: set[str]) -> list[onnx.NodeProto]:
    """`nodes` less those whose values nothing reads any more: what computed the gates' conditions,
    and what only their other branches read."""
    while True:
        read = {x for n in nodes for x in node_inputs(n)} | kept
        live = [n for n in nodes if any(o in read for o in n.output if o)]
        if len(live) == len(nodes):
            return nodes
        nodes = live


def _is_gate(node: onnx.NodeProto) -> bool:
    return node.op_type == "If" and node.domain in ("", "ai.onnx") and bool(_GATE.match(node.name))

