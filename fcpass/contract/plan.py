"""The cache plan: what the compiled graph contains, stored as JSON in the model's metadata.

The plan travels inside the model: regions, the state tensors (names, shapes, dtypes), calibration
numbers, policy defaults and the fcpass version are `model.metadata_props["fcpass.plan"]`.
The fitted weights of the linear approximations are graph initializers, not metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fcpass import __version__
from fcpass.contract.errors import FcpassError, first_clause

log = logging.getLogger(__name__)

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
    # The graph this plan was compiled against (`graph_digest`): its nodes and its weights; empty in older plans
    digest: dict[str, str] = field(default_factory=dict)

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
        """The plan `text` holds, every field of its declared type, or one line saying which is not."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise PlanError(f"its JSON does not parse ({first_clause(exc, 80)})") from None
        version = raw.get("version") if isinstance(raw, dict) else None
        try:
            return _typed(cls, raw, "plan")
        except PlanError as exc:
            if isinstance(version, str) and version != __version__:
                raise PlanError(f"{exc} (it was written by fcpass {version}; this is {__version__})") from None
            raise


class PlanError(FcpassError):
    """A cache plan that is not one this version of fcpass wrote; `read_plan` adds the file and the fix."""


def _typed(cls: type, raw: Any, where: str) -> Any:
    """`cls(**raw)` where each of raw's fields has the type `cls` declares (nested specs included)."""
    if not isinstance(raw, dict):
        raise PlanError(f"{where} is {type(raw).__name__}, not an object")
    known = {f.name: f for f in fields(cls)}
    if unknown := sorted(set(raw) - set(known)):
        raise PlanError(f"{where} has fields this fcpass does not know: {', '.join(map(str, unknown))[:80]}")
    if missing := [n for n, f in known.items() if n not in raw and f.default is MISSING and f.default_factory is MISSING]:
        raise PlanError(f"{where} lacks {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in raw.items():
        hint = hints[name]
        spec = _SPECS.get(typing.get_args(hint)[0] if typing.get_origin(hint) is list else None)
        if spec is not None:
            if not isinstance(value, list):
                raise PlanError(f"{where}.{name} is {type(value).__name__}, not a list")
            out[name] = [_typed(spec, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)]
        elif not _conforms(value, hint):
            raise PlanError(f"{where}.{name} is {json.dumps(value)[:40]}, not {_hint_name(hint)}")
        else:
            out[name] = value
    return cls(**out)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type `hint` (a bool is no number; a number is finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(v, args[1]) for v in value.values())
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        ok = (int,) if hint is int else (int, float)
        return isinstance(value, ok) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def read_plan(model: onnx.ModelProto, path: str = "the model") -> CachePlan:
    for prop in model.metadata_props:
        if prop.key == PLAN_KEY:
            try:
                plan = CachePlan.from_json(prop.value)
            except PlanError as exc:
                raise FcpassError(f"{path} holds a damaged or foreign cache plan: {' '.join(str(exc).split())}; compile the original export "
                                  f"again with fcpass optimize MODEL.onnx -o {path}") from None
            return plan
    raise FcpassError(f"{path} has no fcpass cache plan; make one with: fcpass optimize {path} -o model.fc.onnx")


def has_plan(model: onnx.ModelProto) -> bool:
    return any(p.key == PLAN_KEY for p in model.metadata_props)


def write_plan(model: onnx.ModelProto, plan: CachePlan) -> None:
    """Store `plan` in `model`'s metadata, with the digest of the graph as it is now."""
    plan.digest = {**graph_digest(model), "plan": plan_digest(plan)}
    for prop in list(model.metadata_props):
        if prop.key == PLAN_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = PLAN_KEY, plan.to_json()


_SPECS: dict[Any, type] = {RegionSpec: RegionSpec, StateSpec: StateSpec}


def check_plan_fits(plan: CachePlan, model: onnx.ModelProto, path: str) -> None:
    """The plan names only inputs and outputs the graph has, with the shapes and types the graph gives them:
    a plan edited or copied from another graph is refused here, not by the runtime mid-sampling."""
    inputs = {v.name: v.type.tensor_type for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    fix = f"compile the original export again with fcpass optimize MODEL.onnx -o {path}"

    def refuse(what: str) -> FcpassError:
        return FcpassError(f"{path}'s cache plan does not fit its graph: {' '.join(what.split())}; {fix}")

    states = {s.name for s in plan.states}
    regions = {r.name for r in plan.regions}
    blocks = len(plan.tokens.get("blocks", [])) if isinstance(plan.tokens.get("blocks"), list) else 0
    for s in plan.states:
        if s.region not in regions:  # every state, probes' too: the host indexes its region's decision
            raise refuse(f"state {s.name[:60]!r} is of kind {s.kind[:20]!r} in region {s.region[:20]!r}")
        if s.token_block is not None and not 0 <= s.token_block < blocks:
            raise refuse(f"state {s.name} names token block {s.token_block} of {blocks}")
        t = inputs.get(s.name)
        if t is None:
            raise refuse(f"state {s.name[:60]!r} is no input of the graph")
        if s.next not in outputs and s.next not in states:
            raise refuse(f"state {s.name}'s next value {s.next[:60]!r} is no output of the graph")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) != len(s.shape) or any(not isinstance(d, int) or d < 0 or (g is not None and g != d)
                                            for d, g in zip(s.shape, dims)):
            raise refuse(f"state {s.name} has shape {s.shape} where the graph's input has {dims}")
        try:
            dtype = np.dtype(s.dtype)
        except TypeError:
            raise refuse(f"state {s.name} has dtype {s.dtype[:20]!r}") from None
        if onnx.helper.np_dtype_to_tensor_dtype(dtype) != t.elem_type:
            raise refuse(f"state {s.name} is {s.dtype} where the graph's input is "
                         f"{onnx.TensorProto.DataType.Name(t.elem_type)}")
    if missing := [o for o in plan.outputs[:1] if o not in outputs] or ([] if plan.outputs else ["(none)"]):
        raise refuse(f"its output {missing[0][:60]!r} is no output of the graph")
    if bad := [f"{role}={name}"[:60] for role, name in plan.roles.items() if name is not None and name not in inputs]:
        raise refuse(f"input role {bad[0]} names no input of the graph")
    names = [r.name for r in plan.regions]
    if sorted(r.index for r in plan.regions) != list(range(len(plan.regions))) or len(set(names)) != len(names):
        raise refuse("its regions are not numbered 0..R-1 under distinct names")
    if bad := [r.name for r in plan.regions if r.parent is not None and r.parent not in names]:
        raise refuse(f"region {bad[0]}'s parent is no region")


def graph_digest(model: onnx.ModelProto, folder: str | Path | None = None) -> dict[str, str]:
    """Digests of what a graph computes: its nodes (with their attributes and every subgraph's) and its
    weights (every initializer's name, type, shape and bytes, read from `folder`'s external data where the
    model was loaded without it). Metadata and node names are left out, so the plan can hold the result.
    One pass over the weights' bytes: about as long as reading them."""
    nodes, weights = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    files: dict[str, Any] = {}

    def walk(g: onnx.GraphProto) -> None:
        for v in (*g.input, *g.output):
            nodes.update(v.SerializeToString(deterministic=True))
        for t in g.initializer:
            weights.update(f"{t.name}|{t.data_type}|{list(t.dims)}|".encode())
            weights.update(_tensor_bytes(t, folder, files))
        for n in g.node:
            nodes.update(f"{n.op_type}|{n.domain}|{list(n.input)}|{list(n.output)}|".encode())
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    nodes.update(f"graph {a.name}".encode())
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        walk(sub)
                else:
                    nodes.update(a.SerializeToString(deterministic=True))

    try:
        walk(model.graph)
    finally:
        for fh in files.values():
            fh.close()
    return {"nodes": nodes.hexdigest(), "weights": weights.hexdigest()}


def _tensor_bytes(t: onnx.TensorProto, folder: str | Path | None, files: dict[str, Any]) -> bytes:
    """A tensor's stored bytes wherever they are: raw data, typed fields, or its external data file."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        if t.raw_data:
            return t.raw_data
        bare = onnx.TensorProto()
        bare.CopyFrom(t)
        bare.name = ""
        return bare.SerializeToString(deterministic=True)
    entry = {e.key: e.value for e in t.external_data}
    if folder is None:
        raise FcpassError(f"weight {t.name} is external and no folder was given to read it from; pass the model's path")
    location = entry.get("location", "")
    if location not in files:
        files[location] = open(Path(folder) / location, "rb")  # noqa: SIM115  (closed by graph_digest)
    fh = files[location]
    fh.seek(int(entry.get("offset", 0)))
    length = entry.get("length")
    return fh.read(int(length)) if length is not None else fh.read()


def plan_digest(plan: CachePlan) -> str:
    """A digest of everything the plan holds but its digest."""
    fields_ = {k: v for k, v in asdict(plan).items() if k != "digest"}
    return hashlib.blake2b(json.dumps(fields_, sort_keys=True).encode(), digest_size=16).hexdigest()


def check_digest(model: onnx.ModelProto, plan: CachePlan, path: str | Path) -> None:
    """Refuse a compiled graph edited after fcpass wrote it: its cache would sample other numbers than the
    plan's regions and calibration were made for. A plan written before digests loads with a warning."""
    if not plan.digest:
        log.warning("%s's cache plan carries no digest of its graph (an older fcpass wrote it): edits made to the "
                    "graph since cannot be detected; compile it again with fcpass optimize to add one", path)
        return
    now = {**graph_digest(model, Path(path).parent), "plan": plan_digest(plan)}
    changed = [what for what in ("nodes", "weights", "plan") if plan.digest.get(what) != now[what]]
    if changed:
        raise FcpassError(f"{path} was edited after fcpass compiled it: its {' and its '.join(changed)} differ from "
                          "those its cache plan was made for, so its cache would sample wrong numbers; compile the "
                          f"original export again with fcpass optimize MODEL.onnx -o {path}")
