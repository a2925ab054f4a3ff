"""Sampling through a segments folder: a valid manifest, then its segment files or its step program damaged.

Unlike `test_fuzz_files.test_segments_manifest` (the manifest's reader), these cases keep the folder close
enough to valid that most reach sampling: a segment file cut short, swapped for another or with its graph
edited; a step reading or writing another value's name, a branch's condition or region changed, the
interface's or the state's shapes and types changed. The property is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.cases import GRAPH_EDITS, edit_graph
from tests.fuzz.conftest import copy_to
from tests.fuzz.harness import LAST_ERROR, case_dir, check_cli, examples
from tests.fuzz.mutate import ODD_SCALARS, damaged_bytes

# Policies the folder (stack and tail regions, calibrated) runs; thresholds high enough that regions skip.
POLICIES = ["none", "fora:regions=stack,interval=2,warmup=1", "fbcache:threshold=0.5", "teacache:threshold=2",
            "magcache:threshold=0.5"]


def steps_of(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every step of a step program, those inside branches too, in program order."""
    out: list[dict[str, Any]] = []
    for s in steps:
        out.append(s)
        if s.get("kind") == "branch":
            out += steps_of(s["then"]["steps"]) + steps_of(s["else"]["steps"])
    return out


def value_names(manifest: dict[str, Any]) -> list[str]:
    """Every value name the manifest speaks of: what a damaged step most plausibly reads instead."""
    names = {v["name"] for v in manifest["inputs"] + manifest["outputs"]}
    for s in steps_of(manifest["steps"]):
        names |= set(s.get("inputs", [])) | set(s.get("outputs", [])) | ({s["cond"]} if "cond" in s else set())
    return sorted(names)


@pytest.fixture(scope="module")
def manifest(digits_segments: Path) -> dict[str, Any]:
    return json.loads((digits_segments / "manifest.json").read_text())


def sample(seg: Path, policy: str) -> list[str]:
    return ["sample", str(seg), "--steps", "4", "--class", "1", "--policy", policy]


def test_the_undamaged_folder_samples_with_every_policy(digits_segments: Path) -> None:
    """The baseline: every policy the cases draw samples the folder as written (so a case's error is its damage's)."""
    for policy in POLICIES:
        assert check_cli("segments.baseline", sample(digits_segments, policy)) == "worked", policy


@settings(max_examples=examples(40))
@given(data=st.data(), policy=st.sampled_from(POLICIES),
       how=st.sampled_from(["bytes", "swap", "graph", "graph", "missing"]))
def test_sample_with_a_damaged_segment_file(digits_segments: Path, manifest: dict, data: st.DataObject, policy: str,
                                            how: str) -> None:
    files = sorted({s["file"] for s in steps_of(manifest["steps"]) if s["kind"] == "segment"})
    with case_dir() as d:
        seg = copy_to(digits_segments, d)
        target = seg / data.draw(st.sampled_from(files), label="file")
        if how == "bytes":
            target.write_bytes(data.draw(damaged_bytes(target.read_bytes())))
        elif how == "swap":
            other = data.draw(st.sampled_from([f for f in files if seg / f != target]), label="other")
            target.write_bytes((seg / other).read_bytes())
        elif how == "graph":
            model = onnx.load(str(target))
            for edit in data.draw(st.lists(st.sampled_from(GRAPH_EDITS), min_size=1, max_size=2), label="edits"):
                edit_graph(model, edit, data.draw)
            onnx.save(model, str(target))
        else:
            target.unlink()
        check_cli("segments.files", sample(seg, policy), inputs=[seg], folder=d)


@st.composite
def damaged_program(draw: st.DrawFn, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with one to three plausible edits to its step program, interface or state."""
    doc = json.loads(json.dumps(manifest))
    names = value_names(doc) + ["no_such_value"]
    for _ in range(draw(st.integers(1, 3))):
        steps = steps_of(doc["steps"])
        kind = draw(st.sampled_from(["name", "name", "names", "file", "branch", "order", "interface", "state"]))
        if kind in ("name", "names"):
            step = draw(st.sampled_from([s for s in steps if s["kind"] == "segment"]))
            side = step[draw(st.sampled_from(["inputs", "outputs"]))]
            if kind == "name" and side:
                side[draw(st.integers(0, len(side) - 1))] = draw(st.sampled_from(names))
            elif side and draw(st.booleans()):
                del side[draw(st.integers(0, len(side) - 1))]
            else:
                side.append(draw(st.sampled_from(names)))
        elif kind == "file":
            segs = [s for s in steps if s["kind"] == "segment"]
            draw(st.sampled_from(segs))["file"] = draw(st.sampled_from([s["file"] for s in segs]))
        elif kind == "branch":
            branches = [s for s in steps if s["kind"] == "branch"]
            b = draw(st.sampled_from(branches))
            field = draw(st.sampled_from(["swap", "cond", "region", "outputs"]))
            if field == "swap":
                b["then"], b["else"] = b["else"], b["then"]
            elif field == "cond":
                b["cond"] = draw(st.sampled_from(names))
            elif field == "region":
                b["region"] = draw(st.sampled_from([None, "stack", "tail", "blocks", "x"]))
            else:
                b["outputs"] = draw(st.lists(st.sampled_from(names), max_size=2))
        elif kind == "order":
            top = doc["steps"]
            i, j = draw(st.integers(0, len(top) - 1)), draw(st.integers(0, len(top) - 1))
            top[i], top[j] = top[j], top[i]
        elif kind == "interface":
            v = draw(st.sampled_from(doc["inputs"] + doc["outputs"]))
            field = draw(st.sampled_from(["elem_type", "shape", "dim", "name"]))
            if field == "elem_type":
                v["elem_type"] = draw(st.sampled_from([0, 2, 6, 7, 9, 10, 11, 16]))
            elif field == "shape":
                v["shape"] = draw(st.sampled_from([[], [1], [2, 64], [1, 2, 3, 4, 5]]))
            elif field == "dim" and v["shape"]:
                v["shape"][draw(st.integers(0, len(v["shape"]) - 1))] = draw(st.sampled_from([0, 1, 3, 1000, -1, "N"]))
            else:
                v["name"] = draw(st.sampled_from(names))
        else:
            state = draw(st.sampled_from(doc["plan"]["states"]))
            field = draw(st.sampled_from(["shape", "dtype", "next", "source", "region"]))
            state[field] = draw(st.one_of(st.sampled_from({"shape": [[2, 64, 64], [1, 64, 128], [], [2, 64, 128, 1]],
                                                            "dtype": ["float16", "int64", "bool", "x"]}.get(field, names)),
                                          ODD_SCALARS))
    return doc


@settings(max_examples=examples(60))
@given(data=st.data(), policy=st.sampled_from(POLICIES))
def test_sample_with_a_damaged_step_program(digits_segments: Path, manifest: dict, data: st.DataObject,
                                             policy: str) -> None:
    doc = data.draw(damaged_program(manifest))
    with case_dir() as d:
        seg = copy_to(digits_segments, d)
        (seg / "manifest.json").write_text(json.dumps(doc))
        check_cli("segments.program", sample(seg, policy), inputs=[seg], folder=d)


# --- the minimal inputs of the crashes these cases found ---------------------------------------------------------

def with_manifest(src: Path, folder: Path, edit: Any) -> Path:
    seg = copy_to(src, folder)
    doc = json.loads((seg / "manifest.json").read_text())
    edit(doc)
    (seg / "manifest.json").write_text(json.dumps(doc))
    return seg


def test_regression_a_step_reads_what_nothing_wrote(digits_segments: Path) -> None:
    from fcpass.contract.errors import FcpassError
    from fcpass.contract.manifest import read_manifest

    def unwritten(doc: dict) -> None:
        doc["steps"][-1]["inputs"][0] = "no_such_value"  # KeyError in runtimes.segments_backend._run_numpy, mid-sampling

    def misread(doc: dict) -> None:  # a value that exists, but not one the segment takes: ONNX Runtime's InvalidArgument
        doc["steps"][-1]["inputs"][0] = "latent"

    with case_dir() as d:
        with pytest.raises(FcpassError, match="reads 'no_such_value', which nothing before it writes"):
            read_manifest(with_manifest(digits_segments, d / "a", unwritten))
        assert check_cli("segments.program", sample(with_manifest(digits_segments, d / "b", misread), "none")) == "error"
        assert "does not match its step in the manifest" in LAST_ERROR[0]


def test_regression_a_latent_of_another_rank(digits_segments: Path) -> None:
    def flat(doc: dict) -> None:
        doc["inputs"][0]["shape"] = [2, 64]  # IndexError in runtimes.sampler.sample (shape[-2])

    with case_dir() as d:
        seg = with_manifest(digits_segments, d, flat)
        assert check_cli("segments.program", sample(seg, "none")) == "error"
        assert "latent input latent [2, 64]" in LAST_ERROR[0]


def test_regression_a_probe_state_in_no_region(digits_segments: Path) -> None:
    def stray(doc: dict) -> None:
        (state,) = [st for st in doc["plan"]["states"] if st["kind"] == "mod"]
        state["region"] = "fc.thr_eff"  # KeyError in runtimes.state.live_states, before the first step

    with case_dir() as d:
        seg = with_manifest(digits_segments, d, stray)
        assert check_cli("segments.program", sample(seg, "none")) == "error"
        assert "is of kind 'mod' in region 'fc.thr_eff'" in LAST_ERROR[0]
