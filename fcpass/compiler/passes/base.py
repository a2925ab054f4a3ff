"""The one convention of the compiler's passes (after onnx-ir's): a pass is a function that takes a model
and returns a `PassResult` (the model and whether it changed it), states in its docstring whether it
mutates its input and the invariant it keeps, and checks that invariant on what it returns.

`@graph_pass(mutates_input=..., invariant=..., preserves=...)` declares the first (as the function's
`mutates_input` attribute) and checks the others after the pass: each returns what breaks it (an empty
list when it holds). `invariant` must hold on what the pass returns; `preserves` must break nowhere the
input did not (a flaw the input already had is not the pass's). A broken one raises FcpassError naming
the pass. A lowering (`lower_segments`) turns a
model into another artefact and is not a pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import onnx

from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import subgraphs


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the model (its input itself where the pass mutates it, else a new one), whether
    the pass changed it, and how many things it rewrote (nodes, weights, regions) for its log line."""

    model: onnx.ModelProto
    modified: bool
    count: int = 0


R = TypeVar("R", bound=PassResult)


Check = Callable[[onnx.ModelProto], list[str]]


def graph_pass(*, mutates_input: bool, invariant: Check | None = None,
               preserves: Check | None = None) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Declare a pass: whether it mutates its input, the invariant checked on the model it returns, and
    the property it keeps (checked against its input's)."""

    def wrap(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(fn)
        def run(model: onnx.ModelProto, *args: Any, **kwargs: Any) -> R:
            before = set(preserves(model)) if preserves is not None else set()
            result = fn(model, *args, **kwargs)
            if mutates_input and result.model is not model:
                raise AssertionError(f"pass {fn.__name__} declares that it mutates its input but returned another model")
            broken = invariant(result.model) if invariant is not None else []
            if preserves is not None:
                broken += [b for b in preserves(result.model) if b not in before]
            if broken:
                more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
                raise FcpassError(f"pass {fn.__name__} broke its invariant: {broken[0]}{more}; please report this graph")
            return result

        run.mutates_input = mutates_input  # type: ignore[attr-defined]
        return run

    return wrap


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs, at any depth."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def unresolved_reads(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> list[str]:
    """The reads no value defines where they happen: a node's input that is neither a graph input, an
    initializer, an earlier node's output nor (in a branch) a value the enclosing graphs define before
    it. Empty for a well-formed graph in topological order, the invariant every pass keeps."""
    defined = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    broken = []
    for node in graph.node:
        broken += [f"node {node.name or node.op_type!r} reads {x!r}, which nothing defines before it"
                   for x in node.input if x and x not in defined]
        for sub in subgraphs(node):
            broken += unresolved_reads(sub, frozenset(defined))
        defined.update(o for o in node.output if o)
    return broken


def well_formed(model: onnx.ModelProto) -> list[str]:
    """`unresolved_reads` of the main graph: what every pass preserves."""
    return unresolved_reads(model.graph)
