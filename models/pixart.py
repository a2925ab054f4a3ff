"""A PixArt-alpha-style text-conditioned DiT (Chen et al., "PixArt-alpha", 2023) in PyTorch.

It follows the reference `PixArt` / `PixArtBlock` design and parameter names
(`t_block`, `y_embedder.y_proj.fc1`, `blocks.N.scale_shift_table`, `blocks.N.cross_attn.q_linear`,
`final_layer.scale_shift_table`, ...): one timestep MLP whose output is expanded once by `t_block`
into six modulation vectors shared by every block ("adaLN-single"), each block adding its own
learned `scale_shift_table`, and a cross-attention to the projected caption tokens in each block.

As in `models/dit.py`, attention is written as MatMul / Softmax / MatMul (no SDPA, no xformers) so
exported graphs stay plain. Captions are fixed-length (`caption_len` tokens, e.g. T5 padded to 120)
and unmasked, which is how the exported model is fed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from fcpass.contract.errors import FcpassError
from models.dit import (
    Attention,
    GridTransformerConfig,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    init_backbone_,
    unpatchify,
)

logger = logging.getLogger(__name__)


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PixArt's modulation: shift and scale arrive already shaped (B, 1, D), unlike DiT's (B, D)."""
    return x * (1 + scale) + shift


@dataclass(frozen=True)
class PixArtConfig(GridTransformerConfig):
    """Hyper-parameters of one PixArt model (defaults: PixArt-alpha XL/2 at 512, a 64x64 latent)."""

    input_size: int = 64
    caption_channels: int = 4096
    caption_len: int = 120


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to caption tokens: q from `q_linear(x)`, k and v from `kv_linear(cond)`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        # Same [k; v] split as the reference's `view(..., 2, heads, head_dim).unbind(2)`.
        kv = self.kv_linear(cond).reshape(b, cond.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class CaptionMlp(nn.Module):
    """timm's Mlp with distinct input and output widths (caption_channels -> D -> D)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects text-encoder states to the model width.

    `y_embedding` is the learned "empty caption" the reference substitutes for classifier-free
    guidance; it is kept (as a buffer, like the reference) so real checkpoints load strictly, and
    callers feed it themselves for the unconditional branch.
    """

    def __init__(self, caption_channels: int, hidden_size: int, caption_len: int) -> None:
        super().__init__()
        self.y_proj = CaptionMlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(caption_len, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention, MLP; modulated by the shared `t` plus this block's table."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa))
        # No norm and no gate before cross-attention: that is the reference design, not an omission.
        x = x + self.cross_attn(x, y)
        x = x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class T2IFinalLayer(nn.Module):
    """Final norm, modulated by the raw timestep embedding plus a learned (2, D) table, then linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class PixArt(nn.Module):
    """forward(x (B,C,H,W), t (B,) float, encoder_hidden_states (B, L, caption_channels)) -> (B, out_C, H, W)."""

    def __init__(self, config: PixArtConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_tokens, cfg.hidden_size))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, cfg.hidden_size, cfg.caption_len)
        self.blocks = nn.ModuleList(
            PixArtBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.final_layer = T2IFinalLayer(cfg.hidden_size, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference initialisation; cross-attention outputs and the final linear start at zero."""
        # PixArt scales the grid by base_size / grid_size (1 at the native size), i.e. DiT's table.
        init_backbone_(self, self.config)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        t0 = self.t_block(t_emb)
        y = self.y_embedder(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, y, t0)
        # The final layer takes the embedding before t_block, as in the reference.
        return unpatchify(self.final_layer(x, t_emb), self.out_channels, self.patch_size)


_CONFIGS: dict[str, PixArtConfig] = {
    "pixart-tiny": PixArtConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
        caption_channels=32, caption_len=8, learn_sigma=True,
    ),
    # PixArt-XL-2-512x512: 512 px through the SD VAE (64x64 latent), T5-XXL captions of 120 tokens.
    "pixart-xl-2": PixArtConfig(
        input_size=64, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
        caption_channels=4096, caption_len=120, learn_sigma=True,
    ),
}


def pixart_config(name: str) -> PixArtConfig:
    """A named PixArt configuration: "pixart-tiny" for tests, "pixart-xl-2" for PixArt-alpha XL/2 at 512."""
    try:
        return _CONFIGS[name.lower()]
    except KeyError:
        raise FcpassError(
            f"unknown PixArt config: {name!r}; use one of {', '.join(sorted(_CONFIGS))}"
        ) from None


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every trainable parameter with small seeded random values; returns `model`.

    The reference initialisation zeroes the output layers, which makes an untrained model's output
    identically zero and hides most bugs from a test. Weights get std 1/sqrt(fan_in) so activations
    stay O(1) through depth; vectors get std 0.02. Frozen tensors (DiT's pos_embed) are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not param.requires_grad:
            continue
        if param.dim() >= 2:
            std = 1.0 / math.sqrt(param[0].numel())
        else:
            std = 0.02
        param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * std)
    logger.debug("randomized %s with seed %d", type(model).__name__, seed)
    return model
