"""Splitting blocks into residual branches: our DiT and PixArt, diffusers' DiT and PixArt, both exporters."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fcpass.cli import main
from fcpass.compiler.branches import branches_of, find_branches
from fcpass.compiler.discover import Block, discover_blocks
from fcpass.compiler.graphinfo import GraphIndex
from fcpass.contract.errors import FcpassError
from tests.conftest import load

torch = pytest.importorskip("torch")


def _split(path: Path) -> tuple[onnx.ModelProto, list]:
    model = load(path)
    bmap = discover_blocks(model, "latent")
    split = branches_of(model, bmap.blocks, "latent")
    assert all(not isinstance(s, str) for s in split), split
    return model, split


def test_dit_blocks_are_gated_attention_then_gated_mlp(tiny_dit: Path) -> None:
    model, split = _split(tiny_dit)
    index = GraphIndex(model)
    dependent = index.descendants({"latent"})
    assert len(split) == 3
    for s in split:
        assert [(b.role, b.kind) for b in s.branches] == [("self_attention", "mixing"), ("mlp", "local")]
        attn, mlp = s.branches
        # The chain: the MLP reads what the attention's residual Add wrote; the block ends at the MLP's Add.
        assert mlp.stream_in == attn.stream_out and mlp.stream_out == s.stream_out
        for br in s.branches:
            assert br.gate is not None and index.producer.get(br.gate) not in dependent  # adaLN's gate
            assert index.nodes[br.gate_node].op_type == "Mul" and br.output in index.nodes[br.gate_node].input
            assert index.nodes[br.add_node].op_type == "Add"
        # V is (B, H, N, d) = (2, 2, 16, 16), read by the MatMul after the Softmax; DiT projects it with
        # the fused qkv MatMul.
        assert index.shape(attn.value) == (2, 2, 16, 16)
        reader = next(index.nodes[i] for i in index.consumers[attn.value] if index.nodes[i].op_type == "MatMul")
        assert index.nodes[index.producer[reader.input[0]]].op_type == "Softmax"
        qkv = next(n for n in index.nodes if (n.name or n.output[0]) == attn.value_proj or n.name == attn.value_proj)
        assert qkv.op_type == "MatMul" and index.shape(qkv.output[0])[-1] == 3 * 32
        assert mlp.value is None


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def pixart(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fcpass.export import ExportSpec, export

    path = tmp_path_factory.mktemp(f"pixart-{request.param}") / "pixart.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(ExportSpec("pixart-tiny", 64, 2, request.param, 18), path, verify=False)
    return path


def test_pixart_cross_attention_is_token_local_and_ungated(pixart: Path) -> None:
    _, split = _split(pixart)
    for s in split:
        assert [(b.role, b.kind, b.gate is not None) for b in s.branches] == [
            ("self_attention", "mixing", True), ("cross_attention", "local", False), ("mlp", "local", True)]


DIFFUSERS = [(name, exporter) for name in ("dit", "pixart") for exporter in ("legacy", "dynamo")]


@pytest.fixture(scope="module", params=DIFFUSERS, ids=[f"{n}-{e}" for n, e in DIFFUSERS])
def diffusers_graph(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    pytest.importorskip("diffusers")
    from tests.helpers import diffusers_models as dg

    name, exporter = request.param
    spec = dg.SPECS[name]
    torch.manual_seed(0)
    module = spec.build().eval()
    dg._randomize_(module, seed=1)
    args = spec.inputs(torch.Generator().manual_seed(2), [10.0, 500.0])
    path = tmp_path_factory.mktemp(f"d-{name}-{exporter}") / "model.onnx"
    kwargs = {"input_names": list(spec.names), "output_names": ["sample"], "opset_version": 18}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, verbose=False, **kwargs)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
    model = onnx.load(str(path))
    dg._drop_noop_squeeze(model)
    onnx.save(model, str(path))
    return name, path


def test_diffusers_blocks_split_with_the_value_projection(diffusers_graph: tuple[str, Path]) -> None:
    name, path = diffusers_graph
    model, split = _split(path)
    index = GraphIndex(model)
    expected = [("self_attention", "mixing")] + ([("cross_attention", "local")] if name == "pixart" else []) + [
        ("mlp", "local")]
    for s in split:
        assert [(b.role, b.kind) for b in s.branches] == expected
        attn = s.branches[0]
        proj = next(n for n in index.nodes if n.name == attn.value_proj)
        assert proj.op_type == "MatMul"
        if "/" in proj.name:  # the legacy exporter names it after the module: attn1.to_v
            assert "attn1/to_v" in proj.name


def _tiny_graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_block_without_a_residual_add_is_explained() -> None:
    w = np.eye(8, dtype=np.float32)
    model = _tiny_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="/blocks.0/fc"),
                         helper.make_node("Relu", ["h"], ["y"], name="/blocks.0/act")], {"w": w})
    index = GraphIndex(model)
    block = Block(0, "blocks.0", [0, 1], ["x"], ["y"])
    with pytest.raises(FcpassError, match=r"segment ending at MatMul '/blocks.0/fc' is not a residual branch"):
        find_branches(index, block)


def test_an_ungated_mlp_residual_is_local_and_a_double_stream_block_declines() -> None:
    w = np.eye(8, dtype=np.float32)
    model = _tiny_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                         helper.make_node("Relu", ["h"], ["r"], name="act"),
                         helper.make_node("Add", ["x", "r"], ["y"], name="res")], {"w": w})
    index = GraphIndex(model)
    split = find_branches(index, Block(0, "b", [0, 1, 2], ["x"], ["y"]))
    (br,) = split.branches
    assert (br.role, br.kind, br.gate, br.output, br.nodes) == ("mlp", "local", None, "r", [0, 1])
    with pytest.raises(FcpassError, match="single-stream blocks"):
        find_branches(index, Block(0, "b", [0, 1, 2], ["x", "w"], ["y"]))


def test_inspect_prints_a_branches_line_per_block(tiny_dit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_dit)]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("branches:")]
    assert len(lines) == 3
    assert all(ln.startswith("branches: self_attention(mixing, V from ") and ln.endswith("-> mlp(local)") for ln in lines)
