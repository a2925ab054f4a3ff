"""Model I/O: atomic writes, and the external-data path that models over 2 GB take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fcpass.contract import onnx_io
from fcpass.contract.errors import FcpassError
from tests.conftest import tiny_feeds


def test_large_models_are_written_with_external_data(tiny_dit: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_io, "_PROTO_LIMIT", 1024)  # treat the tiny model as "over 2 GB"
    monkeypatch.chdir(tmp_path)  # a path relative to the working directory, as on the command line
    out = tmp_path / "big.onnx"
    onnx_io.save_model(onnx.load(str(tiny_dit)), "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temp files
    feeds = tiny_feeds(0)
    ref = ort.InferenceSession(str(tiny_dit), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, ref)


def test_a_model_apart_from_its_external_data_is_named_with_the_fix(tiny_dit: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A model copied without its `.data` file, or with a cut-off one, fails on loading with what to do,
    for every command, not with ONNX Runtime's "invalid graph" once a session opens."""
    from fcpass.cli import main

    monkeypatch.setattr(onnx_io, "_PROTO_LIMIT", 1024)
    pair = onnx_io.save_model(onnx.load(str(tiny_dit)), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    loaded = onnx_io.load_model(pair)
    assert [t.raw_data for t in loaded.graph.initializer] == [t.raw_data for t in onnx.load(str(pair)).graph.initializer]

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "m.onnx").write_bytes(pair.read_bytes())
    for weights in (True, False):
        with pytest.raises(FcpassError, match="keeps its weights in m.onnx.data, which is not beside it in .*alone; "
                                              "keep the two files together"):
            onnx_io.load_model(alone / "m.onnx", load_weights=weights)
    (alone / "m.onnx.data").write_bytes(data.read_bytes()[:100])
    with pytest.raises(FcpassError, match=f"holds 100 bytes where m.onnx reads {data.stat().st_size}: the copy was cut short"):
        onnx_io.load_model(alone / "m.onnx")
    (alone / "m.onnx.data").unlink()
    capsys.readouterr()
    assert main(["sample", str(alone / "m.onnx"), "--steps", "2", "--scheduler-config", str(tiny_dit.parent / "x")]) == 2
    assert "keep the two files together" in capsys.readouterr().err


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "x.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), onnx_io.atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    with pytest.raises(FcpassError, match="is the input model"):
        onnx_io.check_distinct(p, tmp_path / "." / "m.onnx")


def test_replace_marked_block_keeps_the_rest_and_refuses_a_file_without_markers(tmp_path: Path) -> None:
    from fcpass.contract.onnx_io import replace_marked_block

    doc = tmp_path / "README.md"
    doc.write_text("head\n<!-- a -->\nold\n<!-- b -->\ntail\n")
    replace_marked_block(doc, "new\n", "<!-- a -->", "<!-- b -->")
    assert doc.read_text() == "head\n<!-- a -->\nnew\n<!-- b -->\ntail\n"
    with pytest.raises(FcpassError, match="no <!-- c --> ... <!-- b --> block"):
        replace_marked_block(doc, "x", "<!-- c -->", "<!-- b -->")
    assert doc.read_text() == "head\n<!-- a -->\nnew\n<!-- b -->\ntail\n"


def test_compiled_graphs_keep_large_weights_in_external_data(calibrated: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """ONNX Runtime holds weights stored inline in nested If branches several times over. A compiled
    graph with more than EXTERNAL_DATA_MIN_BYTES of them keeps them in `<name>.data`: its session holds
    less than half the memory of the same graph stored inline, and computes the same. Small graphs
    stay one file."""
    from fcpass.cli import main
    from fcpass.compiler.passes.localize_weights import EXTERNAL_DATA_MIN_BYTES, branch_weight_bytes
    from fcpass.export import ExportSpec, export
    from tools.bench_memory import session_mib

    src, out, inline = tmp_path / "s2.onnx", tmp_path / "s2.fc.onnx", tmp_path / "inline.fc.onnx"
    export(ExportSpec("dit-s-2", 32, exporter="legacy"), src)  # DiT-S/2's 125 MiB of weights on 4 tokens
    assert main(["optimize", str(src), "-o", str(out)]) == 0  # no calibration: no scheduler config needed
    assert f"its weights in {tmp_path / 's2.fc.onnx.data'} (keep the two files together)" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert branch_weight_bytes(model) >= EXTERNAL_DATA_MIN_BYTES
    assert (tmp_path / "s2.fc.onnx.data").stat().st_size > EXTERNAL_DATA_MIN_BYTES > out.stat().st_size
    assert onnx_io.data_file(out) == tmp_path / "s2.fc.onnx.data"
    onnx_io.save_model(model, inline)
    assert onnx_io.data_file(inline) is None
    assert session_mib(out) < 0.5 * session_mib(inline)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (out, inline)]
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sessions[0].get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        feeds[i.name] = (np.zeros(shape, np.int64) if i.name == "fc_ctl" else rng.integers(0, 10, shape)
                         if "int64" in i.type else rng.standard_normal(shape).astype(np.float32))
    for a, b in zip(*(s.run(None, feeds) for s in sessions)):
        np.testing.assert_array_equal(a, b)
    small = calibrated[1]
    assert not small.with_name(small.name + ".data").exists() and branch_weight_bytes(onnx.load(str(small))) > 0


def test_shape_inference_runs_without_the_large_weights_and_gives_them_back(tiny_dit: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Shape inference serialises the model, which protobuf cannot do over 2 GB: it runs on a copy
    without the large weights, types every tensor as it would with them, and leaves the model as it was."""
    from fcpass.compiler import graphinfo
    from fcpass.compiler.static_shapes import needs_resolving, resolve_static_shapes

    model = onnx.load(str(tiny_dit))
    before = model.SerializeToString()
    with_weights = onnx.shape_inference.infer_shapes(model, data_prop=True)
    if needs_resolving(with_weights):  # the legacy export computes its chunks' sizes in the graph
        with_weights = resolve_static_shapes(with_weights)
    want = {v.name: v.type for v in with_weights.graph.value_info}
    monkeypatch.setattr(onnx_io, "_WEIGHTLESS_MIN_BYTES", 256)  # the tiny model's weights count as large
    light = onnx_io.weightless(model)
    stubs = [t for t in light.graph.initializer if t.external_data]
    assert len(stubs) > 10 and not any(t.raw_data for t in stubs)
    assert light.ByteSize() < len(before) - sum(len(t.raw_data) for t in model.graph.initializer
                                                if t.name in {s.name for s in stubs}) + 64 * len(stubs)
    for keep_weights in (True, False):
        inferred = graphinfo.infer_shapes(model, weights=keep_weights)
        assert model.SerializeToString() == before
        assert {v.name: v.type for v in inferred.graph.value_info} == want
    weights = {t.name: t for t in model.graph.initializer}
    assert {t.name: t.SerializeToString() for t in graphinfo.infer_shapes(model).graph.initializer} == {
        name: t.SerializeToString() for name, t in weights.items()}


def test_a_model_protobuf_cannot_size_is_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.protobuf.message import EncodeError

    class Huge:  # what protobuf does with a model over 2 GB: it raises rather than give the size
        def ByteSize(self) -> int:
            raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(onnx_io, "initializer_tensors", lambda model: [])
    assert onnx_io.over_proto_limit(Huge())
