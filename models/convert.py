"""DiT checkpoints: loading official-layout weights and converting to and from diffusers' layout.

The official layout is the one `models/dit.py` uses (facebookresearch/DiT: `blocks.N.attn.qkv`,
`blocks.N.adaLN_modulation.1`, `final_layer.linear`, one shared `t_embedder` / `y_embedder`).
diffusers' `DiTTransformer2DModel` stores the same network differently:

* `pos_embed.proj` is the patch convolution, and the sin-cos table `pos_embed.pos_embed` is a
  non-persistent buffer that diffusers recomputes, so it is normally absent from its state dict;
* every `transformer_blocks.N.norm1.emb` holds its own copy of the timestep + class embedder
  (block 0's copy also conditions the final layer), where the official model has one;
* the fused `qkv` projection is split into `attn1.to_q` / `to_k` / `to_v`;
* the class table always has the extra "unconditional" row (diffusers hard-codes dropout 0.1);
* the final layer is `proj_out_1` (adaLN, chunked shift-then-scale like the official one) and
  `proj_out_2` (the output linear).

Two numerical differences are not in the weights at all. diffusers builds the timestep
frequencies with `downscale_freq_shift=1` (exp(-ln(1e4) * i / (half - 1))) where the official code
divides by `half`, so an unmodified diffusers DiT conditions on slightly different features for
every t != 0 (see `match_official_timestep_embedding_`). And its feed-forward LayerNorm takes
`norm_eps` from the config (default 1e-5) where the official one uses 1e-6, which
`diffusers_dit_config` sets explicitly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcpass.contract.errors import FcpassError, first_clause
from models.dit import _SIZES, DiT, DiTConfig, get_2d_sincos_pos_embed

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG_NAME = "config.json"

# Training scripts wrap the weights; the official DiT sample.py prefers "ema" over "model".
_WRAPPER_KEYS = ("ema", "model", "state_dict")
# Prefixes left by DistributedDataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")

_FAMILY_NAMES = {sizes[:2]: name.upper() for name, sizes in _SIZES.items()}
_BLOCK_RE = re.compile(r"^(?:blocks|transformer_blocks)\.(\d+)\.")

# Official block suffix -> diffusers block suffix, for the tensors that map one to one.
_BLOCK_RENAMES = {
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
}
# Shared official embedder -> suffix of the per-block diffusers copy.
_EMBEDDER_RENAMES = {
    "t_embedder.mlp.0.weight": "norm1.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "norm1.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "norm1.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "norm1.emb.timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "norm1.emb.class_embedder.embedding_table.weight",
}
_TOP_RENAMES = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
_CLASS_TABLE = "y_embedder.embedding_table.weight"
_DIFFUSERS_POS_EMBED = "pos_embed.pos_embed"


# ----------------------------------------------------------------------------------------------
# Layout conversion


def is_diffusers_layout(state_dict: Mapping[str, Any]) -> bool:
    """True when the keys are diffusers' `DiTTransformer2DModel` names rather than the official ones."""
    return any(k.startswith(("transformer_blocks.", "pos_embed.proj.")) for k in state_dict)


def _block_indices(state_dict: Mapping[str, Any]) -> list[int]:
    found = {int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))}
    return sorted(found)


def _sincos_table(hidden_size: int, config: DiTConfig) -> torch.Tensor:
    grid = config.input_size // config.patch_size
    return torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid)).float()[None]


def dit_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: DiTConfig, *, include_pos_embed: bool = False) -> StateDict:
    """Official-layout DiT weights -> `DiTTransformer2DModel` weights (new, unshared tensors).

    `pos_embed` is dropped because diffusers recomputes it as a non-persistent buffer (keeping it
    would be an unexpected key for `load_state_dict`); pass `include_pos_embed=True` to keep it as
    `pos_embed.pos_embed`, which `diffusers_to_dit` then restores verbatim. A warning is logged
    when the dropped table is not the standard sin-cos one, since diffusers would then differ.
    """
    sd = dict(state_dict)
    out: StateDict = {}
    for src, dst in _TOP_RENAMES.items():
        if src in sd:
            out[dst] = sd[src].detach().clone()

    if "pos_embed" in sd:
        pos = sd["pos_embed"].detach()
        if include_pos_embed:
            out[_DIFFUSERS_POS_EMBED] = pos.clone()
        else:
            expected = _sincos_table(pos.shape[-1], config)
            if pos.shape != expected.shape or not torch.allclose(pos.float(), expected, atol=1e-5):
                logger.warning(
                    "pos_embed is not the standard sin-cos table diffusers recomputes, so the diffusers model will "
                    "not match; convert with include_pos_embed=True to carry it over"
                )

    class_table = sd.get(_CLASS_TABLE)
    if class_table is not None and class_table.shape[0] == config.num_classes:
        # diffusers always allocates the unconditional row; the official model only does with dropout > 0.
        class_table = torch.cat([class_table, class_table.new_zeros(1, class_table.shape[1])])

    for i in _block_indices(sd):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for suffix in ("weight", "bias"):
            qkv = sd.get(f"{src}attn.qkv.{suffix}")
            if qkv is not None:
                # timm's qkv rows are laid out [q; k; v], each hidden_size wide (heads are split later).
                q, k, v = qkv.detach().chunk(3, dim=0)
                out[f"{dst}attn1.to_q.{suffix}"] = q.clone()
                out[f"{dst}attn1.to_k.{suffix}"] = k.clone()
                out[f"{dst}attn1.to_v.{suffix}"] = v.clone()
        for s, d in _BLOCK_RENAMES.items():
            if src + s in sd:
                out[dst + d] = sd[src + s].detach().clone()
        # Each block gets its own copy: diffusers runs block i's embedder inside block i.
        for s, d in _EMBEDDER_RENAMES.items():
            tensor = class_table if s == _CLASS_TABLE else sd.get(s)
            if tensor is not None:
                out[dst + d] = tensor.detach().clone()
    return out


def diffusers_to_dit(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    """`DiTTransformer2DModel` weights -> official-layout weights; the inverse of `dit_to_diffusers`.

    The shared embedder is taken from block 0 (the copy diffusers also uses for the final layer).
    If the per-block copies differ (a model fine-tuned inside diffusers), the official layout
    cannot represent it and FcpassError is raised. Blocks are taken from the keys present, not
    from `config`, so that a depth mismatch is reported by the loader rather than hidden here.
    """
    sd = dict(state_dict)
    out: StateDict = {}
    inverse_top = {d: s for s, d in _TOP_RENAMES.items()}
    for dst, src in inverse_top.items():
        if dst in sd:
            out[src] = sd[dst].detach().clone()

    blocks = _block_indices(sd)
    if blocks:
        first = f"transformer_blocks.{blocks[0]}."
        for official, suffix in _EMBEDDER_RENAMES.items():
            if first + suffix not in sd:
                continue
            reference = sd[first + suffix]
            for i in blocks[1:]:
                other = sd.get(f"transformer_blocks.{i}.{suffix}")
                if other is not None and not torch.equal(other, reference):
                    raise FcpassError(
                        f"diffusers DiT weights cannot be converted to the official layout: "
                        f"transformer_blocks.{i}.{suffix} differs from block {blocks[0]}'s copy; the official DiT "
                        f"shares one timestep/class embedder, so use weights whose per-block embedders are identical "
                        f"(e.g. ones converted from an official checkpoint)"
                    )
            tensor = reference.detach().clone()
            if official == _CLASS_TABLE and config.class_dropout_prob <= 0 and tensor.shape[0] == config.num_classes + 1:
                # Undo the unconditional row diffusers always has; this official model has none.
                tensor = tensor[: config.num_classes].clone()
            out[official] = tensor

    if _DIFFUSERS_POS_EMBED in sd:
        pos = sd[_DIFFUSERS_POS_EMBED].detach().clone()
        out["pos_embed"] = pos if pos.dim() == 3 else pos.reshape(1, *pos.shape[-2:])
    elif "pos_embed.proj.weight" in sd:
        out["pos_embed"] = _sincos_table(sd["pos_embed.proj.weight"].shape[0], config)

    for i in blocks:
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for suffix in ("weight", "bias"):
            parts = [sd.get(f"{src}attn1.to_{name}.{suffix}") for name in ("q", "k", "v")]
            if all(p is not None for p in parts):
                out[f"{dst}attn.qkv.{suffix}"] = torch.cat([p.detach() for p in parts], dim=0)
        for official, diffusers_name in _BLOCK_RENAMES.items():
            if src + diffusers_name in sd:
                out[dst + official] = sd[src + diffusers_name].detach().clone()

    known = set(_TOP_RENAMES.values()) | {_DIFFUSERS_POS_EMBED}
    block_suffixes = set(_BLOCK_RENAMES.values()) | set(_EMBEDDER_RENAMES.values())
    block_suffixes |= {f"attn1.to_{n}.{s}" for n in "qkv" for s in ("weight", "bias")}
    for key, value in sd.items():
        m = _BLOCK_RE.match(key)
        if key in known or (m and key[m.end():] in block_suffixes):
            continue
        # Keep anything unrecognised under its own name so the loader reports it as unexpected.
        out[key] = value
    return out


def diffusers_dit_config(config: DiTConfig) -> dict[str, Any]:
    """Keyword arguments for `diffusers.DiTTransformer2DModel` equivalent to `config`."""
    if config.hidden_size % config.num_heads:
        raise FcpassError(
            f"DiT config cannot be expressed in diffusers: hidden_size {config.hidden_size} is not divisible by "
            f"num_heads {config.num_heads}; pick a head count that divides the width"
        )
    if config.mlp_ratio != 4.0:
        raise FcpassError(
            f"DiT config cannot be expressed in diffusers: mlp_ratio is {config.mlp_ratio} but DiTTransformer2DModel "
            f"always uses a 4x feed-forward; use mlp_ratio 4.0 or keep the official layout"
        )
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        # The official blocks use eps 1e-6 for both LayerNorms; diffusers' default 1e-5 reaches norm3.
        "norm_eps": 1e-6,
    }


def match_official_timestep_embedding_(model: nn.Module) -> nn.Module:
    """Make a diffusers DiT embed timesteps exactly as the official DiT does; returns `model`.

    diffusers' `CombinedTimestepLabelEmbeddings` hard-codes `downscale_freq_shift=1`; the official
    `TimestepEmbedder` corresponds to 0. The setting is not part of the diffusers config, so it has
    to be patched after every `from_pretrained`.
    """
    for module in model.modules():
        if type(module).__name__ == "Timesteps" and hasattr(module, "downscale_freq_shift"):
            module.downscale_freq_shift = 0
    return model


def save_diffusers(model: DiT, directory: str | os.PathLike[str]) -> Path:
    """Write `model` as a diffusers `DiTTransformer2DModel` folder (config.json + safetensors).

    Each file is written to a temporary name in the same folder and moved into place with
    `os.replace`, so an interrupted save never leaves a half-written file under the final name.
    """
    import diffusers
    from safetensors.torch import save_file

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in dit_to_diffusers(model.state_dict(), model.config).items()}
    cfg = {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": diffusers.__version__,
        **diffusers_dit_config(model.config),
    }
    _atomic_write(target / DIFFUSERS_WEIGHTS_NAME, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    _atomic_write(target / DIFFUSERS_CONFIG_NAME, lambda p: p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n"))
    logger.info("wrote diffusers DiT (%d tensors) to %s", len(weights), target)
    return target


def _atomic_write(final: Path, write: Any) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# Loading


def load_dit_checkpoint(path: str | os.PathLike[str], config: DiTConfig) -> DiT:
    """Build `DiT(config)` and load weights from `path`, in eval mode.

    Accepts `.pt` / `.pth` (and other `torch.save` files) holding a bare state dict or one wrapped
    under "ema" / "model" / "state_dict", `.safetensors`, and a diffusers model folder. diffusers-
    layout weights are converted automatically. Any mismatch with `config` raises FcpassError naming
    the first offending key and the architecture the weights appear to have.
    """
    file = Path(path)
    if file.is_dir():
        file = _diffusers_weights_in(file)
    if not file.is_file():
        raise FcpassError(f"DiT checkpoint not found: no file at {file}; check the path (or download the checkpoint first)")
    state_dict = _read_state_dict(file)
    if is_diffusers_layout(state_dict):
        logger.info("%s is in diffusers layout; converting to the official layout", file.name)
        state_dict = diffusers_to_dit(state_dict, config)

    model = DiT(config)
    expected = model.state_dict()
    if "pos_embed" not in state_dict and "pos_embed" in expected:
        # A fixed table: the model already holds the value every published checkpoint stores.
        logger.info("%s has no pos_embed; using the standard sin-cos table", file.name)
        state_dict["pos_embed"] = expected["pos_embed"]
    _check_compatible(state_dict, expected, config, file)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _diffusers_weights_in(folder: Path) -> Path:
    for name in (DIFFUSERS_WEIGHTS_NAME, "diffusion_pytorch_model.bin"):
        for candidate in (folder / name, folder / "transformer" / name):
            if candidate.is_file():
                return candidate
    raise FcpassError(
        f"DiT checkpoint folder has no weights: found no {DIFFUSERS_WEIGHTS_NAME} in {folder}; "
        f"pass the checkpoint file itself or a diffusers model folder"
    )


def _read_state_dict(file: Path) -> StateDict:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(file), device="cpu")
        else:
            # The official train.py stores its argparse.Namespace next to the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader failure means the same thing to the user
        raise FcpassError(
            f"DiT checkpoint could not be read: {file} failed with {type(exc).__name__}: {first_clause(exc)}; "
            f"pass a torch.save state dict (.pt/.pth) or a .safetensors file"
        ) from exc
    return _unwrap(raw, file)


def _unwrap(raw: Any, file: Path) -> StateDict:
    for _ in range(3):  # e.g. {"ema": {...}} or {"state_dict": {"model": {...}}}
        if isinstance(raw, Mapping) and not _is_state_dict(raw):
            inner = next((raw[k] for k in _WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
            if inner is None:
                break
            raw = inner
    if not isinstance(raw, Mapping) or not _is_state_dict(raw):
        found = sorted(raw)[:5] if isinstance(raw, Mapping) else type(raw).__name__
        raise FcpassError(
            f"DiT checkpoint holds no state dict: {file} contains {found}; save model.state_dict() "
            f"(optionally under an 'ema' or 'model' key)"
        )
    out: StateDict = {}
    for key, value in raw.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _is_state_dict(d: Mapping[Any, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _shape(t: torch.Tensor | None) -> str:
    return "absent" if t is None else str(tuple(t.shape))


def _check_compatible(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], config: DiTConfig, file: Path) -> None:
    bad: str | None = None
    # pos_embed is a fixed table that module order puts first; a learned weight names the problem better.
    ordered = sorted(expected.items(), key=lambda item: item[0] == "pos_embed")
    for key, tensor in ordered:
        if key not in found or found[key].shape != tensor.shape:
            bad = f"key {key!r} should have shape {tuple(tensor.shape)} but is {_shape(found.get(key))} in the file"
            break
    if bad is None:
        extra = next((k for k in found if k not in expected), None)
        if extra is None:
            return
        bad = f"key {extra!r} {_shape(found[extra])} in the file has no place in the model"
    raise FcpassError(
        f"DiT checkpoint {file.name} does not match the requested architecture ({describe_config(config)}): "
        f"{bad}; {_advice(found, config)}"
    )


def describe_config(config: DiTConfig) -> str:
    """A short human description, e.g. 'DiT-XL/2, depth 28, width 1152, input 32'."""
    family = _FAMILY_NAMES.get((config.depth, config.hidden_size))
    name = f"DiT-{family}/{config.patch_size}, " if family else ""
    return f"{name}depth {config.depth}, width {config.hidden_size}, input {config.input_size}"


def infer_dit_shape(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """What the official-layout weights say about their architecture (keys that cannot be read are left out).

    The head count is not recoverable from the weights, so it is never reported.
    """
    info: dict[str, int] = {}
    blocks = _block_indices(state_dict)
    if blocks:
        info["depth"] = blocks[-1] + 1
    patch = state_dict.get("x_embedder.proj.weight")
    if patch is not None and patch.dim() == 4:
        info["hidden_size"], info["in_channels"], info["patch_size"] = patch.shape[0], patch.shape[1], patch.shape[2]
    elif (qkv := state_dict.get("blocks.0.attn.qkv.weight")) is not None:
        info["hidden_size"] = qkv.shape[1]
    pos = state_dict.get("pos_embed")
    if pos is not None and "patch_size" in info:
        info["input_size"] = round(pos.shape[-2] ** 0.5) * info["patch_size"]
    table = state_dict.get(_CLASS_TABLE)
    if table is not None:
        info["class_rows"] = table.shape[0]
    linear = state_dict.get("final_layer.linear.weight")
    if linear is not None and "patch_size" in info:
        info["out_channels"] = linear.shape[0] // info["patch_size"] ** 2
    return info


def _advice(found: Mapping[str, torch.Tensor], config: DiTConfig) -> str:
    info = infer_dit_shape(found)
    depth, width = info.get("depth"), info.get("hidden_size")
    if depth is None or width is None:
        return "these weights do not look like a DiT at all; check that the file is a DiT checkpoint"
    family = _FAMILY_NAMES.get((depth, width))
    patch = info.get("patch_size", config.patch_size)
    looks = f"these weights look like depth {depth}, width {width}"
    looks += f": DiT-{family}/{patch}" if family else f" (patch {patch}, not a published DiT size)"
    hints: list[str] = []
    if family and (depth, width, patch) != (config.depth, config.hidden_size, config.patch_size):
        hints.append(f"pass --arch dit-{family.lower()}-{patch}")
    elif (depth, width, patch) != (config.depth, config.hidden_size, config.patch_size):
        hints.append(f"use a config with depth={depth}, hidden_size={width}, patch_size={patch}")
    if info.get("input_size") not in (None, config.input_size):
        hints.append(f"pass --image-size {info['input_size'] * 8}")
    if info.get("in_channels") not in (None, config.in_channels):
        hints.append(f"set in_channels={info['in_channels']}")
    out_channels = info.get("out_channels")
    if out_channels is not None and out_channels != config.out_channels and "in_channels" in info:
        hints.append(f"set learn_sigma={out_channels == 2 * info['in_channels']}")
    rows = info.get("class_rows")
    if rows is not None and rows not in (config.num_classes, config.num_classes + 1):
        hints.append(f"set num_classes={rows - 1} (the table has {rows} rows, one of them for the null class)")
    elif rows is not None and rows != config.num_classes + int(config.class_dropout_prob > 0):
        hints.append(f"set class_dropout_prob {'> 0' if rows == config.num_classes + 1 else 'to 0'}")
    if not hints:
        hints.append("check that the checkpoint and the config come from the same model")
    return f"{looks}; {' and '.join(hints)}"
