"""`fcpass check --target tensorrt`: each rule on a small hand-built graph that breaks exactly it,
a clean graph, the compiled tiny DiTs (both exporters), and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fcpass.cli import main
from fcpass.compiler.trt_check import TOPK_MAX_K, Violation, check_graph
from fcpass.contract.errors import FcpassError

F, B, I64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64


def vi(name: str, elem: int = F, shape: list | None = (2, 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def model(nodes: list, inputs: list, outputs: list, inits: tuple = (), opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def cond_nodes(x: str = "x") -> list[onnx.NodeProto]:
    """A 0-d bool from x: ReduceMax over all axes, then > 0."""
    return [
        helper.make_node("ReduceMax", [x], ["mx"], keepdims=0, name="max"),
        helper.make_node("Greater", ["mx", "zero"], ["cond"], name="gt"),
    ]


ZERO = numpy_helper.from_array(np.array(0.0, np.float32), "zero")


def if_node(then_nodes: list, then_out: list, else_nodes: list, else_out: list, outputs: list[str],
            cond: str = "cond", name: str = "the_if") -> onnx.NodeProto:
    return helper.make_node(
        "If", [cond], outputs, name=name,
        then_branch=helper.make_graph(then_nodes, "then", [], then_out),
        else_branch=helper.make_graph(else_nodes, "else", [], else_out),
    )


def clean_if_model(**overrides: object) -> onnx.ModelProto:
    """x -> If(max(x) > 0, Identity(x), Neg(x)) -> y: breaks no rule."""
    parts: dict = {
        "then_nodes": [helper.make_node("Identity", ["x"], ["t"], name="t_id")], "then_out": [vi("t")],
        "else_nodes": [helper.make_node("Neg", ["x"], ["e"], name="e_neg")], "else_out": [vi("e")],
        "outputs": ["y"],
    }
    parts.update(overrides)
    return model([*cond_nodes(), if_node(**parts)], [vi("x")], [vi("y")], [ZERO])


def only(violations: list[Violation], rule: str) -> Violation:
    assert [v.rule for v in violations] == [rule], [v.format() for v in violations]
    return violations[0]


# --- a clean graph ---------------------------------------------------------------------------

def test_clean_graph_with_an_if_passes() -> None:
    assert check_graph(clean_if_model()) == []


def test_bool_and_int_if_outputs_are_allowed_as_trt_10_documents() -> None:
    m = clean_if_model(
        then_nodes=[helper.make_node("Greater", ["x", "zero"], ["t"], name="t_gt")], then_out=[vi("t", B)],
        else_nodes=[helper.make_node("Less", ["x", "zero"], ["e"], name="e_lt")], else_out=[vi("e", B)],
    )
    m.graph.output[0].CopyFrom(vi("y", B))
    assert check_graph(m) == []


# --- rule 1: op support ----------------------------------------------------------------------

def test_unsupported_default_domain_op() -> None:
    m = model([helper.make_node("Unique", ["x"], ["y"], name="uniq")], [vi("x", F, [4])], [vi("y", F, [4])])
    v = only(check_graph(m), "op-support")
    assert v.node == "uniq" and "Unique" in v.message and "uniq" in v.format()


def test_non_default_domain_op() -> None:
    m = model([helper.make_node("FusedGemm", ["x"], ["y"], name="fg", domain="com.microsoft")], [vi("x")], [vi("y")])
    v = only(check_graph(m), "op-support")
    assert v.node == "fg" and "com.microsoft::FusedGemm" in v.message


# --- rule 2: Attention inside an If ----------------------------------------------------------

def _attention(name: str) -> onnx.NodeProto:
    return helper.make_node("Attention", ["q", "q", "q"], [name + "_out"], name=name)


def test_attention_nested_inside_if_branches_names_the_path() -> None:
    q = vi("q", F, [1, 2, 4, 8])
    inner = if_node([helper.make_node("Identity", ["q"], ["it"], name="it")], [vi("it", F, [1, 2, 4, 8])],
                    [_attention("attn"), helper.make_node("Identity", ["attn_out"], ["ie"], name="ie")],
                    [vi("ie", F, [1, 2, 4, 8])], ["io"], name="inner")
    outer = if_node([inner, helper.make_node("Identity", ["io"], ["ot"], name="ot")], [vi("ot", F, [1, 2, 4, 8])],
                    [helper.make_node("Identity", ["q"], ["oe"], name="oe")], [vi("oe", F, [1, 2, 4, 8])],
                    ["y"], name="outer")
    m = model([*cond_nodes("q"), outer], [q], [vi("y", F, [1, 2, 4, 8])], [ZERO], opset=23)
    v = only(check_graph(m), "attention-in-if")
    assert v.node == "attn"
    assert v.where == "outer > then_branch > inner > else_branch > attn"
    assert "fcpass export --opset 18" in v.fix


def test_attention_outside_if_is_fine() -> None:
    m = model([_attention("attn")], [vi("q", F, [1, 2, 4, 8])], [vi("attn_out", F, [1, 2, 4, 8])], opset=23)
    assert check_graph(m) == []


# --- rule 3: TopK ----------------------------------------------------------------------------

def _topk(k_input: onnx.ValueInfoProto | None, k_const: int | None, **attrs: int) -> onnx.ModelProto:
    node = helper.make_node("TopK", ["x", "k"], ["vals", "idx"], name="topk", **attrs)
    inits = [numpy_helper.from_array(np.array([k_const], np.int64), "k")] if k_const is not None else []
    inputs = [vi("x", F, [2, 8000])] + ([k_input] if k_input is not None else [])
    n = k_const or 4
    return model([node], inputs, [vi("vals", F, [2, n]), vi("idx", I64, [2, n])], tuple(inits))


def test_topk_with_a_constant_k_within_the_limit_passes() -> None:
    assert check_graph(_topk(None, 10)) == []


def test_topk_with_a_runtime_k() -> None:
    v = only(check_graph(_topk(vi("k", I64, [1]), None)), "topk")
    assert v.node == "topk" and "constant" in v.fix


def test_topk_k_over_3840() -> None:
    v = only(check_graph(_topk(None, TOPK_MAX_K + 1)), "topk")
    assert "3841" in v.message and v.node == "topk"


def test_topk_unsorted() -> None:
    v = only(check_graph(_topk(None, 10, sorted=0)), "topk")
    assert "sorted" in v.message


def test_topk_k_from_a_constant_node() -> None:
    const = helper.make_node("Constant", [], ["k"], name="kc", value=numpy_helper.from_array(np.array([5000], np.int64)))
    m = _topk(None, None)
    m.graph.node.insert(0, const)
    assert "5000" in only(check_graph(m), "topk").message


# --- rule 4: ScatterND reduction -------------------------------------------------------------

def _scatter(**attrs: str) -> onnx.ModelProto:
    node = helper.make_node("ScatterND", ["x", "ind", "upd"], ["y"], name="scatter", **attrs)
    ind = numpy_helper.from_array(np.array([[0]], np.int64), "ind")
    return model([node], [vi("x"), vi("upd", F, [1, 4])], [vi("y")], (ind,))


def test_scatternd_with_reduction_none_is_still_a_violation() -> None:
    v = only(check_graph(_scatter(reduction="none")), "scatternd-reduction")
    assert v.node == "scatter" and "'none'" in v.message


def test_scatternd_without_reduction_passes() -> None:
    assert check_graph(_scatter()) == []


# --- rule 5: If branches ---------------------------------------------------------------------

def test_if_branch_ranks_differ() -> None:
    m = clean_if_model(
        else_nodes=[helper.make_node("Reshape", ["x", "flat"], ["e"], name="e_flat")], else_out=[vi("e", F, [8])],
    )
    m.graph.initializer.append(numpy_helper.from_array(np.array([8], np.int64), "flat"))
    v = only(check_graph(m), "if-branches")
    assert v.node == "the_if" and "rank 2" in v.message and "rank 1" in v.message


def test_if_branch_rank_unknown() -> None:
    # Squeeze with run-time axes: no rank can be inferred, none is declared.
    m = clean_if_model(
        else_nodes=[helper.make_node("Squeeze", ["x", "axes"], ["e"], name="e_sq")], else_out=[vi("e", F, None)],
    )
    m.graph.input.append(vi("axes", I64, [1]))
    v = only(check_graph(m), "if-branches")
    assert "cannot determine rank" in v.message and "'e'" in v.message


def test_rank_is_inferred_through_outer_scope_constants() -> None:
    # Undeclared branch output rank, but computable: ReduceSumSquare with axes from the main graph.
    m = clean_if_model(
        then_nodes=[helper.make_node("ReduceSumSquare", ["x", "axes"], ["t"], keepdims=0, name="t_ss")],
        then_out=[vi("t", F, None)],
        else_nodes=[helper.make_node("ReduceSum", ["x", "axes"], ["e"], keepdims=0, name="e_s")],
        else_out=[vi("e", F, None)],
    )
    m.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    m.graph.output[0].CopyFrom(vi("y", F, [2]))
    assert check_graph(m) == []


def test_if_branch_output_is_an_outer_scope_value() -> None:
    m = clean_if_model(then_nodes=[], then_out=[vi("x")])
    v = only(check_graph(m), "if-branches")
    assert "'x'" in v.message and "outer-scope" in v.message and "Identity" in v.fix


def test_if_branch_output_counts_differ() -> None:
    m = clean_if_model(
        else_nodes=[helper.make_node("Neg", ["x"], ["e"], name="e_neg"), helper.make_node("Abs", ["x"], ["e2"])],
        else_out=[vi("e"), vi("e2")],
    )
    v = only(check_graph(m), "if-branches")
    assert "1 outputs" in v.message and "2" in v.message


def test_if_output_type_not_supported() -> None:
    cast_t = helper.make_node("Cast", ["x"], ["t"], to=TensorProto.DOUBLE, name="t_cast")
    cast_e = helper.make_node("Cast", ["x"], ["e"], to=TensorProto.DOUBLE, name="e_cast")
    m = clean_if_model(then_nodes=[cast_t], then_out=[vi("t", TensorProto.DOUBLE)],
                       else_nodes=[cast_e], else_out=[vi("e", TensorProto.DOUBLE)])
    m.graph.output[0].CopyFrom(vi("y", TensorProto.DOUBLE))
    v = only(check_graph(m), "if-branches")
    assert "DOUBLE" in v.message and v.node == "the_if"


# --- rule 6: dynamic dims --------------------------------------------------------------------

def test_dynamic_batch_axis_is_fine() -> None:
    m = model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", F, ["N", 4])], [vi("y", F, ["N", 4])])
    assert check_graph(m) == []


def test_dynamic_non_batch_axis() -> None:
    m = model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", F, [2, "width"])], [vi("y", F, [2, 4])])
    v = only(check_graph(m), "dynamic-dims")
    assert v.node == "graph input x" and "axis 1 (width)" in v.message
    assert "fcpass optimize --dims width=N" in v.fix


# --- rule 7: the If condition ----------------------------------------------------------------

def test_if_condition_with_two_elements() -> None:
    m = clean_if_model(cond="c2")
    m.graph.node.insert(0, helper.make_node("Greater", ["x2", "zero"], ["c2"], name="gt2"))
    m.graph.input.append(vi("x2", F, [2]))
    v = only(check_graph(m), "if-condition")
    assert v.node == "the_if" and "'c2'" in v.message and "shape 2" in v.message


def test_if_condition_not_bool() -> None:
    m = clean_if_model(cond="mx")
    v = only(check_graph(m), "if-condition")
    assert "FLOAT" in v.message


# --- errors ----------------------------------------------------------------------------------

def test_unknown_target() -> None:
    with pytest.raises(FcpassError, match="unknown check target 'coreml'"):
        check_graph(clean_if_model(), "coreml")


# --- the compiled graphs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tiny_dit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fcpass.optimize import OptimizeOptions, optimize

    out = tmp_path_factory.mktemp("trt") / "tiny.fc.onnx"
    optimize(tiny_dit, out, OptimizeOptions(), None)
    return out


def test_compiled_tiny_dit_has_no_violations(compiled: Path) -> None:
    m = onnx.load(str(compiled))
    assert sum(n.op_type == "If" and n.name.endswith("/If") for n in m.graph.node) == 1  # nested regions to check
    assert check_graph(m) == []


def test_cli_check_passes_a_compiled_graph(compiled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(compiled), "--target", "tensorrt"]) == 0
    out = capsys.readouterr()
    assert "no violations" in out.out and out.err == ""


# --- the command line ------------------------------------------------------------------------

@pytest.fixture()
def bad_path(tmp_path: Path) -> Path:
    m = clean_if_model(then_nodes=[], then_out=[vi("x")])
    m.graph.node.append(helper.make_node("Unique", ["y"], ["u"], name="uniq"))
    m.graph.output.append(vi("u"))
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    return path


def test_cli_check_prints_every_violation_and_exits_2(bad_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(bad_path)]) == 2
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[op-support] uniq:") and "fix:" in lines[0]
    assert lines[1].startswith("[if-branches] the_if:") and "outer-scope" in lines[1]
    assert out.err.strip() == "2 violations"


def test_cli_check_json(bad_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(bad_path), "--json"]) == 2
    out = capsys.readouterr()
    items = json.loads(out.out)
    assert [(i["rule"], i["node"]) for i in items] == [("op-support", "uniq"), ("if-branches", "the_if")]
    assert set(items[0]) == {"node", "path", "rule", "message", "fix", "where"}


def test_cli_check_clean_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.onnx"
    onnx.save(clean_if_model(), str(good))
    assert main(["check", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["check", str(good), "--target", "coreml"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["check", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert "model file not found" in err and len(err.strip().splitlines()) == 1
