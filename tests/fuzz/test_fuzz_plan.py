"""The cache plan in a compiled graph's metadata: damaged JSON, wrong field types, names the graph lacks."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcpass.contract.plan import PLAN_KEY, read_plan
from models.digits import SCHEDULER_CONFIG
from tests.fuzz.cases import with_plan
from tests.fuzz.harness import case_dir, check, check_cli, examples
from tests.fuzz.mutate import damaged_json, damaged_text


def plan_text(path: Path) -> str:
    model = onnx.load(str(path), load_external_data=False)
    return next(p.value for p in model.metadata_props if p.key == PLAN_KEY)


@pytest.fixture(scope="module")
def tiny_plan(tiny_fc: Path) -> dict:
    return json.loads(plan_text(tiny_fc))


@pytest.fixture(scope="module")
def digits_plan(digits_fc: Path) -> dict:
    return json.loads(plan_text(digits_fc))


@settings(max_examples=examples(1500))
@given(data=st.data())
def test_read_plan_damaged_fields(digits_plan: dict, data: st.DataObject) -> None:
    doc = data.draw(damaged_json(digits_plan))
    check("plan.fields", lambda: read_plan(with_plan(json.dumps(doc)), "model.fc.onnx"))


@settings(max_examples=examples(800))
@given(data=st.data())
def test_read_plan_damaged_text(tiny_plan: dict, data: st.DataObject) -> None:
    text = data.draw(damaged_text(json.dumps(tiny_plan)))
    check("plan.text", lambda: read_plan(with_plan(text), "model.fc.onnx"))


def write_with_plan(src: Path, dst: Path, text: str) -> Path:
    model = onnx.load(str(src))
    for p in model.metadata_props:
        if p.key == PLAN_KEY:
            p.value = text
    onnx.save(model, str(dst))
    return dst


@settings(max_examples=examples(120))
@given(data=st.data(), policy=st.sampled_from(["none", "fora", "fastcache", "fbcache", "teacache", "taylorseer"]))
def test_sample_with_damaged_plan(tiny_fc: Path, tiny_plan: dict, data: st.DataObject, policy: str) -> None:
    """Plans with their digest (refused as edited) and without (as older fcpass wrote them: checked field by field)."""
    older = data.draw(st.booleans())
    plan = {k: v for k, v in tiny_plan.items() if k != "digest"} if older else tiny_plan
    doc = data.draw(damaged_json(plan, st.sampled_from([None, -1, 0, 1, 7, "x", "fc_missing", [], {}, 1e9])))
    with case_dir() as d:
        model = write_with_plan(tiny_fc, d / "m.fc.onnx", json.dumps(doc))
        check_cli("plan.sample", ["sample", str(model), "--steps", "2", "--class", "1", "--uncond-class", "10", "--policy", policy,
                                  "--scheduler-config", str(SCHEDULER_CONFIG)], inputs=[model], folder=d)


@settings(max_examples=examples(100))
@given(data=st.data())
def test_inspect_with_damaged_plan(tiny_fc: Path, tiny_plan: dict, data: st.DataObject) -> None:
    doc = data.draw(damaged_json(tiny_plan))
    with case_dir() as d:
        model = write_with_plan(tiny_fc, d / "m.fc.onnx", json.dumps(doc))
        check_cli("plan.inspect", ["inspect", str(model), "--json"], inputs=[model], folder=d)


def test_plan_of_another_version(tiny_fc: Path, tiny_plan: dict) -> None:
    """A plan from a later fcpass, with a field this version does not know, is refused with the fix."""
    doc = {**tiny_plan, "version": "9.0.0", "novel": {}}
    with pytest.raises(Exception) as info:
        read_plan(with_plan(json.dumps(doc)), "m.fc.onnx")
    assert "9.0.0" in str(info.value) and "fcpass optimize" in str(info.value)
