"""Token-level caching: the token If per block, top-k gather/scatter, scores, counters, DuCa and ToCa."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from matplotlib.colors import to_rgb

from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.graphinfo import GraphIndex
from fcpass.compiler.passes.cache_regions import insert_cache_regions
from fcpass.compiler.trt_check import check_graph
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import APPROX_MIX, TOK_INPUT, CachePlan
from fcpass.contract.tokens import TokenOptions
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import SamplingSetup, load_denoiser
from runtimes.policies import DuCa, DuCaConfig, ToCa, TokenControls
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from runtimes.state import Commit
from tests.conftest import SCHEDULER_CONFIG, load, tiny_feeds, unread_nodes
from tests.helpers.compiled import ROLES, Tok

N, D, B = 16, 32, 2  # the tiny DiT: 16 tokens of width 32, batch 2 (one CFG pair)
CW, BONUS = 0.25 / 3, 0.8





def _vnorm_means(v: np.ndarray) -> np.ndarray:
    """What a full step stores for V-norm scores: per token the mean over heads of ||v_hj||."""
    return np.linalg.norm(v.astype(np.float64), axis=-1).reshape(B, -1, N).mean(axis=1)


def _attention_means(probs: np.ndarray) -> np.ndarray:
    """What a full step stores for attention scores: per key token j the mean over heads and queries of P[b, h, i, j]."""
    return probs.astype(np.float64).reshape(B, -1, N).mean(axis=1)


def _score(stored: np.ndarray, score: str = "vnorm") -> np.ndarray:
    """The score of the stored means: DuCa's 1 - mean ||v_hj|| or ToCa's column means, L2-normalised."""
    u = 1.0 - stored if score == "vnorm" else stored
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _vnorm(v: np.ndarray) -> np.ndarray:
    return _score(_vnorm_means(v))


def _attention_columns(probs: np.ndarray) -> np.ndarray:
    return _score(_attention_means(probs), "attention")


def _expected_selection(base: np.ndarray, cnt: np.ndarray, k: int) -> set[int]:
    """The graph's selection, in numpy: counters, CFG pair average, 2x2-cell bonus, top k."""
    s = base + CW * (cnt + 1)
    s = (s[: B // 2] + s[B // 2 :]) / 2
    cells = s.reshape(1, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(1, 4, 4)
    best = (cells == cells.max(axis=2, keepdims=True)).astype(np.float64)
    s = s + BONUS * best.reshape(1, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(1, N)
    return set(np.argsort(-s[0])[:k].tolist())


# --- structure ----------------------------------------------------------------------------------

def _moved_into_attention(t: Tok, tif: onnx.NodeProto, index: GraphIndex) -> Counter[str]:
    """The ops block 1's token If `tif` holds beyond the block's own because only its self-attention
    reads them (its adaLN shift and scale): those its attention compute branch holds beyond the
    attention's nodes, its gate and its residual Add."""
    cons = next(a.g for a in tif.attribute if a.name == "then_branch")
    (attention,) = [n for n in cons.node if n.op_type == "If"]
    compute = next(a.g for a in attention.attribute if a.name == "else_branch")
    own = Counter(index.nodes[i].op_type for i in t.split[1].branches[0].nodes) + Counter({"Mul": 1, "Add": 1})
    return Counter(n.op_type for n in compute.node) - own


@pytest.fixture()
def tok(tiny_dit: Path) -> Tok:
    return Tok(tiny_dit)


def test_exact_ops_of_both_branches_and_tensorrt_rules(tok: Tok) -> None:
    onnx.checker.check_model(tok.model, full_check=True)
    assert check_graph(tok.model) == []
    assert unread_nodes(tok.model.graph) == []
    index = GraphIndex(tok.original)
    region = next(n for n in tok.model.graph.node if n.op_type == "If" and n.name == "fc/block1/If")
    run = next(a.g for a in region.attribute if a.name == "else_branch")
    (tif,) = [n for n in run.node if n.op_type == "If"]
    cons = next(a.g for a in tif.attribute if a.name == "then_branch")
    full = next(a.g for a in tif.attribute if a.name == "else_branch")
    mlp = tok.split[1].branches[1]
    mlp_ops = Counter(index.nodes[i].op_type for i in mlp.nodes)
    mechanism = Counter({
        "If": 1,  # attention, gated and added: reused (mode 1) or computed (mode 2)
        "Mul": 1, "Add": 1 + 1,  # MLP gate, residual; counter + 1
        "Slice": 1, "GatherND": 1, "ScatterND": 2,  # its rows: a slice of the selection's
        # no Identity: the states are outputs as they are, and the scores, which the host keeps at this
        # step, take the counters + 1 as a stand-in
    })
    assert Counter(n.op_type for n in cons.node) == mlp_ops + mechanism
    # Every block's token conditions come from one compare and one Split each, for all blocks at once.
    assert sorted(n.op_type for n in tok.model.graph.node if TOK_INPUT in n.input) == ["Cast", "Equal", "Greater"]
    assert not any(TOK_INPUT in n.input for n in run.node)
    block_ops = Counter(index.nodes[i].op_type for i in discover_blocks(tok.original, "latent").blocks[1].nodes)
    # the mean over heads of ||v||, stored as it is (the selection normalises it); the zero counters
    vnorm = Counter({"ReduceL2": 1, "Reshape": 1, "ReduceMean": 1, "Identity": 1})
    # What only self-attention reads (its adaLN shift and scale) moved into the token If, and into
    # attention's own branch, so that a step reusing attention skips it.
    (attention,) = [n for n in cons.node if n.op_type == "If"]
    compute, reuse = (next(a.g for a in attention.attribute if a.name == b) for b in ("else_branch", "then_branch"))
    moved = _moved_into_attention(tok, tif, index)
    assert moved["Unsqueeze"] + moved["Slice"] >= 2
    assert Counter(n.op_type for n in full.node) == block_ops + vnorm + moved
    read_by_attention = {x for n in compute.node for x in n.input}
    read_elsewhere = ({x for n in [*cons.node, *reuse.node] if n is not attention for x in n.input}
                      | {x for n in run.node if n is not tif for x in n.input} | {o.name for o in run.output})
    for n in run.node:
        assert n is tif or not set(n.output) <= read_by_attention - read_elsewhere, n.name
    # Every block's tokens are picked at once, before the blocks run, and only when one is conservative.
    (select,) = [n for n in tok.model.graph.node if n.name == "fc/fc.tok.sel"]
    picks = next(a.g for a in select.attribute if a.name == "then_branch")
    assert Counter(n.op_type for n in picks.node) == Counter({
        "Concat": 2 + 1 + 1, "Reshape": 2 + 1 + 2 + 1,  # stacked counters and scores, CFG pair, rows; 2x2 cells
        "Add": 1 + 1 + 1, "Mul": 1,  # counter + 1, weight, score; bonus
        "Sub": 1, "ReduceL2": 1, "Max": 1, "Div": 1,  # the scores of the stored V norms: 1 - mean, normalised
        "ReduceMean": 1, "ReduceMax": 1, "Equal": 1, "Where": 1, "TopK": 1,  # CFG halves' mean; 2x2 cells
    })
    nothing = next(a.g for a in select.attribute if a.name == "else_branch")
    assert [n.op_type for n in nothing.node] == ["Identity"]
    topk = next(n for n in picks.node if n.op_type == "TopK")
    k_init = next(t for t in tok.model.graph.initializer if t.name == topk.input[1])
    assert onnx.numpy_helper.to_array(k_init).tolist() == [5]
    # The cache is read once (its gate) and copied nowhere: the state keeps it, the gated cache stands in.
    assert [n.op_type for n in reuse.node] == ["Mul", "Add"]
    assert reuse.output[1].name == reuse.node[0].output[0]
    attn_state = next(s for s in tok.plan.states if s.name == "fc.tok1.b0.out")
    assert attn_state.token_block == 1
    kept = {s.name: s.token_keep for s in tok.plan.states if s.token_block is not None}
    assert kept == {**{f"fc.tok{i}.b0.out": [1] for i in range(tok.blocks)}, **{f"fc.tok{i}.score": [1, 2] for i in range(tok.blocks)}}
    gather = next(n for n in cons.node if n.op_type == "GatherND")
    assert not gather.attribute  # (sample, token) rows, the index the scatters take too
    assert all(not n.attribute for n in cons.node if n.op_type == "ScatterND")  # no `reduction` (TensorRT)
    assert tok.plan.tokens["blocks"][1]["branches"][1]["k"] == 5
    assert [s.kind for s in tok.plan.states if s.region == "block1"][-4:] == ["tok_out", "tok_out", "tok_cnt", "tok_score"]


def test_all_full_equals_original_and_states_are_true(tok: Tok) -> None:
    feeds = tiny_feeds(0)
    out = tok.run(feeds, tok=0)
    (ref,) = tok.ref.run(None, feeds)
    assert np.abs(out["noise_pred"] - ref).max() <= 1e-5
    names = [br.output for s in tok.split for br in s.branches] + [s.branches[0].value for s in tok.split]
    truth = tok.truth(feeds, names)
    for pos, s in enumerate(tok.split):
        for br in s.branches:
            np.testing.assert_allclose(out[f"fc.tok{pos}.b{br.position}.out.next"], truth[br.output], atol=1e-5)
        np.testing.assert_allclose(out[f"fc.tok{pos}.score.next"], _vnorm_means(truth[s.branches[0].value]), atol=1e-5)
        assert not out[f"fc.tok{pos}.b1.cnt.next"].any()


def test_conservative_step_at_the_same_input_reproduces_the_full_step(tok: Tok) -> None:
    """Forced into the conservative branch right after a full step at the same input: the reused
    attention and the scattered MLP tokens are what the full step computed."""
    feeds = tiny_feeds(0)
    full = tok.run(feeds, tok=0)
    cons = tok.run(feeds, tok=1)
    np.testing.assert_allclose(cons["noise_pred"], full["noise_pred"], atol=1e-5)
    assert (cons["fc_skip"] == 0).all()


def test_a_reused_attention_cache_keeps_its_value(tok: Tok) -> None:
    """At mode 1 the attention cache's graph output is the gated cache, not the cache: the state keeps
    its value (Commit reads fc_tok), and takes its next value at modes 0 and 2."""
    full = tok.run(tiny_feeds(0), tok=0)
    cache = full["fc.tok1.b0.out.next"]
    cons = tok.run(tiny_feeds(1), tok=1)
    assert not np.allclose(cons["fc.tok1.b0.out.next"], cache)
    np.testing.assert_array_equal(tok.state["fc.tok1.b0.out"], cache)
    np.testing.assert_array_equal(tok.state["fc.tok1.b1.out"], cons["fc.tok1.b1.out.next"])  # the MLP's scattered cache
    local = tok.run(tiny_feeds(2), tok=[1, 2, 0])
    np.testing.assert_array_equal(tok.state["fc.tok0.b0.out"], full["fc.tok0.b0.out.next"])
    for pos in (1, 2):
        np.testing.assert_array_equal(tok.state[f"fc.tok{pos}.b0.out"], local[f"fc.tok{pos}.b0.out.next"])
    with pytest.raises(FcpassError, match="must feed fc_tok"):
        Commit(tok.plan)(tok.state, local, local["fc_skip"])


@pytest.mark.parametrize("lowering", ["if", "segments"])
def test_every_state_binding_samples_toca_alike(tiny_dit: Path, tmp_path: Path, lowering: str) -> None:
    """Runs of conservative steps read the attention caches the last full step left: host arrays,
    ONNX Runtime's I/O binding and both lowerings keep them alike."""
    from runtimes.backend import OrtBackend
    from runtimes.segments_backend import SegmentsBoundState
    from runtimes.state import BoundState, HostState

    out = tmp_path / ("tiny.tok.onnx" if lowering == "if" else "tiny.tok")
    request = SampleRequest(classes=[1], steps=10, guidance_scale=1.5, uncond_class=10)
    optimize(tiny_dit, out, OptimizeOptions(regions=("stack",), tokens="toca", lowering=lowering),
             SamplingSetup(SCHEDULER_CONFIG, request))
    runs = {}
    for bound in (False, True):
        den = load_denoiser(out, "toca", {})
        if lowering == "if":
            den.binding = (BoundState(den.backend.session, den.plan) if bound else HostState(OrtBackend(out, iobinding=False), den.plan))
        else:
            den.binding = SegmentsBoundState(den.backend, den.plan, device="cpu") if bound else HostState(den.backend, den.plan)
        runs[bound] = (sample(den, scheduler_from_config(SCHEDULER_CONFIG), request, progress=False), den.state)
    assert "CC" in "".join("C" if any(r["tok"]) else "F" for r in runs[False][0].records)
    np.testing.assert_array_equal(runs[True][0].images, runs[False][0].images)
    for name, value in runs[False][1].items():
        np.testing.assert_array_equal(runs[True][1][name], value, err_msg=name)
    if lowering == "if":
        none = sample(load_denoiser(out, "none", {}), scheduler_from_config(SCHEDULER_CONFIG), request, progress=False)
        assert not np.array_equal(none.images, runs[True][0].images)


def test_segments_take_every_token_branch_from_fc_tok(tiny_dit: Path, tmp_path: Path) -> None:
    """Lowered to segments, a token graph reads no condition back (its host knows every token If's
    branch from fc_tok, as every forced region's from fc_ctl) and computes what the If graph computes
    in full, conservative and mixed steps."""
    from runtimes.segments_backend import SegmentsBackend, _run_numpy, interpret

    t = Tok(tiny_dit)
    graph, seg = tmp_path / "tiny.tok.onnx", tmp_path / "tiny.tok"
    onnx.save(t.model, graph)
    optimize(graph, seg, OptimizeOptions(lowering="segments"), None)
    program = SegmentsBackend(seg).program
    reads: list[bool] = []

    def read(cond: np.ndarray) -> bool:
        reads.append(bool(cond))
        return bool(cond)

    for step, modes in enumerate(([0, 0, 0], [1, 1, 1], [2, 0, 1], [0, 1, 2])):
        tok = np.array(modes, np.int64)
        ctl = np.zeros(t.r, np.int64)
        env = {**tiny_feeds(step), **t.state, "fc_ctl": ctl, "fc_thr": np.zeros(t.r, np.float32),
               "fc_mix": np.zeros((t.r, len(APPROX_MIX["reuse"])), np.float32), "fc_tok": tok}
        interpret(program, env, ctl, tok, _run_numpy, read)
        assert reads == [], modes
        expected = t.run(tiny_feeds(step), tok=modes)
        for name, value in expected.items():
            if name != "fc_stat":  # the If graph leaves forced regions unmeasured (NaN), the segments measure them
                np.testing.assert_allclose(env[name], value, atol=1e-5, err_msg=f"{modes} {name}")


# --- gather, branch on k tokens, scatter -----------------------------------------------------------

def test_gathered_branch_equals_full_branch_on_selected_tokens_and_scatter_keeps_the_rest(tok: Tok) -> None:
    a, b = tiny_feeds(0), tiny_feeds(1)
    first = tok.run(a, tok=0)
    old_cache = first["fc.tok0.b1.out.next"]
    score = _score(first["fc.tok0.score.next"])
    out = tok.run(b, tok=[2, 0, 0])  # block 0 conservative with attention computed: its MLP input is true
    mlp = tok.split[0].branches[1]
    truth = tok.truth(b, [mlp.output])[mlp.output]
    cnt = out["fc.tok0.b1.cnt.next"]
    selected = set(np.flatnonzero(cnt[0] == 0).tolist())
    assert selected == _expected_selection(score, np.zeros((B, N)), 5)
    np.testing.assert_array_equal(cnt[0], cnt[1])  # both CFG halves took the same tokens
    others = sorted(set(range(N)) - selected)
    assert (cnt[:, others] == 1).all()
    new_cache = out["fc.tok0.b1.out.next"]
    np.testing.assert_allclose(new_cache[:, sorted(selected)], truth[:, sorted(selected)], atol=1e-5)
    np.testing.assert_array_equal(new_cache[:, others], old_cache[:, others])
    # Block 0's output is its input plus the gated attention (computed) and the gated scattered MLP.
    attn = tok.split[0].branches[0]
    t = tok.truth(b, [attn.stream_out, mlp.gate])
    expected = t[attn.stream_out] + t[mlp.gate] * new_cache
    np.testing.assert_allclose(tok.state["fc.block0.out0"], expected, atol=1e-5)


def test_counters_age_and_reset(tok: Tok) -> None:
    tok.run(tiny_feeds(0), tok=0)
    c1 = tok.run(tiny_feeds(1), tok=1)["fc.tok2.b1.cnt.next"]
    c2 = tok.run(tiny_feeds(2), tok=1)["fc.tok2.b1.cnt.next"]
    assert (c1 == 0).sum() == B * 5 and (c2 == 0).sum() == B * 5
    assert set(np.unique(c2).tolist()) <= {0.0, 1.0, 2.0} and (c2 == 2).any()
    np.testing.assert_array_equal(c2[c2 != 0], (c1 + 1)[c2 != 0])
    assert not tok.run(tiny_feeds(3), tok=0)["fc.tok2.b1.cnt.next"].any()  # a full step resets them


@pytest.mark.parametrize("k", [0, N])
def test_k_zero_is_pure_reuse_and_k_n_is_the_full_block(tiny_dit: Path, k: int) -> None:
    t = Tok(tiny_dit, k=k)
    a, b = tiny_feeds(0), tiny_feeds(1)
    first = t.run(a, tok=0)
    if k == N:
        out = t.run(b, tok=2)  # attention computed: every block equals the original one
        (ref,) = t.ref.run(None, b)
        np.testing.assert_allclose(out["noise_pred"], ref, atol=1e-5)
        assert not out["fc.tok1.b1.cnt.next"].any()
        return
    out = t.run(b, tok=1)
    for pos, s in enumerate(t.split):
        attn, mlp = s.branches
        np.testing.assert_array_equal(out[f"fc.tok{pos}.b1.out.next"], first[f"fc.tok{pos}.b1.out.next"])
        np.testing.assert_array_equal(out[f"fc.tok{pos}.b1.cnt.next"], np.ones((B, N), np.float32))
        gates = t.truth(b, [attn.gate, mlp.gate])
        h = t.state[f"fc.block{pos}.in0"]
        expected = h + gates[attn.gate] * first[f"fc.tok{pos}.b0.out.next"] + gates[mlp.gate] * first[f"fc.tok{pos}.b1.out.next"]
        np.testing.assert_allclose(t.state[f"fc.block{pos}.out0"], expected, atol=1e-5)


def test_a_skipped_stack_passes_the_token_state_through(tiny_dit: Path) -> None:
    t = Tok(tiny_dit, regions=("stack",))
    t.run(tiny_feeds(0), tok=0)
    before = dict(t.state)
    out = t.run(tiny_feeds(1), tok=1, ctl={"stack": 1})
    assert out["fc_skip"].tolist() == [1.0]
    token_states = [s for s in t.plan.states if s.kind.startswith("tok")]
    assert len(token_states) == 3 * 4
    for s in token_states:
        np.testing.assert_array_equal(out[s.next], before[s.name], err_msg=s.name)


def test_saliency_and_random_scores_select_what_numpy_selects(tiny_dit: Path) -> None:
    sal = Tok(tiny_dit, score="saliency")
    a, b = tiny_feeds(0), tiny_feeds(1)
    sal.run(a, tok=0)
    x = sal.split[0].branches[1].stream_in
    ref = sal.state["fc.tok0.b1.ref"]
    out = sal.run(b, tok=[2, 0, 0])
    ss = ((sal.truth(b, [x])[x].astype(np.float64) - ref) ** 2).sum(axis=2)
    base = ss / np.linalg.norm(ss, axis=1, keepdims=True)
    assert set(np.flatnonzero(out["fc.tok0.b1.cnt.next"][0] == 0).tolist()) == _expected_selection(base, np.zeros((B, N)), 5)
    rnd = Tok(tiny_dit, score="random")
    r = np.random.default_rng(0).random((3, N), dtype=np.float32)
    rnd.run(a, tok=0, rand=r)
    out = rnd.run(b, tok=1, rand=r)
    expected = _expected_selection(np.broadcast_to(r[1], (B, N)), np.zeros((B, N)), 5)
    assert set(np.flatnonzero(out["fc.tok1.b1.cnt.next"][0] == 0).tolist()) == expected


@pytest.mark.parametrize("score", ["vnorm", "saliency"])
def test_blocks_of_unequal_k_each_select_their_own_top_k(tiny_dit: Path, score: str) -> None:
    """k from the ratio schedule differs by block. V-norm scores are state: every block takes the
    first k of one batched TopK. Saliency reads the step's input: each branch runs its own TopK."""
    t = Tok(tiny_dit, k=None, score=score, ratio=0.25, layer_weight=-0.5)
    ks = [b["branches"][1]["k"] for b in t.plan.tokens["blocks"]]
    assert ks == [5, 10, 15]
    batched = [n for n in t.model.graph.node if n.name == "fc/fc.tok.sel"]
    assert len(batched) == (score == "vnorm")
    a, b = tiny_feeds(0), tiny_feeds(1)
    first = t.run(a, tok=0)
    if score == "vnorm":
        out = t.run(b, tok=[0, 1, 1])  # blocks 1 and 2 conservative: slots 1 and 2 of the selection
        bases = [_score(first[f"fc.tok{pos}.score.next"]) for pos in range(3)]
        checked = (1, 2)
    else:
        out = t.run(b, tok=[0, 0, 2])  # blocks 0, 1 full: block 2's MLP input is the true one
        x = t.split[2].branches[1].stream_in
        ss = ((t.truth(b, [x])[x].astype(np.float64) - first["fc.tok2.b1.ref.next"]) ** 2).sum(axis=2)
        bases = [None, None, ss / np.linalg.norm(ss, axis=1, keepdims=True)]
        checked = (2,)
    for pos in checked:
        selected = set(np.flatnonzero(out[f"fc.tok{pos}.b1.cnt.next"][0] == 0).tolist())
        assert selected == _expected_selection(bases[pos], np.zeros((B, N)), ks[pos]), pos


def test_declines_with_an_explanation(tiny_dit: Path) -> None:
    model = load(tiny_dit)
    bmap = discover_blocks(model, "latent")
    with pytest.raises(FcpassError, match="--token-score 'entropy' unknown"):
        insert_cache_regions(model, bmap, ROLES, ("stack",), tokens=TokenOptions(score="entropy"))
    with pytest.raises(FcpassError, match="block 'blocks.0' is in no cache region"):
        insert_cache_regions(model, bmap, ROLES, ("tail",), tokens=TokenOptions())


# --- attention-map scores (ToCa) ---------------------------------------------------------------------

def test_attention_scores_are_the_column_means_of_the_softmax_output(tiny_dit: Path) -> None:
    t = Tok(tiny_dit, score="attention")
    index = GraphIndex(t.original)
    probs = [s.branches[0].probs for s in t.split]
    for name in probs:
        assert name is not None and index.nodes[index.producer[name]].op_type == "Softmax"
    assert t.plan.tokens["options"]["score"] == "attention"
    assert [s.kind for s in t.plan.states if s.region == "block1"][-1] == "tok_score"
    region = next(n for n in t.model.graph.node if n.op_type == "If" and n.name == "fc/block1/If")
    run = next(a.g for a in region.attribute if a.name == "else_branch")
    (tif,) = [n for n in run.node if n.op_type == "If"]
    full = next(a.g for a in tif.attribute if a.name == "else_branch")
    block_ops = Counter(index.nodes[i].op_type for i in discover_blocks(t.original, "latent").blocks[1].nodes)
    columns = Counter({"Reshape": 1, "ReduceMean": 1, "Identity": 1})  # the column means, stored as they are; the zero counters
    assert Counter(n.op_type for n in full.node) == block_ops + columns + _moved_into_attention(t, tif, index)
    for seed in (0, 1):
        feeds = tiny_feeds(seed)
        out = t.run(feeds, tok=0)
        truth = t.truth(feeds, probs)
        for pos, name in enumerate(probs):
            p = truth[name]
            assert p.shape == (B, 2, N, N)
            expected = _attention_columns(p)
            # A row mean would be the constant 1/N: the columns must carry information.
            assert np.ptp(expected, axis=1).min() > 1e-3
            np.testing.assert_allclose(out[f"fc.tok{pos}.score.next"], _attention_means(p), atol=1e-5)
            assert not out[f"fc.tok{pos}.b1.cnt.next"].any()


def test_conservative_step_selects_the_top_k_tokens_by_attention_score(tiny_dit: Path) -> None:
    t = Tok(tiny_dit, score="attention")
    a = tiny_feeds(0)
    t.run(a, tok=0)
    attn = [s.branches[0] for s in t.split]
    truth = t.truth(a, [br.probs for br in attn] + [br.value for br in attn])
    cnt = [np.zeros((B, N)) for _ in attn]
    discriminating = 0
    # Conservative and local-only steps all rank by the full step's scores (the host keeps them), the
    # later ones with aged counters.
    for seed, mode in ((1, 1), (2, 2), (3, 1)):
        out = t.run(tiny_feeds(seed), tok=mode)
        for pos, br in enumerate(attn):
            selected = set(np.flatnonzero(out[f"fc.tok{pos}.b1.cnt.next"][0] == 0).tolist())
            assert selected == _expected_selection(_attention_columns(truth[br.probs]), cnt[pos], 5), (seed, pos)
            discriminating += selected != _expected_selection(_vnorm(truth[br.value]), cnt[pos], 5)
            cnt[pos] = out[f"fc.tok{pos}.b1.cnt.next"].astype(np.float64)
    assert discriminating > 0  # V-norm scores would select other tokens: the test tells the two apart


def test_fused_attention_declines_attention_scores(tiny_dit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No exporter here emits fused attention, so the split reports it as `find_branches` does for one:
    V is the fused op's input and there is no Softmax output."""
    import fcpass.compiler.passes.token_cache as tc

    real = tc.find_branches

    def fused(*args: object, **kwargs: object) -> object:
        split = real(*args, **kwargs)
        for br in split.mixing():
            br.value_fused, br.probs = True, None
        return split

    monkeypatch.setattr(tc, "find_branches", fused)
    model = load(tiny_dit)
    bmap = discover_blocks(model, "latent")
    with pytest.raises(FcpassError, match=r"^block 'blocks.0': its self-attention is fused .* "
                                          r"use --token-score saliency\|random$"):
        insert_cache_regions(model, bmap, ROLES, ("blocks",), tokens=TokenOptions(k=5, score="attention"))
    insert_cache_regions(model, bmap, ROLES, ("blocks",), tokens=TokenOptions(k=5, score="saliency"))


def test_cli_offers_attention_scores() -> None:
    from fcpass.cli import build_parser

    args = build_parser().parse_args(["optimize", "-o", "x.onnx", "--tokens", "toca", "--token-score", "attention"])
    assert args.token_score == "attention"


# --- policies and the host loop ---------------------------------------------------------------------

def test_toca_schedule_and_duca_needs_the_stack(tok: Tok) -> None:
    with pytest.raises(FcpassError, match="skip the whole stack"):
        DuCa(DuCaConfig(interval=3, warmup=2)).reset(tok.plan, 12)  # a blocks-only graph
    toca = ToCa()  # conservative steps only: no stack needed
    toca.reset(tok.plan, 12)
    assert "".join(toca.step_type(i) for i in range(12)) == "FFFCCFCCFCCF"
    c = toca.controls(3)
    assert isinstance(c, TokenControls) and c.tok.tolist() == [1, 1, 1] and not c.ctl.any()


def test_duca_schedule_on_a_stack_graph(tiny_dit: Path) -> None:
    t = Tok(tiny_dit, regions=("stack",))
    duca = DuCa()
    duca.reset(t.plan, 12)
    assert "".join(duca.step_type(i) for i in range(12)) == "FFFCAFCAFCAF"
    a = duca.controls(4)
    assert a.ctl.tolist() == [1] and tuple(a.mix[0]) == APPROX_MIX["reuse"] and not a.tok.any()
    assert duca.controls(3).tok.tolist() == [1, 1, 1] and not duca.controls(3).ctl.any()
    compute = DuCa(DuCaConfig(attention="compute"))
    compute.reset(t.plan, 12)
    assert compute.controls(3).tok.tolist() == [2, 2, 2]
    with pytest.raises(FcpassError, match="needs token-level caching"):
        DuCa().reset(_plain_plan(tiny_dit), 12)


def _plain_plan(path: Path) -> CachePlan:
    model = load(path)
    return insert_cache_regions(model, discover_blocks(model, "latent"), ROLES, ("stack",)).plan


def test_sampling_with_duca_resets_the_state_between_runs(tiny_dit: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.tok.onnx"
    request = SampleRequest(classes=[1], steps=8, guidance_scale=1.5, uncond_class=10)
    setup = SamplingSetup(SCHEDULER_CONFIG, request)
    plan = optimize(tiny_dit, out, OptimizeOptions(regions=("stack",), tokens="duca"), setup)
    assert [b["branches"][1]["k"] for b in plan.tokens["blocks"]] == [2, 2, 2]  # round(0.05 * f * 2.5 * 16)
    den = load_denoiser(out, "duca", {})
    runs = [sample(den, scheduler_from_config(SCHEDULER_CONFIG), request, progress=False) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].images, runs[1].images)
    assert [r["tok"][0] for r in runs[0].records] == [0, 0, 0, 1, 0, 0, 1, 0]  # F F F C A F C F(last)
    assert [r["ctl"][0] for r in runs[0].records] == [0, 0, 0, 0, 1, 0, 0, 0]
    assert runs[0].macs_executed < runs[0].macs_uncached
    none = load_denoiser(out, "none", {})
    base = sample(none, scheduler_from_config(SCHEDULER_CONFIG), request, progress=False)
    assert not np.array_equal(base.images, runs[0].images)
    # The report marks the C steps on the stack, the region that holds the token-cache blocks.
    from fcpass.report import TOKEN_COLORS, build_figure
    from fcpass.sampling import run_sampling

    _, report = run_sampling(den, setup, out, "duca", progress=False)
    assert report["token_regions"] == ["stack"] * 3
    fig = build_figure(json.loads(json.dumps(report)))
    cells = np.asarray(fig.axes[0].get_images()[0].get_array())[0, :, :3]
    marked = np.abs(cells - np.asarray(to_rgb(TOKEN_COLORS[1]))).max(axis=-1) < 1e-6
    assert marked.tolist() == [s in (3, 6) for s in range(8)]


def test_duca_aggressive_taylor1_extrapolates_the_stack_from_its_computed_steps(tiny_dit: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.tok.taylor.onnx"
    request = SampleRequest(classes=[1], steps=10, guidance_scale=1.5, uncond_class=10)
    setup = SamplingSetup(SCHEDULER_CONFIG, request)
    plan = optimize(tiny_dit, out, OptimizeOptions(regions=("stack",), taylor=True, tokens="duca"), setup)
    duca = DuCa(DuCaConfig(aggressive="taylor1"))
    duca.reset(plan, 10)
    assert tuple(duca.controls(0).mix[0]) == APPROX_MIX["reuse"]
    duca.computed = [2, 5]  # the stack computed at steps 2 and 5 (say a C step at 5)
    a = duca.controls(7)
    assert duca.step_type(7) == "A" and a.ctl.tolist() == [1] and a.mix[0].tolist() == pytest.approx([0.0, 0.0, 2 / 3, 0.0])
    duca.computed = [5]  # one computed step: nothing to extrapolate from, reuse
    assert tuple(duca.controls(7).mix[0]) == APPROX_MIX["reuse"]
    with pytest.raises(FcpassError, match=r"aggressive=taylor1 needs the stack's previous output; optimize with "):
        DuCa(DuCaConfig(aggressive="taylor1")).reset(Tok(tiny_dit, regions=("stack",)).plan, 10)
    with pytest.raises(FcpassError, match="aggressive 'taylor2' unknown; use reuse or taylor1"):
        DuCa(DuCaConfig(aggressive="taylor2"))
    # End to end: the A steps extrapolate (F F F C A F C A F F), so the samples differ from reuse's.
    runs = {}
    for spec in ("duca", "duca:aggressive=taylor1"):
        den = load_denoiser(out, spec, {})
        runs[spec] = sample(den, scheduler_from_config(SCHEDULER_CONFIG), request, progress=False)
        assert den.policy.computed == [0, 1, 2, 3, 5, 6, 8, 9]  # F and C steps compute the stack
    assert not np.array_equal(runs["duca"].images, runs["duca:aggressive=taylor1"].images)
