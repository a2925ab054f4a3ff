"""`fcpass.export.export` reproduces the PyTorch model in ONNX (fp32, max abs diff <= 1e-4).

Covered: the bundled-size DiT (`digits`: 16x16x1, 8 blocks of width 128) and `pixart-tiny`, with both
torch exporters and opsets 18 and 22. A full 2 x 2 x 2 grid would cost four dynamo exports (~10 s
each), so the four cases below form a covering design instead: every architecture meets every
exporter, every exporter meets every opset, and every architecture meets every opset.

Each model gets random non-zero weights (`randomize_`) and is exported through `--weights` from a
`torch.save` checkpoint in the official layout: the reference initialisation zeroes the output
layer, so an export that ignored the weights would output zeros and could not pass the parity test.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fcpass.export import EXPORT_METADATA_KEY, ExportSpec, export
from models.digits import DIGITS_DIT
from models.dit import DiT, DiTConfig
from models.pixart import PixArt, pixart_config, randomize_

TOL = 1e-4
BATCH = 2

# (arch, exporter, opset): a covering design of {digits, pixart-tiny} x {dynamo, legacy} x {18, 22}.
CASES = [
    ("digits", "dynamo", 18),
    ("digits", "legacy", 22),
    ("pixart-tiny", "dynamo", 22),
    ("pixart-tiny", "legacy", 18),
]


@dataclass
class Exported:
    arch: str
    exporter: str
    opset: int
    path: Path
    weights: Path
    model: Any  # the randomized PyTorch module the checkpoint was saved from
    onnx: onnx.ModelProto


def reference_model(arch: str, seed: int = 0) -> Any:
    """The PyTorch module whose checkpoint is exported: random non-zero weights everywhere."""
    if arch == "digits":
        model = DiT(DiTConfig(**DIGITS_DIT))
    else:
        model = PixArt(pixart_config(arch))
    return randomize_(model, seed).eval()


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    arch, exporter, opset = request.param
    folder = tmp_path_factory.mktemp(f"{arch}-{exporter}-{opset}")
    model = reference_model(arch)
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    path = export(ExportSpec(arch, batch=BATCH, exporter=exporter, opset=opset), folder / "model.onnx", weights=weights)
    return Exported(arch, exporter, opset, path, weights, model, onnx.load(str(path)))


def fresh_inputs(ex: Exported, seed: int) -> dict[str, np.ndarray]:
    """Random inputs unlike the export's own example inputs (those come from seed 0 and linspace)."""
    rng = np.random.default_rng(seed)
    cfg = ex.model.config
    feeds = {
        "latent": rng.standard_normal((BATCH, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32),
        "timestep": rng.uniform(0.0, 1000.0, BATCH).astype(np.float32),
    }
    if ex.arch == "digits":
        # Any row of the label table, the null class (index num_classes) included.
        feeds["class_labels"] = rng.integers(0, cfg.num_classes + 1, BATCH).astype(np.int64)
    else:
        feeds["encoder_hidden_states"] = rng.standard_normal((BATCH, cfg.caption_len, cfg.caption_channels)).astype(
            np.float32
        )
    return feeds


def all_nodes(model: onnx.ModelProto):
    """Every node: the main graph, subgraphs (If/Loop bodies) and local functions."""

    def walk(nodes):
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g.node)

    yield from walk(model.graph.node)
    for fn in model.functions:
        yield from walk(fn.node)


def test_writes_one_self_contained_file(exported: Exported) -> None:
    assert exported.path.is_file() and exported.path.stat().st_size > 0
    # No external-data side file (dynamo exports with external data into a temp dir) and no temp file.
    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["model.onnx", "weights.pt"]
    onnx.checker.check_model(str(exported.path))


@pytest.mark.parametrize("seed", [11, 12])
def test_onnx_runtime_matches_pytorch_on_fresh_inputs(exported: Exported, seed: int) -> None:
    feeds = fresh_inputs(exported, seed)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(exported.path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, feeds)
    with torch.no_grad():
        want = exported.model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert got.shape == want.shape
    # The initial weights give an all-zero output; a non-trivial one shows the checkpoint was used.
    assert np.abs(want).max() > 1e-2
    diff = float(np.abs(got - want).max())
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


def _io(values) -> list[tuple[str, int, list[int]]]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        assert all(d.HasField("dim_value") for d in tt.shape.dim), f"{v.name} has a symbolic dimension"
        out.append((v.name, tt.elem_type, [d.dim_value for d in tt.shape.dim]))
    return out


def test_inputs_and_outputs_are_named_and_static(exported: Exported) -> None:
    cfg = exported.model.config
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    side = cfg.input_size
    expected = [("latent", f32, [BATCH, cfg.in_channels, side, side]), ("timestep", f32, [BATCH])]
    if exported.arch == "digits":
        expected.append(("class_labels", i64, [BATCH]))
    else:
        expected.append(("encoder_hidden_states", f32, [BATCH, cfg.caption_len, cfg.caption_channels]))
    initializers = {t.name for t in exported.onnx.graph.initializer}
    inputs = [v for v in exported.onnx.graph.input if v.name not in initializers]
    assert _io(inputs) == expected
    assert _io(exported.onnx.graph.output) == [("noise_pred", f32, [BATCH, cfg.out_channels, side, side])]


def test_graph_is_plain_at_the_requested_opset(exported: Exported) -> None:
    ops = {(n.domain, n.op_type) for n in all_nodes(exported.onnx)}
    assert not any(op == "Attention" for _, op in ops), "a fused Attention node was exported"
    foreign = sorted({f"{d}::{op}" for d, op in ops if d not in ("", "ai.onnx")})
    assert not foreign, f"ops from non-default domains: {foreign}"
    default = [o.version for o in exported.onnx.opset_import if o.domain in ("", "ai.onnx")]
    assert default == [exported.opset]


def test_export_metadata_describes_the_model(exported: Exported) -> None:
    props = {p.key: p.value for p in exported.onnx.metadata_props}
    assert EXPORT_METADATA_KEY in props
    meta = json.loads(props[EXPORT_METADATA_KEY])
    assert meta["arch"] == exported.arch
    assert (meta["exporter"], meta["opset"], meta["batch"]) == (exported.exporter, exported.opset, BATCH)
    assert meta["weights"] == str(exported.weights)
    cfg = meta["config"]
    assert cfg["family"] == ("dit" if exported.arch == "digits" else "pixart")
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
        assert cfg[key] == getattr(exported.model.config, key), key
    if exported.arch == "digits":
        assert cfg["num_classes"] == DIGITS_DIT["num_classes"]


def test_export_without_weights_warns_and_keeps_initial_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fcpass.export"):
        path = export(ExportSpec("pixart-tiny", exporter="legacy", opset=18), tmp_path / "init.onnx")
    assert "no --weights given" in caplog.text
    model = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}[EXPORT_METADATA_KEY])
    assert meta["weights"] is None
    # The layers the official initialisation zeroes get small random weights: no block is the identity.
    matrices = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2]
    assert len(matrices) > 10 and all(m.any() for m in matrices)
