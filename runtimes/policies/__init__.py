"""Cache policies: which region computes at each step, from the graph's statistics and the plan.

`core` holds the policy interface and the region-level families (FORA, FastCache, TaylorSeer, Delta-DiT,
FBCache, TeaCache, MagCache), `tokens` the token-level ones (DuCa, ToCa), `registry` every family by name
and `make_policy` / `parse_policy_spec`."""

from runtimes.policies.core import (
    DeltaDiT,
    DeltaDiTConfig,
    FastCache,
    FastCacheConfig,
    FBCache,
    FBCacheConfig,
    Fora,
    ForaConfig,
    MagCache,
    MagCacheConfig,
    NoCache,
    Policy,
    Scheduled,
    StepControls,
    TaylorSeer,
    TaylorSeerConfig,
    TeaCache,
    TeaCacheConfig,
    chi2_threshold,
    resample_ratios,
    taylor1_mix,
)
from runtimes.policies.registry import CONFIGS, POLICIES, make_policy, parse_policy_spec, policy_defaults
from runtimes.policies.tokens import DuCa, DuCaConfig, ToCa, ToCaConfig, TokenControls, token_options

__all__ = [
    "CONFIGS", "POLICIES", "DeltaDiT", "DeltaDiTConfig", "DuCa", "DuCaConfig", "FBCache", "FBCacheConfig",
    "FastCache", "FastCacheConfig", "Fora", "ForaConfig", "MagCache", "MagCacheConfig", "NoCache", "Policy",
    "Scheduled", "StepControls", "TaylorSeer", "TaylorSeerConfig", "TeaCache", "TeaCacheConfig", "ToCa",
    "ToCaConfig", "TokenControls", "chi2_threshold", "make_policy", "parse_policy_spec", "policy_defaults",
    "resample_ratios", "taylor1_mix", "token_options",
]
