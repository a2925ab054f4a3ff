"""diffusers' HunyuanVideo transformer end to end: double- and single-stream blocks on a video latent, the
captions' mask, pooled embeddings and a distilled guidance input, fed as HunyuanVideoPipeline feeds them
(guidance times 1000, its own sigmas linspace(1, 0, S + 1) without the last, shifted by the scheduler).

Its export holds a bool `Where` (`masked_fill` on the mask), which ONNX Runtime's CPU kernels lack:
`fcpass optimize` rewrites it (`fcpass.compiler.passes.bool_where`), and the tests run the uncached graph as
that pass leaves it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from fcpass.cli import main
from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.passes.bool_where import rewrite_bool_where
from fcpass.compiler.trt_check import check_graph
from fcpass.contract.roles import infer_roles
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import RecordingDenoiser, forced_compute_error
from tools.export_diffusers import export_family


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("hunyuan")
    e = export_family("hunyuanvideo", "tiny", d / "hunyuan.onnx")
    runnable = onnx.load(str(e.path))
    assert rewrite_bool_where(runnable).count >= 1
    onnx.save(runnable, str(d / "hunyuan.ort.onnx"))
    return {"model": e.model, "onnx": e.path, "ort": d / "hunyuan.ort.onnx", "feeds": e.feeds, "sched": e.scheduler,
            "captions": e.captions, "pooled": e.pooled}


def run(argv: list[object]) -> int:
    return main([str(a) for a in argv])


def test_roles_blocks_and_the_forced_compute_invariant(hunyuan: dict[str, object], tmp_path: Path) -> None:
    model = onnx.load(str(hunyuan["onnx"]))
    assert {k: v for k, v in infer_roles(model).names().items() if v} == {
        "latent": "hidden_states", "timestep": "timestep", "prompt_embeds": "encoder_hidden_states",
        "pooled_embeds": "pooled_projections", "prompt_mask": "encoder_attention_mask", "guidance": "guidance"}
    blocks = discover_blocks(model, "hidden_states").blocks  # the caption refiner stays outside: it ignores the latent
    assert [".".join(b.scope.rsplit(".", 2)[-2:]) for b in blocks] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    fc = tmp_path / "hunyuan.fc.onnx"
    assert run(["optimize", hunyuan["onnx"], "-o", fc, "--taylor"]) == 0
    assert check_graph(onnx.load(str(fc))) == []
    with torch.no_grad():
        assert np.abs(hunyuan["model"](*(torch.from_numpy(v) for v in hunyuan["feeds"].values())).numpy()).max() > 1e-2
    assert forced_compute_error(fc, hunyuan["ort"], hunyuan["feeds"]) <= 1e-5
    # The rewritten Where masks what PyTorch's masked_fill masks (fp32 through the caption refiner, rotary
    # embeddings and RMS norms: the two runtimes differ by up to a few 1e-4).
    session = ort.InferenceSession(str(hunyuan["ort"]), providers=["CPUExecutionProvider"])
    for mask in ([[1, 1, 1, 1, 1]], [[1, 1, 1, 0, 0]]):
        feeds = {**hunyuan["feeds"], "encoder_attention_mask": np.array(mask, np.int64)}
        with torch.no_grad():
            ref = hunyuan["model"](*(torch.from_numpy(v) for v in feeds.values())).numpy()
        np.testing.assert_allclose(session.run(None, feeds)[0], ref, rtol=1e-3, atol=1e-3)


def test_the_sampler_feeds_what_hunyuan_video_pipeline_feeds(hunyuan: dict[str, object]) -> None:
    den = RecordingDenoiser(hunyuan["ort"])
    captions, pooled = np.load(hunyuan["captions"])[:1], np.load(hunyuan["pooled"])[:1]
    scheduler = scheduler_from_config(hunyuan["sched"])
    steps = 4
    result = sample(den, scheduler, SampleRequest(prompt_embeds=captions, pooled_embeds=pooled, steps=steps,
                                                  guidance_scale=6.0), progress=False)
    assert len(den.feeds) == steps and result.images.shape == (1, 4, 3, 8, 8)  # no unconditional half
    unshifted = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
    np.testing.assert_allclose(scheduler.sigmas[:-1], 7.0 * unshifted / (1 + 6.0 * unshifted), rtol=1e-6)
    for i, feeds in enumerate(den.feeds):
        np.testing.assert_array_equal(feeds["guidance"], [6000.0])
        np.testing.assert_array_equal(feeds["encoder_attention_mask"], [[1] * 5])
        assert feeds["timestep"] == pytest.approx(scheduler.timesteps[i])
        with torch.no_grad():
            ref = hunyuan["model"](torch.from_numpy(feeds["hidden_states"]), torch.tensor([float(scheduler.timesteps[i])]),
                                   torch.from_numpy(captions), torch.ones(1, 5, dtype=torch.int64),
                                   torch.from_numpy(pooled), torch.tensor([6000.0])).numpy()
        np.testing.assert_allclose(den.session.run(["noise_pred"], feeds)[0], ref, rtol=1e-3, atol=1e-3)


def test_sample_optimize_calibrate_and_cache(hunyuan: dict[str, object], tmp_path: Path) -> None:
    common = ["--scheduler-config", hunyuan["sched"], "--prompt-embeds", hunyuan["captions"], "--pooled-embeds",
              hunyuan["pooled"], "--steps", "8", "--guidance-scale", "6"]
    a, b, report = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "r.json"
    assert run(["sample", hunyuan["ort"], *common, "--out-npy", a, "--out", tmp_path / "grid.png"]) == 0
    plain = np.load(a)
    assert plain.shape == (3, 4, 3, 8, 8) and np.isfinite(plain).all()
    fc = tmp_path / "hunyuan.fc.onnx"
    assert run(["optimize", hunyuan["onnx"], "-o", fc, "--calibrate", "2", "--calib-eps", "0.5", *common]) == 0
    assert run(["sample", fc, "--policy", "none", *common, "--out-npy", b]) == 0
    np.testing.assert_allclose(np.load(b), plain, atol=1e-5)
    assert run(["sample", fc, "--policy", "fastcache", "--regions", "stack", "--sigma-scale", "50", *common,
                "--out-npy", b, "--report", report]) == 0
    records = json.loads(report.read_text())["records"]
    assert any(1 in r["skip"] for r in records) and np.isfinite(np.load(b)).all()


def test_a_bool_where_becomes_and_or_not_with_the_same_values_and_broadcasting() -> None:
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [2, 1])
    x = helper.make_tensor_value_info("x", TensorProto.BOOL, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.BOOL, [2, 4])
    out = helper.make_tensor_value_info("w", TensorProto.BOOL, [2, 4])
    where = helper.make_node("Where", ["c", "x", "y"], ["w"], name="w")
    helper.set_metadata_props(where, {"pkg.torch.onnx.name_scopes": "['', 'blocks.0']"})
    graph = helper.make_graph([where], "g", [c, x, y], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    feeds = {"c": np.array([[True], [False]]), "x": rng.random((1, 4)) > 0.5, "y": rng.random((2, 4)) > 0.5}
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    assert rewrite_bool_where(model).count == 1 and [n.op_type for n in model.graph.node] == ["Not", "And", "And", "Or"]
    assert all(n.metadata_props[0].value == "['', 'blocks.0']" for n in model.graph.node)  # the scope block discovery reads
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.where(feeds["c"], feeds["x"], feeds["y"]))


def test_bench_overhead_times_the_original_as_onnx_runtime_can_run_it(hunyuan: dict[str, object], tmp_path: Path) -> None:
    """The export itself does not load in ONNX Runtime; the overhead benchmark times it with its bool Where as
    And/Or/Not, the nodes otherwise the export's own, and leaves a graph without one as it is."""
    from tools.bench_overhead import _loadable

    timed = _loadable(Path(hunyuan["onnx"]), tmp_path)
    assert timed != hunyuan["onnx"] and _loadable(timed, tmp_path) == timed
    got = ort.InferenceSession(str(timed), providers=["CPUExecutionProvider"]).run(None, hunyuan["feeds"])[0]
    with torch.no_grad():
        want = hunyuan["model"](*(torch.from_numpy(v) for v in hunyuan["feeds"].values())).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
