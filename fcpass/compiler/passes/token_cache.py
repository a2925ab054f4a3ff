"""Token-level caching inside a block: `block(H) -> If(tok > 0, conservative(H, state), block(H))`.

DuCa's / ToCa's conservative step, compiled: the self-attention branch output (before its adaLN
gate) is reused from the cache, and every token-local branch (MLP, cross-attention) runs only on
the top-k tokens of its input, gathered with TopK + GatherND, and is scattered (ScatterND) into
its cached output (`fcpass.compiler.token_rows`). k is static per (block, branch), so every shape is.

Invariant: with `fc_tok` all 0 the block runs exactly its original nodes (the else-branch), so the
outputs equal the original model's; the state outputs are then the true branch outputs, the
V-norm (or attention-column) statistics of that step and zero counters. With k = N a conservative
step's token-local branch equals the full branch at the same input (TopK only permutes the
tokens); with k = 0 it is the cached branch output.

Cases:
1. A block takes part iff `fcpass.compiler.branches.find_branches` splits it; otherwise the pass declines
   with its explanation (FcpassError), as it does for a block outside every cache region and for
   opsets below 18 (the reductions take their axes as inputs there).
2. The control `fc_tok` (int64, one per block) selects per step: 0 full (the original nodes; the
   caches, scores and counters are refreshed), 1 conservative (attention reused, token-local
   branches on the top-k tokens), 2 the same but with attention computed (tests; ToCa-like).
   Mode 2's attention is a nested `If` inside the conservative branch, so a full step pays nothing.
3. Scores (compile-time `score`): `vnorm` (DuCa: per token the mean over heads of 1 - ||v_hj|| at
   the last full step, L2-normalised over the tokens), `attention` (ToCa: per token j the attention
   it received at the last full step, the mean over heads and query tokens i of the self-attention
   Softmax output P[b, h, i, j], L2-normalised over the tokens; needs an unfused Softmax, a fused
   attention op declines). A full step stores the means (mean_h ||v_hj||, or the column means) and
   a conservative step normalises them where it selects, once for all blocks: the full steps, which
   every block runs, pay the fewest nodes. `saliency` (||X_j - X_j_ref||^2
   of the branch input against its value at the last full step, L2-normalised) or `random` (fed by
   the host as `fc_tok_rand`, (blocks, N), from a seeded generator). To each: counter_weight *
   (c_j + 1), c_j the conservative steps since token j was last recomputed in that branch, then the
   spatial bonus to the best token of every grid x grid cell of the token grid.
   Stored and random scores are known before the step runs, so every branch's tokens are picked
   in one batched TopK in the main graph (`TokenPass.select_all`), inside an If that runs only when
   some block is conservative; a branch takes the first k of its row. Saliency selects in the branch.
4. Classifier-free guidance: with an even batch the two halves' scores are averaged and both halves
   take the same selection (the batch is [cond; uncond], as the sampler feeds it).
5. Skipped enclosing regions pass the token state through unchanged (a skipped step recomputes no
   token; counters then count conservative steps, which only shifts every token's score alike).
6. Shape constants that carry N in a token-local branch (a Reshape to (B, N, H, d)) are rewritten to k,
   found by following the token axis through the branch (`fcpass.compiler.token_axis`); an op that mixes
   tokens, or that the follower does not know, declines with FcpassError naming the node.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from fcpass.compiler.branches import BlockBranches, Branch, find_branches
from fcpass.compiler.discover import BlockMap
from fcpass.compiler.graphinfo import GraphIndex, graph_macs, node_inputs, replace_node_groups
from fcpass.compiler.passes.builder import RegionHooks
from fcpass.compiler.token_axis import clone_node, clone_on_tokens
from fcpass.compiler.token_rows import TokenRows, with_samples
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import (
    TOK_ANY,
    TOK_CONSERVATIVE,
    TOK_FULL,
    TOK_INPUT,
    TOK_LOCAL_ONLY,
    TOK_RAND_INPUT,
    StateSpec,
    tok_condition,
)
from fcpass.contract.tokens import TokenOptions

if TYPE_CHECKING:
    from fcpass.compiler.passes.builder import Region, RegionBuilder

log = logging.getLogger(__name__)

SCORES = ("vnorm", "attention", "saliency", "random")
# Scores computed at full steps and kept in the `score` state until the next one.
STORED_SCORES = ("vnorm", "attention")
TOPK_MAX = 3840  # TensorRT's TopK limit
SELECTED_ROWS = "fc.tok.sel.rows"  # the batched selection's (B, S * kmax, 2) rows (`TokenPass.select_all`)


@dataclass
class _TokBlock:
    pos: int  # index into fc_tok
    block: int
    scope: str
    split: BlockBranches
    nodes: list[int]
    region: Region
    tokens: int
    batch: int
    width: int
    ks: dict[int, int]  # branch position -> k (token-local branches)
    states: dict[str, StateSpec] = field(default_factory=dict)


class TokenPass(RegionHooks):
    """Builds the token `If` of every block, as a hook of the region builder (`RegionHooks`).

    `add_state(region)` adds the token state of the blocks whose innermost region is `region`;
    `rewrite_body(body, region)` replaces those blocks' nodes in the region's compute branch by their `If`.
    """

    def __init__(self, builder: RegionBuilder, index: GraphIndex, block_map: BlockMap, flat: list[Region],
                 options: TokenOptions, opset: int) -> None:
        if options.score not in SCORES:
            raise FcpassError(f"--token-score {options.score!r} unknown; use one of {', '.join(SCORES)}")
        if opset < 18:
            raise FcpassError(f"token caching needs opset >= 18 and the model uses {opset}; re-export with --opset 18")
        self.builder = builder
        self.index = index
        self.options = options
        dependent = index.descendants({block_map.latent})
        self.blocks: list[_TokBlock] = []
        # The batched selection (`select_all`): each (block, branch)'s slot in its rows, their largest k.
        self.slots: dict[tuple[int, int], int] = {}
        self.kmax = 0
        layers = len(block_map.blocks)
        for pos, b in enumerate(block_map.blocks):
            split = find_branches(index, b, dependent)
            adds = {br.add_node for br in split.branches}
            owners = [r for r in flat if adds <= r.nodes]
            if not owners:
                raise FcpassError(
                    f"block {b.scope!r} is in no cache region; token caching needs every block inside one "
                    "(optimize with --regions including blocks or stack)"
                )
            region = min(owners, key=lambda r: len(r.nodes))
            nodes = [i for i in sorted(b.nodes) if i in region.nodes]
            batch, tokens, width = (self._dim(split.stream_in, j) for j in range(3))
            ks = {}
            for br in split.local():
                outside = [i for i in (*br.nodes, br.add_node) if i not in region.nodes]
                if outside:
                    raise FcpassError(
                        f"block {b.scope!r}: node {index.nodes[outside[0]].name!r} of its {br.role} branch was moved "
                        "out of the block's region; token caching needs the token-local branches whole"
                    )
                ks[br.position] = options.k_for(pos, layers, tokens)
                if ks[br.position] > TOPK_MAX:
                    raise FcpassError(f"block {b.scope!r}: k = {ks[br.position]} exceeds TensorRT's TopK limit {TOPK_MAX}; "
                                      "lower the token ratio")
            if options.score == "vnorm" and not _has_unfused_v(split):
                raise FcpassError(f"block {b.scope!r} exposes no unfused V for V-norm scores; use --token-score saliency or random")
            if options.score == "attention":
                self._check_attention_map(b.scope, split, tokens)
            outside = region.nodes - set(b.nodes)
            for br in split.mixing():  # what only attention reads runs in its branch: a reuse skips it too
                own = _exclusive_feeders(index, set(br.nodes) & region.nodes, outside)
                br.nodes = sorted({*br.nodes, *own})
                nodes = sorted({*nodes, *own})
            self.blocks.append(_TokBlock(pos, b.index, b.scope, split, nodes, region, tokens, batch, width, ks))
        if self.blocks:
            self._add_inputs()

    # --- setup ----------------------------------------------------------------------------
    def _check_attention_map(self, scope: str, split: BlockBranches, tokens: int) -> None:
        """Attention-column scores read the self-attention's Softmax output; decline where there is none."""
        # Suggest only the scores this block supports: vnorm needs an unfused V as well.
        others = "vnorm|saliency|random" if _has_unfused_v(split) else "saliency|random"
        probs = next((br.probs for br in split.mixing() if br.probs is not None), None)
        if not split.mixing():
            raise FcpassError(f"block {scope!r} has no self-attention to read an attention map from; "
                              f"use --token-score {others}")
        if probs is None:
            raise FcpassError(f"block {scope!r}: its self-attention is fused (no Softmax output) and exposes no "
                              f"attention map for attention scores; use --token-score {others}")
        keys = self.index.shape(probs)
        # The score is per image token: keys beyond them (joint text tokens) would have no slot.
        if keys and isinstance(keys[-1], int) and keys[-1] != tokens:
            raise FcpassError(f"block {scope!r}: its attention map {probs!r} has {keys[-1]} key tokens, not the "
                              f"stream's {tokens}; use --token-score {others}")

    def _dim(self, name: str, j: int) -> int:
        shape = self.index.shape(name)
        if not shape or len(shape) != 3 or not isinstance(shape[j], int):
            raise FcpassError(f"token caching needs the stream {name!r} statically shaped (B, N, D); found {shape}")
        return int(shape[j])

    def _add_inputs(self) -> None:
        g = self.builder.graph
        g.input.append(helper.make_tensor_value_info(TOK_INPUT, TensorProto.INT64, [len(self.blocks)]))
        if self.options.score == "random":
            n = self.blocks[0].tokens
            g.input.append(helper.make_tensor_value_info(TOK_RAND_INPUT, TensorProto.FLOAT, [len(self.blocks), n]))
        c = self.builder.const
        c("fc.tok.zero_i", np.array(TOK_FULL, np.int64))
        c("fc.tok.one_i", np.array(TOK_CONSERVATIVE, np.int64))
        c("fc.tok.one", np.array(1.0, np.float32))
        c("fc.tok.zero", np.array(0.0, np.float32))
        c("fc.tok.eps", np.array(1e-12, np.float32))
        c("fc.tok.cw", np.array(self.options.counter_weight, np.float32))
        c("fc.tok.bonus", np.array(self.options.spatial_bonus, np.float32))
        c("fc.tok.ax0", np.array([0], np.int64))
        c("fc.tok.ax1", np.array([1], np.int64))
        c("fc.tok.ax2", np.array([2], np.int64))
        c("fc.tok.ax24", np.array([2, 4], np.int64))
        c("fc.tok.axlast", np.array([-1], np.int64))

    def add_state(self, region: Region) -> list[StateSpec]:
        """Graph inputs/outputs of the token state of the blocks `region` owns (innermost)."""
        out: list[StateSpec] = []
        for tb in self.blocks:
            if tb.region is not region:
                continue
            b, n = tb.batch, tb.tokens
            for br in tb.split.branches:
                elem, shape = self.builder.tensor_type(br.output)
                tb.states[f"out{br.position}"] = self._state(region, tb, f"b{br.position}.out", "tok_out", br.output, elem, shape,
                                                             keep=[TOK_CONSERVATIVE] if br.kind == "mixing" else None)
                if br.kind == "local":
                    tb.states[f"cnt{br.position}"] = self._state(region, tb, f"b{br.position}.cnt", "tok_cnt", None,
                                                                 TensorProto.FLOAT, [b, n])
                    if self.options.score == "saliency":
                        elem_s, shape_s = self.builder.tensor_type(br.stream_in)
                        tb.states[f"ref{br.position}"] = self._state(region, tb, f"b{br.position}.ref", "tok_ref",
                                                                     br.stream_in, elem_s, shape_s)
            if self.options.score in STORED_SCORES:
                tb.states["score"] = self._state(region, tb, "score", "tok_score", None, TensorProto.FLOAT, [b, n],
                                                 keep=[TOK_CONSERVATIVE, TOK_LOCAL_ONLY])
            self.builder.const(f"fc.tok{tb.pos}.zeros_bn", np.zeros((b, n), np.float32))
            out.extend(tb.states.values())
        return out

    def _state(self, region: Region, tb: _TokBlock, what: str, kind: str, source: str | None, elem: int,
               shape: list[Any], keep: list[int] | None = None) -> StateSpec:
        """A token state; `keep`: the block's token modes that leave it as it is (`StateSpec.token_keep`)."""
        name = f"fc.tok{tb.pos}.{what}"
        g = self.builder.graph
        g.input.append(helper.make_tensor_value_info(name, elem, shape))
        g.output.append(helper.make_tensor_value_info(name + ".next", elem, shape))
        if source is None:
            # Scores and counters track no tensor of the original graph: type them under their own name
            # so that the region machinery can pass them through enclosing Ifs like any other state.
            source = name
            self.index.value_types[name] = (elem, tuple(shape))
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
        if not keep:
            return StateSpec(name, name + ".next", region.name, kind, source, list(shape), dtype)
        return StateSpec(name, name + ".next", region.name, kind, source, list(shape), dtype, token_block=tb.pos,
                         token_keep=keep)

    def conditions(self) -> list[onnx.NodeProto]:
        """Main-graph nodes that give every block its token If's condition (not full) and its attention
        If's (conservative), one-element tensors: one compare and one Split each for all blocks, as
        ONNX Runtime pays microseconds for every node a step runs. The host knows both from fc_tok
        (`fcpass.contract.plan.token_conditions`): keep them in step."""
        if not self.blocks:
            return []
        ones = self.builder.const("fc.tok.split", np.ones(len(self.blocks), np.int64))
        nodes = []
        for what, op, than in (("cond", "Greater", "fc.tok.zero_i"), ("reuse", "Equal", "fc.tok.one_i")):
            every = f"fc.tok.{what}"
            nodes += [
                helper.make_node(op, [TOK_INPUT, than], [every], name=f"fc/tok/{what}"),
                helper.make_node("Split", [every, ones], [tok_condition(tb.pos, what) for tb in self.blocks],
                                 name=f"fc/tok/{what}/split", axis=0),
            ]
        return nodes

    def select_all(self) -> list[onnx.NodeProto]:
        """Main-graph nodes that pick every token-local branch's rows of a conservative step at once.

        A stored or host-fed score and the counters are state, known before the step runs, so all
        branches select in one batched TopK (k = the largest k, sorted: a branch keeps the first k of
        its row, the same tokens its own TopK would pick) instead of a dozen small ops each, inside an
        If that runs only when some block is conservative. Saliency reads each branch's input at the
        step and selects in the branch (returns no nodes), as do blocks of unequal batch or tokens.
        Output SELECTED_ROWS (B, S * kmax, 2): every branch's (sample, token) rows, slot j's kmax at
        [j kmax, (j + 1) kmax), so that a branch's rows are one Slice.
        The If's condition, like the blocks' token Ifs', is a function of fc_tok (`fcpass.contract.plan.token_conditions`).
        """
        sel = [(tb, br.position, tb.ks[br.position]) for tb in self.blocks for br in tb.split.local()
               if tb.ks[br.position] > 0]
        if self.options.score == "saliency" or not sel or len({(tb.batch, tb.tokens) for tb, *_ in sel}) > 1:
            return []
        q = "fc.tok.sel"
        self.kmax = max(k for *_, k in sel)
        self.slots = {(tb.pos, position): j for j, (tb, position, _) in enumerate(sel)}
        shape = [sel[0][0].batch, len(sel) * self.kmax, 2]
        nodes: list[onnx.NodeProto] = []
        picked = self._pick(sel, nodes, q)
        then = helper.make_graph(nodes, "fc_tok_select", [], [helper.make_tensor_value_info(picked, TensorProto.INT64, shape)])
        none = helper.make_graph([helper.make_node("Identity", [f"{q}.none"], [f"{q}.none_rows"], name=f"fc/{q}/none")],
                                 "fc_tok_select_none", [], [helper.make_tensor_value_info(f"{q}.none_rows", TensorProto.INT64, shape)],
                                 [onnx.numpy_helper.from_array(np.zeros(shape, np.int64), f"{q}.none")])
        return [
            helper.make_node("Cast", [TOK_INPUT], [f"{q}.modes"], name=f"fc/{q}/modes", to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", [f"{q}.modes"], [f"{q}.most"], name=f"fc/{q}/most", keepdims=0),
            helper.make_node("Greater", [f"{q}.most", "fc.tok.zero"], [TOK_ANY], name=f"fc/{q}/any"),
            helper.make_node("If", [TOK_ANY], [SELECTED_ROWS], name=f"fc/{q}", then_branch=then, else_branch=none),
        ]

    def _pick(self, sel: list[tuple[_TokBlock, int, int]], nodes: list[onnx.NodeProto], q: str) -> str:
        """Append the batched selection (`_BlockBuilder._select`'s ops on the stacked states); returns its rows."""
        c = self.builder.const
        emit = _appender(nodes)
        count, b, n = len(sel), sel[0][0].batch, sel[0][0].tokens
        c(f"{q}.bsn", np.array([b, count, n], np.int64))  # sample-major: see SELECTED_ROWS
        cnt = emit("Concat", [tb.states[f"cnt{position}"].name for tb, position, _ in sel], f"{q}.cnt", axis=1)
        weighted = emit("Reshape", [emit("Mul", [emit("Add", [cnt, "fc.tok.one"], f"{q}.cnt1"), "fc.tok.cw"], f"{q}.cw"),
                                    f"{q}.bsn"], f"{q}.cw3")
        if self.options.score in STORED_SCORES:
            scores = emit("Concat", [tb.states["score"].name for tb, *_ in sel], f"{q}.scores", axis=1)
            base = _normalised(emit, emit("Reshape", [scores, f"{q}.bsn"], f"{q}.stored"), self.options.score, q)
        else:
            c(f"{q}.blocks", np.array([tb.pos for tb, *_ in sel], np.int64))
            base = emit("Unsqueeze", [emit("Gather", [TOK_RAND_INPUT, f"{q}.blocks"], f"{q}.rand"), "fc.tok.ax0"],
                        f"{q}.base")
        s = emit("Add", [base, weighted], f"{q}.s")
        idx = _top_tokens(nodes, c, s, q, b, (count,), n, self.kmax, self.options, "every block")
        return with_samples(emit, c, idx, (b, count * self.kmax), q)

    # --- the rewrite ------------------------------------------------------------------------
    def rewrite_body(self, body: list[onnx.NodeProto], region: Region) -> list[onnx.NodeProto]:
        """`body` with the nodes of each block `region` owns replaced by that block's token If."""
        mine = [tb for tb in self.blocks if tb.region is region]
        if not mine:
            return body
        owner = {i: tb for tb in mine for i in tb.nodes}
        return replace_node_groups(self.index, body, owner, lambda tb: _BlockBuilder(self, tb).build())

    def spec(self) -> dict[str, Any]:
        """The plan's record of the token mechanism (`CachePlan.tokens`)."""
        blocks = []
        for tb in self.blocks:
            full = graph_macs(self.index, tb.nodes)
            kept = 0
            branches = []
            for br in tb.split.branches:
                macs = graph_macs(self.index, br.nodes)
                k = tb.ks.get(br.position)
                if k is not None:
                    kept += round(macs * k / tb.tokens)
                branches.append({"role": br.role, "kind": br.kind, "k": k, "macs": macs, "output": br.output})
            mixing = sum(graph_macs(self.index, br.nodes) for br in tb.split.mixing())
            blocks.append({"block": tb.block, "scope": tb.scope, "region": tb.region.name, "tokens": tb.tokens,
                           "macs": full, "conservative_macs": full - sum(b["macs"] for b in branches) + kept,
                           "mixing_macs": mixing, "branches": branches})
        return {"input": TOK_INPUT, "modes": {"full": TOK_FULL, "conservative": TOK_CONSERVATIVE,
                                              "local_only": TOK_LOCAL_ONLY},
                "options": asdict(self.options), "blocks": blocks}


class _BlockBuilder:
    """The token If of one block: else the original nodes, then the conservative step."""

    def __init__(self, tp: TokenPass, tb: _TokBlock) -> None:
        self.tp = tp
        self.tb = tb
        self.index = tp.index
        self.p = f"fc.tok{tb.pos}"
        self.cons_nodes: list[onnx.NodeProto] = []
        self.node = _appender(self.cons_nodes)  # node(op, inputs, output, **attrs): a conservative-branch node

    def build(self) -> list[onnx.NodeProto]:
        tb, p = self.tb, self.p
        o = tb.split.stream_out
        outputs = [o, *[s.next for s in tb.states.values()]]
        full = self.full_branch()
        cons = self.conservative_branch()
        if_node = helper.make_node("If", [tok_condition(tb.pos, "cond")], outputs, name=f"fc/{p}/If", then_branch=cons,
                                   else_branch=full)
        return [if_node]

    # The full step: the original nodes; states refreshed from their values.
    def full_branch(self) -> onnx.GraphProto:
        tb, p = self.tb, self.p
        o = tb.split.stream_out
        nodes = []
        for i in tb.nodes:
            c = onnx.NodeProto()
            c.CopyFrom(self.index.nodes[i])
            for j, x in enumerate(c.output):
                if x == o:
                    c.output[j] = f"{o}~{p}"
            for j, x in enumerate(c.input):
                if x == o:
                    c.input[j] = f"{o}~{p}"
            nodes.append(c)
        extra: list[onnx.NodeProto] = []
        values: dict[str, str] = {}
        for br in tb.split.branches:
            values[f"out{br.position}"] = br.output  # before its gate, so never the block output
            if br.kind == "local":
                values[f"cnt{br.position}"] = f"{p}.zeros_bn"
                if "ref" + str(br.position) in tb.states:
                    values[f"ref{br.position}"] = br.stream_in
        if "score" in tb.states:
            values["score"] = self._attention_score(extra) if self.tp.options.score == "attention" else self._vnorm(extra)
        nodes.extend(extra)
        outs = self._outputs(nodes, [(f"{o}~{p}", f"{o}@{p}.full", o),
                                     *[(values[key], f"{s.next}@{p}.full", s.source) for key, s in tb.states.items()]])
        graph = helper.make_graph(nodes, f"fc_{p}_full", [], outs)
        named = {vi.name for vi in outs}
        for n in nodes:
            for x in n.output:
                vi = self.tp.builder.original_value_info(x)
                if vi is not None and x not in named:
                    graph.value_info.append(vi)
        return graph

    def _outputs(self, nodes: list[onnx.NodeProto], pairs: list[tuple[str, str, str]]) -> list[onnx.ValueInfoProto]:
        """A branch's outputs from (value, name if copied, typed like) triples.

        A value the branch computes is an output as it is, so that ONNX Runtime writes it straight
        into the If's output buffer (an Identity there costs a copy of the tensor). A value from the
        outer graph, or one already output, goes through an Identity named `name`, as ONNX requires.
        """
        made = {x for n in nodes for x in n.output}
        outs: list[onnx.ValueInfoProto] = []
        for src, name, like in pairs:
            if src not in made or any(vi.name == src for vi in outs):
                nodes.append(helper.make_node("Identity", [src], [name], name=f"fc/{name}"))
                src = name
            elem, shape = self.tp.builder.tensor_type(like)
            outs.append(helper.make_tensor_value_info(src, elem, shape))
        return outs

    def _vnorm(self, nodes: list[onnx.NodeProto]) -> str:
        """Mean over heads of ||v_hj||: (B, N) float32 (`_normalised` makes it the score)."""
        tb, p = self.tb, self.p
        br = next(b for b in tb.split.mixing() if b.value and not b.value_fused)
        v = br.value
        if self.index.dtype(v) != np.float32:
            nodes.append(helper.make_node("Cast", [v], [f"{p}.v32"], to=TensorProto.FLOAT))
            v = f"{p}.v32"
        self.tp.builder.const(f"{p}.vshape", np.array([tb.batch, -1, tb.tokens], np.int64))
        nodes += [
            helper.make_node("ReduceL2", [v, "fc.tok.axlast"], [f"{p}.vn"], keepdims=0),
            helper.make_node("Reshape", [f"{p}.vn", f"{p}.vshape"], [f"{p}.vnh"]),
            helper.make_node("ReduceMean", [f"{p}.vnh", "fc.tok.ax1"], [f"{p}.vm"], keepdims=0),
        ]
        return f"{p}.vm"

    def _attention_score(self, nodes: list[onnx.NodeProto]) -> str:
        """Per token j the mean over heads and queries of P[b, h, i, j]: (B, N) float32 (`_normalised`
        makes it the score)."""
        tb, p = self.tb, self.p
        probs = next(b.probs for b in tb.split.mixing() if b.probs is not None)
        if self.index.dtype(probs) != np.float32:
            # Averaging H * N probabilities of about 1/N each loses too much in fp16/bf16.
            nodes.append(helper.make_node("Cast", [probs], [f"{p}.p32"], to=TensorProto.FLOAT))
            probs = f"{p}.p32"
        # (B, H, N, N) or (B*H, N, N), batch outermost: (B, H*N, N) with the key token j last.
        self.tp.builder.const(f"{p}.pshape", np.array([tb.batch, -1, tb.tokens], np.int64))
        nodes += [
            helper.make_node("Reshape", [probs, f"{p}.pshape"], [f"{p}.pq"]),
            helper.make_node("ReduceMean", [f"{p}.pq", "fc.tok.ax1"], [f"{p}.pm"], keepdims=0),
        ]
        return f"{p}.pm"

    # The conservative step.
    def conservative_branch(self) -> onnx.GraphProto:
        tb, p = self.tb, self.p
        split = tb.split
        ren: dict[str, str] = {}
        by_add = {br.add_node: br for br in split.branches}
        inner = {i for br in split.branches for i in (*br.nodes, *([br.gate_node] if br.gate_node is not None else []))}
        nexts: dict[str, str] = {}
        for i in tb.nodes:
            if i in by_add:
                br = by_add[i]
                if br.kind == "mixing":
                    ren[br.stream_out] = self._attention(br, ren, nexts)
                else:
                    out_c = self._branch(br, ren, nexts)
                    ren[br.stream_out] = self._residual(br, out_c, ren, self.node, f"{p}.b{br.position}")[1]
            elif i not in inner:  # a pass-through node between branches
                self.cons_nodes.append(clone_node(self.index.nodes[i], ren, f"~{p}c"))
        o = split.stream_out
        outs = self._outputs(self.cons_nodes, [(ren[o], f"{o}@{p}.cons", o),
                                               *[(nexts.get(key, s.name), f"{s.next}@{p}.cons", s.source)
                                                 for key, s in tb.states.items()]])
        return helper.make_graph(self.cons_nodes, f"fc_{p}_conservative", [], outs)

    def _residual(self, br: Branch, out: str, ren: dict[str, str], emit: Any, q: str) -> tuple[str, str]:
        """`stream_in + gate * out` with the block's own gate Mul and residual Add; returns
        (gate * out, or `out` where the block has no gate; the stream)."""
        if br.gate_node is not None:
            gate = self.index.nodes[br.gate_node]
            out = emit("Mul", [br.gate if x == br.gate else out for x in gate.input], f"{q}.gated")
        stream = ren.get(br.stream_in, br.stream_in)
        return out, emit("Add", [stream if x == br.stream_in else out for x in self.index.nodes[br.add_node].input],
                         f"{q}.stream")

    def _branch(self, br: Branch, ren: dict[str, str], nexts: dict[str, str]) -> str:
        """Append a token-local branch's conservative nodes; return its output (before the gate)."""
        tb, p = self.tb, self.p
        q = f"{p}.b{br.position}"
        cache = tb.states[f"out{br.position}"].name
        cnt = tb.states[f"cnt{br.position}"].name
        cnt1 = self.node("Add", [cnt, "fc.tok.one"], f"{q}.cnt1")
        if "score" in tb.states:  # kept by the host at this step: any value of its type will do, no copy
            nexts.setdefault("score", cnt1)
        k = tb.ks[br.position]
        if k == 0:  # nothing to recompute: the cached output, every counter one step older
            nexts[f"cnt{br.position}"] = cnt1
            return cache
        x = ren.get(br.stream_in, br.stream_in)
        c = self.tp.builder.const
        rows = self._rows(br, x, cnt1, k)
        xk = rows.gather(x, f"{q}.xk")
        clones, out_k = clone_on_tokens(self.index, br.nodes, {br.stream_in: xk}, br.output, tb.tokens, k,
                                        f"~{p}k{br.position}", c, ren)
        self.cons_nodes.extend(clones)
        out = rows.scatter(cache, out_k, f"{q}.scattered")
        c(f"{q}.zeros_bk", np.zeros((tb.batch, k), np.float32))
        nexts[f"cnt{br.position}"] = rows.scatter(cnt1, f"{q}.zeros_bk", f"{q}.cnt_next")
        nexts[f"out{br.position}"] = out
        return out

    def _attention(self, br: Branch, ren: dict[str, str], nexts: dict[str, str]) -> str:
        """The stream after self-attention, from a nested If: mode 1 the cached output, mode 2 recomputed.

        The gate and the residual Add sit inside both branches, so that a reused step reads the cache
        once, in its gate Mul, and copies it nowhere: the cache state keeps its value at mode 1
        (`StateSpec.token_block`), so the reuse branch's state output is any value of the cache's shape
        it computes anyway, the gated cache (a copy of the cache only where there is no gate).
        """
        p = self.p
        q = f"{p}.b{br.position}"
        cache = self.tb.states[f"out{br.position}"].name
        mine = set(self.tb.nodes)
        branches = []
        for tag in ("reuse", "compute"):
            nodes: list[onnx.NodeProto] = []
            emit = _appender(nodes)
            if tag == "reuse":
                gated, stream = self._residual(br, cache, ren, emit, f"{q}~{tag}")
                state = gated if gated != cache else emit("Identity", [cache], f"{q}.attn~{tag}")
            else:
                local = dict(ren)
                nodes += [clone_node(self.index.nodes[i], local, f"~{p}a") for i in br.nodes if i in mine]
                state = local.get(br.output, br.output)
                stream = self._residual(br, state, ren, emit, f"{q}~{tag}")[1]
            branches.append(helper.make_graph(nodes, f"fc_{q}_{tag}", [], [self._vi(stream, br.stream_out),
                                                                            self._vi(state, br.output)]))
        outs = [f"{q}.stream", f"{q}.attn"]
        self.cons_nodes.append(helper.make_node("If", [tok_condition(self.tb.pos, "reuse")], outs, name=f"fc/{q}/If",
                                                then_branch=branches[0], else_branch=branches[1]))
        nexts[f"out{br.position}"] = outs[1]
        return outs[0]

    def _vi(self, name: str, like: str) -> onnx.ValueInfoProto:
        elem, shape = self.tp.builder.tensor_type(like)
        return helper.make_tensor_value_info(name, elem, shape)

    def _rows(self, br: Branch, x: str, cnt1: str, k: int) -> TokenRows:
        """The branch's rows: its slot of the batched selection (`TokenPass.select_all`), else its own."""
        q = f"{self.p}.b{br.position}"
        slot = self.tp.slots.get((self.tb.pos, br.position))
        c = self.tp.builder.const
        if slot is None:  # no batched selection (`select_all` gives slots only with its rows)
            tokens = self._select(br, x, cnt1, k)
            return TokenRows(self.node, with_samples(self.node, c, tokens, (self.tb.batch, k), q), q)
        lo = slot * self.tp.kmax  # the first k of its slot's sorted kmax: the top k
        rows = self.node("Slice", [SELECTED_ROWS, c(f"{q}.lo", np.array([lo], np.int64)),
                                   c(f"{q}.hi", np.array([lo + k], np.int64)), "fc.tok.ax1"], f"{q}.rows")
        return TokenRows(self.node, rows, q)

    def _select(self, br: Branch, x: str, cnt1: str, k: int) -> str:
        """The branch's own selection: the tokens (B, k, 1) of its top-k scores; both CFG halves select alike."""
        tb, p = self.tb, self.p
        q = f"{p}.b{br.position}"
        opts = self.tp.options
        if opts.score in STORED_SCORES:
            base = _normalised(self.node, tb.states["score"].name, opts.score, q)
        elif opts.score == "saliency":
            ref = tb.states[f"ref{br.position}"].name
            d = self.node("Sub", [x, ref], f"{q}.d")
            if self.index.dtype(br.stream_in) != np.float32:
                d = self.node("Cast", [d], f"{q}.d32", to=TensorProto.FLOAT)
            ss = self.node("ReduceSumSquare", [d, "fc.tok.ax2"], f"{q}.sal", keepdims=0)
            nrm = self.node("ReduceL2", [ss, "fc.tok.ax1"], f"{q}.saln", keepdims=1)
            nrm = self.node("Max", [nrm, "fc.tok.eps"], f"{q}.salne")
            base = self.node("Div", [ss, nrm], f"{q}.salnorm")
        else:
            idx = self.tp.builder.const(f"{q}.block", np.array(tb.pos, np.int64))
            base = self.node("Gather", [TOK_RAND_INPUT, idx], f"{q}.rand")
        s = self.node("Add", [base, self.node("Mul", [cnt1, "fc.tok.cw"], f"{q}.cw")], f"{q}.s")
        return _top_tokens(self.cons_nodes, self.tp.builder.const, s, q, tb.batch, (), tb.tokens, k, opts, tb.scope)


def _normalised(emit: Callable[..., str], stored: str, score: str, q: str) -> str:
    """The score of stored full-step means (..., N): for `vnorm` 1 - mean_h ||v_hj||, for `attention`
    the column means as they are, each L2-normalised over its N tokens."""
    u = emit("Sub", ["fc.tok.one", stored], f"{q}.vu") if score == "vnorm" else stored
    l2 = emit("Max", [emit("ReduceL2", [u, "fc.tok.axlast"], f"{q}.l2", keepdims=1), "fc.tok.eps"], f"{q}.l2e")
    return emit("Div", [u, l2], f"{q}.score")


def _top_tokens(nodes: list[onnx.NodeProto], const: Callable[[str, np.ndarray], str], s: str, q: str, batch: int,
                inner: tuple[int, ...], n: int, k: int, opts: TokenOptions, where: str) -> str:
    """The tokens (B, prod(inner) k, 1) of the top k of scores `s` (B, *inner, N), each row of `inner`
    ranked on its own: row j's k tokens, best first, at [j k, (j + 1) k).

    With an even batch ([cond; uncond], as the sampler feeds it) the two halves' scores are averaged
    and both take the same tokens; then the spatial bonus, then TopK (sorted: its first j are the top j).
    """
    emit = _appender(nodes)
    pair = batch % 2 == 0 and batch >= 2
    rows = batch // 2 if pair else batch
    if pair:  # the mean of the two halves, row i with row i + B/2
        const(f"{q}.halves", np.array([2, rows, *inner, n], np.int64))
        s = emit("ReduceMean", [emit("Reshape", [s, f"{q}.halves"], f"{q}.halves_s"), "fc.tok.ax0"], f"{q}.pair",
                 keepdims=0)
    s = _spatial_bonus(emit, const, s, q, rows * math.prod(inner), n, opts, where)
    const(f"{q}.k", np.array([k], np.int64))
    nodes.append(helper.make_node("TopK", [s, f"{q}.k"], [f"{q}.topv", f"{q}.top"], name=f"fc/{q}/TopK",
                                  axis=-1, largest=1, sorted=1))
    const(f"{q}.rows_k", np.array([rows, math.prod(inner) * k, 1], np.int64))
    tokens = emit("Reshape", [f"{q}.top", f"{q}.rows_k"], f"{q}.rows_g")
    return emit("Concat", [tokens, tokens], f"{q}.rows_g2", axis=0) if pair else tokens


def _spatial_bonus(emit: Callable[..., str], const: Callable[[str, np.ndarray], str], s: str, q: str, rows: int, n: int,
                   opts: TokenOptions, where: str) -> str:
    """+ spatial_bonus to the best token of every grid x grid cell of the square token grid: `s` holds
    `rows` rows of n scores; the result is (rows, n), or `s` as it is where there is no bonus."""
    side = math.isqrt(n)
    g = opts.grid
    if not opts.spatial_bonus or g < 1 or side * side != n or side % g:
        if opts.spatial_bonus:
            log.info("%s: %d tokens are not a square grid divisible by %d; no spatial bonus", where, n, g)
        return s
    h = side // g
    # (rows, h, g, h, g): a cell is a g x g patch; its maximum reduces the two g axes in place.
    const(f"{q}.cells5", np.array([rows, h, g, h, g], np.int64))
    const(f"{q}.flat", np.array([rows, n], np.int64))
    t = emit("Reshape", [s, f"{q}.cells5"], f"{q}.g5")
    m = emit("ReduceMax", [t, "fc.tok.ax24"], f"{q}.gmax", keepdims=1)
    bonus = emit("Where", [emit("Equal", [t, m], f"{q}.gbest"), "fc.tok.bonus", "fc.tok.zero"], f"{q}.gbonus")
    return emit("Reshape", [emit("Add", [t, bonus], f"{q}.sb5"), f"{q}.flat"], f"{q}.sb")


def _appender(nodes: list[onnx.NodeProto]) -> Callable[..., str]:
    """emit(op, inputs, output, **attributes): append that node to `nodes`, return its output."""

    def emit(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"fc/{output}", **attrs))
        return output

    return emit


def _exclusive_feeders(index: GraphIndex, branch: set[int], candidates: set[int]) -> set[int]:
    """The nodes of `candidates` whose outputs only `branch`, or other such nodes, read: work that the
    branch alone needs, such as self-attention's adaLN shift and scale, which a step that reuses the
    branch's output can then skip with it."""
    taken: set[int] = set()
    todo = [index.producer[x] for i in branch for x in node_inputs(index.nodes[i]) if x in index.producer]
    while todo:
        j = todo.pop()
        if j in taken or j not in candidates:
            continue
        outs = [o for o in index.nodes[j].output if o]
        readers = [r for o in outs for r in index.consumers.get(o, [])]
        if readers and not any(o in index.graph_outputs for o in outs) and all(r in branch or r in taken for r in readers):
            taken.add(j)
            todo += [index.producer[x] for x in node_inputs(index.nodes[j]) if x in index.producer]
    return taken


def _has_unfused_v(split: BlockBranches) -> bool:
    return any(br.value and not br.value_fused for br in split.mixing())
