"""Scale-out on Ray (fcpass.cluster), on a local 2-CPU cluster this module starts: the distributed calibration writes
the single-process plan, a worker lost mid-run changes nothing, the distributed search picks the same winner, and a
bad address or a missing Ray is one line."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from fcpass.cli import main
from fcpass.contract.plan import read_plan
from fcpass.optimize import OptimizeOptions, optimize
from runtimes.schedulers import load_config
from tests.conftest import SCHEDULER_CONFIG, all_initializers, calibration_setup, export_tiny_dit
from tests.helpers.ray_faults import DiesOnce

ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = OptimizeOptions(calibrate=5, calib_steps=6, calib_eps=0.5)  # 5: trajectory 3 is held out
FITTED = (".V", ".b", ".A", ".c")


@pytest.fixture(scope="module")
def cluster() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # the workers import this checkout
    from fcpass.cluster import ray_cluster

    with ray_cluster() as connected:
        yield connected
    ray.shutdown()


@pytest.fixture(scope="module")
def local_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ray_local")
    src = export_tiny_dit(d / "tiny.onnx", "legacy", seed=3)
    optimize(src, d / "local.fc.onnx", CALIBRATION, calibration_setup([1, 2]))
    return src, d / "local.fc.onnx"


def _fitted(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in all_initializers(model)
            if t.name.startswith("fc.") and any(k in t.name for k in FITTED)}


def _assert_same_plan(got: Path, want: Path) -> None:
    """Fits to 1e-6 relative; sigma^2, the counts and the peer policies' records as one process writes them."""
    a, b = read_plan(onnx.load(str(got), load_external_data=False)), read_plan(onnx.load(str(want), load_external_data=False))
    assert a.calibration == b.calibration
    for ra, rb in zip(a.regions, b.regions):
        ca, cb = ra.calibration, rb.calibration
        assert ca["sigma2"] == pytest.approx(cb["sigma2"], rel=1e-12), ra.name
        assert (ca["n_good"], ca["n_pairs"], ca["ridge"], ca["ridge_affine"]) == (
            cb["n_good"], cb["n_pairs"], cb["ridge"], cb["ridge_affine"]), ra.name
        for key in ("fit_rel_err", "affine_rel_err", "residual_rel_err", "reuse_rel_err"):
            assert ca[key] == pytest.approx(cb[key], rel=1e-6), (ra.name, key)
        assert {k: ca[k] for k in ("teacache", "magcache") if k in ca} == {
            k: cb[k] for k in ("teacache", "magcache") if k in cb}, ra.name
    assert "magcache" in next(r for r in a.regions if r.name == "stack").calibration
    fa, fb = _fitted(got), _fitted(want)
    assert fa.keys() == fb.keys() and fa
    for name in fa:
        scale = max(float(np.abs(fb[name]).max()), 1e-30)
        assert float(np.abs(fa[name] - fb[name]).max()) <= 1e-6 * scale, name


def test_distributed_calibration_writes_the_single_process_plan(cluster: Any, local_plan: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    src, want = local_plan
    out = tmp_path / "ray.fc.onnx"
    optimize(src, out, dataclasses.replace(CALIBRATION, cluster=cluster), calibration_setup([1, 2]))
    _assert_same_plan(out, want)


def test_a_worker_lost_mid_run_is_retried_and_changes_nothing(cluster: Any, local_plan: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    src, want = local_plan
    marker = tmp_path / "died"
    setup = calibration_setup([1, 2])
    setup = dataclasses.replace(setup, scheduler_config=DiesOnce(load_config(setup.scheduler_config), marker))
    out = tmp_path / "retried.fc.onnx"
    optimize(src, out, dataclasses.replace(CALIBRATION, cluster=cluster), setup)
    assert marker.exists()  # a worker did die
    _assert_same_plan(out, want)


def test_distributed_search_picks_the_same_winner(cluster: Any, calibrated: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The same trials in the same order, measured alike, and the same winner; the finalists' timings are made
    a tie (wall time is noise on a shared machine), so the choice rule decides, as it would on one machine."""
    from fcpass import tune

    real = tune.choose
    monkeypatch.setattr(tune, "choose", lambda result, time, *a, **k: real(
        result, lambda specs: dict.fromkeys(time(specs), 1.0), *a, **k))
    args = ["tune", str(calibrated[1]), "--target-psnr", "20", "--policies", "fora:regions=stack", "fbcache", "--samples", "2",
            "--budget", "8", "--scheduler-config", str(SCHEDULER_CONFIG), "--class", "1", "2", "--uncond-class", "10", "--steps", "6"]
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray"])):
        js = tmp_path / f"{name}.json"
        assert main([*args, "--plot", str(tmp_path / f"{name}.png"), "--json", str(js), *extra]) == 0
        runs[name] = json.loads(js.read_text())
    local, distributed = runs["local"], runs["ray"]
    assert [t["spec"] for t in distributed["trials"]] == [t["spec"] for t in local["trials"]]
    for a, b in zip(distributed["trials"], local["trials"]):
        assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-6) and a["mac_ideal"] == b["mac_ideal"]
    assert distributed["winner"]["spec"] == local["winner"]["spec"]
    assert local["winner"]["mac_ideal"] > 1.1  # a search that found something
    assert local["timed_on"] is None and "thread" in distributed["timed_on"]
    assert "timed in one interleaved run on " in capsys.readouterr().out


def test_a_bad_address_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.fc.onnx"
    assert main(["optimize", "-o", str(out), "--calibrate", "2", "--ray", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ray 127.0.0.1:1: no Ray cluster answers there" in err and "ray start" in err
    assert not out.exists()


def test_ray_missing_is_the_install_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    assert main(["optimize", "-o", str(tmp_path / "x.fc.onnx"), "--calibrate", "2", "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fcpass[ray]'" in err
