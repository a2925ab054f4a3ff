"""Graphs whose inputs are static but whose shapes ONNX inference leaves symbolic (the legacy exporter's
`chunk` at batch 1): the shapes are resolved to what a run computes, so MACs count every dimension and
the cache state gets buffers of a known size, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import shape_inference

from fcpass.cli import main
from fcpass.graphinfo import GraphIndex, graph_macs, infer_shapes
from fcpass.static_shapes import static_dims
from models.digits import SCHEDULER_CONFIG
from tests.conftest import export_tiny_dit, tiny_feeds
from tests.test_cache_regions import Compiled


@pytest.fixture(scope="module")
def batch1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_dit(tmp_path_factory.mktemp("batch1") / "tiny1.onnx", "legacy", batch=1)


def test_onnx_inference_alone_leaves_symbols(batch1: Path) -> None:
    """The case this resolves exists: without it, values downstream of the chunk have a symbolic batch axis."""
    inferred = shape_inference.infer_shapes(onnx.load(str(batch1)), data_prop=True)
    assert all(static_dims(v) for v in inferred.graph.input)
    assert sum(not static_dims(v) for v in inferred.graph.value_info) > 10


def test_resolved_shapes_are_what_a_run_computes(batch1: Path) -> None:
    model = onnx.load(str(batch1))
    resolved = infer_shapes(model)
    assert [n.SerializeToString() for n in resolved.graph.node] == [n.SerializeToString() for n in model.graph.node]
    types = {v.name: v for v in resolved.graph.value_info}
    produced = [o for n in model.graph.node for o in n.output if o and o not in {x.name for x in model.graph.output}]
    assert all(static_dims(types[name]) for name in produced), [n for n in produced if not static_dims(types[n])]

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in produced)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    ran = dict(zip([o.name for o in session.get_outputs()], session.run(None, tiny_feeds(0, batch=1))))
    for name in produced:
        assert [d.dim_value for d in types[name].type.tensor_type.shape.dim] == list(np.shape(ran[name])), name


def test_macs_of_batch_one_are_half_of_batch_two(batch1: Path, tmp_path: Path) -> None:
    batch2 = export_tiny_dit(tmp_path / "tiny2.onnx", "legacy")
    macs = [graph_macs(GraphIndex(onnx.load(str(p)))) for p in (batch1, batch2)]
    assert macs[1] > 0 and macs[0] * 2 == macs[1]


def test_forced_compute_equals_the_original_and_sampling_runs(batch1: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    compiled = Compiled(batch1)
    assert all(isinstance(d, int) for s in compiled.plan.states for d in s.shape)
    feeds = tiny_feeds(0, batch=1)
    out = compiled.run(feeds)
    (ref,) = compiled.ref_sess.run(None, feeds)
    assert np.abs(out["noise_pred"] - ref).max() <= 1e-5
    truth = compiled.true_values(feeds, [s.source for s in compiled.plan.states if s.kind == "in"])
    for s in compiled.plan.states:
        if s.kind == "in":
            np.testing.assert_allclose(compiled.state[s.name], truth[s.source], rtol=0, atol=1e-5, err_msg=s.name)

    fc = tmp_path / "tiny1.fc.onnx"
    common = ["--scheduler-config", str(SCHEDULER_CONFIG), "--guidance-scale", "1"]
    assert main([str(a) for a in ["optimize", batch1, "-o", fc, "--calibrate", "1", "--calib-steps", "4", *common]]) == 0
    args = ["sample", fc, "--steps", "4", "--class", "1", "2", "--out-npy", tmp_path / "s.npy", *common]
    assert main([str(a) for a in [*args, "--policy", "fora", "--interval", "2"]]) == 0
    assert np.isfinite(np.load(tmp_path / "s.npy")).all()
    assert "fcpass: error" not in capsys.readouterr().err
