"""Tiny random-weight diffusers transformers (DiT, PixArt, SD3) wrapped to take their inputs positionally,
as the export tests build them; `SPECS` names each with its inputs and its blocks' stream tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

BATCH = 2
LAYERS = 3


# --- the models ------------------------------------------------------------------------------


class _DiT(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, latent, timestep, class_labels):
        return self.m(latent, timestep=timestep, class_labels=class_labels).sample


class _PixArt(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, latent, timestep, encoder_hidden_states):
        cond = {"resolution": None, "aspect_ratio": None}
        return self.m(latent, encoder_hidden_states=encoder_hidden_states, timestep=timestep, added_cond_kwargs=cond).sample


class _SD3(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, latent, timestep, encoder_hidden_states, pooled_projections):
        return self.m(
            latent, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections, timestep=timestep
        ).sample


@dataclass(frozen=True)
class Spec:
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    names: tuple[str, ...]
    # Stream tensors each block reads / writes, in block order. SD3: the caption stream entering
    # block 0 does not depend on the latent (it stays outside, an outer value), and the last block is
    # `context_pre_only` (it writes the image stream only).
    block_inputs: tuple[int, ...]
    block_outputs: tuple[int, ...]


def _dit() -> torch.nn.Module:
    m = diffusers.DiTTransformer2DModel(
        num_layers=LAYERS, attention_head_dim=8, num_attention_heads=2, sample_size=8, patch_size=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=10, norm_num_groups=1,
    )
    return _DiT(m)


def _pixart() -> torch.nn.Module:
    m = diffusers.PixArtTransformer2DModel(
        num_layers=LAYERS, attention_head_dim=8, num_attention_heads=2, sample_size=8, patch_size=2,
        in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=12, norm_num_groups=1,
    )
    return _PixArt(m)


def _sd3() -> torch.nn.Module:
    m = diffusers.SD3Transformer2DModel(
        num_layers=LAYERS, attention_head_dim=8, num_attention_heads=2, sample_size=8, patch_size=2,
        in_channels=4, out_channels=4, joint_attention_dim=12, caption_projection_dim=16,
        pooled_projection_dim=6, pos_embed_max_size=16,
    )
    return _SD3(m)


def _latent_time(g: torch.Generator, t: list[float]) -> tuple:
    return torch.randn(BATCH, 4, 8, 8, generator=g), torch.tensor(t)


SPECS: dict[str, Spec] = {
    "dit": Spec(
        _dit,
        lambda g, t: (*_latent_time(g, t), torch.randint(0, 10, (BATCH,), generator=g)),
        ("latent", "timestep", "class_labels"),
        (1, 1, 1),
        (1, 1, 1),
    ),
    "pixart": Spec(
        _pixart,
        lambda g, t: (*_latent_time(g, t), torch.randn(BATCH, 5, 12, generator=g)),
        ("latent", "timestep", "encoder_hidden_states"),
        (1, 1, 1),
        (1, 1, 1),
    ),
    "sd3": Spec(
        _sd3,
        lambda g, t: (*_latent_time(g, t), torch.randn(BATCH, 5, 12, generator=g), torch.randn(BATCH, 6, generator=g)),
        ("latent", "timestep", "encoder_hidden_states", "pooled_projections"),
        (1, 2, 2),
        (2, 2, 1),
    ),
}


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _drop_noop_squeeze(model: onnx.ModelProto) -> int:
    """Replace each Squeeze of statically non-1 dimensions by Identity (torch's no-op squeeze(dim))."""
    g = model.graph
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*g.input, *g.value_info]
    }
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value":
                consts[n.output[0]] = numpy_helper.to_array(a.t)
    fixed = 0
    for node in g.node:
        if node.op_type != "Squeeze" or len(node.input) != 2 or node.input[1] not in consts:
            continue
        shape = shapes.get(node.input[0])
        if not shape:
            continue
        axes = [int(a) % len(shape) for a in consts[node.input[1]].ravel()]
        if axes and all(shape[a] not in (None, 1) for a in axes):
            identity = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
            identity.metadata_props.extend(node.metadata_props)
            node.CopyFrom(identity)
            fixed += 1
    return fixed
