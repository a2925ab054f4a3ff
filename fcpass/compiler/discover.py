"""Find the transformer blocks of an exported DiT and compute each block's boundary.

1. Scopes. The legacy torch exporter writes module scopes into node names
   (`/blocks.3/attn/MatMul`, `/transformer_blocks.3/...`); the dynamo exporter writes them into each
   node's `metadata_props["pkg.torch.onnx.name_scopes"]` (which onnx-graphsurgeon drops, so this
   module reads the ModelProto). A scope component matching the block pattern names the block.
2. Structure, when no node carries a block scope: the residual stream is cut into segments at
   tensors every latent path passes through; the longest run of identically shaped, repeating
   segment groups is the block chain.
3. Boundary, whatever found the blocks: a block's *region* is every node on a path from its stream
   inputs to its stream outputs. Stream inputs are the latent-dependent tensors its scoped nodes read
   from outside; everything that does not depend on the latent (diffusers' per-block timestep
   embedding, adaLN modulation, a caption projection, shared casts and constants) stays outside and
   is read by the region as an outer value.

Declines (FcpassError naming the reason): a graph with no latent input, scopes whose blocks hold no
latent-dependent node, regions that overlap, a graph that fcpass has already optimized.
"""

from __future__ import annotations

import ast
import itertools
import logging
import re
from collections import Counter
from dataclasses import dataclass

import onnx

from fcpass.compiler.graphinfo import GraphIndex, graph_macs, param_count
from fcpass.contract.errors import FcpassError

log = logging.getLogger(__name__)

DEFAULT_BLOCK_PATTERN = r"^(?:.*\.)?(?P<family>(?:transformer_|single_transformer_|joint_)?blocks|layers)\.(?P<index>\d+)$"
DYNAMO_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class Block:
    """One transformer block: the region's node indices (topological order) and its stream tensors."""

    index: int
    scope: str
    nodes: list[int]
    inputs: list[str]
    outputs: list[str]
    macs: int = 0
    params: int = 0


@dataclass
class BlockMap:
    blocks: list[Block]
    method: str
    latent: str

    def __len__(self) -> int:
        return len(self.blocks)


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """The module scope path of a node from either exporter, outermost first."""
    for prop in node.metadata_props:
        if prop.key == DYNAMO_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                scopes = prop.value.strip("[]").replace("'", "").split(",")
            return [s.strip() for s in scopes if s and s.strip()]
    if node.name.startswith("/"):
        return [p for p in node.name.split("/")[1:-1] if p]
    return []


def _scope_key(scopes: list[str], pattern: re.Pattern[str]) -> tuple[str, int, str] | None:
    for scope in scopes:
        m = pattern.match(scope)
        if m:
            groups = m.groupdict()
            index = groups.get("index") or next((g for g in m.groups() if g and g.isdigit()), None)
            if index is None:
                raise FcpassError(
                    f"--block-pattern {pattern.pattern!r} matched {scope!r} but captured no block number; "
                    "add a group such as (?P<index>\\d+)"
                )
            return groups.get("family") or pattern.pattern, int(index), scope
    return None


def discover_blocks(model: onnx.ModelProto, latent: str, block_pattern: str | None = None) -> BlockMap:
    """Find the transformer blocks of `model`, whose latent input is named `latent`."""
    if any(p.key == "fcpass.plan" for p in model.metadata_props):
        raise FcpassError("this model is already cache-aware (it has an fcpass plan); optimize the original export")
    index = GraphIndex(model)
    if latent not in {i.name for i in model.graph.input}:
        raise FcpassError(f"graph has no input {latent!r}; name the latent input with --inputs latent=NAME")
    dependent = index.descendants({latent})
    try:
        pattern = re.compile(block_pattern or DEFAULT_BLOCK_PATTERN)
    except re.error as exc:
        raise FcpassError(f"--block-pattern {block_pattern!r} is not a valid regular expression ({exc})") from None

    groups: dict[tuple[str, int], list[int]] = {}
    scope_names: dict[tuple[str, int], str] = {}
    scoped_any = 0
    numbered: Counter[str] = Counter()  # outermost numbered scope component -> nodes in it
    for i, node in enumerate(index.nodes):
        scopes = node_scopes(node)
        scoped_any += bool(scopes)
        numbered.update(next(([c] for c in scopes if re.search(r"\.\d+$", c)), []))
        key = _scope_key(scopes, pattern)
        if key is not None:
            groups.setdefault(key[:2], []).append(i)
            scope_names[key[:2]] = key[2]
    if block_pattern and not groups:  # the user named the blocks: no silent fallback to the structural search
        # The numbered module holding the most nodes is most likely a block: what the pattern must match.
        example = f", e.g. {numbered.most_common(1)[0][0]!r}" if numbered else ""
        seen = f"none of {scoped_any} scoped nodes{example}" if scoped_any else "no node carries a module scope"
        raise FcpassError(f"--block-pattern {block_pattern!r} matches no module scope ({seen}); pass a pattern that "
                          "matches one scope component per block and captures its number, or leave it out")
    if groups:
        uses_metadata = any(p.key == DYNAMO_SCOPES_KEY for n in index.nodes for p in n.metadata_props)
        method = "scopes (dynamo metadata)" if uses_metadata else "scopes (node names)"
        if block_pattern:
            method += f", pattern {block_pattern!r}"
        ordered = sorted(groups, key=lambda k: groups[k][0])
        blocks = []
        for pos, key in enumerate(ordered):
            core = [i for i in groups[key] if i in dependent]
            if not core:
                raise FcpassError(
                    f"block {scope_names[key]!r} has no node that depends on the latent {latent!r}; "
                    "is the latent input right? name it with --inputs latent=NAME"
                )
            inputs, outputs = _boundary(index, set(core), dependent)
            blocks.append(_region(index, pos, scope_names[key], inputs, outputs, latent))
        result = BlockMap(blocks, method, latent)
    else:
        result = _discover_by_structure(index, latent, dependent)
        if result is None:
            tried = f"pattern {pattern.pattern!r} on {scoped_any} scoped nodes" if scoped_any else "no node carries a module scope"
            raise FcpassError(
                f"no transformer blocks found ({tried}; the structural search found no repeated chain of "
                "subgraphs on the residual stream); pass --block-pattern REGEX matching the block scope names"
            )
    _check_disjoint(result, index)
    for b in result.blocks:
        b.macs = graph_macs(index, b.nodes)
        b.params = param_count(index, b.nodes)
    log.info("found %d blocks by %s", len(result.blocks), result.method)
    return result


def _boundary(index: GraphIndex, core: set[int], dependent: set[int]) -> tuple[list[str], list[str]]:
    """Stream inputs (latent-dependent tensors read from outside) and outputs (read outside)."""
    inputs: list[str] = []
    outputs: list[str] = []
    for i in sorted(core):
        for name in index.nodes[i].input:
            p = index.producer.get(name)
            if p is not None and p not in core and p in dependent and name not in inputs:
                inputs.append(name)
        for name in index.nodes[i].output:
            readers = index.consumers.get(name, [])
            if (any(r not in core for r in readers) or name in index.graph_outputs) and name not in outputs:
                outputs.append(name)
    return inputs, outputs


def boundary_of(
    index: GraphIndex, inputs: list[str], outputs: list[str], latent: str
) -> tuple[list[int], list[str], list[str]]:
    """Nodes on a path from `inputs` to `outputs`, and the latent-dependent tensors crossing the edge.

    The boundary is recomputed on the closed node set: an unscoped node on the path (the dynamo
    exporter leaves some without scope) is inside, and what crosses the edge may change with it.
    """
    nodes = sorted(index.descendants(set(inputs)) & index.ancestors(set(outputs)))
    region = set(nodes)
    dependent = index.descendants({latent})
    ins: list[str] = []
    outs: list[str] = []
    for i in nodes:
        for name in index.nodes[i].input:
            p = index.producer.get(name)
            from_outside = (p is None and name == latent) or (p is not None and p not in region and p in dependent)
            if from_outside and name not in ins:
                ins.append(name)
        for name in index.nodes[i].output:
            leaves = any(r not in region for r in index.consumers.get(name, [])) or name in index.graph_outputs
            if leaves and name not in outs:
                outs.append(name)
    return nodes, ins, outs


def _region(index: GraphIndex, pos: int, scope: str, inputs: list[str], outputs: list[str], latent: str) -> Block:
    nodes, ins, outs = boundary_of(index, inputs, outputs, latent)
    if not nodes:
        raise FcpassError(f"block {scope!r}: no path from its inputs {inputs} to its outputs {outputs}")
    return Block(pos, scope, nodes, ins, outs)


def _check_disjoint(result: BlockMap, index: GraphIndex) -> None:
    owner: dict[int, str] = {}
    for b in result.blocks:
        for i in b.nodes:
            if i in owner:
                raise FcpassError(
                    f"blocks {owner[i]!r} and {b.scope!r} share node {index.nodes[i].name or index.nodes[i].op_type!r}; "
                    "the block scopes are not a chain (pass --block-pattern matching one block family)"
                )
            owner[i] = b.scope


def _cut_tensors(index: GraphIndex, dependent: set[int]) -> list[tuple[int, str]]:
    """(node position, tensor) for every tensor that every latent path passes through, in order."""
    remaining: Counter[str] = Counter()
    cuts: list[tuple[int, str]] = []
    live: set[str] = set()
    for i in sorted(dependent):
        node = index.nodes[i]
        for name in node.input:
            if name in live:
                remaining[name] -= 1
                if remaining[name] == 0:
                    live.discard(name)
        for name in node.output:
            readers = [r for r in index.consumers.get(name, []) if r in dependent]
            if readers or name in index.graph_outputs:
                live.add(name)
                remaining[name] = len(readers) + (name in index.graph_outputs)
        if len(live) == 1:
            cuts.append((i, next(iter(live))))
    return cuts


def _discover_by_structure(index: GraphIndex, latent: str, dependent: set[int]) -> BlockMap | None:
    cuts = _cut_tensors(index, dependent)
    if len(cuts) < 3:
        return None
    segments = []
    for (a, _), (b, _) in itertools.pairwise(cuts):
        ops = tuple(index.nodes[i].op_type for i in sorted(dependent) if a < i <= b)
        segments.append(ops)
    best: tuple[int, int, int] | None = None  # (coverage, start, period)
    for period in range(1, 9):
        for start in range(len(segments)):
            reps = 1
            while start + (reps + 1) * period <= len(segments) and all(
                segments[start + reps * period + j] == segments[start + j] for j in range(period)
            ):
                reps += 1
            # Demand real work in a block and at least 2 repeats: a chain of single Adds is no block.
            work = sum(op in ("MatMul", "Gemm", "Conv") for seg in segments[start : start + period] for op in seg)
            if reps >= 2 and work >= 2 and (best is None or reps * period > best[0]):
                best = (reps * period, start, period)
    if best is None:
        return None
    coverage, start, period = best
    blocks = []
    for pos in range(coverage // period):
        first = start + pos * period
        inp = cuts[first][1]
        out = cuts[first + period][1]
        blocks.append(_region(index, pos, f"structural block {pos}", [inp], [out], latent))
    return BlockMap(blocks, f"structure (period {period} segments)", latent)
