"""The cache-region rewrite: exact structure, the all-compute invariant, every branch forced."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fcpass.compiler.graphinfo import node_inputs
from fcpass.compiler.passes.inline_gates import inline_gates
from fcpass.compiler.trt_check import check_graph
from fcpass.contract.onnx_io import subgraphs
from fcpass.contract.plan import APPROX_MIX, CachePlan, read_plan
from tests.conftest import export_tiny_dit, tiny_feeds, unread_nodes
from tests.helpers.compiled import Compiled


def _fp16_ulps(scale: np.ndarray, n: float) -> float:
    """n units in fp16's last place at the largest magnitude in `scale`."""
    return n * float(np.finfo(np.float16).eps) * float(np.abs(scale).max())


@pytest.fixture()
def compiled(tiny_dit: Path) -> Compiled:
    return Compiled(tiny_dit)


def test_structure_is_nested_regions_with_exact_approximation_ops(compiled: Compiled) -> None:
    onnx.checker.check_model(compiled.model, full_check=True)
    assert check_graph(compiled.model) == []  # TensorRT's static rules (fcpass check)
    names = [r.name for r in compiled.plan.regions]
    assert names == ["stack", "block0", "tail", "block1", "block2"]
    parents = {r.name: r.parent for r in compiled.plan.regions}
    assert parents == {"stack": None, "block0": "stack", "tail": "stack", "block1": "tail", "block2": "tail"}
    top_ifs = [n for n in compiled.model.graph.node if n.op_type == "If" and n.name.endswith("/If")]
    assert len(top_ifs) == 1  # only the stack at top level; the rest nest inside its compute branch
    gates = [n.name for n in compiled.model.graph.node if n.op_type == "If" and n not in top_ifs]
    assert gates == ["fc/stack/gate"]
    then_branch = next(a.g for a in top_ifs[0].attribute if a.name == "then_branch")
    # The approximation: the taylor trend at its top level; what reads the stack's input behind a gate
    # on the mix row, in three forms: the general one (its then-branch), linear and residual.
    approx_ops = Counter(n.op_type for n in then_branch.node)
    assert approx_ops["Sub"] == 1 and approx_ops["MatMul"] == 0

    def branches(node: onnx.NodeProto) -> tuple[onnx.GraphProto, onnx.GraphProto]:
        return next(a.g for a in node.attribute if a.name == "then_branch"), next(a.g for a in node.attribute if a.name == "else_branch")

    (reads,) = [n for n in then_branch.node if n.op_type == "If"]
    assert reads.name == "fc/stack/a0/gate"
    read, plain = branches(reads)
    assert [n.op_type for n in plain.node] == ["Add"]  # the extrapolation, made where it is returned
    assert [n.op_type for n in read.node] == ["Add", "Sub", "Gather", "Cast", "If"]
    assert read.node[-1].name == "fc/stack/a0/fitted/gate"
    general, unfitted = branches(read.node[-1])
    general_ops = Counter(n.op_type for n in general.node)
    assert general_ops["MatMul"] == 1 and general_ops["Sub"] == 1  # one MatMul for both fitted forms; 1 - m_aff
    assert [n.op_type for n in unfitted.node] == ["Gather", "Cast", "Gather", "If"]
    linear, residual = branches(unfitted.node[-1])
    matmul = next(n for n in linear.node if n.op_type == "MatMul")
    assert matmul.input[1] == "fc.stack.V0"  # the fitted weight itself: ONNX Runtime prepacks a constant
    assert [n.op_type for n in residual.node] == ["Mul", "Add"]
    else_branch = next(a.g for a in top_ifs[0].attribute if a.name == "else_branch")
    inner_ifs = [n.name for n in else_branch.node if n.op_type == "If"]
    assert sorted(inner_ifs) == ["fc/block0/If", "fc/block0/gate", "fc/tail/If", "fc/tail/gate"]
    # No branch output is an outer value directly.
    for branch in (then_branch, else_branch):
        produced = {o for n in branch.node for o in n.output}
        assert all(o.name in produced for o in branch.output)
    # The original graph still holds no If, and its outputs are the compiled graph's first outputs.
    assert not any(n.op_type == "If" for n in compiled.original.graph.node)
    assert compiled.names[0] == "noise_pred"


@pytest.mark.parametrize("taylor", [False, True])
def test_no_branch_holds_a_node_nothing_reads(tiny_dit: Path, taylor: bool) -> None:
    """Every coefficient an approximation branch gathers is used (without --taylor there is no trend to
    scale): a node nothing reads would run at every skipped step. Nor is there a constant of the
    rewrite that nothing reads (ONNX Runtime warns about each when it loads the graph)."""
    graph = Compiled(tiny_dit, taylor=taylor).model.graph
    assert unread_nodes(graph) == []
    read = {x for n in graph.node for x in node_inputs(n)} | {o.name for o in graph.output}
    assert [t.name for t in graph.initializer if t.name.startswith("fc.") and t.name not in read] == []


def test_all_compute_equals_original_and_states_are_true_block_io(compiled: Compiled) -> None:
    feeds = tiny_feeds(0)
    out = compiled.run(feeds)
    (ref,) = compiled.ref_sess.run(None, feeds)
    assert np.abs(out["noise_pred"] - ref).max() <= 1e-5
    assert (out["fc_skip"] == 0).all()
    tensors = sorted({t for r in compiled.plan.regions for t in r.inputs + r.outputs} | {s.source for s in compiled.plan.states})
    truth = compiled.true_values(feeds, tensors)
    head = compiled.plan.block_regions()[0].inputs[0]
    kinds = {s.kind for s in compiled.plan.states}
    assert {"in", "out", "res", "mod"} <= kinds
    state = compiled.state
    for s in compiled.plan.states:
        if s.kind in ("in", "out", "mod"):
            np.testing.assert_allclose(state[s.name], truth[s.source], rtol=0, atol=1e-5, err_msg=s.name)
        elif s.kind == "res":  # the first block's residual
            np.testing.assert_allclose(state[s.name], truth[s.source] - truth[head], rtol=0, atol=1e-5, err_msg=s.name)
        else:  # prev takes the old `out`, zero at the first step
            assert not state[s.name].any()
    # A block's output and the next block's input state share one graph output, written once.
    b1_out = next(s for s in compiled.plan.states if s.name == "fc.block1.out0")
    b2_in = next(s for s in compiled.plan.states if s.name == "fc.block2.in0")
    assert b1_out.next == b2_in.next and compiled.names.count(b1_out.next) == 1


def test_an_fp16_graph_keeps_its_types_and_forced_compute_equals_the_original(tiny_dit_fp16: Path) -> None:
    c = Compiled(tiny_dit_fp16)
    assert {s.dtype for s in c.plan.states} == {"float16"}
    assert check_graph(c.model) == []  # TensorRT's static rules hold in fp16 too (the route to a TensorRT 11 engine)
    feeds = tiny_feeds(0, dtype=np.float16)
    out = c.run(feeds)
    (ref,) = c.ref_sess.run(None, feeds)
    assert out["noise_pred"].dtype == np.float16 and out["fc_stat"].dtype == np.float32
    # The same nodes; ONNX Runtime fuses a few differently across the If boundaries, a unit or two in
    # the last place of fp16.
    np.testing.assert_allclose(out["noise_pred"], ref, rtol=0, atol=_fp16_ulps(ref, 2))
    source = c.plan.region("block1").inputs[0]
    truth = c.true_values(feeds, [source])[source]
    np.testing.assert_allclose(c.state["fc.block1.in0"], truth, rtol=0, atol=_fp16_ulps(truth, 2))


def test_an_fp16_statistic_is_summed_in_fp32(tiny_dit_fp16: Path) -> None:
    """Every sum in a statistic reads fp32: one sample's sum of squares passes fp16's 65504 as soon as
    its values pass about 6 (2048 values here). ONNX Runtime's CPU kernels compute fp16 ops in fp32
    anyway, so the graph's types show it, and the value at such a reference (100 everywhere) checks it."""
    c = Compiled(tiny_dit_fp16)

    def reduced(graph: onnx.GraphProto) -> list[tuple[str, int]]:
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
        return [(n.output[0], types[n.input[0]]) for n in graph.node if n.op_type == "ReduceSum"] + [
            x for n in graph.node for g in subgraphs(n) for x in reduced(g)]
    sums = reduced(onnx.shape_inference.infer_shapes(c.model).graph)
    assert len(sums) == 2 * (len(c.plan.regions) + 2)  # num and den per region and per probe
    assert {elem for _, elem in sums} == {onnx.TensorProto.FLOAT}, sums
    feeds = tiny_feeds(0, dtype=np.float16)
    c.run(feeds)
    k = c.idx("block1")
    c.state["fc.block1.in0"] = np.full_like(c.state["fc.block1.in0"], 100)
    c.ctl[k] = 2
    out = c.run(feeds, update=False)
    source = c.plan.region("block1").inputs[0]
    x = c.true_values(feeds, [source])[source].astype(np.float64)
    axes = tuple(range(1, x.ndim))
    expected = np.sqrt(((x - 100) ** 2).sum(axis=axes) / (100.0 ** 2 * x[0].size))
    np.testing.assert_allclose(out["fc_stat"][k], expected, rtol=1e-3)


def test_only_regions_the_graph_decides_are_measured_and_inlined_gates_measure_all(compiled: Compiled) -> None:
    """A forced region's gate skips its statistic (NaN); with the gates inlined (what TensorRT and the
    segments lowering get) every region is measured and everything else is unchanged."""
    inlined = inline_gates(compiled.model).model
    def ifs(graph: onnx.GraphProto) -> list[str]:
        return [x for n in graph.node for x in ([n.name] if n.op_type == "If" else []) + [y for g in subgraphs(n) for y in ifs(g)]]
    assert [n for n in ifs(compiled.model.graph) if n.endswith("/a0/linear/gate")]  # the approximations' gates nest
    assert not [n for n in ifs(inlined.graph) if n.endswith("/gate")]
    assert unread_nodes(inlined.graph) == []  # nor does what computed their conditions stay behind
    sess = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])
    compiled.run(tiny_feeds(0))
    state = dict(compiled.state)
    assert [r.name for r in compiled.plan.regions] == ["stack", "block0", "tail", "block1", "block2"]
    # The stack decides and computes (thr < 0), block1 decides and skips; the others are forced.
    compiled.ctl[:] = [2, 0, 0, 2, 1]
    compiled.thr[:] = [-1, 0, 0, np.inf, 0]
    out = compiled.run(tiny_feeds(1), update=False)
    measured = np.isfinite(out["fc_stat"]).all(axis=1)
    assert [r.name for r in compiled.plan.regions if measured[r.index]] == ["stack", "block1"]
    assert out["fc_skip"].tolist() == [0, 0, 0, 1, 1]
    feeds = {**tiny_feeds(1), **state, "fc_ctl": compiled.ctl, "fc_thr": compiled.thr, "fc_mix": compiled.mix}
    ref = dict(zip(compiled.names, sess.run(None, feeds)))
    assert np.isfinite(ref["fc_stat"]).all()
    np.testing.assert_array_equal(ref["fc_stat"][measured], out["fc_stat"][measured])
    for name in compiled.names:
        if name != "fc_stat":
            np.testing.assert_array_equal(ref[name], out[name], err_msg=name)


def test_zero_state_never_skips_even_when_the_graph_decides(compiled: Compiled) -> None:
    """A fresh state gives NaN/Inf statistics; `stat <= thr` is false for them: fail closed."""
    compiled.ctl[:] = 2
    compiled.thr[:] = np.inf
    out = compiled.run(tiny_feeds(0))
    assert (out["fc_skip"] == 0).all()
    assert not np.isfinite(out["fc_stat"]).any()


@pytest.mark.parametrize("approx", ["reuse", "residual", "linear", "affine", "taylor1"])
def test_forced_skip_of_one_block_gives_the_exact_approximation(compiled: Compiled, approx: str) -> None:
    _check_forced_skip_of_block1(compiled, approx)


@pytest.mark.parametrize("approx", ["reuse", "residual", "linear", "affine", "taylor1"])
def test_forced_skip_of_one_block_in_fp16_gives_the_approximation(tiny_dit_fp16: Path, approx: str) -> None:
    _check_forced_skip_of_block1(Compiled(tiny_dit_fp16), approx)


def _check_forced_skip_of_block1(compiled: Compiled, approx: str) -> None:
    f1, f2 = (tiny_feeds(i, dtype=compiled.dtype) for i in (0, 1))
    compiled.run(tiny_feeds(2, dtype=compiled.dtype))  # so that `prev` differs from `out` for taylor1
    compiled.run(f1)
    before = dict(compiled.state)
    k = compiled.idx("block1")
    # A known fitted map for `linear`: V = 0.1 * J (shifted identity), b = 0.1.
    d = before["fc.block1.in0"].shape[-1]
    v = 0.1 * np.eye(d, k=1, dtype=compiled.dtype)
    b = np.full(d, 0.1, compiled.dtype)
    _set_initializer(compiled, "fc.block1.V0", v)
    _set_initializer(compiled, "fc.block1.b0", b)
    a = np.eye(d, dtype=compiled.dtype) + 0.05 * np.eye(d, k=-1, dtype=compiled.dtype)
    c = np.full(d, -0.2, compiled.dtype)
    _set_initializer(compiled, "fc.block1.A0", a)
    _set_initializer(compiled, "fc.block1.c0", c)
    compiled.ctl[k] = 1
    compiled.mix[k] = APPROX_MIX[approx] if approx != "taylor1" else (0.0, 0.0, 0.5, 0.0)
    out = compiled.run(f2)
    assert out["fc_skip"][k] == 1 and (np.delete(out["fc_skip"], k) == 0).all()
    h = compiled.state["fc.block2.in0"]  # block2's input is block1's (approximated) output
    assert h.dtype == compiled.dtype
    # block1's input this step is block0's true output (block0 computed); the state keeps the old one.
    source = compiled.plan.region("block1").inputs[0]
    h1 = compiled.true_values(f2, [source])[source].astype(np.float32)
    h_ref, o_ref, o_prev = (before[f"fc.block1.{s}0"].astype(np.float32) for s in ("in", "out", "prev"))
    v, b, a, c = (x.astype(np.float32) for x in (v, b, a, c))
    expected = {
        "reuse": o_ref,
        "residual": o_ref + (h1 - h_ref),
        "linear": o_ref + (h1 - h_ref) + (h1 - h_ref) @ v + b,
        "affine": h1 @ a + c,
        "taylor1": o_ref + 0.5 * (o_ref - o_prev),
    }[approx]
    # fp16 rounds each of the form's few operations once: a few units in the last place.
    atol = 1e-5 if compiled.dtype == np.float32 else _fp16_ulps(expected, 4)
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=atol)
    # A skipped region keeps its references.
    for kind in ("in0", "out0", "prev0"):
        np.testing.assert_array_equal(compiled.state[f"fc.block1.{kind}"], before[f"fc.block1.{kind}"])


def _set_initializer(compiled: Compiled, name: str, value: np.ndarray) -> None:
    for t in compiled.model.graph.initializer:
        if t.name == name:
            t.CopyFrom(onnx.numpy_helper.from_array(value, name))
    compiled.sess = ort.InferenceSession(compiled.model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_residual_skip_at_unchanged_input_reproduces_the_computed_output(compiled: Compiled) -> None:
    feeds = tiny_feeds(0)
    first = compiled.run(feeds)
    compiled.ctl[:] = 0
    k = compiled.idx("tail")
    compiled.ctl[k] = 1
    compiled.mix[k] = APPROX_MIX["residual"]
    second = compiled.run(feeds)
    assert second["fc_skip"][k] == 1
    np.testing.assert_allclose(second["noise_pred"], first["noise_pred"], atol=1e-5)


def test_skipped_stack_keeps_nested_state(compiled: Compiled) -> None:
    compiled.run(tiny_feeds(0))
    before = dict(compiled.state)
    compiled.ctl[compiled.idx("stack")] = 1
    out = compiled.run(tiny_feeds(1))
    skip = dict(zip([r.name for r in compiled.plan.regions], out["fc_skip"]))
    assert skip == {"stack": 1, "block0": -1, "tail": -1, "block1": -1, "block2": -1}
    assert np.isnan(out["fc_stat"]).all()  # the stack was forced, so not measured; the rest not reached
    for s in compiled.plan.states:
        if s.kind == "mod":  # the previous step's modulated input, updated every step
            assert not np.array_equal(compiled.state[s.name], before[s.name])
        else:
            np.testing.assert_array_equal(compiled.state[s.name], before[s.name], err_msg=s.name)


def test_graph_decision_is_per_sample_and_needs_every_sample(compiled: Compiled) -> None:
    compiled.run(tiny_feeds(0))
    feeds = tiny_feeds(0)
    feeds["latent"] = feeds["latent"].copy()
    feeds["latent"][1] += 0.5  # only the second sample changes
    k = compiled.idx("block0")
    compiled.ctl[k] = 2
    probe = compiled.run(feeds, update=False)
    stat = probe["fc_stat"][k]
    assert stat[0] == pytest.approx(0.0, abs=1e-6) and stat[1] > 1e-3
    compiled.thr[k] = stat[1] / 2  # sample 0 would skip, sample 1 would not
    assert compiled.run(feeds, update=False)["fc_skip"][k] == 0
    compiled.thr[k] = stat[1] * 2
    assert compiled.run(feeds, update=False)["fc_skip"][k] == 1


def test_plan_round_trips_through_metadata(compiled: Compiled, tmp_path: Path) -> None:
    path = tmp_path / "m.fc.onnx"
    onnx.save(compiled.model, str(path))
    plan = read_plan(onnx.load(str(path)))
    assert isinstance(plan, CachePlan)
    assert plan.to_json() == compiled.plan.to_json()
    assert [s.name for s in plan.states] == [i.name for i in compiled.model.graph.input if i.name.startswith("fc.")]


def test_blocks_only_region_set(tiny_dit: Path) -> None:
    c = Compiled(tiny_dit, regions=("blocks",), taylor=False)
    assert [r.name for r in c.plan.regions] == ["block0", "block1", "block2"]
    assert {s.kind for s in c.plan.states} == {"in", "out"}  # no `prev` state without taylor
    assert all(r.parent is None for r in c.plan.regions)
    ifs = [n for n in c.model.graph.node if n.op_type == "If" and n.name.endswith("/If")]
    # Each block's If outputs its output alone: the state reads the blocks' inputs and outputs
    # off the graph (four values for three blocks), and no branch copies a state.
    assert len(ifs) == 3 and all(len(n.output) == 1 for n in ifs)
    assert len({s.next for s in c.plan.states}) == 4
    states = {s.name for s in c.plan.states}
    for n in ifs:
        for branch in (a.g for a in n.attribute if a.g.node):
            assert not any(x.op_type == "Identity" and x.input[0] in states for x in branch.node)
    feeds = tiny_feeds(3)
    (ref,) = c.ref_sess.run(None, feeds)
    assert np.abs(c.run(feeds)["noise_pred"] - ref).max() <= 1e-5


def test_a_forced_region_adds_only_its_gate_and_its_if(tiny_dit: Path, request: pytest.FixtureRequest) -> None:
    """A step that forces every region runs, per region, its gate (three nodes in the forced branch)
    and its If: the other controls run once for all regions, as ONNX Runtime pays microseconds per
    node (a Gather, a Cast and an Unsqueeze per region cost the bundled model's nested set 2% of its step)."""
    def outside(c: Compiled) -> list[str]:  # the main graph's new nodes besides the regions' Ifs
        original = {n.name for n in c.original.graph.node}
        return sorted(n.op_type for n in c.model.graph.node if n.op_type != "If" and n.name not in original)

    deeper = export_tiny_dit(tiny_dit.parent / "deeper.onnx", request.node.callspec.params["tiny_dit"], depth=5)
    three, five = Compiled(tiny_dit, regions=("blocks",), taylor=False), Compiled(deeper, regions=("blocks",), taylor=False)
    assert outside(three) == outside(five)
    for c in (three, five):
        gates = [n for n in c.model.graph.node if n.op_type == "If" and n.name.endswith("/gate")]
        assert len(gates) == len(c.plan.regions)
        for gate in gates:
            forced = next(a.g for a in gate.attribute if a.name == "else_branch")
            assert len(forced.node) == 3, [x.op_type for x in forced.node]
    feeds = tiny_feeds(1)
    (ref,) = three.ref_sess.run(None, feeds)
    out = three.run(feeds)
    assert np.abs(out["noise_pred"] - ref).max() <= 1e-5 and (out["fc_skip"] == 0).all()


def _rel_l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, a.ndim))
    return np.abs(a - b).sum(axis=axes) / np.abs(b).sum(axis=axes)


def test_probes_are_rel_l1_of_first_block_residual_and_modulated_input(compiled: Compiled) -> None:
    """ctl 3 tests the probe: tail = FBCache's residual change, stack = TeaCache's modulated-input change."""
    plan = compiled.plan
    assert plan.region("tail").probe == "head_residual" and plan.region("stack").probe == "modulated_input"
    assert all(r.probe is None for r in plan.block_regions())
    mod = next(s for s in plan.states if s.kind == "mod")
    res = next(s for s in plan.states if s.kind == "res")
    first = compiled.run(tiny_feeds(0))
    compiled.ctl[[compiled.idx("tail"), compiled.idx("stack")]] = 3
    compiled.thr[:] = 0.0
    second = compiled.run(tiny_feeds(1), update=False)
    k_tail, k_stack = compiled.idx("tail"), compiled.idx("stack")
    np.testing.assert_allclose(second["fc_stat"][k_stack], _rel_l1(second[mod.next], first[mod.next]), rtol=1e-5)
    np.testing.assert_allclose(second["fc_stat"][k_tail], _rel_l1(second[res.next], first[res.next]), rtol=1e-5)
    # The modulated input is a LayerNorm's modulated output: not the stream itself.
    assert mod.source not in plan.region("stack").inputs
    # Under ctl 2 the same regions report (and test) the relative change of their inputs instead.
    compiled.ctl[[k_tail, k_stack]] = 2
    third = compiled.run(tiny_feeds(1), update=False)
    stream = plan.region("stack").inputs[0]
    s_in = next(s for s in plan.states if s.region == "stack" and s.kind == "in")
    assert stream == s_in.source
    h1 = third[s_in.next]
    np.testing.assert_allclose(third["fc_stat"][k_stack],
                               np.linalg.norm((h1 - first[s_in.next]).reshape(2, -1), axis=1)
                               / np.linalg.norm(first[s_in.next].reshape(2, -1), axis=1), rtol=1e-5)


def test_probe_decides_under_ctl_3_and_fails_closed(compiled: Compiled) -> None:
    compiled.run(tiny_feeds(0))
    k = compiled.idx("tail")
    compiled.ctl[k] = 3
    compiled.thr[k] = np.inf
    compiled.mix[k] = APPROX_MIX["residual"]
    out = compiled.run(tiny_feeds(0), update=False)  # same input: probe 0 <= inf
    assert out["fc_skip"][k] == 1 and out["fc_stat"][k].max() == 0.0
    compiled.thr[k] = 1e-6
    out = compiled.run(tiny_feeds(1), update=False)
    assert out["fc_skip"][k] == 0
    fresh = Compiled.__new__(Compiled)
    fresh.__dict__.update(compiled.__dict__)
    fresh.state = {s.name: np.zeros(s.shape, np.float32) for s in compiled.plan.states}
    fresh.thr[k] = np.inf
    out = fresh.run(tiny_feeds(0), update=False)  # zero reference: 0/0 or x/0, never a skip
    assert out["fc_skip"][k] == 0


def test_localized_weights_compute_the_same_and_live_in_their_branch(compiled: Compiled) -> None:
    """Weights move into the innermost branch reading them (ORT prepacks them there); values unchanged."""
    from fcpass.compiler.passes.localize_weights import localize_weights
    from tests.conftest import all_initializers

    model = onnx.ModelProto()
    model.CopyFrom(compiled.model)
    before = {t.name for t in all_initializers(model)}
    moved = localize_weights(model).count
    assert moved > 0 and {t.name for t in all_initializers(model)} == before
    onnx.checker.check_model(model, full_check=True)
    assert check_graph(model) == []
    # A block's own weights now sit inside that block's compute branch.
    block1_w = next(t.name for t in compiled.model.graph.initializer if "blocks.1" in t.name or "blocks/1" in t.name)
    stack_if = next(n for n in model.graph.node if n.op_type == "If")
    assert block1_w not in {t.name for t in model.graph.initializer}
    assert block1_w not in {t.name for a in stack_if.attribute for t in a.g.initializer}  # deeper than the stack
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    compiled.run(tiny_feeds(0))
    for ctl in (0, 1):
        compiled.ctl[:] = ctl
        compiled.mix[:] = APPROX_MIX["linear"]
        feeds = {**tiny_feeds(1), **compiled.state, "fc_ctl": compiled.ctl, "fc_thr": compiled.thr, "fc_mix": compiled.mix}
        ref = compiled.run(tiny_feeds(1), update=False)
        got = dict(zip(names, sess.run(None, feeds)))
        for k in names:
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-5, err_msg=k)
