"""Calibration: fit every region's linear approximation and FastCache's per-block sigma^2.

Two passes over N sampling trajectories of the compiled graph with every region computing (which
makes its state outputs the true input H and output O of every region at every step):

1. Fit. For each step i and gap g in 1..max_gap (a skipped region's reference is up to max_gap
   steps old), with X = H(i) - H(i-g) and Y = O(i) - O(i-g), solve the ridge problem
   min ||X W + b - Y||^2 + lam (||W - I||^2 + ||b||^2) for V = W - I, b (`linear`); and with
   X = H(i), Y = O(i), the same problem for `affine`'s A and c. Only the normal equations
   are accumulated ((D+1)^2 numbers per region output), never the activations, so memory is
   bounded. lam is chosen on held-out trajectories (every 4th) from a grid that includes lam = inf
   (W = I, b = 0: the residual approximation), so the fit never does worse than `residual` there;
   the residual stream has directions that barely vary, and a weak ridge blows the fit up along them.
2. Test. Rerun the same trajectories; wherever the fitted approximation reproduces O(i) within
   relative error eps, collect delta^2 = rel(H(i), H(i-g))^2. sigma^2 is their mean (ALGORITHMS 2a);
   a region with no such pair gets none and is never skipped by FastCache.

One trajectory's share of a pass is `accumulate` (over some of the trajectories, into given fits and peer
records); `reduce` adds the shares of separate runs, in trajectory order, into one pass's totals. On one
machine a pass is one `accumulate` over every trajectory; on a cluster (`fcpass.cluster`, `--ray`) each
trajectory is a task returning its `Accumulation`, and `reduce` sums them into the same plan (the same
sigma^2 and peer records; the fits to rounding of the sums' order).
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model
from scipy import linalg

from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import initializer_tensors, save_model
from fcpass.contract.plan import CachePlan, RegionSpec
from fcpass.contract.roles import graph_inputs, infer_roles
from fcpass.peer_calibration import PEERS, PeerStats
from runtimes.backend import OrtBackend
from runtimes.cache import CachedDenoiser
from runtimes.policies import NoCache
from runtimes.sampler import SampleRequest, sample, samples_per_call
from runtimes.schedulers import config_identity, scheduler_from_config

if TYPE_CHECKING:
    from fcpass.sampling import SamplingSetup

log = logging.getLogger(__name__)


@dataclass
class CalibrationOptions:
    trajectories: int = 8
    steps: int = 50
    eps: float = 0.05
    max_gap: int = 4
    ridge: float = 1e-2  # used when there is no held-out trajectory to choose it (fewer than 4)
    seed: int = 1000
    provider: str = "cpu"  # ONNX Runtime's, for the calibration runs: cpu or cuda
    threads: int | None = None  # its intra-op threads (None: ONNX Runtime's default)

    def __post_init__(self) -> None:
        if self.trajectories < 1:
            raise FcpassError(f"--calibrate {self.trajectories} must be at least 1 trajectory")
        if self.steps < 1:
            raise FcpassError(f"--calib-steps {self.steps} must be at least 1")


class _Recorder(CachedDenoiser):
    """Calls `sink(step, state, output)` after every step with the new (true, all-compute) state."""

    def __init__(self, *args: Any, sink: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink = sink

    def reset(self, num_steps: int) -> None:
        super().reset(num_steps)
        self.sink(-1, None, None)

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        out = super().__call__(feeds, step)
        self.sink(step, self.state, out)
        return out


def _calibration_request(request: SampleRequest, options: CalibrationOptions) -> SampleRequest:
    """N trajectories cycling through the user's classes or prompts, with the calibration seed."""
    n = options.trajectories
    classes = request.classes or []

    def per_trajectory(rows: np.ndarray | None) -> np.ndarray | None:  # the captions' rows, cycled
        return None if rows is None else rows[np.arange(n) % len(rows)]

    def negative(rows: np.ndarray | None) -> np.ndarray | None:  # one row for every caption stays one row
        return rows if rows is None or len(rows) == 1 else per_trajectory(rows)

    return SampleRequest(
        classes=[classes[j % len(classes)] for j in range(n)] if classes else None,
        prompt_embeds=per_trajectory(request.prompt_embeds), pooled_embeds=per_trajectory(request.pooled_embeds),
        prompt_mask=per_trajectory(request.prompt_mask), negative_embeds=negative(request.negative_embeds),
        negative_pooled=negative(request.negative_pooled), negative_mask=negative(request.negative_mask),
        resolution=request.resolution, steps=options.steps, guidance_scale=request.guidance_scale,
        true_cfg_scale=request.true_cfg_scale,
        uncond_class=request.uncond_class, seed=options.seed,
    )


@contextmanager
def recording_session(model: onnx.ModelProto, plan: CachePlan, options: CalibrationOptions) -> Iterator[Callable[..., None]]:
    """One ONNX Runtime session of `model` on `options.provider`; yields record(sink, setup, options), which
    samples the calibration trajectories with every region computing and calls sink after every step."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calib.onnx"
        save_model(model, path)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in initializer_tensors(model)):
            # over 2 GB saving moved the weights out of `model` into the file: read them back while it exists
            load_external_data_for_model(model, tmp)
        backend = OrtBackend(path, [options.provider], threads=options.threads)
        from fcpass.sampling import roles_from_plan

        roles = roles_from_plan(plan.roles, backend)

        def record(sink: Callable[..., None], setup: SamplingSetup, options: CalibrationOptions,
                   chunks: Sequence[int] | None = None) -> None:
            denoiser = _Recorder(backend, plan, NoCache(), roles, keep_all=True, sink=sink)
            scheduler = scheduler_from_config(setup.scheduler_config)
            sample(denoiser, scheduler, _calibration_request(setup.request, options), progress=chunks is None,
                   chunks=chunks)

        yield record


def calibrate_peers(model: onnx.ModelProto, plan: CachePlan, setup: SamplingSetup, which: str,
                    options: CalibrationOptions, cluster: Cluster | None = None) -> dict[str, Any]:
    """Fit `which` (teacache, magcache) on fresh trajectories and store it in `plan`; see peer_calibration.
    With `cluster`, the trajectories run there (one task each) and their records are reduced here."""
    if which not in PEERS:
        raise FcpassError(f"--for {which!r} unknown; use one of {', '.join(PEERS)}")
    peers = PeerStats(plan, (which,))
    if not peers.which:
        raise FcpassError(f"{which} calibration needs the stack region"
                          + (" with block 0's modulated-input probe" if which == "teacache" else "")
                          + "; optimize with --regions including stack")
    with _passes(model, plan, setup, options, cluster) as run:
        run({}, peers, "peers")
    result = peers.store(options.steps)
    if which not in result:
        raise FcpassError(f"{which} calibration saw no usable pair of steps; use --calib-steps >= 2")
    return result[which]


def _peer_sink(peers: PeerStats) -> Callable[[int, dict[str, np.ndarray] | None, np.ndarray | None], None]:
    """The sink of a peers-only pass: every all-compute step into `peers`, a NaN/Inf refused."""

    def sink(step: int, state: dict[str, np.ndarray] | None, output: np.ndarray | None) -> None:
        if state is None or output is None:
            peers.reset()
            return
        if not (np.isfinite(output).all() and all(np.isfinite(v).all() for v in state.values())):
            raise FcpassError(f"calibration diverged: NaN/Inf at step {step}; check the scheduler config and weights")
        peers.add(step, state, output)

    return sink


@dataclass
class Accumulation:
    """One run's share of a pass: per region its fit's sums and lists (`_Fit.stats`), and the peer policies'
    records (`PeerStats.stats`) where the pass keeps them."""

    fits: dict[str, dict[str, Any]]
    peers: dict[str, Any] | None


Remote = Callable[[str, "dict[str, Any] | None", "tuple[str, ...] | None"], list[Accumulation]]


class Cluster(Protocol):
    """Where a pass's trajectories run when not here (`fcpass.cluster.RayCluster`): `passes` opens the graph there
    and yields remote(phase, solutions, peers) -> every trajectory's `trajectory_share`, in trajectory order."""

    def passes(self, model: onnx.ModelProto, plan: CachePlan, setup: SamplingSetup,
               options: CalibrationOptions) -> AbstractContextManager[Remote]: ...


def trajectory_count(model: onnx.ModelProto, plan: CachePlan, setup: SamplingSetup, options: CalibrationOptions) -> int:
    """The calibration's trajectories: the calls of the graph its request makes (`samples_per_call` samples each)."""
    own = [s for s in graph_inputs(model) if not s.name.startswith("fc")]
    roles = infer_roles(model, {k: v for k, v in plan.roles.items() if v}, candidates=own)
    request = _calibration_request(setup.request, options)
    return -(-request.count // samples_per_call(request, roles))


def accumulate(record: Callable[..., None], sink: Callable[..., None], setup: SamplingSetup,
               options: CalibrationOptions, chunks: Sequence[int] | None = None) -> None:
    """Run trajectories `chunks` (default: all) of the calibration request through `sink`."""
    record(sink, setup, options, chunks)


def trajectory_share(record: Callable[..., None], plan: CachePlan, setup: SamplingSetup, options: CalibrationOptions,
                     chunk: int, phase: str, solutions: dict[str, Any] | None,
                     which: tuple[str, ...] | None) -> Accumulation:
    """What trajectory `chunk` adds to `phase` (fit, test, or peers: the peer records alone), from zero: fresh fits
    (holding `solutions`, each region's (V, b) and (A - I, c) per output, in the test pass) and fresh records of
    the peer policies `which` (None: none)."""
    fits = {} if phase == "peers" else {r.name: _Fit(r, plan, options) for r in plan.regions}
    for name, (solution, affine) in (solutions or {}).items():
        fits[name].solution, fits[name].affine = solution, affine
    peers = PeerStats(plan, which) if which is not None else None
    if phase == "peers":
        assert peers is not None
        sink: Callable[..., None] = _peer_sink(peers)
    else:
        sink = _Sink(plan, fits, phase, options.max_gap, peers, first=chunk)
    accumulate(record, sink, setup, options, [chunk])
    return Accumulation({n: f.stats() for n, f in fits.items()}, peers.stats() if peers is not None else None)


def reduce(fits: dict[str, _Fit], peers: PeerStats | None, parts: Sequence[Accumulation]) -> None:
    """Add trajectories' shares, in trajectory order, into a pass's `fits` and `peers`: the lists as one run
    appends them, the sums as one run adds them up to the order of addition."""
    for part in parts:
        for name, stats in part.fits.items():
            fits[name].absorb(stats)
        if peers is not None and part.peers is not None:
            peers.absorb(part.peers)


Run = Callable[[dict[str, "_Fit"], PeerStats | None, str], None]


@contextmanager
def _passes(model: onnx.ModelProto, plan: CachePlan, setup: SamplingSetup, options: CalibrationOptions,
            cluster: Cluster | None) -> Iterator[Run]:
    """Yields run(fits, peers, phase), which adds every trajectory of one pass into `fits` and `peers`: here, in
    one session, or on `cluster`, reduced here."""
    if cluster is None:
        with recording_session(model, plan, options) as record:

            def run(fits: dict[str, _Fit], peers: PeerStats | None, phase: str) -> None:
                sink = _peer_sink(peers) if phase == "peers" and peers is not None else _Sink(
                    plan, fits, phase, options.max_gap, peers)
                accumulate(record, sink, setup, options)

            yield run
        return
    with cluster.passes(model, plan, setup, options) as remote:

        def run_remote(fits: dict[str, _Fit], peers: PeerStats | None, phase: str) -> None:
            solutions = {n: (f.solution, f.affine) for n, f in fits.items()} if phase == "test" else None
            reduce(fits, peers, remote(phase, solutions, peers.which if peers is not None else None))

        yield run_remote


def _pairs(region: RegionSpec) -> list[tuple[int, int]]:
    return [(k, j) for k, j in enumerate(region.pairs) if j is not None]


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample ||a - b|| / ||b|| (batch axis 0)."""
    axes = tuple(range(1, a.ndim))
    num = np.sqrt(np.sum((a.astype(np.float64) - b) ** 2, axis=axes))
    den = np.sqrt(np.sum(b.astype(np.float64) ** 2, axis=axes))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def calibrate(model: onnx.ModelProto, plan: CachePlan, setup: SamplingSetup, options: CalibrationOptions,
              cluster: Cluster | None = None) -> None:
    """Fit V, b of every region (initializers of `model`) and store per-region numbers in `plan`. With `cluster`,
    each pass's trajectories run there and are reduced here."""
    request: SampleRequest = setup.request
    n = options.trajectories
    fits = {r.name: _Fit(r, plan, options) for r in plan.regions}
    peers = PeerStats(plan)
    with _passes(model, plan, setup, options, cluster) as run:
        for phase in ("fit", "test"):
            if phase == "test":
                for f in fits.values():
                    f.solve()
            log.info("calibration, %s pass: %d trajectories x %d steps", phase, n, options.steps)
            run(fits, peers if phase == "fit" else None, phase)
    for r in plan.regions:
        fits[r.name].store(model)
        r.calibration = fits[r.name].summary()
    peers.store(options.steps)
    plan.calibration = {
        "trajectories": n, "steps": options.steps, "eps": options.eps, "max_gap": options.max_gap,
        "ridge": options.ridge, "seed": options.seed, "guidance_scale": request.guidance_scale,
        **config_identity(setup.scheduler_config),
    }


class _Sink:
    """Keeps the last max_gap states of the current trajectory and feeds (ref, now) pairs to fits."""

    def __init__(self, plan: CachePlan, fits: dict[str, _Fit], phase: str, max_gap: int,
                 peers: PeerStats | None = None, first: int = 0) -> None:
        self.plan = plan
        self.peers = peers
        self.fits = fits
        self.phase = phase
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=max_gap)
        self.trajectory = first - 1  # the index of the trajectory it records (held-out: every 4th)

    def __call__(self, step: int, state: dict[str, np.ndarray] | None, output: np.ndarray | None) -> None:
        if state is None or output is None:
            self.history.clear()
            self.trajectory += 1
            if self.peers is not None:
                self.peers.reset()
            return
        now = {s.name: state[s.name] for s in self.plan.states if s.kind in ("in", "out")}
        bad = [n for n, v in now.items() if not np.isfinite(v).all()]
        if bad:
            raise FcpassError(
                f"calibration diverged: {self._culprit(now)} is NaN/Inf at step {step} of trajectory "
                f"{self.trajectory}; check the scheduler config and the model's weights"
            )
        for gap, ref in enumerate(reversed(self.history), start=1):
            for f in self.fits.values():
                f.add(ref, now, gap, self.phase, held_out=self.trajectory % 4 == 3)
        self.history.append(now)
        if self.peers is not None:
            self.peers.add(step, state, output)


    def _culprit(self, now: dict[str, np.ndarray]) -> str:
        """The first block whose input is finite and output is not, else the first bad tensor."""
        for r in self.plan.block_regions():
            ins = [now[f"fc.{r.name}.in{j}"] for j in range(len(r.inputs))]
            outs = [now[f"fc.{r.name}.out{k}"] for k in range(len(r.outputs))]
            if all(np.isfinite(x).all() for x in ins) and not all(np.isfinite(x).all() for x in outs):
                return f"region {r.name} output"
        name = next(n for n, v in now.items() if not np.isfinite(v).all())
        return f"state {name}"


_LISTS = ("good_delta2", "err_linear", "err_residual", "err_reuse", "err_affine")  # _Fit's per-pair lists


class _Fit:
    def __init__(self, region: RegionSpec, plan: CachePlan, options: CalibrationOptions) -> None:
        self.region = region
        self.options = options
        self.names_in = [f"fc.{region.name}.in{j}" for j in range(len(region.inputs))]
        self.names_out = [f"fc.{region.name}.out{k}" for k in range(len(region.outputs))]
        self.width = {k: s.shape[-1] for k, s in enumerate(st for st in plan.states if st.region == region.name and st.kind == "out")}
        # Per form ("lin": X = H(i) - H(i-g); "aff": X = H(i)), output k and split (0 fit, 1 held
        # out): X'X, X'R and R'R of the augmented problem, R the target minus the identity's guess.
        self.normal: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray, float]] = {}
        self.chosen_lambda: dict[tuple[str, int], float] = {}
        self.solution: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.affine: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.good_delta2: list[float] = []
        self.pairs_seen = 0
        self.err_linear: list[float] = []
        self.err_residual: list[float] = []
        self.err_reuse: list[float] = []
        self.err_affine: list[float] = []

    def add(
        self, ref: dict[str, np.ndarray], now: dict[str, np.ndarray], gap: int, phase: str, held_out: bool = False
    ) -> None:
        pairs = _pairs(self.region)
        if phase == "fit":
            for k, j in pairs:
                h0, h1 = ref[self.names_in[j]], now[self.names_in[j]]
                o0, o1 = ref[self.names_out[k]], now[self.names_out[k]]
                d = h1.shape[-1]
                x = (h1 - h0).reshape(-1, d).astype(np.float64)
                self._accumulate(("lin", k, int(held_out)), x, (o1 - o0).reshape(-1, d) - x)
                if gap == 1:  # the affine map ignores the reference: one pair per step
                    x = h1.reshape(-1, d).astype(np.float64)
                    self._accumulate(("aff", k, int(held_out)), x, o1.reshape(-1, d) - x)
            return
        # Test phase: one decision per region, so errors and deltas combine all its streams.
        self.pairs_seen += 1
        num = sum(np.sum((now[n] - ref[n]).astype(np.float64).reshape(len(now[n]), -1) ** 2, axis=1) for n in self.names_in)
        den = sum(np.sum(ref[n].astype(np.float64).reshape(len(ref[n]), -1) ** 2, axis=1) for n in self.names_in)
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = float(np.max(np.sqrt(num / den)))
        errs_lin, errs_res, errs_reuse, errs_aff = [], [], [], []
        for k in range(len(self.names_out)):
            o0, o1 = ref[self.names_out[k]], now[self.names_out[k]]
            j = self.region.pairs[k]
            if j is None:
                lin = res = aff = o0
            else:
                h1 = now[self.names_in[j]].astype(np.float64)
                dh = h1 - ref[self.names_in[j]]
                res = o0 + dh
                v, b = self.solution[k]
                lin = res + dh @ v + b
                va, c = self.affine[k]
                aff = h1 + h1 @ va + c
            errs_lin.append(np.max(_rel(lin, o1)))
            errs_res.append(np.max(_rel(res, o1)))
            errs_reuse.append(np.max(_rel(o0, o1)))
            errs_aff.append(np.max(_rel(aff, o1)))
        err = float(max(errs_lin))
        self.err_linear.append(err)
        self.err_residual.append(float(max(errs_res)))
        self.err_reuse.append(float(max(errs_reuse)))
        self.err_affine.append(float(max(errs_aff)))
        if err <= self.options.eps and np.isfinite(delta):
            self.good_delta2.append(delta**2)

    def _accumulate(self, key: tuple[str, int, int], x: np.ndarray, y: np.ndarray) -> None:
        d = x.shape[1]
        y = y.astype(np.float64)
        xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        a, b, c = self.normal.get(key, (np.zeros((d + 1, d + 1)), np.zeros((d + 1, d)), 0.0))
        self.normal[key] = (a + xa.T @ xa, b + xa.T @ y, c + float(np.sum(y * y)))

    def stats(self) -> dict[str, Any]:
        """What the trajectories added so far (the normal equations, the test pass's counts and lists)."""
        return {"normal": self.normal, "pairs_seen": self.pairs_seen, **{k: getattr(self, k) for k in _LISTS}}

    def absorb(self, stats: dict[str, Any]) -> None:
        """Add another run's `stats` (later trajectories) to these."""
        for key, (a, b, c) in stats["normal"].items():
            if key in self.normal:
                a0, b0, c0 = self.normal[key]
                self.normal[key] = (a0 + a, b0 + b, c0 + c)
            else:
                self.normal[key] = (a, b, c)
        self.pairs_seen += stats["pairs_seen"]
        for k in _LISTS:
            getattr(self, k).extend(stats[k])

    def solve(self) -> None:
        for k, _ in _pairs(self.region):
            self.solution[k] = self._solve("lin", k)
            self.affine[k] = self._solve("aff", k)

    def _solve(self, form: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(W - I, b) of one form and output: the ridge solution at the held-out choice of lambda."""
        zero = (np.zeros((0, 0)), np.zeros((0, 0)), 0.0)
        d = int(self.width[k])
        identity = (np.zeros((d, d)), np.zeros(d))
        fit, held = self.normal.get((form, k, 0), zero), self.normal.get((form, k, 1), zero)
        if not fit[0].size:  # no pair seen (a 1-step calibration): stay at W = I, b = 0
            self.chosen_lambda[(form, k)] = float("inf")
            return identity
        scale = max(np.trace(fit[0][:d, :d]) / d, 1e-12)
        lam = self._select_lambda(fit, held, scale)
        self.chosen_lambda[(form, k)] = lam
        if not np.isfinite(lam):
            return identity
        a = fit[0] + (held[0] if held[0].size else 0.0)
        b = fit[1] + (held[1] if held[1].size else 0.0)
        sol = linalg.solve(a + lam * scale * np.eye(d + 1), b, assume_a="pos")
        return sol[:d], sol[d]

    def _select_lambda(self, fit: tuple, held: tuple, scale: float) -> float:
        """The grid value with the least held-out squared error; inf means W = I, b = 0."""
        if not held[0].size:
            return self.options.ridge
        best, best_err = float("inf"), held[2]  # the residual approximation's error
        for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
            theta = linalg.solve(fit[0] + lam * scale * np.eye(len(fit[0])), fit[1], assume_a="pos")
            err = float(np.sum(theta * (held[0] @ theta)) - 2 * np.sum(theta * held[1]) + held[2])
            if err < best_err:
                best, best_err = lam, err
        return best

    def store(self, model: onnx.ModelProto) -> None:
        by_name = {t.name: t for t in model.graph.initializer}
        n = self.region.name
        for k, (v, b) in self.solution.items():
            va, c = self.affine[k]
            weights = ((f"fc.{n}.V{k}", v), (f"fc.{n}.b{k}", b), (f"fc.{n}.A{k}", np.eye(len(va)) + va), (f"fc.{n}.c{k}", c))
            for name, value in weights:
                tensor = by_name[name]
                dtype = numpy_helper.to_array(tensor).dtype
                tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))

    def summary(self) -> dict[str, Any]:
        mean = lambda xs: float(np.mean(xs)) if xs else None
        return {
            "sigma2": mean(self.good_delta2),
            "n_good": len(self.good_delta2),
            "n_pairs": self.pairs_seen,
            "fit_rel_err": mean(self.err_linear),
            "residual_rel_err": mean(self.err_residual),
            "reuse_rel_err": mean(self.err_reuse),
            "affine_rel_err": mean(self.err_affine),
            # None: held-out data preferred W = I, b = 0 (linear: the residual approximation).
            "ridge": {str(k): (v if np.isfinite(v) else None) for (f, k), v in self.chosen_lambda.items() if f == "lin"},
            "ridge_affine": {str(k): (v if np.isfinite(v) else None)
                             for (f, k), v in self.chosen_lambda.items() if f == "aff"},
        }
