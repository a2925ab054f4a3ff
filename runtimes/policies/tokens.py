"""Token-level caching policies: DuCa (dual caching) and ToCa (token-wise caching), ALGORITHMS 3.

The graph (optimized with `--tokens duca` or `--tokens toca`) holds the mechanism: per block a
conservative mode (self-attention reused before its gate, token-local branches on the top-k tokens)
and its scores and counters. A policy only sets, per step, `fc_tok` (every block full or
conservative) and, for DuCa's aggressive steps, skips the `stack` region with `reuse`.

k is compiled (static shapes): the ratio fields of a config are what `fcpass optimize --tokens NAME`
compiles from; changing them here changes nothing but a warning, re-optimize instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import APPROX_MIX, CTL_SKIP, TOK_CONSERVATIVE, TOK_LOCAL_ONLY, CachePlan
from fcpass.contract.tokens import TokenOptions
from runtimes.policies.core import Policy, StepControls, taylor1_mix

log = logging.getLogger(__name__)


@dataclass
class TokenControls(StepControls):
    """StepControls plus the token mode of every block and, for `random` scores, the host's scores."""

    tok: np.ndarray | None = None  # int64 (blocks,)
    rand: np.ndarray | None = None  # float32 (blocks, N)


@dataclass
class DuCaConfig:
    """DuCa: full (F), conservative (C) and aggressive (A) steps with interval n.

    interval: n; position p = (i - warmup) mod n: p = 0 F, p odd C, p even A (n = 3: F C A F C A ...).
        Larger n is faster and drifts more.
    warmup: leading full steps (2 for DiT-like models, 3 for video). The last step is full too.
    attention: `reuse` (DuCa: a C step reuses self-attention) or `compute` (recompute it; only the
        token-local branches are partial: slower, closer).
    aggressive: what an A step puts in place of the stack: `reuse` (DuCa: its output at the last
        step that computed it) or `taylor1` (an fcpass extension, graphs optimized with --taylor:
        first-order extrapolation from the stack's two last computed steps, F or C, as TaylorSeer
        does; it holds quality over longer runs of A steps than reuse).
    seed: for `random` token scores (graphs optimized with --token-score random).
    Compiled by `fcpass optimize --tokens duca` (changing them here needs a re-optimize):
    ratio: R0, the base fraction of tokens a C step recomputes (0.05: about 1 token in 8 at the MLP).
    layer_weight: w of f(idx) = 1 + w - 2 w idx / max_idx; -0.2 recomputes more tokens in later blocks.
    mlp_factor: the token-local branches' factor (MLP and cross-attention); attention's is 0 (reused).
    counter_weight: weight of the steps-since-recompute counter in the score (0.25 / n).
    spatial_bonus: added to the best token of every grid x grid cell (0.8 for DiT, grid 2), which
        spreads the recomputed tokens over the image.
    score: `vnorm` (DuCa's V-caching), `attention` (ToCa's attention-map column scores; unfused
        attention only), `saliency` or `random`.
    """

    interval: int = 3
    warmup: int = 2
    attention: str = "reuse"
    aggressive: str = "reuse"
    seed: int = 0
    ratio: float = 0.05
    layer_weight: float = -0.2
    mlp_factor: float = 2.5
    counter_weight: float = 0.25 / 3
    spatial_bonus: float = 0.8
    grid: int = 2
    score: str = "vnorm"


@dataclass
class ToCaConfig(DuCaConfig):
    """ToCa: full steps every `interval` steps, conservative steps in between (no aggressive step).

    Defaults as DuCa's except ratio 0.07. ToCa's own score is the attention map's column sum
    (`--token-score attention`), which needs the attention probabilities (an unfused Softmax);
    V-norm keeps fused attention usable and is the default here.
    """

    ratio: float = 0.07


# Config field -> the TokenOptions field the graph was compiled with.
_COMPILED = {"ratio": "ratio", "layer_weight": "layer_weight", "mlp_factor": "local_factor",
             "counter_weight": "counter_weight", "spatial_bonus": "spatial_bonus", "grid": "grid", "score": "score"}


def token_options(name: str, score: str | None = None) -> TokenOptions:
    """What `fcpass optimize --tokens NAME` compiles: the ratio schedule of NAME's default config."""
    configs = {"duca": DuCaConfig, "toca": ToCaConfig}
    if name not in configs:
        raise FcpassError(f"--tokens {name!r} unknown; use duca or toca")
    c = configs[name]()
    return TokenOptions(ratio=c.ratio, layer_weight=c.layer_weight, local_factor=c.mlp_factor, score=score or c.score,
                        counter_weight=c.counter_weight, spatial_bonus=c.spatial_bonus, grid=c.grid, schedule=name)


class DuCa(Policy):
    name = "duca"
    aggressive = True

    def __init__(self, config: DuCaConfig | None = None) -> None:
        super().__init__()
        self.config = config or (ToCaConfig() if self.name == "toca" else DuCaConfig())
        if self.config.interval < 1:
            raise FcpassError(f"{self.name} interval {self.config.interval} must be >= 1")
        if self.config.attention not in ("reuse", "compute"):
            raise FcpassError(f"{self.name} attention {self.config.attention!r} unknown; use reuse or compute")
        if self.config.aggressive not in ("reuse", "taylor1"):
            raise FcpassError(f"{self.name} aggressive {self.config.aggressive!r} unknown; use reuse or taylor1")
        self.rng = np.random.default_rng(self.config.seed)
        self.stack: int | None = None

    def reset(self, plan: CachePlan, num_steps: int) -> None:
        super().reset(plan, num_steps)
        blocks = plan.tokens.get("blocks") if plan.tokens else None
        if not blocks:
            raise FcpassError(f"{self.name} needs token-level caching in the graph; optimize with --tokens {self.name}")
        self.blocks = len(blocks)
        self.tokens = int(blocks[0]["tokens"])
        compiled = plan.tokens.get("options", {})
        if compiled.get("k") is None:
            for ours, theirs in _COMPILED.items():
                if compiled.get(theirs) is not None and getattr(self.config, ours) != compiled[theirs]:
                    log.warning("%s %s = %s, but the graph was compiled with %s (k is static); re-optimize to change it",
                                self.name, ours, getattr(self.config, ours), compiled[theirs])
        self.random = compiled.get("score") == "random"
        self.stack = None
        if self.aggressive:
            names = [r.name for r in plan.regions]
            if "stack" not in names:
                raise FcpassError(f"{self.name}'s aggressive steps skip the whole stack; optimize with --regions including stack")
            self.stack = plan.region("stack").index
            if self.config.aggressive == "taylor1" and not any(st.kind == "prev" and st.region == "stack"
                                                               for st in plan.states):
                raise FcpassError(f"{self.name} aggressive=taylor1 needs the stack's previous output; "
                                  f"optimize with --regions stack --taylor --tokens {self.name}")
        self.computed: list[int] = []  # the steps that computed the stack (F or C)
        self.rng = np.random.default_rng(self.config.seed)

    def step_type(self, step: int) -> str:
        """F (full), C (conservative) or A (aggressive)."""
        c = self.config
        if step < c.warmup or step == self.num_steps - 1:
            return "F"
        p = (step - c.warmup) % c.interval
        if p == 0:
            return "F"
        return "C" if (p % 2 == 1 or not self.aggressive) else "A"

    def controls(self, step: int) -> StepControls:
        base = self.base()
        out = TokenControls(base.ctl, base.thr, base.mix, tok=np.zeros(self.blocks, np.int64))
        if self.random:  # drawn every step, so the sequence does not depend on the step types
            out.rand = self.rng.random((self.blocks, self.tokens), dtype=np.float32)
        kind = self.step_type(step)
        if kind == "A":
            assert self.stack is not None
            out.ctl[self.stack] = CTL_SKIP
            out.mix[self.stack] = (taylor1_mix(step, self.computed) if self.config.aggressive == "taylor1"
                                   else APPROX_MIX["reuse"])
        elif kind == "C":
            out.tok[:] = TOK_CONSERVATIVE if self.config.attention == "reuse" else TOK_LOCAL_ONLY
        return out

    def observe(self, step: int, stat: np.ndarray, skip: np.ndarray) -> None:
        if self.stack is not None and skip[self.stack] == 0:
            self.computed.append(step)


class ToCa(DuCa):
    name = "toca"
    aggressive = False

    def __init__(self, config: ToCaConfig | None = None) -> None:
        super().__init__(config or ToCaConfig())
