"""diffusers' own cache hooks on the bundled digits DiT, driven by fcpass's sampling host loop.

The peer half of a side-by-side benchmark (`tools/bench_peers.py` imports this): the bundled weights
are loaded into diffusers' `DiTTransformer2DModel` (fp32, eval, CPU) and wrapped as a
`runtimes.sampler.Denoiser`, so `runtimes.sampler.sample` runs it with exactly the ONNX path's host
loop, noise, CFG batching (the ONNX graph's static batch 2: one sample's cond and uncond rows per call)
and numpy scheduler. Uncached, its samples equal the ONNX graph's to float32 rounding.

    model = load_diffusers_digits(threads=1)
    apply_hook(model, "fbcache", threshold=0.03)         # or **KNOBS["fbcache"][i]; "none" adds nothing
    result = sample(DiffusersDenoiser(model), scheduler_from_config(SCHEDULER_CONFIG), request)

What is measured, and caveats:
- PyTorch eager, not ONNX Runtime: compare each method's speedup over its OWN uncached baseline
  (the same DiffusersDenoiser without a hook), never wall times across runtimes.
- Work actually done per step is counted with forward pre-hooks on modules *inside* each block
  (`norm1`, `attn1.to_q`, `ff.net.0`): a pre-hook on the block itself would fire for skipped blocks too,
  because diffusers' hooks replace `block.forward` and still get called. `last_record()` gives
  blocks_run / attn_run / ff_run (modules that ran) and rows_run (batch rows through attention and
  feed-forward, so a halved CFG batch counts half). There is no MAC count: `uncached_macs` is 0;
  `blocks_total` is the block count.
- `DiTTransformer2DModel` is not a `CacheMixin` (no `enable_cache` / `cache_context`), so hooks are
  attached with diffusers' public `apply_*` functions and each call runs inside the cache context that
  `CacheMixin.cache_context` would set. The CFG batch is one call, so it is one context, "cond_uncond",
  as in diffusers' batched-CFG pipelines; the cache decision is taken for both halves together. Inside
  the call the rows are reordered to diffusers' [uncond, cond] convention (FasterCache relies on it).
- `reset` (called by `sample` before every trajectory) resets every stateful hook
  (`HookRegistry.reset_stateful_hooks`), so repeated runs are identical.

Methods (`METHODS`; `KNOBS` holds a conservative-to-aggressive sweep of each):
- fbcache: FirstBlockCache; block 0 always runs, the rest are skipped (their cached residual added)
  while block 0's residual changed by less than `threshold` (relative mean abs) since the last full step.
- taylorseer: TaylorSeerCache. Its default module patterns (`^transformer_blocks.*attn`, full match)
  match nothing in this model (the attention is `attn1`), so `scope` picks the modules: "stack" (the
  last block's output is Taylor-extrapolated and the other blocks skipped, fcpass's `taylorseer` at
  the stack level) or "modules" (each block's attn1 and ff outputs, the paper's granularity; adaLN
  and norms still run). Taylor factors are kept in float32 (diffusers' default is bfloat16).
- magcache: MagCache needs per-step magnitude ratios of the model + scheduler: `calibrate_magcache`
  runs uncached trajectories in diffusers' calibration mode and returns them; pass them as
  `mag_ratios` (they are not in KNOBS). Skipped steps add the last full step's residual.
- fastercache: FasterCache, a CFG cache: on most steps in a timestep window only the cond half runs
  and the uncond output is predicted from frequency-split deltas; attention in that window is
  extrapolated. Needs guidance (a CFG batch); its default weights are the paper's.
- pab: PyramidAttentionBroadcast; each block's self-attention output is reused for
  `spatial_attention_block_skip_range - 1` steps inside a timestep window (MLP and the rest run).
- seacache: SeaCache, built for video transformers, runs through its generic path with a small
  adapter: the latent is its "raw vision" (each row as C x 1 x H x W) and the DDIM noise level is given
  as the rectified-flow sigma with the same signal/noise ratio, sqrt(1-a)/(sqrt(a)+sqrt(1-a)).
Not included: LayerSkip (static removal of layers on every step, used for skip-layer/perturbed
guidance, not a cache over steps); TextKVCache (caches text-encoder key/values; this DiT has none).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiTTransformer2DModel
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_sea_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

from fcpass.contract.errors import FcpassError
from fcpass.contract.roles import InputRoles, infer_roles
from models.convert import (
    diffusers_dit_config,
    dit_to_diffusers,
    load_dit_checkpoint,
    match_official_timestep_embedding_,
)
from models.digits import DIGITS_DIT, NUM_CLASSES, ONNX, SCHEDULER_CONFIG, WEIGHTS
from models.dit import DiTConfig
from runtimes.multistep import MultistepScheduler
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import DDIMScheduler, scheduler_from_config

log = logging.getLogger(__name__)

CONTEXT = "cond_uncond"  # one cache context per CFG-batched call, as diffusers' batched-CFG pipelines use

# Options of each method and their defaults (diffusers' defaults unless noted in the module docstring).
DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "fbcache": {"threshold": 0.05},
    "taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3, "disable_cache_after_step": None,
                   "max_order": 1, "scope": "stack"},
    "magcache": {"mag_ratios": None, "threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2,
                 "num_inference_steps": None},
    "fastercache": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 681),
                    "unconditional_batch_skip_range": 5, "unconditional_batch_timestep_skip_range": (-1, 641),
                    "attention_weight": 0.5, "alpha_low_frequency": 1.1, "alpha_high_frequency": 1.1},
    "pab": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
    "seacache": {"threshold": 0.25, "residual_order": 1, "retention_steps": 1, "cache_end_steps": 1,
                 "max_consecutive_cached": 2, "power_exp": 3.0},
}
METHODS: tuple[str, ...] = tuple(DEFAULTS)

# Each method's main knob, conservative to aggressive (TaylorSeer: per scope); MagCache also needs
# mag_ratios from calibrate_magcache. Every sweep crosses 30 dB PSNR at 10 samples x 50 steps, guidance 1.5.
KNOBS: dict[str, list[dict[str, Any]]] = {
    "fbcache": [{"threshold": t} for t in (0.01, 0.02, 0.03, 0.04, 0.05, 0.08, 0.12, 0.2, 0.4)],
    "taylorseer": [
        *({"scope": "stack", "cache_interval": n, "disable_cache_before_step": 3} for n in (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)),
        *({"scope": "modules", "cache_interval": n, "disable_cache_before_step": 3} for n in (4, 6, 8, 10)),
    ],
    "magcache": [
        {"threshold": t, "max_skip_steps": k, "retention_ratio": 0.1}
        for t, k in ((0.01, 2), (0.02, 2), (0.03, 3), (0.04, 3), (0.05, 3), (0.06, 4), (0.1, 4), (0.25, 6))
    ],
    "fastercache": [
        {"unconditional_batch_skip_range": n, "spatial_attention_block_skip_range": b,
         "unconditional_batch_timestep_skip_range": window, "spatial_attention_timestep_skip_range": window}
        for n, b, window in ((3, 2, (-1, 641)), (5, 2, (-1, 641)), (8, 3, (-1, 641)), (8, 3, (-1, 1000)),
                             (12, 4, (-1, 1000)), (25, 4, (-1, 1000)))
    ],
    "pab": [
        {"spatial_attention_block_skip_range": n, "spatial_attention_timestep_skip_range": window}
        for n, window in ((2, (100, 800)), (2, (-1, 1000)), (3, (100, 800)), (4, (-1, 1000)), (6, (-1, 1000)),
                          (8, (-1, 1000)))
    ],
    "seacache": [
        {"threshold": t, "max_consecutive_cached": k}
        for t, k in ((0.1, 2), (0.25, 2), (0.25, 3), (0.5, 3), (0.5, 4), (0.75, 4), (0.75, 5), (1.0, 6))
    ],
}


# ----------------------------------------------------------------------------------------------
# The model


def load_diffusers_digits(threads: int = 1) -> DiTTransformer2DModel:
    """The bundled digits DiT as diffusers' `DiTTransformer2DModel`: fp32, eval mode, CPU.

    Sets torch's (process-wide) intra-op thread count to `threads`.
    """
    torch.set_num_threads(threads)
    config = DiTConfig(**DIGITS_DIT)
    official = load_dit_checkpoint(WEIGHTS, config)
    model = DiTTransformer2DModel(**diffusers_dit_config(config))
    model.load_state_dict(dit_to_diffusers(official.state_dict(), config), strict=True)
    match_official_timestep_embedding_(model)
    return model.eval()  # built on the CPU in float32


def digits_roles(onnx_path: str | Path = ONNX) -> InputRoles:
    """The bundled ONNX graph's input roles (latent, timestep, class; static batch 2)."""
    import onnx

    return infer_roles(onnx.load(str(onnx_path), load_external_data=False))


class _Clock:
    """Where the host loop is; the timestep callbacks of PAB and FasterCache read it."""

    def __init__(self) -> None:
        self.timestep = 1000.0


def _clock(model: torch.nn.Module) -> _Clock:
    clock = getattr(model, "_fcpass_clock", None)
    if clock is None:
        clock = _Clock()
        model._fcpass_clock = clock
    return clock


# ----------------------------------------------------------------------------------------------
# Hooks


def _options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    if method not in DEFAULTS:
        raise FcpassError(f"unknown diffusers cache method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(DEFAULTS[method]))
    if unknown:
        valid = ", ".join(DEFAULTS[method]) or "none"
        raise FcpassError(f"unknown option(s) {', '.join(unknown)} for {method}; its options are: {valid}")
    return {**DEFAULTS[method], **options}


def _taylorseer_config(model: DiTTransformer2DModel, o: dict[str, Any]) -> TaylorSeerCacheConfig:
    last = len(model.transformer_blocks) - 1
    if o["scope"] == "stack":
        active, inactive = [rf"transformer_blocks\.{last}"], [rf"transformer_blocks\.{i}" for i in range(last)]
    elif o["scope"] == "modules":
        active, inactive = [r"transformer_blocks\.\d+\.(attn1|ff)"], None
    else:
        raise FcpassError(f"taylorseer scope {o['scope']!r} is not known; use scope=stack or scope=modules")
    return TaylorSeerCacheConfig(
        cache_interval=o["cache_interval"], disable_cache_before_step=o["disable_cache_before_step"],
        disable_cache_after_step=o["disable_cache_after_step"], max_order=o["max_order"],
        taylor_factors_dtype=torch.float32, cache_identifiers=active, skip_predict_identifiers=inactive,
    )


def _magcache_config(o: dict[str, Any]) -> MagCacheConfig:
    ratios = o["mag_ratios"]
    if ratios is None:
        raise FcpassError("magcache needs mag_ratios: none given; pass mag_ratios=calibrate_magcache(steps=...)")
    return MagCacheConfig(
        threshold=o["threshold"], max_skip_steps=o["max_skip_steps"], retention_ratio=o["retention_ratio"],
        num_inference_steps=o["num_inference_steps"] or len(ratios), mag_ratios=list(ratios),
    )


def _fastercache_config(clock: _Clock, o: dict[str, Any]) -> FasterCacheConfig:
    weight = float(o["attention_weight"])
    return FasterCacheConfig(
        spatial_attention_block_skip_range=o["spatial_attention_block_skip_range"],
        spatial_attention_timestep_skip_range=tuple(o["spatial_attention_timestep_skip_range"]),
        unconditional_batch_skip_range=o["unconditional_batch_skip_range"],
        unconditional_batch_timestep_skip_range=tuple(o["unconditional_batch_timestep_skip_range"]),
        alpha_low_frequency=o["alpha_low_frequency"], alpha_high_frequency=o["alpha_high_frequency"],
        attention_weight_callback=lambda _module: weight,
        current_timestep_callback=lambda: clock.timestep,
        tensor_format="BCHW",
        # DiT's batched-CFG inputs; diffusers' default list lacks class_labels.
        _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"],
    )


def _latent_rows(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """SeaCache's raw vision latents: each row of the (B, C, H, W) input as a one-frame C x 1 x H x W video."""
    latent = kwargs.get("hidden_states", args[0] if args else None)
    return [row[:, None] for row in latent] if isinstance(latent, torch.Tensor) else []


def apply_hook(model: DiTTransformer2DModel, method: str, **options: Any) -> Any:
    """Attach diffusers' `method` cache hook to `model` (once per model); returns the diffusers config.

    `method` is one of METHODS ("none" attaches nothing); `options` are that method's keys in DEFAULTS.
    """
    o = _options(method, options)
    if getattr(model, "_fcpass_method", None) is not None:
        raise FcpassError(
            f"cache hook {method} cannot be added: the model already has {model._fcpass_method}; "
            "load a fresh model with load_diffusers_digits() for each method"
        )
    clock = _clock(model)
    config: Any = None
    if method == "fbcache":
        config = FirstBlockCacheConfig(threshold=o["threshold"])
        apply_first_block_cache(model, config)
    elif method == "taylorseer":
        config = _taylorseer_config(model, o)
        apply_taylorseer_cache(model, config)
    elif method == "magcache":
        config = _magcache_config(o)
        apply_mag_cache(model, config)
    elif method == "fastercache":
        config = _fastercache_config(clock, o)
        apply_faster_cache(model, config)
    elif method == "pab":
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=o["spatial_attention_block_skip_range"],
            spatial_attention_timestep_skip_range=tuple(o["spatial_attention_timestep_skip_range"]),
            current_timestep_callback=lambda: clock.timestep,
        )
        apply_pyramid_attention_broadcast(model, config)
    elif method == "seacache":
        config = SeaCacheConfig(**{k: o[k] for k in DEFAULTS["seacache"]}, raw_vision_callback=_latent_rows)
        apply_sea_cache(model, config)
    # As CacheMixin.enable_cache does: block hooks added under the root stale its registry list.
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    model._fcpass_method = method
    model._fcpass_config = config
    log.debug("applied %s: %s", method, config)
    return config


# ----------------------------------------------------------------------------------------------
# The denoiser


def _flow_sigma(scheduler_config: Mapping[str, Any] | str | Path) -> Callable[[float], float]:
    """Timestep -> rectified-flow sigma with the same signal-to-noise ratio (SeaCache's context needs one)."""
    scheduler = scheduler_from_config(scheduler_config)
    if isinstance(scheduler, (DDIMScheduler, MultistepScheduler)) and not getattr(scheduler, "flow", False):
        alphas = scheduler.alphas_cumprod.astype(np.float64)
        signal, noise = np.sqrt(alphas), np.sqrt(1.0 - alphas)
        sigmas = noise / (signal + noise)
        return lambda t: float(sigmas[int(np.clip(round(t), 0, len(sigmas) - 1))])
    n = scheduler.num_train_timesteps  # flow matching: timestep = sigma * n
    return lambda t: float(np.clip(t / n, 0.0, 1.0))


class DiffusersDenoiser:
    """A diffusers DiT as a `runtimes.sampler.Denoiser`: one PyTorch call per step, under inference_mode.

    `roles` default to the bundled ONNX graph's (static batch 2), so the host loop batches exactly as
    it does for the graph. With `count_work` (default) the record of each step says what ran; the
    counting hooks stay on the model, so wrap each model in one denoiser only.
    """

    def __init__(
        self,
        model: DiTTransformer2DModel,
        roles: InputRoles | None = None,
        scheduler_config: Mapping[str, Any] | str | Path = SCHEDULER_CONFIG,
        count_work: bool = True,
    ) -> None:
        self.model = model
        self.roles = roles if roles is not None else digits_roles()
        if self.roles.class_labels is None:
            raise FcpassError("DiffusersDenoiser needs a class-label input role: none found; pass roles with class_labels")
        self.uncached_macs = 0
        self.blocks_total = len(model.transformer_blocks)
        self._sigma = _flow_sigma(scheduler_config)
        self._clock = _clock(model)
        self._registry = HookRegistry.check_if_exists_or_initialize(model)
        self._num_steps = 0
        self._counts = {"blocks_run": 0, "attn_run": 0, "ff_run": 0, "rows_run": 0}
        self._record: dict[str, Any] = {}
        if count_work:
            for block in model.transformer_blocks:
                block.norm1.register_forward_pre_hook(self._counter("blocks_run", rows=False))
                block.attn1.to_q.register_forward_pre_hook(self._counter("attn_run"))
                block.ff.net[0].register_forward_pre_hook(self._counter("ff_run"))

    def _counter(self, key: str, rows: bool = True) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self._counts[key] += 1
            if rows:
                self._counts["rows_run"] += int(args[0].shape[0])

        return hook

    def reset(self, num_steps: int) -> None:
        method = getattr(self.model, "_fcpass_method", None)
        if method == "magcache" and self.model._fcpass_config.num_inference_steps != num_steps:
            raise FcpassError(
                f"magcache was set up for {self.model._fcpass_config.num_inference_steps} steps but the run has "
                f"{num_steps}; apply it with mag_ratios from calibrate_magcache(steps={num_steps})"
            )
        self._registry.reset_stateful_hooks(recurse=True)
        self._num_steps = num_steps

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        roles = self.roles
        latent = feeds[roles.latent.name]
        timestep = np.broadcast_to(np.asarray(feeds[roles.timestep.name], dtype=np.float32), (latent.shape[0],))
        labels = feeds[roles.class_labels.name]  # type: ignore[union-attr]
        t = float(timestep[0])
        self._clock.timestep = t
        self._counts.update(dict.fromkeys(self._counts, 0))
        context = CacheContext(CONTEXT, step_index=step, num_inference_steps=self._num_steps, timestep=t,
                               sigma=self._sigma(t))
        with torch.inference_mode():
            _set_cache_context(self.model, context)
            try:
                out = self.model(
                    hidden_states=torch.from_numpy(_swap_halves(latent)),
                    timestep=torch.from_numpy(_swap_halves(timestep)),
                    class_labels=torch.from_numpy(_swap_halves(labels.astype(np.int64))),
                    return_dict=False,
                )[0]
            finally:
                _set_cache_context(self.model, None)
        self._record = dict(self._counts)
        return _swap_halves(out.numpy())

    def last_record(self) -> dict[str, Any]:
        return self._record


def _swap_halves(a: np.ndarray) -> np.ndarray:
    """[cond; uncond] (the host loop's order) <-> [uncond; cond] (diffusers'); odd batches are left alone."""
    n = a.shape[0]
    if n % 2:
        return np.ascontiguousarray(a)
    return np.concatenate([a[n // 2 :], a[: n // 2]])


# ----------------------------------------------------------------------------------------------
# MagCache calibration


def calibrate_magcache(
    steps: int = 50,
    classes: tuple[int, ...] = (0, 3, 7),
    guidance_scale: float = 1.5,
    seed: int = 1,
    threads: int = 1,
    scheduler_config: Mapping[str, Any] | str | Path = SCHEDULER_CONFIG,
) -> list[float]:
    """MagCache's per-step magnitude ratios for the bundled model under `scheduler_config`, `steps` long.

    Runs one uncached trajectory per class (seed `seed`; keep it apart from the evaluation seeds) with
    diffusers' MagCache in calibration mode and averages the ratios it records. The hook is told one
    step more than the run has, so that it neither prints nor clears the ratios at the last step; they
    are then read from its state.
    """
    model = load_diffusers_digits(threads)
    apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    head = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
    denoiser = DiffusersDenoiser(model, scheduler_config=scheduler_config, count_work=False)
    runs = []
    for label in classes:
        request = SampleRequest(classes=[label], steps=steps, guidance_scale=guidance_scale, uncond_class=NUM_CLASSES, seed=seed)
        sample(denoiser, scheduler_from_config(scheduler_config), request, progress=False)
        runs.append(list(head.state_manager._state_cache[CONTEXT].calibration_ratios))
    ratios = np.mean(np.asarray(runs, dtype=np.float64), axis=0)
    log.info("MagCache ratios over %d trajectories of %d steps: %s", len(runs), steps, np.round(ratios, 4).tolist())
    return [float(r) for r in ratios]
