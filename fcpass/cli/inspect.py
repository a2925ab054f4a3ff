"""`fcpass inspect`: inputs, outputs, transformer blocks, MACs, and the cache plan if any."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fcpass.cli.common import (
    BLOCK_PATTERN_HELP,
    DIMS_HELP,
    INPUTS_HELP,
)
from fcpass.contract.errors import FcpassError


def add_parser(sub: Any) -> None:
    i = sub.add_parser("inspect", help="inputs, outputs, transformer blocks, MACs, and the cache plan if any")
    i.add_argument("model", type=Path, help="an exported DiT, a graph written by fcpass optimize, or a segments folder")
    i.add_argument("--json", action="store_true", help="everything found, as JSON")
    i.add_argument("--block-pattern", help=BLOCK_PATTERN_HELP)
    i.add_argument("--inputs", help=INPUTS_HELP)
    i.add_argument("--dims", metavar="NAME=N,...", help=DIMS_HELP)
    i.set_defaults(func=cmd_inspect)



def cmd_inspect(args: argparse.Namespace) -> int:
    from fcpass.contract.manifest import is_segments_artefact

    if is_segments_artefact(args.model):
        return _inspect_segments(args)
    info = _graph_info(args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_graph(info)
    if "plan" in info:
        _print_plan(info["plan"])
    return 0


def _graph_info(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `inspect` shows, as JSON-able data: I/O, roles, MACs, and the blocks or the cache plan."""
    from fcpass.compiler.graphinfo import GraphIndex, graph_macs, sized
    from fcpass.compiler.static_shapes import dynamic_axes, parse_dims
    from fcpass.contract.onnx_io import load_model
    from fcpass.contract.plan import has_plan, read_plan
    from fcpass.contract.roles import graph_inputs, graph_outputs, infer_roles, parse_role_overrides

    model = load_model(args.model)
    named = {(name, axis): dim for name, axis, dim in dynamic_axes(model)}
    info: dict[str, Any] = {
        "model": str(args.model),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [_spec_json(s, named) for s in graph_inputs(model)],
        "outputs": [_spec_json(s) for s in graph_outputs(model)],
    }
    if has_plan(model):
        plan = read_plan(model, str(args.model))
        info["plan"] = json.loads(plan.to_json())
        info["roles"] = plan.roles
        info["macs_per_call"] = plan.uncached_macs
    else:
        roles = infer_roles(model, parse_role_overrides(args.inputs))
        info["roles"] = roles.names()
        if named:  # dynamic axes: counted at batch 1, MACs per batch row
            try:
                model = sized(model, parse_dims(args.dims), batch=1)
                info["macs_per"] = "batch row"
            except FcpassError as exc:
                if args.dims:
                    raise
                info["macs_unknown"] = str(exc)  # the shapes, and so the MACs, wait for sizes
        index = GraphIndex(model)
        info["macs_per_call"] = None if "macs_unknown" in info else graph_macs(index)
        info["blocks"] = _blocks_info(model, index, roles.latent.name, args.block_pattern)
    return info


def _blocks_info(model: Any, index: Any, latent: str, block_pattern: str | None) -> dict[str, Any]:
    """The transformer blocks found, each with its branches (or why they were not split)."""
    from fcpass.compiler.branches import branches_of
    from fcpass.compiler.discover import discover_blocks

    bmap = discover_blocks(model, latent, block_pattern)
    split = branches_of(index, bmap.blocks, latent)
    return {
        "count": len(bmap),
        "method": bmap.method,
        "blocks": [
            {"index": b.index, "scope": b.scope, "nodes": len(b.nodes), "inputs": b.inputs,
             "outputs": b.outputs, "params": b.params, "macs": b.macs,
             "branches": split_b if isinstance(split_b, str) else [
                 {"role": br.role, "kind": br.kind, "output": br.output, "gate": br.gate, "value": br.value,
                  "value_projection": br.value_proj} for br in split_b.branches]}
            for b, split_b in zip(bmap.blocks, split)
        ],
    }


def _print_graph(info: dict[str, Any]) -> None:
    print(f"{info['model']}  (opset {info['opset']})")
    # A compiled graph exports the values its cache state takes under their names in the export:
    # listed with the model's own outputs they would read as more predictions.
    state_values = {st["next"] for st in info.get("plan", {}).get("states", [])}
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for s in info[kind]:
            if not s["name"].startswith("fc") and s["name"] not in state_values:
                print(f"  {s['name']:<24} {s['dtype']:<8} {s['shape']}")
        if kind == "inputs" and "roles" in info:
            how = "as optimized" if "plan" in info else "--inputs names them where this is wrong"
            print("  as " + ", ".join(f"{role}={name}" for role, name in info["roles"].items() if name) + f" ({how})")
    exported = [s["name"] for s in info["outputs"] if s["name"] in state_values and not s["name"].startswith("fc")]
    if exported:
        print(f"  ... and {len(exported)} block values the cache state takes ({', '.join(exported[:3])}"
              f"{', ...' if len(exported) > 3 else ''}), and the fc* cache tensors")
    per = f" per {info['macs_per']} (the batch axis is dynamic)" if "macs_per" in info else ""
    if "macs_unknown" in info:
        print(f"MACs per call: unknown, {info['macs_unknown']}")
    else:
        print(f"MACs per call: {info['macs_per_call'] / 1e9:.3f} G{per}")
    if "blocks" in info:
        b = info["blocks"]
        print(f"transformer blocks: {b['count']} (found by {b['method']})")
        for blk in b["blocks"]:
            macs = "      ?" if "macs_unknown" in info else f"{blk['macs'] / 1e9:7.3f}"
            print(f"  {blk['index']:>3} {blk['scope']:<28} nodes {blk['nodes']:>4}  params {blk['params'] / 1e6:7.3f} M"
                  f"  MACs {macs} G")
            branches = blk["branches"]
            if isinstance(branches, str):
                print(f"      branches: not split: {branches}")
            else:
                print("      branches: " + " -> ".join(
                    f"{br['role']}({br['kind']}{', V from ' + br['value_projection'] if br['value_projection'] else ''})"
                    for br in branches))


def _print_plan(plan: dict[str, Any]) -> None:
    print(f"cache plan (fcpass {plan['version']}): {len(plan['regions'])} regions, {len(plan['states'])} state tensors")
    if plan.get("compiled_for"):
        specs = " ".join(name + "".join(f"{',' if i else ':'}{k}={v}" for i, (k, v) in enumerate(opts.items()))
                         for name, opts in plan["compiled_for"].items())
        print(f"  compiled for {specs} (fcpass sample --policy NAME takes these options unless told otherwise)")
    if t := plan.get("tuned"):
        held = f", digit accuracy {t['accuracy']:.2f}" if t.get("accuracy") is not None else ""
        print(f"  tuned for {t['policy']} (fcpass sample runs it when no --policy is given): {t['psnr']:.2f} dB and "
              f"{t['speedup']:.2f}x (MAC-ideal {t['mac_ideal']:.2f}x){held} against the uncached graph on "
              f"{t['samples']} samples x {t['steps']} steps of {t.get('scheduler', 'its sampler')}, target "
              f"{t['target_psnr']:g} dB, best of {len(t['trials'])} trials")
    if c := plan.get("calibration"):
        print(f"  calibrated on {c['trajectories']} trajectories x {c['steps']} steps of "
              f"{c.get('scheduler', 'an unrecorded sampler')}, guidance {c['guidance_scale']:g}")
    for r in plan["regions"]:
        cal = r["calibration"]
        cal_txt = f"  sigma2 {cal['sigma2']:.3g}  fit err {cal.get('fit_rel_err', float('nan')):.3g}" if cal.get("sigma2") is not None else ""
        probe_txt = f"  probe {r['probe']}" if r.get("probe") else ""
        print(f"  {r['index']:>3} {r['name']:<10} parent {r['parent']!s:<6} blocks {r['blocks'][0]}..{r['blocks'][-1]}"
              f"  MACs {r['macs'] / 1e9:.3f} G{cal_txt}{probe_txt}")
        if "teacache" in cal:
            tea = cal["teacache"]
            print(f"        teacache poly {', '.join(f'{c:.4g}' for c in tea['coefficients'])}"
                  f"  (fit residual {tea['rel_residual']:.2f}, {tea['points']} points)")
        if "magcache" in cal:
            ratios = cal["magcache"]["ratios"]
            print(f"        magcache ratios for {len(ratios)} steps, {min(ratios):.4f} .. {max(ratios):.4f}")
    if plan.get("motion"):
        m = plan["motion"]
        how = (f"merged by k-NN (K = {m['merge']['neighbours']}, lambda = {m['merge']['weight']})" if m.get("merge")
               else "the most salient" + (", attending to every token's cached keys and values" if m.get("context") else ""))
        print(f"  motion tokens in {m['region']}: k = {m['k']} of {m['tokens']} (ratio {m['ratio']}), {how}; "
              f"MACs of a motion step {m['macs'] / 1e9:.3f} G")


def _inspect_segments(args: argparse.Namespace) -> int:
    """The manifest of a segments folder: its step program, one line per segment or branch."""
    from fcpass.contract.manifest import read_manifest

    manifest = read_manifest(args.model)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    plan = manifest.get("plan") or {"regions": []}
    print(f"{args.model}  (fcpass segments, {manifest['segments']} segments, {manifest['branches']} branch points)")
    print(f"cache plan: {len(plan['regions'])} regions ({', '.join(r['name'] for r in plan['regions'])})")

    def show(steps: list[dict[str, Any]], depth: int) -> None:
        pad = "  " * depth
        for s in steps:
            if s["kind"] == "segment":
                print(f"{pad}{s['file']:<34} {len(s['inputs']):>3} in  {len(s['outputs']):>3} out")
            elif s["kind"] == "branch":
                print(f"{pad}if {s['cond']} ({s['region'] or 'not a region'}):")
                for key in ("then", "else"):
                    print(f"{pad}  {s[key]['role']}:")
                    show(s[key]["steps"], depth + 2)

    show(manifest["steps"], 1)
    return 0


def _spec_json(s: Any, named: dict[tuple[str, int], str] | None = None) -> dict[str, Any]:
    """Name, dtype and shape; a dynamic axis reads as its name in `named` (input, axis) where it has one."""
    return {"name": s.name, "dtype": s.dtype.name,
            "shape": [(named or {}).get((s.name, axis), d) if d is None else d for axis, d in enumerate(s.shape)]}
