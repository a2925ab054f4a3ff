"""`fcpass optimize --target-psnr` and `fcpass tune -o`: an artefact that carries its tuned policy.

`optimize_to_target` compiles a search graph that serves every setting the search may try (each
policy's region sets, probes and previous outputs), calibrates it, searches it (`fcpass.tune`),
then compiles and calibrates the graph `--for` the winner alone, checks the winner on that graph
(quality against the uncached samples of the search's seeds, speed timed against its own uncached
run) and writes it with the winner in its plan (`CachePlan.tuned`). Nothing reaches `output` unless
every step succeeds: the two graphs are built in a temporary folder, the artefact written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcpass import tune
from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import check_distinct, check_file_output, load_model
from fcpass.contract.plan import CachePlan, read_plan, write_plan
from fcpass.optimize import OptimizeOptions, optimize, save_compiled
from fcpass.policy_graph import graph_for
from fcpass.sampling import SamplingSetup, classifier_for, load_denoiser
from fcpass.search import SEARCH_SEED

log = logging.getLogger(__name__)


@dataclass
class SearchOptions:
    """What the search may try and how long: `policies` (specs; default `tune.DEFAULT_POLICIES`), at most
    `budget` trials of `samples` samples each (classes cycled, from seed `seed`), the finalists timed
    `repeats` times each way; `plot` is the speed/quality figure of every trial."""

    target_psnr: float = 30.0
    policies: tuple[str, ...] = ()
    budget: int = 60
    samples: int = 10
    repeats: int = 1
    seed: int = SEARCH_SEED
    provider: str = "cpu"
    threads: int | None = None
    plot: Path | None = None
    cluster: Any = None  # --ray: where the trials run (fcpass.cluster.RayCluster); None: this process

    def check(self) -> None:
        if self.samples < 1:
            raise FcpassError(f"--samples {self.samples} must be at least 1")
        if self.repeats < 1:
            raise FcpassError(f"--repeats {self.repeats} must be at least 1")
        if self.budget < 1:
            raise FcpassError(f"--budget {self.budget} must be at least 1 trial")
        if not math.isfinite(self.target_psnr):
            raise FcpassError(f"--target-psnr {self.target_psnr} must be a finite number of dB, e.g. 30")


def search_setup(setup: SamplingSetup, search: SearchOptions, steps: int | None = None) -> SamplingSetup:
    """The setup's request on the search's own samples: its classes cycled to `samples`, its seed, and `steps`
    where given (optimize samples with the step count it calibrates for)."""
    request = dataclasses.replace(setup.request, seed=search.seed, steps=steps or setup.request.steps)
    if request.classes is not None:
        request.classes = [request.classes[i % len(request.classes)] for i in range(search.samples)]
    return dataclasses.replace(setup, request=request)


def search_graph(denoiser: Any, setup: SamplingSetup, search: SearchOptions, model: str,
                 path: Path | None = None) -> tune.TuneResult:
    """Run the search on a compiled graph (already loaded as `denoiser`, from `path`) and write its plot; with
    `search.cluster`, its runs happen there."""
    policies = list(search.policies) or tune.default_policies(denoiser.plan)
    trials = None
    if search.cluster is not None:
        if path is None:
            raise ValueError("a search on a cluster needs the graph's path")
        trials = search.cluster.trials(path, setup, search.repeats)
    result = tune.tune(denoiser, setup, policies, search.target_psnr, search.budget, classifier_for(setup),
                       model, search.repeats, seed=search.seed, named=bool(search.policies), trials=trials)
    if search.plot is not None:
        tune.plot_trials(result, search.plot, f"{Path(model).name}: {result.samples} samples x {result.steps} steps, "
                         f"{len(result.search.trials)} trials")
    return result


def optimize_to_target(model_path: str | Path, output: str | Path, options: OptimizeOptions, setup: SamplingSetup,
                       search: SearchOptions) -> tuple[CachePlan, tune.TuneResult]:
    """Write `output`: `model_path` compiled for the fastest setting that holds `search.target_psnr`."""
    search.check()
    check_distinct(model_path, output)
    check_file_output(output)
    if options.lowering != "if":
        raise FcpassError(f"--target-psnr writes one .fc.onnx; lower the result afterwards: fcpass optimize {output} "
                          f"-o {Path(output).with_suffix('')}.segments --lowering segments")
    if options.calibrate < 1:
        raise FcpassError("--target-psnr needs the calibration; add --calibrate N (e.g. 8)")
    spaces = tune.spaces_for(list(search.policies) or tune.DEFAULT_POLICIES)
    specs = tune.graph_specs(spaces)
    on_seeds = search_setup(setup, search, options.calib_steps)
    with tempfile.TemporaryDirectory(prefix="fcpass-search-") as tmp:
        searched, final = Path(tmp) / "search.fc.onnx", Path(tmp) / "final.fc.onnx"
        log.info("search graph: every setting of %s", ", ".join(s.name for s in spaces))
        optimize(model_path, searched, _for(options, specs), setup)
        denoiser = load_denoiser(searched, "none", {}, provider=search.provider, inputs=setup.inputs,
                                 threads=search.threads)
        search = dataclasses.replace(search, policies=tuple(s.name for s in spaces))
        result = search_graph(denoiser, on_seeds, search, str(output), searched)
        winner = result.winner
        assert winner is not None  # tune raises where none holds
        log.info("compiling %s for %s alone", Path(output).name, winner.spec)
        optimize(model_path, final, _for(options, [winner.spec]), setup)
        record = checked_record(final, result, on_seeds, search)
        model = load_model(final)
        plan = read_plan(model, str(final))
        plan.tuned = record
        write_plan(model, plan)
        save_compiled(model, output)
    return plan, result


def _for(options: OptimizeOptions, specs: list[str]) -> OptimizeOptions:
    """`options` compiling what `specs` need and nothing more (as --for SPECS)."""
    return dataclasses.replace(options, for_policies=tuple(specs), **graph_for(specs, None))


def checked_record(path: Path, result: tune.TuneResult, setup: SamplingSetup, search: SearchOptions) -> dict[str, Any]:
    """The winner's record, with its quality and speed measured again on the graph at `path` (compiled for it
    alone: fewer regions than the search graph, so faster at the same decisions)."""
    assert result.winner is not None
    denoiser = load_denoiser(path, "none", {}, provider=search.provider, inputs=setup.inputs, threads=search.threads)
    tuner = tune.Tuner(denoiser, setup, classifier_for(setup))
    spec = result.winner.spec
    measured = tuner.measure(spec, result.baseline)
    timed, _ = tuner.time([spec], search.repeats)
    record = tune.winner_record(result, setup)
    record.update(psnr=measured.psnr, ssim=measured.ssim, accuracy=measured.accuracy, speedup=timed[spec],
                  mac_ideal=measured.mac_ideal)
    if measured.psnr < search.target_psnr:
        log.warning("%s holds %.2f dB on the graph compiled for it, against %.2f dB on the search graph",
                    spec, measured.psnr, result.winner.measured.psnr)
    return record


def write_tuned(model_path: str | Path, output: str | Path, result: tune.TuneResult, setup: SamplingSetup) -> None:
    """`fcpass tune -o`: the graph at `model_path` as it is, with the search's winner in its plan."""
    model = load_model(model_path)
    plan = read_plan(model, str(model_path))
    plan.tuned = tune.winner_record(result, setup)
    write_plan(model, plan)
    save_compiled(model, output)
