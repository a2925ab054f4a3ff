"""The emission toolkit the cache passes share: regions, fresh names, typing, constants, branch outputs.

`fcpass.compiler.passes.cache_regions` builds the regions' `If`s with a `RegionBuilder`; the passes
that rewrite inside a region (`token_cache`, `motion_tokens`) and the approximation
(`approximation`) emit through the same builder, and plug into the regions' construction through
`RegionHooks`, so no pass reads another's fields.

Invariant: a builder only appends (initializers, graph inputs and outputs); the nodes it makes go
where its caller puts them. Names it makes are unique in the model: `fresh` numbers them, and every
other name it emits is prefixed `fc.` by the passes that use it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fcpass.compiler.discover import Block, boundary_of
from fcpass.compiler.graphinfo import GraphIndex, graph_macs, node_inputs
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import RegionSpec, StateSpec


@dataclass
class Region:
    """One cache region while it is built: its plan record, its nodes (indices into the original
    graph), the regions nested in it, and its states by kind."""

    spec: RegionSpec
    nodes: set[int]
    children: list[Region] = field(default_factory=list)
    states_in: list[StateSpec] = field(default_factory=list)
    states_out: list[StateSpec] = field(default_factory=list)
    states_prev: list[StateSpec] = field(default_factory=list)
    states_res: list[StateSpec] = field(default_factory=list)
    states_mod: list[StateSpec] = field(default_factory=list)
    probe_pairs: list[tuple[str, str]] = field(default_factory=list)  # head_residual: (region input, head input)
    probe_input: str | None = None  # modulated_input: the probed tensor
    states_tok: list[StateSpec] = field(default_factory=list)  # token caching (fcpass.compiler.passes.token_cache)
    states_kv: list[StateSpec] = field(default_factory=list)  # motion tokens' attention context (motion_tokens)
    direct: set[str] = field(default_factory=set)  # names of the states read directly off the graph's values

    @property
    def name(self) -> str:
        return self.spec.name

    def own_states(self) -> list[StateSpec]:
        """Its states but the modulated input (that one is updated every step, outside its `If`)."""
        return [*self.states_in, *self.states_out, *self.states_prev, *self.states_res, *self.states_tok, *self.states_kv]

    def if_states(self) -> list[StateSpec]:
        """The states its `If` outputs: those whose next value only the compute branch defines."""
        return [s for s in self.own_states() if s.name not in self.direct]

    def direct_states(self) -> list[StateSpec]:
        """The states whose next value is a value the graph computes anyway (see `cache_regions`' `add_state`)."""
        return [s for s in (*self.own_states(), *self.states_mod) if s.name in self.direct]


class RegionHooks:
    """Where a pass that rewrites inside the regions plugs into their construction.

    The region builder calls every hook of a region as it builds that region's `If`; the defaults
    leave the region as it is, so a pass overrides only the step it rewrites.
    """

    def rewrite_body(self, body: list[onnx.NodeProto], region: Region) -> list[onnx.NodeProto]:
        """The nodes of `region`'s compute branch (nested regions already replaced by their `If`s)."""
        return body

    def wrap_compute(self, graph: onnx.GraphProto, region: Region) -> onnx.GraphProto:
        """`region`'s compute branch, with the same outputs."""
        return graph


def flatten_regions(regions: list[Region]) -> list[Region]:
    """Every region, each before the regions nested in it (outermost first)."""
    out: list[Region] = []
    for r in regions:
        out.append(r)
        out.extend(flatten_regions(r.children))
    return out


def region_summaries(region: Region) -> dict[str, str]:
    """The statistic and decision value of every region inside `region` -> "stat" or "skip"."""
    return {f"fc.{c.name}.{kind}": kind for c in flatten_regions(region.children) for kind in ("stat", "skip")}


def cond_info(regions: list[Region]) -> list[onnx.ValueInfoProto]:
    """TensorRT wants an If condition to be a 0-d bool; say so rather than leave it to inference."""
    return [helper.make_tensor_value_info(f"fc.{r.name}.cond", TensorProto.BOOL, []) for r in regions]


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(node)
    return c


def toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Stable topological order; names not produced by `nodes` count as available (outer scope)."""
    produced = {o for n in nodes for o in n.output}
    producer_of = {o: i for i, n in enumerate(nodes) for o in n.output}
    deps = [{producer_of[x] for x in node_inputs(n) if x in produced and producer_of[x] != i} for i, n in enumerate(nodes)]
    users: dict[int, list[int]] = {}
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    missing = [len(ds) for ds in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i in range(len(nodes)) if i not in set(order))
        raise FcpassError(f"the rewrite left a cycle at node {stuck.name or stuck.op_type!r}; please report this graph")
    return [nodes[i] for i in order]


class RegionBuilder:
    """Creates the initializers, graph inputs/outputs and branch outputs of a region rewrite of `model`
    (edited in place; `index` is the index of its original graph)."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex) -> None:
        self.model = model
        self.index = index
        self.graph = model.graph
        self.consts: set[str] = set()
        self._counter = 0
        # The shapes inference gave the original values, before the rewrite moves them into branches.
        self._original_value_info: dict[str, onnx.ValueInfoProto] = {v.name: v for v in self.graph.value_info}

    # --- names and typing -------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A name no other call returns: `base` numbered."""
        self._counter += 1
        return f"{base}__fc{self._counter}"

    def tensor_type(self, name: str) -> tuple[int, list[int | str | None]]:
        """(element type, shape) of an original value; raises FcpassError where inference gave none."""
        entry = self.index.value_types.get(name)
        if entry is None or entry[1] is None:
            fused = sorted({n.op_type for n in self.index.nodes if n.domain not in ("", "ai.onnx")})
            if fused:  # ONNX's shape inference knows no contrib op, so nothing after one gets a type
                raise FcpassError(
                    f"cannot type region tensor {name!r}: shape inference stops at the graph's {', '.join(fused)} "
                    "(ONNX Runtime's fusions); run fcpass optimize on the export itself, before ONNX Runtime's "
                    "offline optimization (it fuses the compiled graph when it loads it)")
            raise FcpassError(
                f"cannot type region tensor {name!r} (shape inference gave nothing); "
                "re-export with static shapes or run onnx shape inference on the model first"
            )
        return entry[0], list(entry[1])

    def value_info(self, name: str, like: str) -> onnx.ValueInfoProto:
        """A value info named `name` with the type of the original value `like`."""
        elem, shape = self.tensor_type(like)
        return helper.make_tensor_value_info(name, elem, shape)

    def original_value_info(self, name: str) -> onnx.ValueInfoProto | None:
        """The value info the original graph carried for `name`, if any."""
        return self._original_value_info.get(name)

    def const(self, name: str, array: np.ndarray) -> str:
        """Add `array` as the initializer `name`; return the name."""
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.consts.add(name)
        return name

    def drop_unread_consts(self) -> None:
        """Remove the constants of the rewrite that no node reads (a region set or option that does not
        use them): ONNX Runtime warns about each when it loads the graph."""
        read = {o.name for o in self.graph.output} | {x for n in self.graph.node for x in node_inputs(n)}
        unread = self.consts - read
        # deleted in place: rebuilding the list would copy every weight (3 GB for DiT-XL/2)
        for i in reversed([i for i, t in enumerate(self.graph.initializer) if t.name in unread]):
            del self.graph.initializer[i]

    def move_value_info(self, graph: onnx.GraphProto, body: list[onnx.NodeProto], rename: dict[str, str]) -> None:
        """Carry the shapes of values now defined inside a branch with them (TensorRT and ORT use them)."""
        inverse = {v: k for k, v in rename.items()}
        for node in body:
            for out in node.output:
                src = inverse.get(out, out)
                if src in self._original_value_info:
                    vi = onnx.ValueInfoProto()
                    vi.CopyFrom(self._original_value_info[src])
                    vi.name = out
                    graph.value_info.append(vi)

    def finish_value_info(self) -> None:
        """Keep top-level value_info only for values the main graph itself defines."""
        defined = {o for n in self.graph.node for o in n.output}
        keep = [v for v in self.graph.value_info if v.name in defined]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep)

    # --- regions ----------------------------------------------------------------------------
    def region_for(self, name: str, blocks: list[Block], latent: str) -> Region:
        """The region spanning `blocks` (consecutive), typed; raises FcpassError for an untyped boundary."""
        nodes, ins, outs = boundary_of(self.index, blocks[0].inputs, blocks[-1].outputs, latent)
        for o in outs:
            self.tensor_type(o)
        for i in ins:
            self.tensor_type(i)
        pairs: list[int | None] = []
        for o in outs:
            o_type = self.tensor_type(o)
            pairs.append(next((j for j, i in enumerate(ins) if self.tensor_type(i) == o_type), None))
        approx_macs = 0
        for o, j in zip(outs, pairs):
            if j is not None:
                shape = self.tensor_type(o)[1]
                if all(isinstance(d, int) for d in shape):
                    approx_macs += int(np.prod(shape)) * int(shape[-1])
        spec = RegionSpec(
            name=name, index=-1, blocks=[b.index for b in blocks], parent=None, inputs=ins, outputs=outs,
            pairs=pairs, macs=graph_macs(self.index, sorted(nodes)), approx_macs=approx_macs,
        )
        return Region(spec, set(nodes))

    def exports(self, region: Region) -> list[str]:
        """What the region's `If` outputs besides its stream outputs: its `If` states' next values,
        then `child_exports`."""
        return [s.next for s in region.if_states()] + self.child_exports(region)

    def child_exports(self, region: Region) -> list[str]:
        """Per child its statistic, decision and exports; then the direct state values of the regions
        inside that only this region's compute branch defines (a block's output inside the stack)."""
        names: list[str] = []
        for child in region.children:
            names += [f"fc.{child.name}.stat", f"fc.{child.name}.skip", *self.exports(child)]
        defined = {o for i in region.nodes for o in self.index.nodes[i].output}
        for inner in flatten_regions(region.children):
            for s in inner.direct_states():
                if s.next in defined and s.next not in names and s.next not in region.spec.outputs:
                    names.append(s.next)
        return names

    @staticmethod
    def state_sources(region: Region) -> dict[str, tuple[str, str]]:
        """Next value -> (the tensor it has the type of, a state that takes it) for the regions inside."""
        out: dict[str, tuple[str, str]] = {}
        for inner in flatten_regions(region.children):
            for s in (*inner.own_states(), *inner.states_mod):
                out.setdefault(s.next, (s.source, s.name))
        return out

    def unreached_children(self, region: Region, tag: str, nodes: list[onnx.NodeProto],
                           infos: list[onnx.ValueInfoProto]) -> None:
        """A branch that does not run `region`'s nested regions: per child export (in the compute
        branch's order) the statistic NaN, the decision -1, a state value passed through."""
        batch = self.tensor_type(region.spec.inputs[0])[1][0]
        like, summary = self.state_sources(region), region_summaries(region)
        for x in self.child_exports(region):
            out = f"{x}@{tag}"
            if x in summary:
                stat = summary[x] == "stat"
                nodes.append(helper.make_node("Identity", ["fc.nan_b" if stat else "fc.minus_one"], [out]))
                infos.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch] if stat else [1]))
            else:
                source, state = like[x]
                nodes.append(helper.make_node("Identity", [state], [out], name=f"fc/{out}"))
                infos.append(self.value_info(out, source))

    def export_direct(self, flat: list[Region]) -> None:
        """Make each direct state's next value a graph output, once (states may share one: a block's
        output is the next block's input)."""
        have = {o.name for o in self.graph.output} | {s.name for r in flat for s in (*r.own_states(), *r.states_mod)}
        for r in flat:
            for s in r.direct_states():
                if s.next not in have:
                    self.graph.output.append(self.value_info(s.next, s.source))
                    have.add(s.next)
