"""Which graph input is the latent, the timestep, the class label, the caption embeddings, the pooled
caption embeddings (SD3's `pooled_projections`), the captions' attention mask (PixArt's
`encoder_attention_mask`), PixArt-alpha's size conditions (the 1024-pixel models' `resolution` and
`aspect_ratio`), or Flux's position ids and distilled guidance.

Inferred from rank and dtype (latent: rank-4 float, rank-5 for a video model's (B, C, frames, H, W),
or a rank-3 float shaped as the model's output, Flux's packed latent (B, tokens, channels); timestep:
rank-0/1 float or int; class: rank-1 int; caption embeddings: rank-3 float) and, where rank and dtype
do not tell them apart, from the name as well (pooled: rank-2 named pool...; resolution: (B, 2) named
resolution or hw; aspect ratio: (B, 1) named aspect...; img_ids and txt_ids: (tokens, 3) named so;
guidance: rank-0/1 named guidance; the caption mask: (B, caption tokens) named ...mask),
unless the user names them with `--inputs role=NAME,...`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fcpass.contract.errors import FcpassError

if TYPE_CHECKING:  # the command line reads ROLES for its help before any command needs onnx
    import onnx

ROLES = ("latent", "timestep", "class", "prompt_embeds", "pooled_embeds", "prompt_mask", "resolution", "aspect_ratio",
         "img_ids", "txt_ids", "guidance")


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape of a graph input or output (None for an unknown dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class InputRoles:
    latent: TensorSpec
    timestep: TensorSpec
    class_labels: TensorSpec | None = None
    prompt_embeds: TensorSpec | None = None
    pooled_embeds: TensorSpec | None = None
    prompt_mask: TensorSpec | None = None
    resolution: TensorSpec | None = None
    aspect_ratio: TensorSpec | None = None
    img_ids: TensorSpec | None = None
    txt_ids: TensorSpec | None = None
    guidance: TensorSpec | None = None
    others: tuple[TensorSpec, ...] = field(default_factory=tuple)

    def names(self) -> dict[str, str | None]:
        """{role: input name or None}, as `--inputs` and the cache plan name them."""
        specs = (self.latent, self.timestep, self.class_labels, self.prompt_embeds, self.pooled_embeds,
                 self.prompt_mask, self.resolution, self.aspect_ratio, self.img_ids, self.txt_ids, self.guidance)
        return {role: spec.name if spec else None for role, spec in zip(ROLES, specs)}


def value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    from onnx import helper

    tt = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
    except (KeyError, TypeError, ValueError):  # a type number ONNX does not define, or none numpy holds
        raise FcpassError(f"{value.name} has element type {tt.elem_type}, which fcpass cannot feed; re-export the "
                          "model with float, integer or bool inputs and outputs") from None
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return TensorSpec(value.name, dtype, shape)


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    initializers = {t.name for t in model.graph.initializer}
    return [value_spec(v) for v in model.graph.input if v.name not in initializers]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [value_spec(v) for v in model.graph.output]


def parse_role_overrides(text: str | None) -> dict[str, str]:
    """Parse `latent=x,timestep=t,class=y` into {role: input name}."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        role, sep, name = item.partition("=")
        role = role.strip()
        if not sep or not name.strip():
            raise FcpassError(f"--inputs entry {item!r} is not ROLE=NAME; write e.g. latent=x,timestep=t,class=y")
        if role not in ROLES:
            raise FcpassError(f"--inputs names unknown role {role!r}; roles are {', '.join(ROLES)}")
        out[role] = name.strip()
    return out


def infer_roles(model: onnx.ModelProto, overrides: dict[str, str] | None = None, candidates: list[TensorSpec] | None = None) -> InputRoles:
    """Assign roles to the graph inputs; raise a FcpassError naming what is missing and the fix.

    `candidates` restricts the search (the cache-aware graph has extra state inputs, which must
    not be mistaken for the model's own).
    """
    inputs = candidates if candidates is not None else graph_inputs(model)
    by_name = {s.name: s for s in inputs}
    overrides = overrides or {}
    chosen: dict[str, TensorSpec] = {}
    for role, name in overrides.items():
        if name not in by_name:
            raise FcpassError(
                f"--inputs {role}={name}: the graph has no input {name!r}; its inputs are {', '.join(by_name)}"
            )
        chosen[role] = by_name[name]

    def pick(role: str, test) -> None:
        if role in chosen:
            return
        taken = {s.name for s in chosen.values()}
        for spec in inputs:
            if spec.name not in taken and test(spec):
                chosen[role] = spec
                return

    is_float = lambda s: np.issubdtype(s.dtype, np.floating)
    is_int = lambda s: np.issubdtype(s.dtype, np.integer)
    named = lambda pattern: lambda s: re.search(pattern, s.name.lower()) is not None
    output = graph_outputs(model)[0].shape if model is not None and model.graph.output else None
    pick("latent", lambda s: s.rank in (4, 5) and is_float(s))
    pick("latent", lambda s: s.rank == 3 and is_float(s) and s.shape == output)  # Flux's packed latent
    pick("guidance", lambda s: s.rank <= 1 and is_float(s) and named("guid")(s))
    pick("timestep", lambda s: s.rank <= 1 and (is_float(s) or is_int(s)) and "class" not in s.name and "label" not in s.name)
    pick("class", lambda s: s.rank == 1 and is_int(s))
    ids = lambda pattern: lambda s: s.rank in (2, 3) and s.shape[-1] in (3, None) and named(pattern)(s)
    pick("img_ids", ids(r"im(a)?g(e)?_?ids"))
    pick("txt_ids", ids(r"te?xt_?ids"))
    pick("prompt_embeds", lambda s: s.rank == 3 and is_float(s))
    # The rank-2 roles look alike, so the name decides among them; an input named otherwise keeps no role.
    pick("pooled_embeds", lambda s: s.rank == 2 and is_float(s) and "pool" in s.name.lower())
    pick("resolution", lambda s: s.rank == 2 and is_float(s) and s.shape[1] in (2, None)
         and named(r"resolution|hw")(s))
    pick("aspect_ratio", lambda s: s.rank == 2 and is_float(s) and s.shape[1] in (1, None) and named("aspect")(s))
    caption = chosen["prompt_embeds"].shape[1] if "prompt_embeds" in chosen else None
    pick("prompt_mask", lambda s: s.rank == 2 and named("mask")(s) and s.shape[1] in (caption, None))
    names = ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in inputs)
    if "latent" not in chosen:
        raise FcpassError(
            f"no latent input found (expected a rank-4 or rank-5 float input, or a rank-3 one shaped as the output) among: {names}; "
            "name it with --inputs latent=NAME"
        )
    if "timestep" not in chosen:
        raise FcpassError(
            f"no timestep input found (expected a rank-0/1 number) among: {names}; name it with --inputs timestep=NAME"
        )
    used = {s.name for s in chosen.values()}
    return InputRoles(
        latent=chosen["latent"],
        timestep=chosen["timestep"],
        class_labels=chosen.get("class"),
        prompt_embeds=chosen.get("prompt_embeds"),
        pooled_embeds=chosen.get("pooled_embeds"),
        prompt_mask=chosen.get("prompt_mask"),
        resolution=chosen.get("resolution"),
        aspect_ratio=chosen.get("aspect_ratio"),
        img_ids=chosen.get("img_ids"),
        txt_ids=chosen.get("txt_ids"),
        guidance=chosen.get("guidance"),
        others=tuple(s for s in inputs if s.name not in used),
    )
