"""The sampling host loop: scheduler steps around a denoiser, classifier-free guidance in one call.

The denoiser is either the plain graph or a cache-aware one (`runtimes.cache.CachedDenoiser`); the
loop does not know which. A graph exported at batch 1 takes one half of guidance: the loop still
hands the denoiser both halves, and the denoiser makes two calls of them (`split_halves`). Each
sampling run resets the denoiser, so no cache state leaks between runs. Noise comes from one seeded
generator for the whole request, so a sample does not depend on how requests are split into
model-sized batches.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from fcpass.contract.errors import FcpassError
from fcpass.contract.roles import ROLES, InputRoles
from runtimes.schedulers import Scheduler

log = logging.getLogger(__name__)


class Denoiser(Protocol):
    """One model call per step; `reset` starts a new trajectory of `num_steps` steps."""

    roles: InputRoles
    uncached_macs: int

    def reset(self, num_steps: int) -> None: ...

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray: ...

    def last_record(self) -> dict[str, Any]: ...


@dataclass
class SampleRequest:
    """What to draw. `classes` for class-conditional models, `prompt_embeds` (N, L, C) for captions, with
    `pooled_embeds` (N, P) for the graphs that also take a pooled caption embedding (SD3);
    `negative_embeds` (and `negative_pooled`), one row or one per caption, are guidance's unconditional
    half (the encoded empty or negative prompt; zeros where not given); `prompt_mask` (N, L) and
    `negative_mask` are the captions' attention masks, for the graphs that take one (ones where not
    given). `resolution` (height, width) in pixels is what a graph with PixArt-alpha's size conditions
    is told it draws (default: the latent's size times 8, PixArt's VAE factor), and the grid of a
    packed latent (Flux's)."""

    classes: list[int] | None = None
    prompt_embeds: np.ndarray | None = None
    pooled_embeds: np.ndarray | None = None
    negative_embeds: np.ndarray | None = None
    negative_pooled: np.ndarray | None = None
    prompt_mask: np.ndarray | None = None
    negative_mask: np.ndarray | None = None
    resolution: tuple[int, int] | None = None
    steps: int = 50
    guidance_scale: float = 1.5
    true_cfg_scale: float = 1.0  # a guidance-distilled graph's classifier-free guidance (its pipelines' true_cfg_scale)
    uncond_class: int | None = None
    seed: int = 0

    @property
    def count(self) -> int:
        if self.prompt_embeds is not None:
            return int(self.prompt_embeds.shape[0])
        return len(self.classes or [])


@dataclass
class SampleResult:
    images: np.ndarray
    wall_seconds: float
    step_seconds: list[float]
    macs_executed: int
    macs_uncached: int
    records: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    frames_axis: int = 2  # where a video sample keeps its frames (`fcpass.compiler.graphinfo.frames_axis`)

    def clips(self) -> np.ndarray:
        """The samples, a video's as (N, C, frames, H, W) whatever the model's layout: what grids and quality read."""
        return self.images.transpose(0, 2, 1, 3, 4) if self.images.ndim == 5 and self.frames_axis == 1 else self.images


def _batch_of(roles: InputRoles) -> int | None:
    b = roles.latent.shape[0] if roles.latent.shape else None
    return b if isinstance(b, int) else None


def samples_per_call(request: SampleRequest, roles: InputRoles) -> int:
    """How many of the request's samples one call of the graph draws (one "chunk" of `sample`): the graph's batch,
    halved where both halves of guidance share a call; every sample where the batch is dynamic."""
    cfg_scale = request.guidance_scale if roles.guidance is None else request.true_cfg_scale
    return _calls(roles, cfg_scale != 1.0, request.count)[0]


def sample(
    denoiser: Denoiser, scheduler: Scheduler, request: SampleRequest, progress: bool = True,
    chunks: Sequence[int] | None = None,
) -> SampleResult:
    """Run the whole sampling loop for every sample in `request`; time it as one wall-clock span. `chunks`, where
    given, runs only those calls' samples (chunk c: samples c * samples_per_call ..., from the same noise as the
    whole request draws); the others' images stay zero."""
    roles = denoiser.roles
    n = request.count
    cfg_scale, cond_input = _check_request(request, roles)
    cfg = cfg_scale != 1.0
    _check_inputs(request, roles, cfg)
    _check_latent(roles.latent)
    per_call, halves = _calls(roles, cfg, n)
    shape = tuple(int(d) for d in roles.latent.shape[1:])  # type: ignore[arg-type]
    packed = len(shape) == 2  # Flux's latent: (tokens, channels) of 2x2 patches
    # (frames of a video latent lead its height and width)
    grid = _token_grid(request, shape[0]) if packed else (shape[-2] // 2, shape[-1] // 2)
    pixels = (2 * VAE_FACTOR * grid[0], 2 * VAE_FACTOR * grid[1]) if packed else (VAE_FACTOR * shape[-2], VAE_FACTOR * shape[-1])
    way = convention(roles)
    if way.name:
        log.info("feeding the graph as %s's pipeline feeds its transformer", way.name)
    per_row, fixed = _constant_feeds(request, roles, grid, pixels, way.guidance_scale)
    rng = np.random.default_rng(request.seed)
    noise = rng.standard_normal((n, *shape)).astype(np.float32) * scheduler.init_noise_sigma
    scheduler.set_timesteps(request.steps, image_seq_len=grid[0] * grid[1],
                            sigmas=way.sigmas(request.steps) if way.sigmas else None)
    timesteps = scheduler.timesteps
    images = np.zeros_like(noise)
    starts = range(0, n, per_call)
    firsts = starts if chunks is None else [starts[c] for c in chunks]
    bar = tqdm(total=len(firsts) * len(timesteps), desc="sample", disable=not progress, leave=False, mininterval=1.0)
    loop = _Loop(denoiser, scheduler, timesteps, roles, way, cfg_scale, shape, packed, bar)
    start = time.perf_counter()
    for first in firsts:
        idx = np.arange(first, min(first + per_call, n))
        pad = np.concatenate([idx, np.full(per_call - len(idx), idx[-1])])
        rows = len(pad) * (2 if cfg else 1)
        # What stays put through the chunk's steps, built once: the conditioning, and the per-row
        # inputs repeated for both halves of guidance alike.
        constant = {cond_input.name: _conditioning(request, pad, cfg).astype(cond_input.dtype),
                    **_caption_extras(request, roles, pad, cfg),
                    **{name: np.repeat(row, rows, axis=0) for name, row in per_row.items()}, **fixed}
        images[idx] = loop.run_chunk(noise[pad], constant, rows, first // per_call)[: len(idx)]
    wall = time.perf_counter() - start
    bar.close()
    calls = len(firsts) * len(timesteps) * (2 if halves else 1)
    if packed:
        images = unpack_latents(images, grid)
    return SampleResult(images, wall, loop.step_seconds, loop.macs, denoiser.uncached_macs * calls, loop.records, calls,
                        getattr(denoiser, "frames_axis", 2))


def _check_request(request: SampleRequest, roles: InputRoles) -> tuple[float, Any]:
    """Raise FcpassError for a request the graph cannot take; return the guidance scale the loop
    applies and the conditioning input."""
    if request.count == 0:
        raise FcpassError("nothing to sample: give --class C (one or more) or --prompt-embeds FILE.npy")
    if request.steps < 1:
        raise FcpassError(f"--steps {request.steps} must be at least 1")
    if request.seed < 0:
        raise FcpassError(f"--seed {request.seed} must be 0 or more")
    # A guidance-distilled graph (FLUX.1-dev, HunyuanVideo) takes the guidance scale as an input; an
    # unconditional half is its pipelines' "true" guidance, at its own scale.
    if request.true_cfg_scale != 1.0 and roles.guidance is None:
        raise FcpassError(f"--true-cfg-scale {request.true_cfg_scale:g} is for graphs that take the guidance scale as an "
                          "input; this one guides with --guidance-scale")
    cfg_scale = request.guidance_scale if roles.guidance is None else request.true_cfg_scale
    cond_input = roles.prompt_embeds if request.prompt_embeds is not None else roles.class_labels
    if cond_input is None:
        kind = "--prompt-embeds" if request.prompt_embeds is not None else "--class"
        raise FcpassError(f"{kind} given but the graph has no matching conditioning input; name it with --inputs")
    if cfg_scale != 1.0 and request.prompt_embeds is None and request.uncond_class is None:
        raise FcpassError("classifier-free guidance needs the unconditional label, and the graph's class input indexes "
                          "no label table to read it from; pass --uncond-class U, or --guidance-scale 1")
    return cfg_scale, cond_input


def _check_latent(latent: Any) -> None:
    if latent.rank not in (3, 4, 5) or any(not isinstance(d, (int, np.integer)) or d < 1 for d in latent.shape[1:]):
        # (a role named with --inputs, or a segments manifest's interface, can give any shape)
        raise FcpassError(f"latent input {latent.name} {list(latent.shape)} is no (batch, channels, [frames,] height, "
                          "width) or packed (batch, tokens, channels) latent of fixed sizes; name the latent with "
                          "--inputs latent=NAME, or re-export the model")


def _calls(roles: InputRoles, cfg: bool, n: int) -> tuple[int, bool]:
    """(samples per denoiser call, whether each step makes two calls: one per half of guidance)."""
    model_batch = _batch_of(roles)
    halves = cfg and model_batch == 1
    if cfg and model_batch is not None and model_batch > 1 and model_batch % 2:
        raise FcpassError(f"the graph's batch is {model_batch}: guidance needs an even batch (both halves in one call) "
                          "or batch 1 (a call per half); re-export with --batch 2, or use --guidance-scale 1")
    per_call = n if model_batch is None else (model_batch // 2 if cfg and not halves else model_batch)
    return per_call, halves


@dataclass
class _Loop:
    """The steps of one chunk of samples, and what they record across chunks."""

    denoiser: Denoiser
    scheduler: Scheduler
    timesteps: Any  # the scheduler's, as set for the whole run
    roles: InputRoles
    way: Convention
    cfg_scale: float
    shape: tuple[int, ...]
    packed: bool
    bar: Any
    step_seconds: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    macs: int = 0

    def run_chunk(self, x: np.ndarray, constant: dict[str, np.ndarray], rows: int, chunk: int) -> np.ndarray:
        """Denoise the chunk's noise `x` through every timestep; return the final latent."""
        cfg = self.cfg_scale != 1.0
        roles, scheduler, timesteps = self.roles, self.scheduler, self.timesteps
        self.denoiser.reset(len(timesteps))
        for i, t in enumerate(timesteps):
            t0 = time.perf_counter()
            latent_in = np.concatenate([x, x]) if cfg else x
            feeds = {roles.latent.name: scheduler.scale_model_input(latent_in, i).astype(roles.latent.dtype),
                     roles.timestep.name: _timestep_feed(t * self.way.timestep_scale, rows, roles), **constant}
            out = self.denoiser(feeds, i)
            if not self.packed:
                out = out[:, : self.shape[0]]  # learned-sigma graphs output 2C channels; the first C are the mean
            if cfg:
                cond_out, uncond_out = out[: len(x)], out[len(x) :]
                out = uncond_out + self.cfg_scale * (cond_out - uncond_out)
            x = scheduler.step(out, i, x)
            check_finite(x, i, len(timesteps), scheduler)
            self.step_seconds.append(time.perf_counter() - t0)
            record = self.denoiser.last_record()
            self.macs += record.get("macs", self.denoiser.uncached_macs)
            self.records.append({"step": i, "chunk": chunk, **record})
            self.bar.update()
        return x


def _check_inputs(request: SampleRequest, roles: InputRoles, cfg: bool) -> None:
    """Every graph input has a role this loop feeds, and the pooled and negative embeddings match the graph
    and the captions."""
    if roles.others:
        s = roles.others[0]
        raise FcpassError(f"input {s.name} {s.dtype}{list(s.shape)} has no role the sampler feeds ({', '.join(ROLES)}); "
                          f"name its role with --inputs ROLE={s.name}, or export the model without it")
    pooled, given = roles.pooled_embeds, request.pooled_embeds
    if pooled is not None and given is None:
        raise FcpassError(f"the graph takes pooled caption embeddings ({pooled.name} {list(pooled.shape)}); pass "
                          "--pooled-embeds F.npy, one row per caption")
    if given is not None and pooled is None:
        raise FcpassError("--pooled-embeds given but the graph takes no pooled embeddings (a rank-2 float input "
                          "named pooled...); drop it, or name that input with --inputs pooled_embeds=NAME")
    if given is not None and (request.prompt_embeds is None or len(given) != len(request.prompt_embeds)):
        captions = 0 if request.prompt_embeds is None else len(request.prompt_embeds)
        raise FcpassError(f"--pooled-embeds has {len(given)} rows for {captions} captions (--prompt-embeds); "
                          "give one row per caption")
    mask = roles.prompt_mask
    if request.prompt_mask is not None and mask is None:
        raise FcpassError("--prompt-mask given but the graph takes no caption mask (a rank-2 input named ...mask); drop "
                          "it, or name that input with --inputs prompt_mask=NAME")
    if request.prompt_mask is not None and (request.prompt_embeds is None or len(request.prompt_mask) != len(request.prompt_embeds)):
        captions = 0 if request.prompt_embeds is None else len(request.prompt_embeds)
        raise FcpassError(f"--prompt-mask has {len(request.prompt_mask)} rows for {captions} captions (--prompt-embeds); "
                          "give one row per caption")
    for flag, negative, of in (("--negative-embeds", request.negative_embeds, request.prompt_embeds),
                               ("--negative-pooled-embeds", request.negative_pooled, given),
                               ("--negative-mask", request.negative_mask, request.prompt_embeds if mask else None)):
        if negative is None:
            continue
        if not cfg:
            raise FcpassError(f"{flag} is guidance's unconditional half, and this run has none (--guidance-scale 1, or "
                              "a graph that takes the scale as an input without --true-cfg-scale); drop it")
        if of is None:
            raise FcpassError(f"{flag} given without what it stands beside ({flag.replace('negative-', '')}, and a graph "
                              "that takes it); add them, or drop it")
        if len(negative) not in (1, len(of)):
            raise FcpassError(f"{flag} has {len(negative)} rows for {len(of)} captions; give one row for all, or one "
                              "per caption")
    for flag, rows, spec in (("--prompt-embeds", request.prompt_embeds, roles.prompt_embeds), ("--pooled-embeds", given, pooled),
                             ("--negative-embeds", request.negative_embeds, roles.prompt_embeds),
                             ("--negative-pooled-embeds", request.negative_pooled, pooled),
                             ("--prompt-mask", request.prompt_mask, mask), ("--negative-mask", request.negative_mask, mask)):
        if rows is None or spec is None:
            continue
        want = spec.shape[1:]
        if len(rows.shape) != len(spec.shape) or any(w is not None and w != g for w, g in zip(want, rows.shape[1:])):
            raise FcpassError(f"{flag} rows are {tuple(rows.shape[1:])} but the graph takes {tuple(want)} per sample "
                              f"({spec.name} {list(spec.shape)}); save them at that size, or re-export the model for yours")
    if request.resolution is not None and roles.resolution is None and roles.aspect_ratio is None and roles.latent.rank != 3:
        raise FcpassError("--resolution given but the graph takes no size condition (PixArt-alpha's resolution or "
                          "aspect_ratio input) and no packed latent (Flux's); drop it, or name that input with "
                          "--inputs resolution=NAME")


@dataclass(frozen=True)
class Convention:
    """How a family's pipeline feeds its transformer where the graph cannot say: the timestep's scale, the
    distilled guidance input's scale, and the unshifted sigmas it hands its scheduler (None: the scheduler's)."""

    name: str = ""
    timestep_scale: float = 1.0
    guidance_scale: float = 1.0
    sigmas: Callable[[int], np.ndarray] | None = None


# FluxPipeline: timestep / 1000 (the transformer scales it back), linspace(1, 1/S, S).
FLUX = Convention("Flux", timestep_scale=1e-3, sigmas=lambda steps: np.linspace(1.0, 1 / steps, steps))
# HunyuanVideoPipeline: guidance * 1000, linspace(1, 0, S + 1) without its last.
HUNYUAN_VIDEO = Convention("HunyuanVideo", guidance_scale=1000.0,
                           sigmas=lambda steps: np.linspace(1.0, 0.0, steps + 1)[:-1])


def convention(roles: InputRoles) -> Convention:
    """Flux's graphs take position ids; HunyuanVideo's are the video graphs with a guidance input."""
    if roles.img_ids is not None:
        return FLUX
    if roles.guidance is not None and roles.latent.rank == 5:
        return HUNYUAN_VIDEO
    return Convention()


VAE_FACTOR = 8  # pixels per latent cell in the VAEs of PixArt-alpha, Stable Diffusion and Flux


def _token_grid(request: SampleRequest, tokens: int) -> tuple[int, int]:
    """Rows and columns of 2x2 latent patches in a packed latent of `tokens` tokens: from --resolution, else square."""
    if request.resolution is not None:
        height, width = request.resolution
        grid = (height // (2 * VAE_FACTOR), width // (2 * VAE_FACTOR))
        if grid[0] * grid[1] != tokens:
            raise FcpassError(f"--resolution {height}x{width} makes {grid[0]}x{grid[1]} latent patches, but the graph's "
                              f"latent holds {tokens} tokens; pass the size it was exported for")
        return grid
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise FcpassError(f"the graph's packed latent holds {tokens} tokens, not a square grid; pass --resolution HxW")
    return side, side


def unpack_latents(latents: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(B, tokens, 4C) packed latents as (B, C, H, W), as Flux's pipeline unpacks them before decoding."""
    b, _, channels = latents.shape
    x = latents.reshape(b, grid[0], grid[1], channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, 2 * grid[0], 2 * grid[1])


def _constant_feeds(request: SampleRequest, roles: InputRoles, grid: tuple[int, int], pixels: tuple[int, int],
                    guidance_scale: float = 1.0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The inputs that stay put through a run: ({name: one batch row}, {name: the whole feed}).

    PixArt-alpha's size conditions, as diffusers' pipeline feeds them (height and width in pixels, their
    ratio, `pixels` unless --resolution gives them); Flux's position ids (each image token's patch row and
    column in `grid`, zeros for the caption tokens) and a distilled guidance scale (times `guidance_scale`)."""
    per_row: dict[str, np.ndarray] = {}
    fixed: dict[str, np.ndarray] = {}
    if roles.resolution is not None or roles.aspect_ratio is not None:
        height, width = request.resolution or pixels
        if request.resolution is None:
            log.info("size conditions: %dx%d pixels (the latent's size times %d); --resolution HxW sets them",
                     height, width, VAE_FACTOR)
        if roles.resolution is not None:
            per_row[roles.resolution.name] = np.array([[height, width]], roles.resolution.dtype)
        if roles.aspect_ratio is not None:
            per_row[roles.aspect_ratio.name] = np.array([[height / width]], roles.aspect_ratio.dtype)
    ids = {}
    if roles.img_ids is not None:
        rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
        ids[roles.img_ids] = np.stack([np.zeros(rows.size), rows.ravel(), cols.ravel()], axis=-1)
    if roles.txt_ids is not None:
        ids[roles.txt_ids] = np.zeros((int(roles.txt_ids.shape[-2]), 3))
    for spec, value in ids.items():
        if spec.rank == 3:  # older exports hold a batch axis
            per_row[spec.name] = value[None].astype(spec.dtype)
        else:
            fixed[spec.name] = value.astype(spec.dtype)
    if roles.guidance is not None:
        spec = roles.guidance
        scale = np.array(request.guidance_scale * guidance_scale, spec.dtype)
        (per_row if spec.rank else fixed)[spec.name] = scale.reshape((1,) * spec.rank)
    return per_row, fixed


def split_halves(feeds: dict[str, np.ndarray], roles: InputRoles) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """A guided step's feeds (the conditional rows, then the unconditional ones) as the feeds of two calls,
    where the graph takes one half's rows; None where it takes both in one call."""
    batch = _batch_of(roles)
    if batch is None or len(feeds[roles.latent.name]) != 2 * batch:
        return None
    batched = _batched_inputs(roles)
    cond: dict[str, np.ndarray] = {}
    uncond: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        cond[name], uncond[name] = (value[:batch], value[batch:]) if name in batched else (value, value)
    return cond, uncond


@functools.lru_cache(maxsize=8)
def _batched_inputs(roles: InputRoles) -> frozenset[str]:
    """Every role's input leads with the batch axis but a scalar timestep and position ids without one
    (Flux's (tokens, 3)), which serve both calls of a guided step."""
    specs = (roles.latent, roles.timestep, roles.class_labels, roles.prompt_embeds, roles.pooled_embeds, roles.prompt_mask,
             roles.resolution, roles.aspect_ratio, roles.guidance, *(s for s in (roles.img_ids, roles.txt_ids) if s and s.rank == 3))
    return frozenset(s.name for s in specs if s is not None and s.rank > 0)


def join_halves(cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray], roles: InputRoles) -> dict[str, np.ndarray]:
    """Two calls' cache states (or outputs) as one call of both halves holds them: the batch rows joined."""
    batch = _batch_of(roles)
    return {name: np.concatenate([value, uncond[name]]) if value.ndim > 0 and len(value) == batch else value
            for name, value in cond.items()}


def _with_uncond(cond: np.ndarray, cfg: bool, negative: np.ndarray | None, idx: np.ndarray, fill: float = 0) -> np.ndarray:
    """The captions' rows `cond`, then guidance's unconditional rows: the negative ones (one row for every
    caption, or the captions' own `idx`), else `fill` (zero embeddings: no text encoder here to encode "")."""
    if not cfg:
        return cond
    uncond = np.full_like(cond, fill) if negative is None else negative[idx if len(negative) > 1 else np.zeros_like(idx)]
    return np.concatenate([cond, uncond.astype(cond.dtype)])


def _caption_extras(request: SampleRequest, roles: InputRoles, idx: np.ndarray, cfg: bool) -> dict[str, np.ndarray]:
    """The pooled embeddings and the caption mask of the captions `idx`, for the graphs that take them."""
    extras = {}
    if roles.pooled_embeds is not None:
        pooled = roles.pooled_embeds
        extras[pooled.name] = _with_uncond(request.pooled_embeds[idx], cfg, request.negative_pooled, idx).astype(pooled.dtype)
    if roles.prompt_mask is not None:
        mask = roles.prompt_mask
        rows = request.prompt_mask[idx] if request.prompt_mask is not None else np.ones((len(idx), mask.shape[1]))
        extras[mask.name] = _with_uncond(rows, cfg, request.negative_mask, idx, fill=1).astype(mask.dtype)
    return extras


def _conditioning(request: SampleRequest, idx: np.ndarray, cfg: bool) -> np.ndarray:
    if request.prompt_embeds is not None:
        return _with_uncond(request.prompt_embeds[idx], cfg, request.negative_embeds, idx)
    labels = np.asarray(request.classes, dtype=np.int64)[idx]
    if cfg:
        return np.concatenate([labels, np.full_like(labels, request.uncond_class)])
    return labels


def _timestep_feed(t: float, batch: int, roles: InputRoles) -> np.ndarray:
    spec = roles.timestep
    value = np.asarray(t, dtype=np.float64)
    if np.issubdtype(spec.dtype, np.integer):
        value = np.round(value)
    if spec.rank == 0:
        return value.astype(spec.dtype)
    return np.full((batch,), value, dtype=spec.dtype)


class PlainDenoiser:
    """The uncached graph: one backend call per step, bound like the cached graph's where the backend binds."""

    def __init__(self, backend: Any, roles: InputRoles, output: str, macs: int, per_row: bool = False) -> None:
        """`macs` of one call, or with `per_row` (a graph with a dynamic batch axis) of one batch row."""
        self.backend = backend
        self.roles = roles
        self.output = output
        self._macs = macs
        self.per_row = per_row
        self._rows = 1  # of the last call; `sample` pads every call of a run to the same rows
        self._calls = 1  # graph calls of the last step: two where the graph takes one half of guidance
        bound = getattr(backend, "bound_call", None)
        self._bound = bound() if bound is not None else None

    @property
    def uncached_macs(self) -> int:
        return self._macs * self._rows if self.per_row else self._macs

    def reset(self, num_steps: int) -> None:
        pass

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        halves = split_halves(feeds, self.roles)
        self._calls = 1 if halves is None else 2
        if halves is not None:
            return np.concatenate([self._call(half) for half in halves])
        self._rows = len(feeds[self.roles.latent.name])
        return self._call(feeds)

    def _call(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self._bound is not None:
            return self._bound(feeds, [self.output])[self.output]
        return self.backend.run(feeds)[self.output]

    def last_record(self) -> dict[str, Any]:
        return {"macs": self.uncached_macs * self._calls}


def check_finite(x: np.ndarray, index: int, steps: int, scheduler: Any) -> None:
    """Stop a trajectory whose latent turned NaN or Inf: every step after would only carry it on, and the
    images would come out blank without a word. The model's output or the sampler's arithmetic is at fault."""
    if not np.isfinite(x).all():
        raise FcpassError(f"the latent is not finite after step {index + 1} of {steps} ({type(scheduler).__name__}): "
                          "the model's output or the scheduler config's values overflow; check the scheduler config "
                          "against the model's own, and sample the graph without a policy to rule out the cache")
