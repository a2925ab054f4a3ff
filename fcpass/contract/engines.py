"""The TensorRT artefacts' formats: an engine's I/O as TensorRT reports it, and the engines folder a segments
folder builds into (`engines.json`: segment file -> engine file, tied to the manifest it was built from).

TensorRT itself is optional: `import_tensorrt` imports it where an engine is built or run, and says how to
install it where it is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fcpass.contract.errors import FcpassError
from fcpass.contract.manifest import MANIFEST

NOT_INSTALLED = "TensorRT is not installed: pip install 'fcpass[trt]' (needs NVIDIA's package index and a GPU)"

ENGINES_INDEX = "engines.json"
ENGINES_FORMAT = "fcpass-tensorrt-segments"
ENGINES_FOLDER = "a folder of fcpass engines (a segments folder builds into a folder)"


@dataclass
class IOTensor:
    name: str
    mode: str  # INPUT or OUTPUT
    dtype: str
    shape: tuple[int, ...]


def engine_file(segment: str) -> str:
    return segment.removesuffix(".onnx") + ".engine"


def manifest_digest(segments: Path) -> str:
    return hashlib.sha256((segments / MANIFEST).read_bytes()).hexdigest()


def is_engines_folder(path: str | Path) -> bool:
    return (Path(path) / ENGINES_INDEX).is_file()


def read_engines_index(engines: Path, segments: Path) -> dict[str, str]:
    """segment file -> engine file, from an engines folder built from the segments folder `segments`."""
    rebuild = f"fcpass build {segments} -o {engines}"
    p = engines / ENGINES_INDEX
    if not p.is_file():
        raise FcpassError(f"{engines} is not a folder of engines built from a segments folder (no {ENGINES_INDEX}); "
                          f"build one with {rebuild}")
    try:
        index = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise FcpassError(f"cannot read {p} ({type(exc).__name__}); rebuild the engines with {rebuild}") from None
    if not isinstance(index, dict) or index.get("format") != ENGINES_FORMAT or index.get("format_version") != 1:
        raise FcpassError(f"{p} is not an fcpass engines index of format 1; rebuild the engines with {rebuild}")
    if index.get("manifest_sha256") != manifest_digest(segments):
        raise FcpassError(f"the engines in {engines} were not built from {segments} (its manifest differs); "
                          f"rebuild them with {rebuild}")
    table = index.get("engines")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in (*table, *table.values())):
        raise FcpassError(f"{p} is damaged (its engines are no map of segment to engine file); rebuild the engines "
                          f"with {rebuild}")
    return dict(table)


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError:
        raise FcpassError(NOT_INSTALLED) from None
    return trt


def io_tensor(engine: Any, index: int) -> IOTensor:
    name = engine.get_tensor_name(index)
    return IOTensor(
        name=name,
        mode=_enum_name(engine.get_tensor_mode(name)),
        dtype=_enum_name(engine.get_tensor_dtype(name)),
        shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
    )


def _enum_name(value: Any) -> str:
    return getattr(value, "name", None) or str(value).rsplit(".", 1)[-1]
