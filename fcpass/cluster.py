"""Scale-out on Ray: calibration's trajectories as Ray tasks, the tuning search's trials as Ray Tune trials.

Ray is optional (`pip install 'fcpass[ray]'`) and imported here only, when a command is given `--ray`.

- `RayCluster(address)`: `--ray` alone starts a local cluster (`ray.init()`), `--ray ADDRESS` joins a running one
  (`ray start --head` there). A missing Ray, or an address nothing answers at, is one line (`FcpassError`). On
  leaving, a cluster fcpass connected to is shut down, which ends every task and actor it started (Ctrl-C too).
- Calibration (`RayCluster.passes`, `fcpass.calibrate.Cluster`): the graph's files go into Ray's object store once
  (`ray.put`); each trajectory is a task (retried where its worker dies) that opens the graph once per worker
  process (the session stays cached there for the next trajectory) and returns its `calibrate.Accumulation`; the
  driver reduces them in trajectory order (`calibrate.reduce`), so the plan is the one a single process writes.
- The search (`RayCluster.trials`, `fcpass.tune.Trials`): fcpass's own pattern search (`fcpass.search.search`)
  runs on the driver inside `PatternSearcher`, a Ray Tune `Searcher`: every setting it evaluates is one Ray Tune
  trial, so the space, the budget, the seeds and the choice rule, and with them the winner, are those of one
  machine. The uncached baseline and the finalists' timing each run as one task, so every wall time the choice
  compares comes from one worker, which the output names.

A worker runs on the provider it has: tasks ask Ray for a GPU each where the command says `--provider cuda` and
use CUDA where their ONNX Runtime offers it; each runs its ONNX Runtime on the CPUs Ray gave it (`--threads N`
per task, default 1).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from onnx.external_data_helper import load_external_data_for_model
from tqdm import tqdm

from fcpass.calibrate import (
    Accumulation,
    CalibrationOptions,
    Remote,
    recording_session,
    trajectory_count,
    trajectory_share,
)
from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import data_file, initializer_tensors, load_model, save_model
from fcpass.contract.plan import CachePlan
from fcpass.search import Evaluate, Measurement, SearchResult, Space, search

if TYPE_CHECKING:
    from fcpass.sampling import SamplingSetup
    from fcpass.tune import Baseline

log = logging.getLogger(__name__)

INSTALL = "pip install 'fcpass[ray]'"
TASK_RETRIES = 3  # a task whose worker dies runs again, up to this many times
TRIAL_RETRIES = 2


def import_ray() -> Any:
    """Ray, or the line that says how to install it."""
    try:
        import ray
    except ImportError:
        raise FcpassError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address answers, or one line saying it does not and what to do."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FcpassError(f"--ray {address}: not HOST:PORT; give the head's address as `ray start --head` printed "
                          "it (e.g. 10.0.0.1:6379), or --ray alone for a local cluster")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise FcpassError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                          f"`ray start --head --port={port}` on {host}, or give --ray alone for a local one") from None


@contextmanager
def ray_cluster(address: str | None = None, provider: str = "cpu", threads: int | None = None) -> Iterator[RayCluster]:
    """A connection for one command: to a new local cluster (no `address`), to the cluster at `address`, or to the
    one this process is already connected to (a test's, a notebook's). A connection made here is shut down on
    leaving, however it leaves, which ends every task and actor it started."""
    ray = import_ray()
    if address:
        check_reachable(address)
    started = False
    if not ray.is_initialized():
        _init(ray, address or None)
        started = True
    try:
        yield RayCluster(provider, threads)
    finally:
        if started:
            ray.shutdown()


def _init(ray: Any, address: str | None) -> None:
    here = str(Path(__file__).resolve().parents[1])  # a local cluster's workers import this fcpass
    runtime_env = None if address else {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)}}
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--ray {address}" if address else "--ray"
        raise FcpassError(f"{where}: could not connect to Ray ({' '.join(str(exc).split())[:200]}); check the "
                          "address `ray start --head` printed, or give --ray alone for a local cluster") from None
    resources = ray.cluster_resources()
    log.info("Ray: %s, %d CPUs, %d GPUs", f"joined {address}" if address else "a local cluster",
             int(resources.get("CPU", 0)), int(resources.get("GPU", 0)))


class RayCluster:
    """What the commands run on a Ray cluster (`ray_cluster` connects): calibration passes and search trials, each
    task asking for `threads` CPUs (default 1) and, with `provider` cuda, a GPU."""

    def __init__(self, provider: str = "cpu", threads: int | None = None) -> None:
        self.provider = provider
        self.threads = threads

    def resources(self) -> dict[str, float]:
        """What one task or trial asks Ray for: its threads' CPUs, and a GPU where the command runs on CUDA."""
        return {"num_cpus": float(self.threads or 1), "num_gpus": 1.0 if self.provider == "cuda" else 0.0}

    def slots(self) -> int:
        """How many tasks or trials of `resources` the cluster runs at once."""
        total = import_ray().cluster_resources()
        need = self.resources()
        fits = int(total.get("CPU", 0) // need["num_cpus"])
        if need["num_gpus"]:
            fits = min(fits, int(total.get("GPU", 0) // need["num_gpus"]))
        return max(fits, 1)

    @contextmanager
    def passes(self, model: onnx.ModelProto, plan: CachePlan, setup: SamplingSetup,
               options: CalibrationOptions) -> Iterator[Remote]:
        """Calibration on the cluster: yields remote(phase, solutions, which), every trajectory's share of one pass."""
        ray = import_ray()
        n = trajectory_count(model, plan, setup, options)
        graph = [ray.put(graph_files(model))]  # in a list, so that a task fetches it only to open the graph
        job = ray.put((plan, setup, options))
        key = uuid.uuid4().hex
        task = ray.remote(_trajectory).options(max_retries=TASK_RETRIES, **self.resources())

        def remote(phase: str, solutions: dict[str, Any] | None, which: tuple[str, ...] | None) -> list[Accumulation]:
            shared = ray.put(solutions)
            refs = [task.remote(graph, key, job, j, phase, shared, which) for j in range(n)]
            return gather(refs, f"calibration {phase}", "trajectory")

        log.info("calibration on Ray: %d trajectories as tasks of %s", n, self.resources())
        yield remote

    def trials(self, path: Path, setup: SamplingSetup, repeats: int) -> RayTrials:
        """The search's trials on the cluster (`fcpass.tune.Trials`), of the graph at `path`."""
        return RayTrials(self, path, setup, repeats)


def graph_files(model: onnx.ModelProto) -> dict[str, bytes]:
    """`model` as the files `save_model` writes (one .onnx, and its .data over 2 GB), by name."""
    with tempfile.TemporaryDirectory(prefix="fcpass-ray-") as tmp:
        save_model(model, Path(tmp) / "graph.onnx")
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in initializer_tensors(model)):
            load_external_data_for_model(model, tmp)  # saving moved the weights out of `model`: read them back
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def gather(refs: Sequence[Any], desc: str, unit: str) -> list[Any]:
    """The results of `refs`, in their order, with a bar of how many are done; a task's FcpassError as itself, and
    the tasks cancelled where this stops (Ctrl-C)."""
    ray = import_ray()
    bar = tqdm(total=len(refs), desc=desc, unit=unit)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
        return ray.get(list(refs))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, FcpassError):
            raise FcpassError(str(exc.cause)) from None
        raise
    except ray.exceptions.WorkerCrashedError:
        raise FcpassError(f"a {desc} task's worker died {TASK_RETRIES + 1} times; see the Ray logs "
                          "(/tmp/ray/session_latest/logs) for why") from None
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()


class _WorkerCache:
    """What a worker process keeps between tasks: the graph it opened last (by key), and what it opened with."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.value: Any = None
        self.stack = ExitStack()

    def get(self, key: tuple[Any, ...], graph: list[Any], open_: Callable[[ExitStack, Path], Any]) -> Any:
        if key != self.key:
            self.stack.close()
            self.stack = ExitStack()
            self.key, self.value = None, None
            folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="fcpass-worker-")))
            for name, data in import_ray().get(graph[0]).items():
                (folder / name).write_bytes(data)
            self.value = open_(self.stack, folder / "graph.onnx")
            self.key = key
        return self.value


_CACHE = _WorkerCache()


def worker_runtime(provider: str) -> tuple[str, int | None, str]:
    """This worker's provider (CUDA where Ray gave it a GPU and its ONNX Runtime has CUDA, else CPU), its threads
    (the CPUs Ray gave it) and a description of it."""
    import onnxruntime

    ray = import_ray()
    cuda = provider == "cuda" and ray.get_gpu_ids() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if provider == "cuda" and not cuda:
        log.warning("%s: no CUDA here; running on the CPU", socket.gethostname())
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    threads = max(int(cpus), 1) if cpus else None
    where = f"{socket.gethostname()} ({'cuda' if cuda else 'cpu'}, " + (
        f"{threads} thread{'' if threads == 1 else 's'})" if threads else "ONNX Runtime's default threads)")
    return ("cuda" if cuda else "cpu"), threads, where


def _trajectory(graph: list[Any], key: str, job: tuple[CachePlan, SamplingSetup, CalibrationOptions], chunk: int,
                phase: str, solutions: dict[str, Any] | None, which: tuple[str, ...] | None) -> Accumulation:
    """A Ray task: trajectory `chunk`'s share of `phase`, on this worker's graph session (opened once)."""
    plan, setup, options = job
    provider, threads, _ = worker_runtime(options.provider)
    options = dataclasses.replace(options, provider=provider, threads=threads)

    def open_(stack: ExitStack, path: Path) -> Any:
        return stack.enter_context(recording_session(load_model(path), plan, options))

    record = _CACHE.get(("calibration", key, provider, threads), graph, open_)
    return trajectory_share(record, plan, setup, options, chunk, phase, solutions, which)


# The search --------------------------------------------------------------------------------------------------


def _worker_tuner(graph: list[Any], key: str, setup: SamplingSetup, provider: str) -> tuple[Any, str]:
    """This worker's `fcpass.tune.Tuner` of the searched graph (opened once per process), and where it runs."""
    from fcpass.sampling import classifier_for, load_denoiser
    from fcpass.tune import Tuner

    provider, threads, where = worker_runtime(provider)

    def open_(stack: ExitStack, path: Path) -> Any:
        denoiser = load_denoiser(path, "none", {}, provider=provider, inputs=setup.inputs, threads=threads)
        return Tuner(denoiser, setup, classifier_for(setup))

    return _CACHE.get(("search", key, provider, threads), graph, open_), where


def _baseline_task(graph: list[Any], key: str, setup: SamplingSetup, provider: str) -> tuple[Baseline, str]:
    tuner, where = _worker_tuner(graph, key, setup, provider)
    return tuner.baseline(), where


def _time_task(graph: list[Any], key: str, setup: SamplingSetup, provider: str, specs: list[str],
               repeats: int) -> tuple[dict[str, float], str]:
    tuner, where = _worker_tuner(graph, key, setup, provider)
    return tuner.time(specs, repeats)[0], where


def _trial(config: dict[str, Any], graph: list[Any], key: str, setup: SamplingSetup, provider: str,
           base: Baseline) -> None:
    """A Ray Tune trial: one setting sampled and measured against the baseline; a setting its policy cannot run
    reports why (the search drops the policy, as on one machine)."""
    from ray import tune as ray_tune

    tuner, _ = _worker_tuner(graph, key, setup, provider)
    try:
        measured = tuner.measure(config["spec"], base)
    except FcpassError as exc:
        ray_tune.report({"fcpass_error": str(exc)})
        return
    ray_tune.report({f"m_{k}": v for k, v in dataclasses.asdict(measured).items()})


class TrialFailed(RuntimeError):
    """A trial that failed on the cluster past its retries (not a setting its policy cannot run)."""


class SearchDriver:
    """fcpass's search, run where Ray Tune asks for trials: `run(evaluate, ahead)` (the search) runs in a thread of
    the driver, and each `evaluate(spec)` waits for the trial of that setting. While slots are free (`concurrency`
    trials at once), the settings it said it may ask for next (`ahead`) are measured meanwhile; one it never asks
    for is dropped, so the trials, their order and the winner are the search's on one machine."""

    def __init__(self, run: Callable[[Evaluate, Callable[[list[str]], None]], SearchResult], concurrency: int) -> None:
        self.run, self.concurrency = run, concurrency
        self.lock = threading.Lock()
        self.futures: dict[str, Future[Measurement]] = {}  # every setting asked for or measured ahead
        self.waiting: deque[str] = deque()  # asked for by the search, no trial yet
        self.upcoming: list[str] = []  # what the search may ask for next, in its order
        self.running: dict[str, str] = {}  # trial id -> setting
        self.finished = threading.Event()
        self.result: SearchResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._search, name="fcpass-search", daemon=True)

    def _search(self) -> None:
        try:
            self.result = self.run(self._evaluate, self._ahead)
        except Exception as exc:  # noqa: BLE001  (raised on the driver's thread once Ray Tune stops)
            self.error = exc
        finally:
            self.finished.set()

    def _evaluate(self, spec: str) -> Measurement:
        with self.lock:
            future = self.futures.get(spec)
            if future is None:
                future = self.futures[spec] = Future()
                self.waiting.append(spec)
        return future.result()

    def _ahead(self, specs: list[str]) -> None:
        with self.lock:
            self.upcoming = [s for s in specs if s not in self.futures]

    def next_trial(self, trial_id: str) -> str | None:
        """The setting trial `trial_id` measures: the one the search waits for, else one it may ask for next; None
        for none now."""
        if not self.thread.is_alive() and not self.finished.is_set():
            self.thread.start()
        with self.lock:
            spec = self.waiting.popleft() if self.waiting else None
            while spec is None and self.upcoming and len(self.running) < self.concurrency and not self.finished.is_set():
                candidate = self.upcoming.pop(0)
                if candidate not in self.futures:
                    spec, self.futures[candidate] = candidate, Future()
            if spec is not None:
                self.running[trial_id] = spec
            return spec

    def done(self, trial_id: str, result: dict | None, error: bool) -> None:
        """Trial `trial_id` finished: its measurement (or why there is none) to whoever waits for its setting."""
        with self.lock:
            spec = self.running.pop(trial_id)
        future = self.futures[spec]
        if error or not result:
            future.set_exception(TrialFailed(f"the trial of {spec} failed on the cluster {TRIAL_RETRIES + 1} times; "
                                             "see the Ray logs (/tmp/ray/session_latest/logs)"))
        elif "fcpass_error" in result:
            future.set_exception(FcpassError(result["fcpass_error"]))
        else:
            future.set_result(Measurement(**{f.name: result.get(f"m_{f.name}") for f in dataclasses.fields(Measurement)}))

    def measured(self) -> list[str]:
        with self.lock:
            return [spec for spec, future in self.futures.items() if future.done()]

    def abort(self) -> None:
        """Wake the search where Ray Tune stopped before it finished."""
        with self.lock:
            pending = list(self.futures.values())
        for future in pending:
            if not future.done():
                future.set_exception(TrialFailed("the search stopped before it finished"))


def pattern_searcher(driver: SearchDriver) -> Any:
    """A Ray Tune Searcher (defined here, where Ray is imported) whose suggestions are `driver`'s."""
    from ray.tune.search import Searcher

    class PatternSearcher(Searcher):  # type: ignore[misc]
        """The settings fcpass's search asks for, as Ray Tune trials (`SearchDriver`)."""

        def __init__(self, driver: SearchDriver) -> None:
            super().__init__()
            self.driver = driver  # an argument, not a closure: Ray Tune pickles the class

        def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
            return True

        def __getstate__(self) -> dict[str, Any]:
            """Ray Tune pickles its experiment to resume it; a search is not resumed (it reruns from its seed)."""
            return {}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state)

        def save(self, checkpoint_path: str) -> None:
            """Ray Tune's checkpoint of the searcher: the settings measured so far, for the record."""
            Path(checkpoint_path).write_text("\n".join(self.driver.measured()))

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            spec = self.driver.next_trial(trial_id)
            if spec is not None:
                return {"spec": spec}
            return Searcher.FINISHED if self.driver.finished.is_set() else None

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            self.driver.done(trial_id, result, error)

    return PatternSearcher(driver)


class RayTrials:
    """`fcpass.tune.Trials` on a Ray cluster: the baseline and the finalists' timing as one task each, the search's
    trials as Ray Tune trials driven by fcpass's pattern search."""

    def __init__(self, cluster: RayCluster, path: Path, setup: SamplingSetup, repeats: int) -> None:
        ray = import_ray()
        self.cluster, self.setup, self.repeats = cluster, setup, repeats
        files = {"graph.onnx": Path(path).read_bytes()}
        if (data := data_file(path)) is not None:  # the weights beside it, under the name the graph refers to
            files[data.name] = data.read_bytes()
        self.graph = [ray.put(files)]
        self.key = uuid.uuid4().hex
        self.where = "one Ray worker"

    def _task(self, fn: Callable[..., Any]) -> Any:
        return import_ray().remote(fn).options(max_retries=TASK_RETRIES, **self.cluster.resources())

    def baseline(self) -> Baseline:
        ref = self._task(_baseline_task).remote(self.graph, self.key, self.setup, self.cluster.provider)
        (base, where), = gather([ref], "uncached baseline", "run")
        log.info("uncached baseline sampled on %s", where)
        return base

    def time(self, specs: list[str]) -> dict[str, float]:
        ref = self._task(_time_task).remote(self.graph, self.key, self.setup, self.cluster.provider, specs,
                                            self.repeats)
        (timed, self.where), = gather([ref], "timing the finalists", "run")
        log.info("finalists timed on one worker: %s", self.where)
        return timed

    def search(self, spaces: Sequence[Space], base: Baseline, holds: Callable[[Measurement], bool], budget: int,
               seed: int, progress: bool) -> SearchResult:
        """fcpass's pattern search, every trial a Ray Tune trial."""
        from ray import tune as ray_tune

        concurrency = self.cluster.slots()
        driver = SearchDriver(lambda evaluate, ahead: search(spaces, evaluate, holds, budget, seed, base.wall_seconds,
                                                             progress, ahead), concurrency)
        trainable = ray_tune.with_parameters(_trial, graph=self.graph, key=self.key, setup=self.setup,
                                             provider=self.cluster.provider, base=base)
        resources = self.cluster.resources()
        trainable = ray_tune.with_resources(trainable, {"cpu": resources["num_cpus"], "gpu": resources["num_gpus"]})
        storage = tempfile.mkdtemp(prefix="fcpass-tune-")
        tuner = ray_tune.Tuner(trainable, tune_config=ray_tune.TuneConfig(
            search_alg=pattern_searcher(driver), num_samples=-1, max_concurrent_trials=concurrency, reuse_actors=True),
                               run_config=ray_tune.RunConfig(
                                   storage_path=storage, name="search", verbose=0, log_to_file=False,
                                   failure_config=ray_tune.FailureConfig(max_failures=TRIAL_RETRIES)))
        previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C stops fcpass, not only the experiment
        try:
            tuner.fit()
        finally:
            driver.abort()
            shutil.rmtree(storage, ignore_errors=True)
            if previous is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous
        driver.thread.join(timeout=10)
        if isinstance(driver.error, TrialFailed):
            raise FcpassError(str(driver.error)) from None
        if driver.error is not None:
            raise driver.error
        assert driver.result is not None
        wasted = len(driver.measured()) - len(driver.result.trials)
        log.info("search on Ray: %d trials, %d measured ahead and not needed", len(driver.result.trials), wasted)
        return driver.result
