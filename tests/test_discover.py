"""Block discovery: scopes from either exporter, the structural fallback, overrides, explanations."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from fcpass.cli import main
from fcpass.compiler.discover import discover_blocks
from fcpass.contract.errors import FcpassError
from tests.conftest import load


def _strip_scopes(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, n in enumerate(m.graph.node):
        n.name = f"n{i}"
        del n.metadata_props[:]
    return m


def test_scopes_find_three_chained_blocks(tiny_dit: Path) -> None:
    bmap = discover_blocks(load(tiny_dit), "latent")
    assert len(bmap) == 3 and bmap.method.startswith("scopes")
    assert [b.scope for b in bmap.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    for a, b in zip(bmap.blocks, bmap.blocks[1:]):
        assert a.outputs == b.inputs  # the residual stream runs block to block
    assert all(b.macs > 0 and b.params > 0 for b in bmap.blocks)


def test_structure_finds_the_same_blocks_without_any_scope(tiny_dit: Path) -> None:
    model = load(tiny_dit)
    by_scope = discover_blocks(model, "latent")
    by_structure = discover_blocks(_strip_scopes(model), "latent")
    assert by_structure.method.startswith("structure")
    assert [(b.inputs, b.outputs, b.nodes) for b in by_structure.blocks] == [
        (b.inputs, b.outputs, b.nodes) for b in by_scope.blocks
    ]


def test_block_pattern_overrides_the_default(tiny_dit: Path) -> None:
    model = load(tiny_dit)
    bmap = discover_blocks(model, "latent", block_pattern=r"^blocks\.(\d+)$")
    assert len(bmap) == 3 and "pattern" in bmap.method
    with pytest.raises(FcpassError, match="captured no block number"):
        discover_blocks(model, "latent", block_pattern=r"^blocks\.\d+$")
    with pytest.raises(FcpassError, match="not a valid regular expression"):
        discover_blocks(model, "latent", block_pattern="(")
    # A pattern the user gave that matches nothing is an error, not a silent structural search.
    with pytest.raises(FcpassError, match="matches no module scope") as err:
        discover_blocks(model, "latent", block_pattern=r"layer\.(\d+)")
    assert "--block-pattern 'layer\\\\.(\\\\d+)'" in str(err.value) and "e.g. 'blocks.0" in str(err.value)


def test_nothing_found_says_what_was_tried(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A graph with a latent input and no repeated blocks: patch embed and an output projection only.
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Reshape", ["latent", "shape"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Add", ["y", "timestep"], ["out"])],
        "flat", [helper.make_tensor_value_info("latent", TensorProto.FLOAT, [2, 4, 2, 2]),
                 helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 4])],
        [w, numpy_helper.from_array(np.array([2, 4, 4], np.int64), "shape")],
    )
    path = tmp_path / "flat.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no transformer blocks found" in err and "--block-pattern" in err


def test_an_already_optimized_graph_is_refused(tiny_dit: Path, tmp_path: Path) -> None:
    from fcpass.optimize import OptimizeOptions, optimize

    out = tmp_path / "m.fc.onnx"
    optimize(tiny_dit, out, OptimizeOptions(), None)
    with pytest.raises(FcpassError, match="already cache-aware"):
        discover_blocks(load(out), "latent")



def _fused_by_onnx_runtime(src: Path, dst: Path) -> Path:
    """`src` as ONNX Runtime's offline optimization writes it (contrib-op fusions, the exporter's scopes gone)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst


def test_a_graph_onnx_runtime_already_fused_counts_the_same_macs_and_compiles(tmp_path: Path) -> None:
    """The bundled export keeps its value types through ONNX Runtime's fusions (attention's scaled MatMul
    becomes com.microsoft FusedMatMul): the MACs are still every multiply-accumulate, and structure
    finds blocks whose regions compute what the fused graph does."""
    import numpy as np

    from fcpass.compiler.graphinfo import GraphIndex, graph_macs
    from fcpass.optimize import OptimizeOptions, optimize
    from models.digits import ONNX
    from tests.conftest import forced_compute_error

    fused = _fused_by_onnx_runtime(ONNX, tmp_path / "fused.onnx")
    model = load(fused)
    assert any(n.op_type == "FusedMatMul" for n in model.graph.node)
    assert graph_macs(GraphIndex(model)) == graph_macs(GraphIndex(load(ONNX))) > 0

    out = tmp_path / "fused.fc.onnx"
    plan = optimize(fused, out, OptimizeOptions(regions=("blocks",)), None)
    # 7 of 8 blocks: the last block's residual add is fused with the final norm (SkipLayerNormalization)
    assert len(plan.regions) == 7
    rng = np.random.default_rng(0)
    feeds = {"latent": rng.standard_normal((2, 1, 16, 16)).astype(np.float32),
             "timestep": np.array([10.0, 500.0], np.float32), "class_labels": np.array([3, 10], np.int64)}
    assert forced_compute_error(out, fused, feeds) <= 1e-5


def test_a_fused_graph_without_value_types_is_sent_back_to_the_export(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A legacy export stores no value types: after ONNX Runtime's fusions shape inference stops at the first
    contrib op, and the error names them and the fix."""
    from tests.conftest import export_tiny_dit
    from tests.helpers.cli import user_error

    fused = _fused_by_onnx_runtime(export_tiny_dit(tmp_path / "tiny.onnx", "legacy"), tmp_path / "fused.onnx")
    user_error(capsys, ["optimize", fused, "-o", tmp_path / "x.onnx"], "shape inference stops at the graph's FusedMatMul",
               "run fcpass optimize on the export itself, before ONNX Runtime's offline optimization")
    assert not (tmp_path / "x.onnx").exists()


def test_einsum_products_count_their_macs_and_permutations_none(tmp_path: Path) -> None:
    """Attention written with einsum exports as ONNX Einsum: a product of b*h*q*k*d multiply-accumulates;
    the bundled model's unpatchify is a one-operand Einsum, a permutation, and counts none."""
    torch = pytest.importorskip("torch")
    from fcpass.compiler.graphinfo import GraphIndex, graph_macs, node_macs
    from models.digits import ONNX

    class EinsumAttention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            weights = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
            return torch.einsum("bhqk,bhkd->bhqd", weights, v)

    b, h, n, d = 2, 3, 5, 4
    path = tmp_path / "einsum.onnx"
    args = tuple(torch.randn(b, h, n, d) for _ in range(3))
    torch.onnx.export(EinsumAttention(), args, str(path), dynamo=False, opset_version=18)
    model = load(path)
    assert [n.op_type for n in model.graph.node].count("Einsum") == 2
    assert graph_macs(GraphIndex(model)) == 2 * b * h * n * n * d

    bundled = load(ONNX)
    index = GraphIndex(bundled)
    assert [node_macs(n, index) for n in bundled.graph.node if n.op_type == "Einsum"] == [0]
