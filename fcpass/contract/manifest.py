"""The segments artefact's format: a folder of If-free segment graphs and `manifest.json`, its step program.

Written by the segments lowering (`fcpass.compiler.passes.lower_segments`) and read by the runtimes that run it
(`runtimes.segments_backend`, `runtimes.trt_segments`) and by the engine build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from fcpass.contract.errors import FcpassError, first_clause
from fcpass.contract.plan import PLAN_KEY

MANIFEST = "manifest.json"
FORMAT = "fcpass.segments"
FORMAT_VERSION = 1


def is_segments_artefact(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise FcpassError(f"cannot read {p} ({type(exc).__name__}); re-run fcpass optimize --lowering segments") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise FcpassError(f"{p} is not an fcpass segments manifest of format {FORMAT_VERSION}; "
                          "re-run fcpass optimize --lowering segments")
    try:  # its step program and interface, read as the backends read them
        files = segment_files(manifest)
        _check_steps(manifest["steps"])
        interface_model(manifest)
        names = [manifest["inputs"], manifest["outputs"]]
        if not all(isinstance(f, str) for f in files) or not all(isinstance(v["name"], str) for vs in names for v in vs):
            raise TypeError("a name is no string")
        _check_dataflow(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise FcpassError(f"{p} is damaged ({type(exc).__name__}: {first_clause(exc, 100)}); re-run fcpass optimize "
                          "--lowering segments") from None
    return manifest


def _check_steps(steps: Any) -> None:
    """Every step of a step program has the fields of its kind, of the types the backends read."""
    def names(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(n, str) for n in v)

    if not isinstance(steps, list):
        raise TypeError("the steps are no list")
    for s in steps:
        kind = s["kind"]
        if kind == "segment" and not (isinstance(s["file"], str) and names(s["inputs"]) and names(s["outputs"])):
            raise TypeError("a segment step's file, inputs or outputs")
        if kind == "alias" and not all(names(p) and len(p) == 2 for p in s["pairs"]):
            raise TypeError("an alias step's pairs")
        if kind == "branch":
            if not isinstance(s["cond"], str) or not isinstance(s.get("region"), (str, type(None))):
                raise TypeError("a branch step's cond or region")
            _check_steps(s["then"]["steps"])
            _check_steps(s["else"]["steps"])


def _check_dataflow(manifest: dict[str, Any]) -> None:
    """Every value a step reads is an input or written by a step before it, on every path through the branches,
    and so is every output: a step program that reads what nothing wrote is refused before anything runs."""
    def walk(steps: list[dict[str, Any]], known: set[str]) -> set[str]:
        known = set(known)
        for s in steps:
            if s["kind"] == "segment":
                reads, writes = s["inputs"], s["outputs"]
            elif s["kind"] == "alias":
                reads, writes = [src for _, src in s["pairs"]], [dst for dst, _ in s["pairs"]]
            elif s["kind"] == "branch":
                reads, writes = [s["cond"]], []
            else:
                raise ValueError(f"unknown step kind {s['kind']!r}")
            if missing := [n for n in reads if n not in known]:
                raise ValueError(f"step {s.get('file') or s['kind']} reads {missing[0]!r}, which nothing before it writes")
            if s["kind"] == "branch":
                known |= walk(s["then"]["steps"], known) & walk(s["else"]["steps"], known)
            known |= set(writes)
        return known

    written = walk(manifest["steps"], {v["name"] for v in manifest["inputs"]})
    if missing := [v["name"] for v in manifest["outputs"] if v["name"] not in written]:
        raise ValueError(f"output {missing[0]!r} is written by no step")


def segment_files(manifest: dict[str, Any]) -> list[str]:
    """Every segment file of the manifest's step program, in program order."""
    def walk(steps: list[dict[str, Any]]) -> list[str]:
        out: list[str] = []
        for s in steps:
            if s["kind"] == "segment":
                out.append(s["file"])
            elif s["kind"] == "branch":
                out += walk(s["then"]["steps"]) + walk(s["else"]["steps"])
        return out

    return walk(manifest["steps"])


def interface_model(manifest: dict[str, Any]) -> onnx.ModelProto:
    """A node-less model with the If graph's inputs, outputs and metadata (for roles and the plan)."""
    def vi(v: dict[str, Any]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(v["name"], v["elem_type"], v["shape"])

    graph = helper.make_graph([], "interface", [vi(v) for v in manifest["inputs"]], [vi(v) for v in manifest["outputs"]])
    model = helper.make_model(graph)
    for key, value in manifest.get("metadata", {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if manifest.get("plan") is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = PLAN_KEY, json.dumps(manifest["plan"])
    return model
