"""What a policy needs compiled into its graph, and nothing more (`fcpass optimize --for`).

A graph compiled with every region set and every probe serves every policy, but a policy pays at each
skipped step for what it does not use: nested regions pass their states out of a skipped stack, and
TeaCache's probe runs block 0's normalisation and modulation at every step. `graph_for` maps policy
specs to the OptimizeOptions fields that serve exactly them: the region sets their `regions` option names, the
probes (FBCache, TeaCache), the previous outputs (taylor1 extrapolation), the token mechanism (DuCa,
ToCa) and the motion tokens (FastCache with motion=1).
"""

from __future__ import annotations

from typing import Any

from fcpass.compiler.passes.cache_regions import REGION_SETS
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import CachePlan
from runtimes.policies import Policy, make_policy, parse_policy_spec


def graph_needs(policy: str, motion_ratio: float = 0.5) -> dict[str, Any]:
    """What a policy needs compiled into its graph, as OptimizeOptions fields: the probes (fbcache,
    teacache), the previous outputs (taylor1 extrapolation), the token mechanism (duca, toca), the
    motion tokens (fastcache with motion=1, at `motion_ratio`)."""
    name, options = parse_policy_spec(policy)
    motion = name == "fastcache" and bool(options.get("motion", False))
    return {
        "probes": name in ("fbcache", "teacache"),
        "taylor": name == "taylorseer" or "taylor1" in (options.get("approx"), options.get("aggressive")),
        "tokens": name if name in ("duca", "toca") else None,
        "motion_ratio": motion_ratio if motion else None,
    }


def regions_needed(policy: Policy) -> tuple[str, ...]:
    """The region sets a (built) policy controls, from its settings."""
    name, config = policy.name, getattr(policy, "config", None)
    if name in ("fora", "taylorseer"):
        return (config.regions,)
    if name == "fastcache":
        return tuple(x.strip() for x in config.regions.split(",") if x.strip())
    if name == "delta-dit":
        return ("blocks",)
    if name == "fbcache":
        return ("tail",)
    # TeaCache and MagCache decide for the whole stack, DuCa and ToCa cache tokens inside it, and a
    # graph without a policy needs one region: the stack's is the cheapest.
    return ("stack",)


def graph_for(policies: list[str], motion_ratio: float | None) -> dict[str, Any]:
    """OptimizeOptions fields for one graph that serves every policy of `policies` and no more
    (motion tokens at `motion_ratio` if it is given, as without --for)."""
    needs = [graph_needs(policy, motion_ratio or 0.0) for policy in policies]
    for policy, need in zip(policies, needs):
        if need["motion_ratio"] is not None and motion_ratio is None:
            raise FcpassError(f"--for {policy} runs FastCache's motion tokens; add --motion-ratio RHO (e.g. 0.5)")
    tokens = sorted({need["tokens"] for need in needs} - {None})
    if len(tokens) > 1:
        raise FcpassError(f"--for names {' and '.join(tokens)}: a graph holds one token schedule; optimize one graph for each")
    regions = {r for policy in policies for r in regions_needed(make_policy(policy))}  # checks each spec too
    if motion_ratio is not None:
        regions.add("stack")  # the motion tokens run in the stack region
    return {"regions": tuple(r for r in REGION_SETS if r in regions), "probes": any(n["probes"] for n in needs),
            "taylor": any(n["taylor"] for n in needs), "tokens": tokens[0] if tokens else None, "motion_ratio": motion_ratio}


def unused_costs(plan: CachePlan, policy: Policy) -> list[str]:
    """What a compiled graph holds that `policy` does not use but pays for at its skipped stacks."""
    regions = regions_needed(policy)
    if policy.name in ("none", "teacache") or "stack" not in regions:
        return []
    costs = []
    if any(r.name == "stack" and r.probe == "modulated_input" for r in plan.regions):
        costs.append("TeaCache's probe (block 0's normalisation and modulation at every step)")
    nested = [r.name for r in plan.regions if r.parent is not None]
    if nested and "blocks" not in regions and "tail" not in regions:
        costs.append(f"{len(nested)} regions inside the stack (a skipped stack passes their state out of its If)")
    return costs


def compiled_defaults(plan: CachePlan, spec: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`options` (None values dropped) over the options `plan` was compiled --for under `spec`'s policy: what
    make_policy(spec, **...) takes, so that the spec's own values win over both."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    return {**plan.compiled_for.get(parse_policy_spec(spec)[0], {}), **given}


def default_policy(plan: CachePlan) -> tuple[str, str] | None:
    """The policy spec `fcpass sample` runs on `plan`'s graph when none is named, and where it comes from: the
    one a search tuned it for (`fcpass optimize --target-psnr`, `fcpass tune -o`), else the one policy it was
    compiled --for; None where the graph says neither."""
    if plan.tuned:
        t = plan.tuned
        return t["policy"], (f"tuned to hold {t['target_psnr']:g} dB: {t['psnr']:.2f} dB at {t['speedup']:.2f}x on "
                             f"{t['samples']} samples x {t['steps']} steps of its search")
    if len(plan.compiled_for) == 1:
        name, options = next(iter(plan.compiled_for.items()))
        spec = name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
        return spec, "the policy it was compiled --for"
    return None
