"""`regions` is the one name for the region sets a policy acts on; the spellings it replaced (`level=`,
`levels=`, `--level`, `--levels`) still work, each with one deprecation warning naming the new one,
and a graph tuned under them samples exactly as one tuned under `regions=`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpass.cli import main
from fcpass.contract.plan import read_plan, write_plan
from fcpass.optimize import save_compiled
from fcpass.sampling import load_denoiser
from runtimes.policies import make_policy, parse_policy_spec, registry
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import SCHEDULER_CONFIG


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_warned", set())


def _deprecations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


@pytest.mark.parametrize("old", ["level", "levels"])
def test_an_old_spec_key_is_regions_with_one_warning(old: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING")
    assert parse_policy_spec(f"fora:interval=3,{old}=stack") == ("fora", {"interval": 3, "regions": "stack"})
    assert make_policy(f"fastcache:{old}=stack,blocks").config.regions == "stack,blocks"
    assert make_policy("taylorseer", **{old: "stack"}).config == make_policy("taylorseer:regions=stack").config
    assert _deprecations(caplog) == [f"policy option {old}= is deprecated: it is now regions= (regions=stack)"]


def test_the_current_name_wins_over_the_old_one() -> None:
    assert make_policy("fora:regions=blocks", level="stack").config.regions == "blocks"
    assert make_policy("fora", regions="blocks", level="stack").config.regions == "blocks"


@pytest.mark.parametrize("flag", ["--levels", "--level"])
def test_an_old_sample_flag_is_regions_with_one_warning(flag: str, calibrated: tuple[Path, Path], tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    _, fc = calibrated
    common = ["--policy", "fora", "--interval", "2", "--steps", "4", "--class", "1", "--guidance-scale", "1.5",
              "--uncond-class", "10", "--scheduler-config", str(SCHEDULER_CONFIG)]
    caplog.set_level("WARNING")
    assert main(["sample", str(fc), *common, flag, "stack", "--out-npy", str(tmp_path / "old.npy")]) == 0
    assert _deprecations(caplog) == [f"{flag} is deprecated: it is now --regions (--regions stack)"]
    assert main(["sample", str(fc), *common, "--regions", "stack", "--out-npy", str(tmp_path / "new.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "old.npy"), np.load(tmp_path / "new.npy"))


def test_a_plan_tuned_under_level_samples_as_one_tuned_under_regions(calibrated: tuple[Path, Path], tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    _, fc = calibrated
    runs = {}
    for spelling in ("level", "regions"):
        model = onnx.load(str(fc))
        plan = read_plan(model)
        plan.tuned = {"policy": f"fora:{spelling}=stack,interval=2,warmup=1", "target_psnr": 30.0, "psnr": 31.0,
                      "speedup": 2.0, "samples": 2, "steps": 8}
        plan.compiled_for = {"fora": {spelling: "stack"}}
        write_plan(model, plan)
        path = save_compiled(model, tmp_path / f"{spelling}.fc.onnx")
        assert json.dumps(read_plan(onnx.load(str(path))).tuned).count(f"{spelling}=stack") == 1  # as written
        caplog.clear()
        caplog.set_level("WARNING")
        denoiser = load_denoiser(path, None, {})
        assert denoiser.policy.config.regions == "stack"
        request = SampleRequest(classes=[1, 2], steps=8, guidance_scale=1.5, uncond_class=10)
        runs[spelling] = sample(denoiser, scheduler_from_config(SCHEDULER_CONFIG), request, progress=False)
        assert len(_deprecations(caplog)) == (1 if spelling == "level" else 0)
    np.testing.assert_array_equal(runs["level"].images, runs["regions"].images)
    assert [r["skip"] for r in runs["level"].records] == [r["skip"] for r in runs["regions"].records]
    assert any(1 in r["skip"] for r in runs["level"].records)  # the stack really skipped
