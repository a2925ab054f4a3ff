"""ONNX files, external data, .npy embeddings, segments manifests and engine indexes, damaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcpass.contract.onnx_io import load_model, save_model
from tests.fuzz.cases import GRAPH_EDITS, edit_graph
from tests.fuzz.conftest import copy_to
from tests.fuzz.harness import case_dir, check, check_cli, examples
from tests.fuzz.mutate import damaged_bytes, damaged_json


@pytest.fixture(scope="module")
def tiny_bytes(tiny_onnx: Path) -> bytes:
    return tiny_onnx.read_bytes()


@settings(max_examples=examples(1500))
@given(data=st.data())
def test_load_damaged_protobuf(tiny_bytes: bytes, data: st.DataObject) -> None:
    damaged = data.draw(damaged_bytes(tiny_bytes))
    with case_dir() as d:
        path = d / "m.onnx"
        path.write_bytes(damaged)
        check("onnx.load", lambda: load_model(path), inputs=[path], folder=d)


@settings(max_examples=examples(120))
@given(data=st.data())
def test_inspect_damaged_protobuf(tiny_bytes: bytes, data: st.DataObject) -> None:
    damaged = data.draw(damaged_bytes(tiny_bytes))
    with case_dir() as d:
        path = d / "m.onnx"
        path.write_bytes(damaged)
        check_cli("onnx.inspect", ["inspect", str(path)], inputs=[path], folder=d)


@pytest.fixture(scope="module")
def external(fuzz_root: Path, tiny_onnx: Path) -> Path:
    out = fuzz_root / "external" / "m.onnx"
    out.parent.mkdir()
    save_model(onnx.load(str(tiny_onnx)), out, external=True)
    return out


@settings(max_examples=examples(150))
@given(cut=st.floats(0, 1, exclude_max=True), how=st.sampled_from(["cut", "missing", "renamed", "grown"]))
def test_external_data_damaged(external: Path, cut: float, how: str) -> None:
    with case_dir() as d:
        model, data = copy_to(external, d), copy_to(external.parent / "m.onnx.data", d)
        if how == "cut":
            data.write_bytes(data.read_bytes()[: int(cut * data.stat().st_size)])
        elif how == "missing":
            data.unlink()
        elif how == "renamed":
            data.rename(d / "other.data")
        else:
            data.write_bytes(data.read_bytes() + b"\0" * int(cut * 100))
        check_cli("onnx.external", ["inspect", str(model)], inputs=[model], folder=d)


@settings(max_examples=examples(60))
@given(data=st.data(), command=st.sampled_from(["inspect", "optimize", "sample"]))
def test_damaged_graph(tiny_onnx: Path, data: st.DataObject, command: str) -> None:
    model = onnx.load(str(tiny_onnx))
    for edit in data.draw(st.lists(st.sampled_from(GRAPH_EDITS), min_size=1, max_size=2)):
        edit_graph(model, edit, data.draw)
    with case_dir() as d:
        path = d / "m.onnx"
        onnx.save(model, str(path))
        argv = {"inspect": ["inspect", str(path)], "optimize": ["optimize", str(path), "-o", str(d / "m.fc.onnx")],
                "sample": ["sample", str(path), "--steps", "1", "--class", "1", "--uncond-class", "10",
                           "--scheduler-config", str(Path("models/digits/scheduler_config.json").resolve())]}[command]
        check_cli("onnx.graph", argv, inputs=[path], folder=d, outputs=("m.fc.onnx",))


ARRAYS = st.one_of(
    st.tuples(st.sampled_from([(), (3,), (1, 4, 8), (2, 4, 8), (1, 1, 4, 8), (0, 4, 8), (1, 0, 8)]),
              st.sampled_from(["float32", "float16", "float64", "int64", "bool", "complex64", "uint8", "<U2"]),
              st.sampled_from([None, "nan", "inf", "big"])),
)


def make_array(shape: tuple, dtype: str, poison: str | None) -> np.ndarray:
    a = np.ones(shape, dtype=dtype) if dtype != "<U2" else np.full(shape, "ab")
    if poison and a.size and a.dtype.kind in "fc":
        a.flat[0] = {"nan": np.nan, "inf": np.inf, "big": 1e30}[poison]
    return a


@settings(max_examples=examples(800))
@given(spec=ARRAYS, damage=st.one_of(st.none(), st.integers(0, 200)), rank=st.sampled_from([2, 3]))
def test_npy_embeddings(spec: tuple, damage: int | None, rank: int) -> None:
    from fcpass.cli.common import embeddings

    with case_dir() as d:
        path = d / "e.npy"
        np.save(path, make_array(*spec))
        if damage is not None:
            path.write_bytes(path.read_bytes()[:damage])
        check("npy.embeddings", lambda: embeddings(path, "prompt embeddings", rank=rank), inputs=[path], folder=d)


@settings(max_examples=examples(150))
@given(a=ARRAYS, b=ARRAYS)
def test_npy_compare(a: tuple, b: tuple) -> None:
    with case_dir() as d:
        pa, pb = d / "a.npy", d / "b.npy"
        np.save(pa, make_array(*a))
        np.save(pb, make_array(*b))
        check_cli("npy.compare", ["compare", str(pa), str(pb)], inputs=[pa, pb], folder=d)


@pytest.fixture(scope="module")
def manifest(digits_segments: Path) -> dict:
    return json.loads((digits_segments / "manifest.json").read_text())


@settings(max_examples=examples(500))
@given(data=st.data())
def test_segments_manifest(digits_segments: Path, manifest: dict, data: st.DataObject) -> None:
    from fcpass.contract.manifest import interface_model, read_manifest, segment_files

    doc = data.draw(damaged_json(manifest))
    with case_dir() as d:
        seg = d / "m.seg"
        seg.mkdir()
        (seg / "manifest.json").write_text(json.dumps(doc))

        def read() -> None:
            m = read_manifest(seg)
            segment_files(m)
            interface_model(m)

        check("segments.manifest", read, inputs=[seg], folder=d)


@settings(max_examples=examples(60))
@given(data=st.data())
def test_sample_damaged_segments(digits_segments: Path, manifest: dict, data: st.DataObject) -> None:
    doc = data.draw(damaged_json(manifest))
    with case_dir() as d:
        seg = copy_to(digits_segments, d)
        (seg / "manifest.json").write_text(json.dumps(doc))
        check_cli("segments.sample", ["sample", str(seg), "--steps", "2", "--class", "1", "--policy", "fora:regions=stack"],
                  inputs=[seg], folder=d)


@settings(max_examples=examples(400))
@given(data=st.data())
def test_engines_index(digits_segments: Path, data: st.DataObject) -> None:
    from fcpass.contract.engines import ENGINES_FORMAT, ENGINES_INDEX, manifest_digest, read_engines_index

    index = {"format": ENGINES_FORMAT, "format_version": 1, "manifest_sha256": manifest_digest(digits_segments),
             "engines": {"head.onnx": "head.plan"}}
    doc = data.draw(damaged_json(index))
    with case_dir() as d:
        (d / ENGINES_INDEX).write_text(json.dumps(doc))
        check("engines.index", lambda: read_engines_index(d, digits_segments), inputs=[d / ENGINES_INDEX], folder=d)


# --- the minimal inputs of the crashes the fuzzer found ---------------------------------------------------------

def test_regression_manifest_not_an_object(digits_segments: Path) -> None:
    from fcpass.contract.errors import FcpassError
    from fcpass.contract.manifest import read_manifest

    with case_dir() as d:
        (d / "manifest.json").write_text("null")  # AttributeError: 'NoneType' object has no attribute 'get'
        with pytest.raises(FcpassError, match="not an fcpass segments manifest"):
            read_manifest(d)
        doc = json.loads((digits_segments / "manifest.json").read_text())
        del doc["steps"][0]["inputs"]  # KeyError in the backend's compile_program
        (d / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(FcpassError, match="damaged"):
            read_manifest(d)


def test_regression_engines_index_not_an_object(digits_segments: Path) -> None:
    from fcpass.contract.engines import ENGINES_INDEX, read_engines_index
    from fcpass.contract.errors import FcpassError

    with case_dir() as d:
        (d / ENGINES_INDEX).write_text("[]")  # AttributeError: 'list' object has no attribute 'get'
        with pytest.raises(FcpassError, match="not an fcpass engines index"):
            read_engines_index(d, digits_segments)


@pytest.mark.parametrize("array", [np.full((1, 2, 3), "ab"), np.full((1, 2, 3), np.nan, dtype=np.float32),
                                   np.ones((1, 1, 2, 3), dtype=np.float32)], ids=["strings", "nan", "rank4"])
def test_regression_embeddings(array: np.ndarray) -> None:
    from fcpass.cli.common import embeddings
    from fcpass.contract.errors import FcpassError

    with case_dir() as d:
        np.save(d / "e.npy", array)  # strings: ValueError in astype; NaN and rank 4 were taken as they were
        with pytest.raises(FcpassError):
            embeddings(d / "e.npy", "prompt embeddings", rank=3)


def test_regression_unknown_elem_type(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    model.graph.input[0].type.tensor_type.elem_type = 30  # KeyError: 30 in roles.value_spec
    with case_dir() as d:
        onnx.save(model, str(d / "m.onnx"))
        assert check_cli("onnx.graph", ["inspect", str(d / "m.onnx")]) == "error"


def test_regression_damaged_weight_and_name(tiny_onnx: Path) -> None:
    from fcpass.contract.errors import FcpassError

    model = onnx.load(str(tiny_onnx))
    model.graph.initializer[0].data_type = 33  # KeyError: 33 in graphinfo.tensor_nbytes
    model.graph.node[0].name = "NODEZERO"
    with case_dir() as d:
        onnx.save(model, str(d / "m.onnx"))
        with pytest.raises(FcpassError, match="damaged"):
            load_model(d / "m.onnx")
        model.graph.initializer[0].data_type = onnx.TensorProto.FLOAT
        # a name that is not UTF-8: protobuf hands it over as bytes (TypeError in str.startswith in discover)
        (d / "m.onnx").write_bytes(model.SerializeToString().replace(b"NODEZERO", b"\x80ODEZERO"))
        with pytest.raises(FcpassError, match="not UTF-8"):
            load_model(d / "m.onnx")


def test_regression_matmul_without_inputs(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    matmul = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm"))
    del matmul.input[:]  # IndexError in graphinfo.node_macs
    with case_dir() as d:
        onnx.save(model, str(d / "m.onnx"))
        check_cli("onnx.graph", ["inspect", str(d / "m.onnx")])


def test_regression_constant_without_output(tiny_onnx: Path) -> None:
    from onnx import helper, numpy_helper

    model = onnx.load(str(tiny_onnx))
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(1, np.float32)))
    del const.output[:]  # IndexError in graphinfo.GraphIndex.value_types
    model.graph.node.insert(0, const)
    with case_dir() as d:
        onnx.save(model, str(d / "m.onnx"))
        check_cli("onnx.graph", ["inspect", str(d / "m.onnx")])


def test_regression_inputs_disagree_on_batch(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    t = next(v for v in model.graph.input if v.name == "latent")
    t.type.tensor_type.shape.dim[0].dim_value = 1  # RuntimeError from ONNX Runtime: timestep's batch is 2
    with case_dir() as d:
        onnx.save(model, str(d / "m.onnx"))
        argv = ["sample", str(d / "m.onnx"), "--steps", "1", "--class", "1", "--uncond-class", "10",
                "--scheduler-config", str(Path("models/digits/scheduler_config.json").resolve())]
        check_cli("onnx.graph", argv)


def test_regression_npy_header_cut_inside_its_dict() -> None:
    """Found by the coverage-guided target: numpy tokenizes the header, and a dict left open raised TokenError."""
    from fcpass.cli.common import embeddings
    from fcpass.contract.errors import FcpassError

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3"  # no closing ), }
    with case_dir() as d:
        (d / "e.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 24)
        with pytest.raises(FcpassError, match="could not read .* as a .npy array"):
            embeddings(d / "e.npy", "prompt embeddings", rank=3)
