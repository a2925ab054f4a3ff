"""The cache plan: what the compiled graph contains, stored as JSON in the model's metadata.

The plan travels inside the model: regions, the state tensors (names, shapes, dtypes), calibration
numbers, policy defaults and the fcpass version are `model.metadata_props["fcpass.plan"]`.
The fitted weights of the linear approximations are graph initializers, not metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from fcpass import __version__
from fcpass.contract.errors import FcpassError

PLAN_KEY = "fcpass.plan"
CTL_INPUT = "fc_ctl"  # int64 (R,): 0 compute, 1 skip, 2 decide in the graph (skip iff stat <= thr), 3 the same on the probe
THR_INPUT = "fc_thr"  # float32 (R,): thresholds on the statistic
MIX_INPUT = "fc_mix"  # float32 (R, MIX_WIDTH): coefficients of the approximation, see APPROX_MIX
STAT_OUTPUT = "fc_stat"  # float32 (R, B): per sample, the statistic each region was tested on (its probe under ctl 3)
SKIP_OUTPUT = "fc_skip"  # float32 (R,): 1 skipped, 0 computed, -1 not reached (an enclosing region skipped)
# Token-level caching (`fcpass.compiler.passes.token_cache`; only in graphs optimized with --tokens), one entry per
# block: 0 full (the original nodes; token caches, V-norm scores and counters refreshed), 1 conservative
# (self-attention reused, token-local branches on their top-k tokens), 2 conservative with attention computed.
TOK_INPUT = "fc_tok"  # int64 (blocks,)
TOK_FULL, TOK_CONSERVATIVE, TOK_LOCAL_ONLY = 0, 1, 2
TOK_ANY = "fc.tok.sel.any"  # the condition of the If that selects every block's tokens: some block is not full
# FastCache's motion tokens (`fcpass.compiler.passes.motion_tokens`; only in graphs optimized with --motion-ratio):
# 1 runs a computing stack on its k most salient tokens, the others approximated; 0 runs it whole.
MOTION_INPUT = "fc_motion"  # int64 scalar
TOK_RAND_INPUT = "fc_tok_rand"  # float32 (blocks, N): the host's seeded token scores, with --token-score random

CTL_COMPUTE, CTL_SKIP, CTL_DECIDE, CTL_PROBE = 0, 1, 2, 3


def tok_condition(pos: int, what: str) -> str:
    """The condition of block `pos`'s token If (`cond`: not full) or of its attention If (`reuse`: conservative)."""
    return f"fc.tok{pos}.{what}"


def token_conditions(blocks: int) -> dict[str, Callable[[np.ndarray], bool]]:
    """Every token If's condition as the function of fc_tok the graph computes it by: the host, which
    feeds fc_tok, knows each branch without reading a condition back from the device."""
    out: dict[str, Callable[[np.ndarray], bool]] = {TOK_ANY: lambda tok: bool((tok > TOK_FULL).any())}
    for pos in range(blocks):
        out[tok_condition(pos, "cond")] = lambda tok, pos=pos: bool(tok[pos] > TOK_FULL)
        out[tok_condition(pos, "reuse")] = lambda tok, pos=pos: bool(tok[pos] == TOK_CONSERVATIVE)
    return out


# A region's second statistic, tested under ctl 3 (both are rel_L1 = sum|a - b| / sum|b| per sample):
PROBES = {
    # The range after the first block (FBCache): the first block's residual O_0 - H_0 against the
    # residual at the last step this range computed.
    "head_residual": "first block's residual vs the last computed step's",
    # The whole stack (TeaCache): block 0's timestep-modulated, normalised input against the previous step's.
    "modulated_input": "block 0's modulated input vs the previous step's",
}

# A skipped region's output, with d = H - H_ref, V = W - I, b fitted by calibration (linear) and
# A, c fitted by calibration (affine, the paper's literal O = H A + c):
#   (1 - m_aff) * (O_ref + m_tay*(O_ref - O_prev)) + m_res*d + (m_lin*d + m_aff*H)(m_lin*V + m_aff*A) + m_lin*b + m_aff*c
# Rows of fc_mix per approximation (taylor1's m_tay is step-dependent); m_lin and m_aff are never both set.
MIX_WIDTH = 4
APPROX_MIX: dict[str, tuple[float, float, float, float]] = {
    "reuse": (0.0, 0.0, 0.0, 0.0),
    "residual": (1.0, 0.0, 0.0, 0.0),
    "linear": (1.0, 1.0, 0.0, 0.0),
    "affine": (0.0, 0.0, 0.0, 1.0),
    "taylor1": (0.0, 0.0, 1.0, 0.0),
}


@dataclass
class StateSpec:
    """One cache-state tensor, fed as `name`. Where its region computed (`fc_skip` 0; the "mod" probe at
    every step) it takes the value `next`: a graph output, or another state's value before the step
    (the previous output takes the output state's); elsewhere it keeps its value (`runtimes.state.Commit`).

    A token state that some token modes leave as it is names its block's index in fc_tok (`token_block`)
    and those modes (`token_keep`): it also keeps its value where fc_tok[token_block] is one of them, and
    the graph's `next` output there is any value of its type, which spares the graph a copy into its
    output. The self-attention cache is kept at TOK_CONSERVATIVE (reused), the scores stored at full
    steps at every mode but TOK_FULL."""

    name: str
    next: str
    region: str
    # "in" (last computed input), "out" (last computed output), "prev" (the computed output before),
    # "res" (the probed residual at the last computed step), "mod" (the probed input at the previous step)
    kind: str
    source: str  # the original graph tensor it tracks
    shape: list[int | str | None]
    dtype: str
    token_block: int | None = None
    # the modes that keep it, where token_block is set; the default, the self-attention cache's, reads older plans
    token_keep: list[int] = field(default_factory=lambda: [TOK_CONSERVATIVE])


@dataclass
class RegionSpec:
    """A skippable region: one block or a range of blocks, nested under `parent` if any."""

    name: str
    index: int
    blocks: list[int]
    parent: str | None
    inputs: list[str]
    outputs: list[str]
    pairs: list[int | None]  # for each output, the input of equal shape it is approximated from
    macs: int
    approx_macs: int
    calibration: dict[str, Any] = field(default_factory=dict)
    probe: str | None = None  # a key of PROBES, if the region has a second statistic

    @property
    def region_set(self) -> str:
        """The region set it belongs to (`fcpass.compiler.passes.cache_regions.REGION_SETS`): blocks, tail or stack."""
        return "blocks" if self.name.startswith("block") else self.name


@dataclass
class CachePlan:
    regions: list[RegionSpec]
    states: list[StateSpec]
    roles: dict[str, str | None]
    outputs: list[str]
    uncached_macs: int
    discovery: str
    version: str = __version__
    calibration: dict[str, Any] = field(default_factory=dict)
    policy_defaults: dict[str, Any] = field(default_factory=dict)
    # `fcpass optimize --for`: each policy's options as given there, its defaults when this graph is sampled
    compiled_for: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Token-level caching, if compiled: options, and per block its region, k per branch and MACs (token_cache.spec)
    tokens: dict[str, Any] = field(default_factory=dict)
    # Motion tokens, if compiled: ratio, k, N, the region and the MACs of a motion step (motion_tokens.spec)
    motion: dict[str, Any] = field(default_factory=dict)
    # The tuned policy (`fcpass optimize --target-psnr`, `fcpass tune -o`): its spec, the quality and speed it
    # held on the search's seeds, what it was measured under and every trial (fcpass.tune.winner_record);
    # what `fcpass sample` runs when no --policy is given
    tuned: dict[str, Any] = field(default_factory=dict)

    def region(self, name: str) -> RegionSpec:
        for r in self.regions:
            if r.name == name:
                return r
        raise FcpassError(f"the plan has no region {name!r}; it has {', '.join(r.name for r in self.regions)}")

    def block_regions(self) -> list[RegionSpec]:
        return sorted((r for r in self.regions if r.region_set == "blocks"), key=lambda r: r.blocks[0])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CachePlan:
        raw = json.loads(text)
        raw["regions"] = [RegionSpec(**r) for r in raw["regions"]]
        raw["states"] = [StateSpec(**s) for s in raw["states"]]
        return cls(**raw)


def read_plan(model: onnx.ModelProto, path: str = "the model") -> CachePlan:
    for prop in model.metadata_props:
        if prop.key == PLAN_KEY:
            return CachePlan.from_json(prop.value)
    raise FcpassError(f"{path} has no fcpass cache plan; make one with: fcpass optimize {path} -o model.fc.onnx")


def has_plan(model: onnx.ModelProto) -> bool:
    return any(p.key == PLAN_KEY for p in model.metadata_props)


def write_plan(model: onnx.ModelProto, plan: CachePlan) -> None:
    for prop in list(model.metadata_props):
        if prop.key == PLAN_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = PLAN_KEY, plan.to_json()
