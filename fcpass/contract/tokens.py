"""What the token mechanism compiles (`fcpass.compiler.passes.token_cache`), read back by the token policies
(`runtimes.policies.tokens`) that drive it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenOptions:
    """What the token mechanism compiles; the ratio schedule fixes every k (ALGORITHMS 3).

    k = round(r N) per (block, token-local branch), r = ratio * f(layer) * local_factor with
    f(idx) = 1 + w - 2 w idx / max_idx. `k` (tests) overrides every k with one number.
    score: one of SCORES (module docstring, case 3); `attention` needs unfused self-attention.
    counter_weight multiplies the per-token counters (DuCa: 0.25 / n with interval n = 3);
    spatial_bonus goes to the best token of every grid x grid cell (0 disables it).
    """

    ratio: float = 0.05
    layer_weight: float = -0.2
    local_factor: float = 2.5
    score: str = "vnorm"
    counter_weight: float = 0.25 / 3
    spatial_bonus: float = 0.8
    grid: int = 2
    k: int | None = None
    schedule: str = "duca"

    def k_for(self, layer: int, layers: int, tokens: int) -> int:
        if self.k is not None:
            return max(0, min(self.k, tokens))
        f = 1.0 + self.layer_weight - 2.0 * self.layer_weight * layer / (layers - 1) if layers > 1 else 1.0
        return max(0, min(tokens, round(self.ratio * f * self.local_factor * tokens)))
