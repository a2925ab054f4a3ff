"""Loading and saving ONNX models with clear errors and atomic writes.

Saving never leaves a half-written artefact: the model (and its external data, for models over
2 GB or when asked) is written to a temporary name in the destination folder and renamed into place.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import helper, shape_inference

from fcpass.contract.errors import FcpassError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)

# Protobuf cannot serialise a single message over 2 GiB; above this, weights go to external data.
_PROTO_LIMIT = 2**31 - 2**20


def over_proto_limit(model: onnx.ModelProto) -> bool:
    """Whether `model`, weights included, is too large for one protobuf message.

    Protobuf raises on sizing a message over 2 GiB (a DiT-XL/2 with its weights loaded) rather than
    returning the size, and takes seconds to do so: weights that alone pass the limit decide first.
    """
    if sum(tensor_nbytes(t) for t in initializer_tensors(model) if t.HasField("raw_data")) >= _PROTO_LIMIT:
        return True
    try:
        return model.ByteSize() >= _PROTO_LIMIT
    except EncodeError:
        return True


def load_model(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, turning every failure into one actionable FcpassError."""
    p = Path(path)
    if not p.exists():
        raise FcpassError(f"model file not found: {p}; check the path (fcpass export writes one from a checkpoint)")
    if p.is_dir():
        raise FcpassError(f"{p} is a directory, not an ONNX file; pass the path of the .onnx file inside it")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (protobuf raises several unrelated types for a non-ONNX file)
        raise FcpassError(
            f"{p} is not a readable ONNX model ({type(exc).__name__}); pass an .onnx file exported from the model"
        ) from None
    try:  # protobuf checks a string field's UTF-8 only when it is read: read them all now
        _read_strings(model)
    except UnicodeDecodeError:
        raise FcpassError(f"{p} is not a readable ONNX model (a name in it is not UTF-8: the file is damaged); "
                          "pass an .onnx file exported from the model") from None
    check_initializers(model, p)
    if not model.graph.node:
        raise FcpassError(f"{p} holds no graph nodes; it is not an exported model (re-export it with fcpass export)")
    # Checked whether or not the weights are read now: ONNX Runtime reads them later, and its error
    # for a missing file says only that the graph is invalid.
    check_external_data(model, p)
    if load_weights:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(p.parent))
    return model


_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}


def check_initializers(model: onnx.ModelProto, path: Path) -> None:
    """Every weight has a type ONNX defines, a shape of sizes >= 0 and, if stored inline, the bytes that shape
    takes: a damaged file shows here, not as a KeyError or a reshape error deep in a pass."""
    for t in initializer_tensors(model):
        bad = t.data_type not in _KNOWN_TYPES or any(d < 0 for d in t.dims)
        if not bad and t.HasField("raw_data") and t.data_type != onnx.TensorProto.STRING:
            try:
                bad = len(t.raw_data) != tensor_nbytes(t)
            except (KeyError, ValueError):  # a type numpy has no dtype for: leave it to the runtime
                bad = False
        if bad:
            raise FcpassError(f"{path} is damaged: its weight {t.name[:60]!r} has type {t.data_type}, shape "
                              f"{list(t.dims)[:6]} and {len(t.raw_data)} bytes, which do not agree; export the model "
                              "again or copy it again from where it was written")


def _read_strings(message: Any) -> None:
    """Read every string field of `message` and the messages inside it (weights' bytes are not strings)."""
    for fd, value in message.ListFields():
        if fd.type == fd.TYPE_MESSAGE:
            for m in value if fd.is_repeated else [value]:
                _read_strings(m)
        elif fd.type == fd.TYPE_STRING and any(isinstance(v, bytes) for v in (value if fd.is_repeated else [value])):
            # protobuf hands a proto2 string that is not UTF-8 over as bytes, which every str method then refuses
            raise UnicodeDecodeError("utf-8", b"", 0, 1, f"field {fd.name}")


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external data file the model at `path` names is beside it and long enough for its tensors."""
    needed: dict[str, int] = {}
    for tensor in _external_tensors(model):
        entry = {e.key: e.value for e in tensor.external_data}
        location = entry.get("location", "")
        needed[location] = max(needed.get(location, 0), int(entry.get("offset", 0)) + int(entry.get("length", 0)))
    for location, size in needed.items():
        data = path.parent / location
        if not data.is_file():
            raise FcpassError(f"{path} keeps its weights in {location}, which is not beside it in "
                              f"{path.parent.resolve()}; keep the two files together (copy or move both)")
        if data.stat().st_size < size:
            raise FcpassError(f"{data} holds {data.stat().st_size} bytes where {path.name} reads {size}: the copy was "
                              f"cut short; copy {location} again from where {path.name} was written")


_TYPE_CONFLICT = re.compile(r"node name: ([^)]*)\): \[TypeInferenceError\] Inferred elem type differs from existing "
                            r"elem type: \((\d+)\) vs \((\d+)\)")


def check_types(model: onnx.ModelProto, path: str) -> None:
    """Refuse a graph whose stored element types contradict what its nodes compute: neither ONNX
    Runtime nor TensorRT loads it, and its rewrite would load no better. Nothing else is refused here:
    a graph that shape inference cannot fully follow (custom ops, say) passes, as `infer_shapes` takes it."""
    try:
        shape_inference.infer_shapes(weightless(model), strict_mode=True)
    except shape_inference.InferenceError as exc:
        found = _TYPE_CONFLICT.search(str(exc))
        if found is None:
            return
        node, computed, stored = found.group(1), *(onnx.TensorProto.DataType.Name(int(t)) for t in found.groups()[1:])
        op = next((n.op_type for n in model.graph.node if n.name == node), "node")
        # onnxconverter-common's float16 conversion retypes a Cast's output but leaves its `to` attribute.
        fix = ("convert it to fp16 again with onnxconverter-common's node_block_list naming the Cast nodes"
               if op == "Cast" and "FLOAT16" in (computed, stored) else "re-export the model")
        raise FcpassError(f"{path} does not load: its {op} {node} computes {computed} where the graph stores {stored}; "
                          f"{fix}") from None


def check_distinct(input_path: str | Path, output_path: str | Path) -> None:
    """Refuse to write over the input: an interrupted or failed run would lose the user's model."""
    src, dst = Path(input_path).resolve(), Path(output_path).resolve()
    if src == dst:
        raise FcpassError(f"output {output_path} is the input model; choose another -o path (e.g. model.fc.onnx)")


def check_file_output(path: str | Path) -> None:
    """Refuse, before any work, a file output that could not be written: a folder, a path through a
    file, or a folder this process may not write in (`atomic_path` checks again when it writes)."""
    dst = Path(path)
    if dst.is_dir():
        raise FcpassError(f"output {dst} is a directory; pass the path of a file to write (inside it or elsewhere)")
    folder = dst.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise FcpassError(f"cannot write {dst}: part of the path is a file, not a folder; choose an output path in a writable folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FcpassError(f"cannot write {dst}: {folder} is not writable; choose an output path in a writable folder")


def _temp_prefix(dst: Path) -> str:
    """Temporary names beside `dst` carry the writer's process id, so a later writer can tell a dead one's."""
    return f".{dst.name}.fcpass-{os.getpid()}-"


def clean_stale(dst: Path) -> None:
    """Remove what a writer of `dst` killed mid-write left beside it (`.NAME.fcpass-PID-*.tmp` / `.old` of a
    process that no longer runs): a kill (SIGKILL, out of memory) skips every cleanup, and the names are
    hidden, so nothing reads them meanwhile. Files of writers still running are left alone."""
    for p in dst.parent.glob(f".{glob.escape(dst.name)}.fcpass-*-*"):
        found = re.match(r"fcpass-(\d+)-", p.name[len(dst.name) + 2:])
        if found is None or not p.name.endswith((".tmp", ".old")) or _alive(int(found.group(1))):
            continue
        log.debug("removing %s, left by a writer of %s that was killed", p, dst)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    dst = Path(path)
    check_file_output(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dst)
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(dst), suffix=suffix + ".tmp", dir=dst.parent)
    except OSError as exc:  # a parent is a file, the folder is not writable, ...
        not_folder = isinstance(exc, (FileExistsError, NotADirectoryError))
        why = "part of the path is a file, not a folder" if not_folder else exc.strerror or exc
        raise FcpassError(f"cannot write {dst}: {why}; choose an output path in a writable folder") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; outputs get the usual mode
        os.replace(tmp, dst)
    except OSError as exc:  # disk full, quota, ... while writing or renaming into place
        raise FcpassError(
            f"could not write {dst}: {exc.strerror or exc}; free some space or choose another output path"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_dir_output(path: str | Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse, before any work, a folder output that exists and is not a previous artefact of its kind."""
    dst = Path(path)
    if dst.exists() and not dst.is_dir():
        raise FcpassError(f"output {dst} is an existing file; this writes {what}: choose a new -o path")
    if dst.is_dir() and not ours(dst) and any(dst.iterdir()):
        raise FcpassError(f"output {dst} is a folder that is not {what}; choose a new -o path")


@contextmanager
def atomic_dir(path: str | Path, ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.

    A previous artefact at `path` (`ours(path)`) is replaced: renamed aside, then deleted, and put
    back if the final rename fails. Anything else there is refused before work starts; `what` names
    the artefact in that error ("a segments folder").
    """
    dst = Path(path)
    check_dir_output(dst, ours, what)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dst)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), suffix=".tmp", dir=dst.parent))
    except OSError as exc:
        why = "part of the path is a file, not a folder" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise FcpassError(f"cannot write {dst}: {why}; choose an output path in a writable folder") from None
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes the folder private; outputs get the usual mode
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), suffix=".old", dir=dst.parent))
            os.replace(dst, old / "artefact")
        try:
            os.replace(tmp, dst)
        except OSError:
            if old is not None:
                os.replace(old / "artefact", dst)
            raise
    except OSError as exc:
        raise FcpassError(f"could not write {dst}: {exc.strerror or exc}; free some space or choose another output path") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | Path, external: bool = False) -> Path:
    """Write `model` atomically; with `external`, and for models over 2 GB, its weights go to
    `<name>.data` beside it."""
    dst = Path(path)
    if not external and not over_proto_limit(model):
        with atomic_path(dst) as tmp:
            onnx.save_model(model, str(tmp))
        return dst
    data_name = dst.name + ".data"
    with atomic_path(dst.parent / data_name) as tmp_data, atomic_path(dst) as tmp:
        # The model refers to its data file by name, so write the data under the temporary name
        # and then point the references at the final one before the model itself is written.
        # onnx refuses a data file name that exists relative to the working directory (it checks
        # there, not beside the model), so the reserved name is freed first.
        tmp_data.unlink()
        onnx.save_model(
            model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name
        )
        for tensor in _external_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        onnx.save_model(model, str(tmp))
    log.info("wrote %s with external data %s", dst, data_name)
    return dst


def data_file(path: str | Path) -> Path | None:
    """The external data file the model at `path` keeps its weights in, if any."""
    for tensor in _external_tensors(load_model(path, load_weights=False)):
        for entry in tensor.external_data:
            if entry.key == "location":
                return Path(path).parent / entry.value
    return None


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def replace_marked_block(path: Path, text: str, start: str, end: str) -> None:
    """Replace what stands between the `start` and `end` markers of a text file (atomically)."""
    old = path.read_text()
    if start not in old or end not in old:
        raise FcpassError(f"{path} has no {start} ... {end} block to replace; add the two markers")
    head, rest = old.split(start, 1)
    with atomic_path(path, suffix=path.suffix or ".txt") as tmp:
        tmp.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")


# --- walking a model's weights ---------------------------------------------------------------

def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds as attributes (If's branches, Loop's and Scan's bodies)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


# A weight this large is never a shape or an axis, the only tensor values shape inference reads.
_WEIGHTLESS_MIN_BYTES = 2**20
WEIGHTLESS = "fcpass:weightless"


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large weights hold no data, marked external as a model loaded without its
    external data is.

    Shape inference serialises the whole model, and protobuf cannot serialise one over 2 GB (a
    DiT-XL/2 with its weights); without them the graph is a few MB. The main graph's large weights
    are never copied; those in subgraphs (a compiled graph's) are copied with their nodes, then dropped.
    """
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field.name, value)
    for t in model.graph.initializer:
        if _large(t):
            _stub(light.graph.initializer.add(), t)
        else:
            light.graph.initializer.add().CopyFrom(t)
    for t in initializer_tensors(light):
        if _large(t):
            t.ClearField("raw_data")
            _stub(t, t)
    return light


def _large(t: onnx.TensorProto) -> bool:
    return t.HasField("raw_data") and tensor_nbytes(t) >= _WEIGHTLESS_MIN_BYTES


def _copy_field(dst: Any, name: str, value: Any) -> None:
    target = getattr(dst, name)
    if hasattr(target, "extend"):
        target.extend(value)
    elif hasattr(target, "CopyFrom"):
        target.CopyFrom(value)
    else:
        setattr(dst, name, value)


def _stub(stub: onnx.TensorProto, t: onnx.TensorProto) -> None:
    """Make `stub` `t` without data: its name, type and shape, its data marked external."""
    if stub is not t:
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    stub.external_data.add(key="location", value=WEIGHTLESS)


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """A tensor's data size from its shape and type (reading `raw_data` or `ByteSize` copies the data)."""
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def initializer_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of `model`, in the main graph and in every subgraph."""
    def walk(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for n in g.node:
            for sub in subgraphs(n):
                yield from walk(sub)
    return walk(model.graph)
