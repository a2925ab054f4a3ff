"""Shapes that are not numbers in the export. Static inputs with symbolic shapes after ONNX inference (the
legacy exporter's `chunk` at batch 1): resolved to what a run computes, so MACs count every dimension and
the cache state gets buffers of a known size. A dynamic batch axis: compiled at a fixed batch (2, or
--batch) that computes what the dynamic graph does; inspected and sampled per batch row."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import shape_inference

from fcpass.cli import main
from fcpass.compiler.graphinfo import GraphIndex, graph_macs, infer_shapes
from fcpass.compiler.static_shapes import static_dims
from fcpass.contract.plan import read_plan
from fcpass.optimize import OptimizeOptions, optimize
from tests.conftest import SCHEDULER_CONFIG, export_tiny_dit, forced_compute_error, tiny_feeds
from tests.helpers.cli import user_error
from tests.helpers.compiled import Compiled


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


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def dynamic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_dit(tmp_path_factory.mktemp(f"dynamic-{request.param}") / "tiny.onnx", request.param,
                           dynamic_batch=True)


def feeds_of(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"latent": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
            "timestep": np.linspace(10, 900, batch).astype(np.float32),
            "class_labels": np.arange(batch, dtype=np.int64) % 11}


@pytest.mark.parametrize("batch", [None, 4])
def test_a_dynamic_batch_compiles_at_a_fixed_one_that_computes_what_the_export_does(dynamic: Path, tmp_path: Path,
                                                                                     batch: int | None) -> None:
    out = tmp_path / "tiny.fc.onnx"
    optimize(dynamic, out, OptimizeOptions(batch=batch), None)
    rows = batch or 2
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [rows, 4, 8, 8]
    plan = read_plan(model)
    assert all(isinstance(d, int) for s in plan.states for d in s.shape)
    assert {s.shape[0] for s in plan.states} == {rows}
    assert forced_compute_error(out, dynamic, feeds_of(rows)) <= 1e-5


def test_inspect_and_plain_sampling_count_a_dynamic_graphs_macs_per_row(dynamic: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    static = export_tiny_dit(tmp_path / "static.onnx", "legacy")
    capsys.readouterr()
    assert main(["inspect", str(dynamic), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["macs_per"] == "batch row" and info["blocks"]["count"] == 3
    assert 2 * info["macs_per_call"] == graph_macs(GraphIndex(onnx.load(str(static))))

    report = tmp_path / "r.json"
    assert main([str(a) for a in ["sample", dynamic, "--steps", "3", "--class", "1", "2", "3", "--uncond-class", "10",
                                  "--scheduler-config", SCHEDULER_CONFIG, "--report", report]]) == 0
    r = json.loads(report.read_text())
    assert r["macs"] == r["macs_uncached"] == info["macs_per_call"] * 6 * 3  # 3 samples with guidance, 3 steps


def test_batches_it_cannot_compile_are_named(dynamic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    static = export_tiny_dit(tmp_path / "static.onnx", "legacy")
    user_error(capsys, ["optimize", static, "-o", tmp_path / "x.onnx", "--batch", "3"],
               "--batch 3:", "fixes its batch at 2")
    user_error(capsys, ["optimize", dynamic, "-o", tmp_path / "x.onnx", "--batch", "0"], "--batch 0 must be at least 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["static.onnx"]


@pytest.fixture(scope="module")
def any_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """diffusers' DiT exported with its batch, height and width dynamic, as deployment exports often are."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tests.helpers.diffusers_models import SPECS, _dit, _randomize_

    model = _dit().eval()
    _randomize_(model, 0)
    spec = SPECS["dit"]
    path = tmp_path_factory.mktemp("any-size") / "dit.onnx"
    image = {0: "batch_size", 2: "height", 3: "width"}
    axes = {"latent": image, "timestep": {0: "batch_size"}, "class_labels": {0: "batch_size"}, "noise_pred": image}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, spec.inputs(torch.Generator().manual_seed(0), [10.0, 500.0]), str(path), dynamo=False,
                          opset_version=18, input_names=list(spec.names), output_names=["noise_pred"], dynamic_axes=axes)
    return path


def test_named_dynamic_axes_are_fixed_by_dims_and_the_rest_named_with_the_fix(any_size: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    user_error(capsys, ["optimize", any_size, "-o", out / "x.onnx"],
               "latent axis 2 (height), latent axis 3 (width)", "fix them with --dims height=N,width=N")
    user_error(capsys, ["optimize", any_size, "-o", out / "x.onnx", "--dims", "hieght=8"],
               "--dims hieght: no input axis has that name; the dynamic axes are named: batch_size, height, width")
    user_error(capsys, ["optimize", any_size, "-o", out / "x.onnx", "--dims", "height=0"], "is not NAME=N with N >= 1")
    static = export_tiny_dit(tmp_path / "static.onnx", "legacy")
    user_error(capsys, ["optimize", static, "-o", out / "x.onnx", "--dims", "height=8"], "has no dynamic axes")
    assert not list(out.iterdir())

    capsys.readouterr()
    assert main(["inspect", str(any_size), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"][0]["shape"] == ["batch_size", 4, "height", "width"]
    assert info["macs_per_call"] is None and "--dims height=N,width=N" in info["macs_unknown"]
    assert main(["inspect", str(any_size), "--json", "--dims", "height=8,width=8"]) == 0
    per_row = json.loads(capsys.readouterr().out)["macs_per_call"]

    fc = out / "dit.fc.onnx"
    assert main(["optimize", str(any_size), "-o", str(fc), "--dims", "height=8,width=8"]) == 0
    model = onnx.load(str(fc))
    plan = read_plan(model)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 4, 8, 8]
    assert all(static_dims(o) for o in model.graph.output)  # the export named an output axis it computed
    assert plan.uncached_macs == 2 * per_row > 0
    feeds = {"latent": np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([10.0, 500.0], np.float32), "class_labels": np.array([1, 7], np.int64)}
    assert forced_compute_error(fc, any_size, feeds) <= 1e-5

    common = ["--steps", "3", "--class", "1", "2", "--uncond-class", "10", "--scheduler-config", SCHEDULER_CONFIG]
    plain, cached, report = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "r.json"
    assert main([str(a) for a in ["sample", any_size, *common, "--dims", "height=8,width=8", "--out-npy", plain,
                                  "--report", report]]) == 0
    assert json.loads(report.read_text())["macs"] == per_row * 4 * 3  # 2 samples with guidance in one call, 3 steps
    assert main([str(a) for a in ["sample", fc, "--policy", "none", *common, "--out-npy", cached]]) == 0
    np.testing.assert_allclose(np.load(cached), np.load(plain), atol=1e-5)
    user_error(capsys, ["sample", fc, *common, "--dims", "height=8"], "is compiled at fixed sizes; drop --dims")
