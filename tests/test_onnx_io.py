"""Model I/O: atomic writes, and the external-data path that models over 2 GB take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fcpass import onnx_io
from fcpass.errors import FcpassError
from tests.conftest import tiny_feeds


def test_large_models_are_written_with_external_data(tiny_dit: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_io, "_PROTO_LIMIT", 1024)  # treat the tiny model as "over 2 GB"
    out = tmp_path / "big.onnx"
    onnx_io.save_model(onnx.load(str(tiny_dit)), out)
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temp files
    feeds = tiny_feeds(0)
    ref = ort.InferenceSession(str(tiny_dit), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, ref)


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
    from fcpass.onnx_io import replace_marked_block

    doc = tmp_path / "README.md"
    doc.write_text("head\n<!-- a -->\nold\n<!-- b -->\ntail\n")
    replace_marked_block(doc, "new\n", "<!-- a -->", "<!-- b -->")
    assert doc.read_text() == "head\n<!-- a -->\nnew\n<!-- b -->\ntail\n"
    with pytest.raises(FcpassError, match="no <!-- c --> ... <!-- b --> block"):
        replace_marked_block(doc, "x", "<!-- c -->", "<!-- b -->")
    assert doc.read_text() == "head\n<!-- a -->\nnew\n<!-- b -->\ntail\n"
