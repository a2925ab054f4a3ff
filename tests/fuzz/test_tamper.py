"""A compiled graph edited after fcpass wrote it is refused: its plan carries a digest of what it was made for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fcpass.contract.onnx_io import initializer_tensors
from fcpass.contract.plan import PLAN_KEY, graph_digest, read_plan
from models.digits import SCHEDULER_CONFIG
from tests.fuzz.harness import LAST_ERROR, case_dir, check_cli

SAMPLE = ["--steps", "2", "--class", "1", "--uncond-class", "10", "--scheduler-config", str(SCHEDULER_CONFIG)]


def sample(path: Path) -> tuple[str, str]:
    outcome = check_cli("tamper", ["sample", str(path), *SAMPLE])
    return outcome, LAST_ERROR[0]


def test_unedited_graph_samples(tiny_fc: Path) -> None:
    assert read_plan(onnx.load(str(tiny_fc))).digest.keys() == {"nodes", "weights", "plan"}
    assert check_cli("tamper", ["sample", str(tiny_fc), *SAMPLE]) == "worked"


def test_digest_is_deterministic_and_storage_blind(tiny_fc: Path) -> None:
    """The same graph gives the same digest whether its weights are inline or external."""
    from fcpass.contract.onnx_io import load_model, save_model

    model = onnx.load(str(tiny_fc))
    with case_dir() as d:
        inline = graph_digest(model)
        save_model(model, d / "x.onnx", external=True)  # (onnx marks the saved tensors external in `model`)
        light = load_model(d / "x.onnx", load_weights=False)
        assert graph_digest(light, d) == inline == graph_digest(onnx.load(str(tiny_fc)))


def edited(src: Path, dst: Path, how: str) -> Path:
    model = onnx.load(str(src))
    if how == "weights":  # one weight inside a region, nudged
        t = max((t for t in initializer_tensors(model) if t.data_type == onnx.TensorProto.FLOAT),
                key=lambda t: int(np.prod(t.dims)))
        a = numpy_helper.to_array(t).copy()
        a.flat[0] += 0.5
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    elif how == "nodes":  # one Add turned into a Sub
        next(n for n in model.graph.node if n.op_type == "Add").op_type = "Sub"
    else:  # the plan: a region's calibration edited by hand
        prop = next(p for p in model.metadata_props if p.key == PLAN_KEY)
        plan = json.loads(prop.value)
        plan["regions"][0]["macs"] += 1
        prop.value = json.dumps(plan)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("how", ["weights", "nodes", "plan"])
def test_edited_graph_is_refused(tiny_fc: Path, how: str) -> None:
    with case_dir() as d:
        outcome, err = sample(edited(tiny_fc, d / "m.fc.onnx", how))
    assert outcome == "error"
    assert f"its {how}" in err and "was edited after fcpass compiled it" in err and "fcpass optimize" in err


def test_plan_without_digest_loads_with_a_warning(tiny_fc: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = onnx.load(str(tiny_fc))
    prop = next(p for p in model.metadata_props if p.key == PLAN_KEY)
    plan = json.loads(prop.value)
    del plan["digest"]
    prop.value = json.dumps(plan)
    with case_dir() as d, caplog.at_level(logging.WARNING):
        onnx.save(model, str(d / "old.fc.onnx"))
        assert check_cli("tamper", ["sample", str(d / "old.fc.onnx"), *SAMPLE]) == "worked"
    assert any("carries no digest" in r.getMessage() for r in caplog.records)


def test_tuned_record_is_stamped_and_covered(tiny_fc: Path) -> None:
    """A tuned record written as `fcpass tune -o` writes it (plan.tuned, write_plan, save_compiled) round-trips,
    the graph samples with no flags, and an edit of the record afterwards is refused like any other."""
    from fcpass.contract.onnx_io import load_model
    from fcpass.contract.plan import write_plan
    from fcpass.optimize import save_compiled

    tuned = {"policy": "none", "target_psnr": 30.0, "psnr": 31.5, "speedup": 1.25, "samples": 2, "steps": 2,
             "trials": [{"spec": "none", "speedup": None, "holds": True}]}
    with case_dir() as d:
        model = load_model(tiny_fc)
        plan = read_plan(model)
        plan.tuned = tuned
        write_plan(model, plan)
        out = d / "t.fc.onnx"
        save_compiled(model, out)
        assert read_plan(onnx.load(str(out))).tuned == tuned
        assert sample(out)[0] == "worked"
        edited = onnx.load(str(out))
        for prop in edited.metadata_props:
            if prop.key == PLAN_KEY:
                raw = json.loads(prop.value)
                raw["tuned"]["psnr"] = 40.0
                prop.value = json.dumps(raw)
        onnx.save(edited, str(out))
        outcome, message = sample(out)
        assert outcome == "error" and "its plan differ" in message, message
