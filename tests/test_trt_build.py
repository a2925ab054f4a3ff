"""`fcpass build`: refusals without TensorRT or with a graph that fails the checks, and the control
flow of a build against a minimal fake `tensorrt` module that has only the documented names
`fcpass.compiler.trt_build` calls (TensorRT 10.x Python API), so a misspelt call fails here too."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fcpass.cli import main
from fcpass.compiler.trt_build import BuildOptions, build_engine
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import read_plan
from tests.helpers.fake_trt_build import FakeState, make_fake_trt

F = TensorProto.FLOAT


def relu_model(batch: int | str = 2) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", F, [batch, 4])], [helper.make_tensor_value_info("y", F, [batch, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def bad_model() -> onnx.ModelProto:
    m = relu_model()
    m.graph.initializer.extend([numpy_helper.from_array(np.array([[0]], np.int64), "ind"),
                                numpy_helper.from_array(np.zeros((1, 4), np.float32), "upd")])
    m.graph.node.append(helper.make_node("ScatterND", ["y", "ind", "upd"], ["z"], name="scatter", reduction="none"))
    m.graph.output.append(helper.make_tensor_value_info("z", F, [2, 4]))
    return m


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, str(path))
    return path


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeState:
    state = FakeState()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(state))
    return state


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- without TensorRT ------------------------------------------------------------------------

def test_cli_build_without_tensorrt_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    model = save(relu_model(), tmp_path / "m.onnx")
    out = tmp_path / "m.engine"
    assert main(["build", str(model), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "TensorRT" in err[0] and "fcpass[trt]" in err[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_graph_failing_the_checks_is_refused_before_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    model = save(bad_model(), tmp_path / "bad.onnx")
    out = tmp_path / "bad.engine"
    assert main(["build", str(model), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "fails the TensorRT checks" in err[0] and "scatter" in err[0] and "reduction" in err[0]
    assert "not installed" not in err[0]
    assert not out.exists()


# --- with the fake ---------------------------------------------------------------------------

def test_successful_build_writes_the_engine_and_timing_cache(tmp_path: Path, fake: FakeState) -> None:
    model = save(relu_model(), tmp_path / "m.onnx")
    out, cache = tmp_path / "m.engine", tmp_path / "m.cache"
    summary = build_engine(model, out, BuildOptions(fp16=True, timing_cache=cache, workspace_mb=64))
    assert out.read_bytes() == fake.engine
    assert cache.read_bytes() == b"+tuned" and fake.timing_cache_in == b""
    assert [f.name for f in fake.flags] == ["FP16"]
    assert [(p.name, size) for p, size in fake.pool_limits] == [("WORKSPACE", 64 << 20)]
    assert fake.profiles == [] and not summary.dynamic_batch  # static batch: no profile
    assert fake.parsed == str(model)  # parsed from the file, so external data resolves beside it
    assert summary.engine_bytes == len(fake.engine) and summary.layers == 1 and summary.conditionals == 0
    assert [(t.name, t.mode, t.dtype, t.shape) for t in summary.io] == [
        ("x", "INPUT", "FLOAT", (2, 4)), ("y", "OUTPUT", "FLOAT", (2, 4)),
    ]
    assert leftovers(tmp_path) == []
    # A second build starts from the saved timing cache and updates it.
    build_engine(model, out, BuildOptions(timing_cache=cache))
    assert fake.timing_cache_in == b"+tuned" and cache.read_bytes() == b"+tuned+tuned"


def test_a_compiled_graph_is_built_without_its_statistic_gates(calibrated: tuple[Path, Path], tmp_path: Path,
                                                               fake: FakeState) -> None:
    """TensorRT reads every If condition on the host: the build gets one If per region, none per gate."""
    _, fc = calibrated
    summary = build_engine(fc, tmp_path / "m.engine", BuildOptions())
    assert fake.parsed == str(fc) and fake.parsed_model is not None
    names = _if_names(fake.parsed_model.graph)
    assert names and all(n.endswith("/If") for n in names)
    assert summary.conditionals == len(names) == len(read_plan(onnx.load(str(fc), load_external_data=False)).regions)
    assert any(n.endswith("/gate") for n in _if_names(onnx.load(str(fc), load_external_data=False).graph))


def _if_names(graph: onnx.GraphProto) -> list[str]:
    out = []
    for n in graph.node:
        if n.op_type == "If":
            out.append(n.name)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _if_names(a.g)
    return out


def test_dynamic_batch_gets_a_profile(tmp_path: Path, fake: FakeState) -> None:
    model = save(relu_model("N"), tmp_path / "m.onnx")
    summary = build_engine(model, tmp_path / "m.engine", BuildOptions(batch=3, bf16=True))
    assert summary.dynamic_batch
    assert fake.profiles == [{"x": ((1, 4), (3, 4), (3, 4))}]
    assert [f.name for f in fake.flags] == ["BF16"]


def test_cli_build_prints_a_summary(tmp_path: Path, fake: FakeState, capsys: pytest.CaptureFixture[str]) -> None:
    model = save(relu_model(), tmp_path / "m.onnx")
    assert main(["build", str(model), "-o", str(tmp_path / "m.engine"), "--workspace", "16", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "1 layers" in out and "0 If conditionals" in out
    assert "input  x" in out and "output y" in out


def test_parser_errors_are_one_error_with_the_first_and_the_count(tmp_path: Path, fake: FakeState) -> None:
    fake.parse_errors = [("Assertion failed: unsupported thing", 0, "relu"), ("second", 0, "relu")]
    model = save(relu_model(), tmp_path / "m.onnx")
    out = tmp_path / "m.engine"
    with pytest.raises(FcpassError, match=r"rejected .* at node 0 \(relu\): Assertion failed: unsupported thing "
                                          r"\(and 1 more\)"):
        build_engine(model, out, BuildOptions())
    assert not out.exists() and leftovers(tmp_path) == []


def test_no_gpu_is_one_line_naming_it(tmp_path: Path, fake: FakeState) -> None:
    fake.builder_fails = True
    model = save(relu_model(), tmp_path / "m.onnx")
    with pytest.raises(FcpassError, match="cannot create a builder.*GPU"):
        build_engine(model, tmp_path / "m.engine", BuildOptions())


def test_failed_build_writes_nothing(tmp_path: Path, fake: FakeState) -> None:
    fake.build_fails = True
    model = save(relu_model(), tmp_path / "m.onnx")
    cache = tmp_path / "m.cache"
    with pytest.raises(FcpassError, match="could not build an engine"):
        build_engine(model, tmp_path / "m.engine", BuildOptions(timing_cache=cache))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_fp16_on_tensorrt_11_says_to_convert_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(FakeState(), trt11=True))
    model = save(relu_model(), tmp_path / "m.onnx")
    with pytest.raises(FcpassError, match="--fp16 needs TensorRT 10.x: TensorRT 11.0.0 removed BuilderFlag.FP16") as err:
        build_engine(model, tmp_path / "m.engine", BuildOptions(fp16=True))
    # A converter run on the compiled graph would sum the statistics in fp16 (and onnxconverter-common
    # cannot follow its Ifs): the export is what to convert.
    assert "convert the exported model to fp16" in str(err.value) and "before fcpass optimize" in str(err.value)


def test_bad_options(tmp_path: Path, fake: FakeState) -> None:
    model = save(relu_model(), tmp_path / "m.onnx")
    with pytest.raises(FcpassError, match="is the input model"):
        build_engine(model, model, BuildOptions())
    with pytest.raises(FcpassError, match="--timing-cache"):
        build_engine(model, tmp_path / "m.engine", BuildOptions(timing_cache=model))
    with pytest.raises(FcpassError, match="--workspace 0"):
        build_engine(model, tmp_path / "m.engine", BuildOptions(workspace_mb=0))
