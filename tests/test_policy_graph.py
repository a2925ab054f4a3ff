"""`fcpass optimize --for POLICY`: a graph with what the policy needs, on which it runs, and no more."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fcpass.cli import main
from fcpass.contract.errors import FcpassError
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.policy_graph import graph_for
from fcpass.sampling import load_denoiser
from runtimes.policies import make_policy
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import SCHEDULER_CONFIG, calibration_setup, export_tiny_dit

# policy -> (region names, probes, state kinds) of the graph --for compiles for it
EXPECTED = {
    "none": (["stack"], [None], {"in", "out"}),
    "fora": (["block0", "block1", "block2"], [None] * 3, {"in", "out"}),
    "fora:regions=stack": (["stack"], [None], {"in", "out"}),
    "fastcache": (["block0", "block1", "block2"], [None] * 3, {"in", "out"}),
    "fastcache:regions=stack,approx=taylor1": (["stack"], [None], {"in", "out", "prev"}),
    "taylorseer:regions=stack": (["stack"], [None], {"in", "out", "prev"}),
    "delta-dit": (["block0", "block1", "block2"], [None] * 3, {"in", "out"}),
    "fbcache": (["tail"], ["head_residual"], {"in", "out", "res"}),
    "teacache": (["stack"], ["modulated_input"], {"in", "out", "mod"}),
    "magcache": (["stack"], [None], {"in", "out"}),
    "duca:aggressive=taylor1": (["stack"], [None], {"in", "out", "prev", "tok_cnt", "tok_out", "tok_score"}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_dit(tmp_path_factory.mktemp("for") / "tiny.onnx", "legacy", seed=5)


@pytest.mark.parametrize("policy", list(EXPECTED))
def test_the_graph_for_a_policy_holds_what_it_needs_and_the_policy_runs_on_it(tiny: Path, tmp_path: Path,
                                                                               policy: str) -> None:
    fc = tmp_path / "m.fc.onnx"
    plan = optimize(tiny, fc, OptimizeOptions(calibrate=1, calib_steps=6, calib_eps=0.5, **graph_for([policy], None)),
                    calibration_setup([1]))
    regions, probes, kinds = EXPECTED[policy]
    assert [r.name for r in plan.regions] == regions
    assert [r.probe for r in plan.regions] == probes
    assert {s.kind for s in plan.states} == kinds
    request = SampleRequest(classes=[1], steps=6, guidance_scale=1.5, uncond_class=10)
    result = sample(load_denoiser(fc, policy, {}), scheduler_from_config(SCHEDULER_CONFIG), request, progress=False)
    assert np.isfinite(result.images).all()


def test_one_graph_for_several_policies_is_their_union() -> None:
    graph = graph_for(["fora", "taylorseer:regions=stack", "fbcache"], None)
    assert graph == {"regions": ("blocks", "tail", "stack"), "probes": True, "taylor": True, "tokens": None,
                     "motion_ratio": None}
    assert graph_for(["fastcache:regions=blocks,motion=1"], 0.5)["regions"] == ("blocks", "stack")  # motion runs in the stack


@pytest.mark.parametrize(("policies", "motion", "message"), [
    (["fastcache:motion=1"], None, "add --motion-ratio RHO"),
    (["duca", "toca"], None, "a graph holds one token schedule"),
    (["teacup"], None, "unknown policy 'teacup'"),
    (["fastcache:alpha=abc"], None, "alpha='abc' is not a finite number"),
])
def test_policies_no_graph_can_serve_are_refused(policies: list[str], motion: float | None, message: str) -> None:
    with pytest.raises(FcpassError, match=message):
        graph_for(policies, motion)


def test_for_replaces_the_graph_flags_it_decides(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.fc.onnx"
    assert main(["optimize", str(tiny), "-o", str(out), "--for", "fastcache", "--taylor"]) == 2
    assert "--for decides --taylor; drop it or --for" in capsys.readouterr().err
    assert not out.exists()
    # --for takes every word after it: a model path there is named, not read as a policy.
    assert main(["optimize", "-o", str(out), "--for", "fastcache", str(tiny)]) == 2
    assert f"--for takes policies, not {tiny}; put the model first" in capsys.readouterr().err
    assert main(["optimize", str(tiny), "-o", str(out), "--for", "taylorseer:regions=stack"]) == 0
    assert "wrote" in capsys.readouterr().out and out.exists()


def test_a_graph_names_what_a_policy_pays_for_and_does_not_use(tiny: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from fcpass.contract.plan import read_plan
    from fcpass.policy_graph import unused_costs
    from tests.conftest import load

    everything = tmp_path / "all.fc.onnx"
    optimize(tiny, everything, OptimizeOptions(), None)  # every region set, both probes
    plan = read_plan(load(everything))
    costs = unused_costs(plan, make_policy("fastcache:regions=stack"))
    assert len(costs) == 2 and "TeaCache's probe" in costs[0] and "4 regions inside the stack" in costs[1]
    assert unused_costs(plan, make_policy("fora", regions="stack")) == costs  # options count as the spec's do
    assert unused_costs(plan, make_policy("fastcache:regions=stack,blocks")) == costs[:1]  # it uses the nested regions
    for policy in ("teacache", "fora", "none"):  # the probe's user, and policies that never skip the stack
        assert unused_costs(plan, make_policy(policy)) == [], policy
    lean = tmp_path / "lean.fc.onnx"
    optimize(tiny, lean, OptimizeOptions(**graph_for(["fora:regions=stack"], None)), None)
    assert unused_costs(read_plan(load(lean)), make_policy("fora:regions=stack")) == []
    caplog.set_level("INFO", logger="fcpass.sampling")
    assert main(["sample", str(everything), "--policy", "fora:regions=stack", "--steps", "1", "--class", "1",
                 "--scheduler-config", str(SCHEDULER_CONFIG), "--uncond-class", "10"]) == 0
    assert "fcpass optimize --for fora:regions=stack compiles without them" in caplog.text


def test_the_graph_samples_with_the_options_it_was_compiled_for(tiny: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--for` specs are the plan's defaults for their policies: a flag or a spec at sampling time wins."""
    fc = tmp_path / "m.fc.onnx"
    assert main(["optimize", str(tiny), "-o", str(fc), "--for", "fastcache:regions=stack,approx=taylor1,sigma_scale=50",
                 "fora:interval=3,regions=stack", "--calibrate", "1", "--steps", "6", "--calib-eps", "0.5",
                 "--scheduler-config", str(SCHEDULER_CONFIG), "--class", "1", "--uncond-class", "10"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(fc)]) == 0
    assert "compiled for fastcache:regions=stack,approx=taylor1,sigma_scale=50 fora:interval=3,regions=stack" in capsys.readouterr().out

    config = load_denoiser(fc, "fastcache", {}).policy.config
    assert (config.regions, config.approx, config.sigma_scale) == ("stack", "taylor1", 50.0)
    assert load_denoiser(fc, "fastcache", {"approx": "reuse", "sigma_scale": None}).policy.config.approx == "reuse"
    assert load_denoiser(fc, "fastcache:approx=linear", {"approx": "reuse"}).policy.config.approx == "linear"

    def fora(*extra: str) -> np.ndarray:
        npy = tmp_path / "x.npy"
        assert main(["sample", str(fc), "--policy", *extra, "--steps", "8", "--class", "1", "2", "--uncond-class", "10",
                     "--scheduler-config", str(SCHEDULER_CONFIG), "--out-npy", str(npy)]) == 0
        return np.load(npy)

    np.testing.assert_array_equal(fora("fora"), fora("fora:interval=3,regions=stack"))
    assert np.abs(fora("fora", "--interval", "2") - fora("fora")).max() > 0
