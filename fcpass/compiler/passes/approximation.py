"""A skipped region's output from its cache state and the host's mix row (`fcpass.contract.plan.APPROX_MIX`).

With d = H - H_ref, the general form (right for every row) is

    (1 - m_aff) (O_ref + m_tay (O_ref - O_prev)) + m_res d + (m_lin d + m_aff H)(m_lin V + m_aff A)
    + m_lin b + m_aff c

Invariant: the nodes compute that value for every mix row. ONNX Runtime runs every node of an `If`
branch it takes, so a step runs only the terms its row uses. Gates (`inline_gates.gate_name`: `If`s
whose then-branch is the general form; `fcpass.compiler.passes.inline_gates` keeps only that one for TensorRT
and the segments lowering) pick a form by the row's coefficients:

1. m_res, m_lin and m_aff zero (`reuse`, `taylor1`): the extrapolated O_ref alone; no pass over H.
2. m_aff set (`affine`): the general form, one MatMul with the mixed weights.
3. m_lin set (`linear`): O_ref + m_res d + m_lin (m_lin d V + b); V as fitted, not mixed first.
4. otherwise (`residual`): O_ref + m_res d; no MatMul.

An output with no input of its shape (a double-stream block's second stream) takes form 1 alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx
from onnx import TensorProto, helper

from fcpass.compiler.passes.inline_gates import gate_name
from fcpass.contract.plan import MIX_INPUT

if TYPE_CHECKING:
    from fcpass.compiler.passes.builder import Region, RegionBuilder

MIX_COLUMNS = ("mres", "mlin", "mtay", "maff")  # the columns of fc_mix (plan.APPROX_MIX)
INPUT_COLUMNS = [MIX_COLUMNS.index(c) for c in ("mres", "mlin", "maff")]  # the terms that read H (fc.cols_input)


@dataclass
class _Scope:
    """One graph of the approximation: its nodes, the prefix of the names it defines, and the
    coefficients it can read (its own, and those of the graphs around it)."""

    nodes: list[onnx.NodeProto]
    prefix: str
    known: dict[str, str] = field(default_factory=dict)

    def inner(self, prefix: str) -> _Scope:
        return _Scope([], prefix, dict(self.known))


def approximation_nodes(builder: RegionBuilder, region: Region, k: int, nodes: list[onnx.NodeProto],
                        out: str | None = None) -> str:
    """Append the nodes of `region`'s approximation of output k to `nodes` (a branch's top level);
    return its name: `out` where it can be defined under that name rather than copied to it."""
    a = _Approximation(builder, region, k, nodes)
    p = a.p
    if region.states_prev:
        nodes.append(helper.make_node("Sub", [a.o_ref, region.states_prev[k].name], [f"{p}.trend"]))
        nodes.append(helper.make_node("Mul", [a.coef("mtay", a.top), f"{p}.trend"], [f"{p}.tay"]))
    j = region.spec.pairs[k]
    if j is None:
        return a.base_in(a.top, f"{p}.base")
    read = a.read_forms(region.spec.inputs[j], region.states_in[j].name)
    kept = a.top.inner(f"{p}.kept")  # form 1
    if a.base_in(kept, f"{p}.kept") == a.o_ref:
        kept.nodes.append(helper.make_node("Identity", [a.o_ref], [f"{p}.kept"]))
    out = out or f"{p}.out"
    nodes += [
        helper.make_node("Gather", [a.row(), "fc.cols_input"], [f"{p}.reads.m"]),
        helper.make_node("ReduceL1", [f"{p}.reads.m"], [f"{p}.reads.l1"], keepdims=0),
        helper.make_node("Cast", [f"{p}.reads.l1"], [f"{p}.reads"], to=TensorProto.BOOL),
        a.gate(f"{region.name}/a{k}", f"{p}.reads", read, kept, out),
    ]
    return out


class _Approximation:
    """The approximation of one region output: its scopes' coefficients, gates and forms."""

    def __init__(self, builder: RegionBuilder, region: Region, k: int, nodes: list[onnx.NodeProto]) -> None:
        n = region.name
        self.builder, self.region, self.k, self.nodes, self.n = builder, region, k, nodes, n
        self.o_ref = region.states_out[k].name
        self.like = region.spec.outputs[k]
        self.elem = builder.tensor_type(self.like)[0]
        self.p = f"fc.{n}.a{k}"
        self.top = _Scope(nodes, f"fc.{n}", {c: f"fc.{n}.{c}" for c in MIX_COLUMNS
                                             if any(f"fc.{n}.{c}" in x.output for x in nodes)})

    def row(self) -> str:
        """The region's row of fc_mix, gathered once at the top level."""
        n = self.n
        if not any(f"fc.{n}.mix" in x.output for x in self.nodes):
            self.nodes.append(helper.make_node("Gather", [MIX_INPUT, f"fc.{n}.idx"], [f"fc.{n}.mix"]))
        return f"fc.{n}.mix"

    def scalar(self, c: str, at: _Scope) -> str:
        """Coefficient c (float), from `at` or a graph around it, else gathered into `at`."""
        if c not in at.known:
            at.known[c] = f"{at.prefix}.{c}"
            if c == "mkeep":
                at.nodes.append(helper.make_node("Sub", ["fc.one_f", self.scalar("maff", at)], [at.known[c]]))
            else:
                at.nodes.append(helper.make_node("Gather", [self.row(), f"fc.c{MIX_COLUMNS.index(c)}"], [at.known[c]]))
        return at.known[c]

    def coef(self, c: str, at: _Scope) -> str:
        """Coefficient c in the output's element type."""
        if self.elem == TensorProto.FLOAT:
            return self.scalar(c, at)
        if c + ".t" not in at.known:
            at.known[c + ".t"] = f"{at.prefix}.{c}.t"
            at.nodes.append(helper.make_node("Cast", [self.scalar(c, at)], [at.known[c + ".t"]], to=self.elem))
        return at.known[c + ".t"]

    def nonzero(self, c: str, at: _Scope) -> str:
        at.nodes.append(helper.make_node("Cast", [self.scalar(c, at)], [f"{at.prefix}.{c}.set"], to=TensorProto.BOOL))
        return f"{at.prefix}.{c}.set"

    def gate(self, scope: str, cond: str, then: _Scope, other: _Scope, name: str) -> onnx.NodeProto:
        def branch(at: _Scope) -> onnx.GraphProto:
            result = self.builder.value_info(at.nodes[-1].output[0], self.like)
            return helper.make_graph(at.nodes, at.prefix.replace(".", "_"), [], [result])
        return helper.make_node("If", [cond], [name], name=gate_name(scope), then_branch=branch(then),
                                else_branch=branch(other))

    def base_in(self, at: _Scope, name: str) -> str:
        """O_ref, extrapolated in graphs with --taylor: made in the graph that returns it, not copied there."""
        if not self.region.states_prev:
            return self.o_ref
        at.nodes.append(helper.make_node("Add", [self.o_ref, f"{self.p}.tay"], [name]))
        return name

    def read_forms(self, h: str, h_ref: str) -> _Scope:
        """Forms 2-4, the ones that read H: the general form, else the linear or residual one."""
        p, n, k = self.p, self.n, self.k
        d = f"{p}.delta"
        read = self.top.inner(f"{p}.read")
        base = self.base_in(read, f"{p}.base")
        read.nodes.append(helper.make_node("Sub", [h, h_ref], [d]))
        fitted = self.nonzero("maff", read)
        general = read.inner(f"{p}.general")
        coef = self.coef
        # One MatMul serves both fitted forms: the weights are mixed (D x D), not the activations.
        general.nodes += [
            helper.make_node("Mul", [coef("mlin", general), d], [f"{p}.xl"]),
            helper.make_node("Mul", [coef("maff", general), h], [f"{p}.xa"]),
            helper.make_node("Add", [f"{p}.xl", f"{p}.xa"], [f"{p}.x"]),
            helper.make_node("Mul", [coef("mlin", general), f"fc.{n}.V{k}"], [f"{p}.Wl"]),
            helper.make_node("Mul", [coef("maff", general), f"fc.{n}.A{k}"], [f"{p}.Wa"]),
            helper.make_node("Add", [f"{p}.Wl", f"{p}.Wa"], [f"{p}.W"]),
            helper.make_node("Mul", [coef("mlin", general), f"fc.{n}.b{k}"], [f"{p}.bl"]),
            helper.make_node("Mul", [coef("maff", general), f"fc.{n}.c{k}"], [f"{p}.ba"]),
            helper.make_node("Add", [f"{p}.bl", f"{p}.ba"], [f"{p}.bias"]),
            helper.make_node("MatMul", [f"{p}.x", f"{p}.W"], [f"{p}.xw"]),
            helper.make_node("Add", [f"{p}.xw", f"{p}.bias"], [f"{p}.fit"]),
            helper.make_node("Mul", [coef("mkeep", general), base], [f"{p}.kept"]),
            helper.make_node("Mul", [coef("mres", general), d], [f"{p}.res"]),
            helper.make_node("Add", [f"{p}.kept", f"{p}.res"], [f"{p}.s1"]),
            helper.make_node("Add", [f"{p}.s1", f"{p}.fit"], [f"{p}.general"]),
        ]
        unfitted = self.unfitted_forms(read, base, d)
        read.nodes.append(self.gate(f"{n}/a{k}/fitted", fitted, general, unfitted, f"{p}.read"))
        return read

    def unfitted_forms(self, read: _Scope, base: str, d: str) -> _Scope:
        """Forms 3 and 4: the linear form where m_lin is set, else the residual one."""
        p, n, k, coef = self.p, self.n, self.k, self.coef
        unfitted = read.inner(f"{p}.unfitted")
        uses_v = self.nonzero("mlin", unfitted)
        coef("mres", unfitted)  # both forms read it
        linear = unfitted.inner(f"{p}.linear")
        linear.nodes += [
            helper.make_node("MatMul", [d, f"fc.{n}.V{k}"], [f"{p}.dv"]),
            helper.make_node("Mul", [coef("mlin", linear), f"{p}.dv"], [f"{p}.dvl"]),
            helper.make_node("Add", [f"{p}.dvl", f"fc.{n}.b{k}"], [f"{p}.lb"]),
            helper.make_node("Mul", [coef("mlin", linear), f"{p}.lb"], [f"{p}.lfit"]),
            helper.make_node("Mul", [coef("mres", linear), d], [f"{p}.lres"]),
            helper.make_node("Add", [base, f"{p}.lres"], [f"{p}.lkept"]),
            helper.make_node("Add", [f"{p}.lkept", f"{p}.lfit"], [f"{p}.linear"]),
        ]
        residual = unfitted.inner(f"{p}.residual")
        residual.nodes += [
            helper.make_node("Mul", [coef("mres", residual), d], [f"{p}.rres"]),
            helper.make_node("Add", [base, f"{p}.rres"], [f"{p}.residual"]),
        ]
        unfitted.nodes.append(self.gate(f"{n}/a{k}/linear", uses_v, linear, residual, f"{p}.unfitted"))
        return unfitted
