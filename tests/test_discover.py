"""Block discovery: scopes from either exporter, the structural fallback, overrides, explanations."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from fcpass.cli import main
from fcpass.discover import discover_blocks
from fcpass.errors import FcpassError
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
