"""The `fcpass` command line. Every user-facing failure is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fcpass import __version__
from fcpass.errors import FcpassError
from fcpass.roles import ROLES

log = logging.getLogger("fcpass")

BLOCK_PATTERN_HELP = ("regex matching a block's scope name, with a group for its number (default: found from the "
                      "exporter's scopes, else from the graph's structure)")
CALIB_STEPS_HELP = ("sampling steps of each calibration trajectory, best the count you will sample with: the fits "
                    "and statistics are those of one step's change (default %(default)s)")
DIMS_HELP = ("sizes for dynamic axes other than the batch, by the names the export gave them, e.g. "
             "height=64,width=64 (fcpass inspect shows them in the inputs' shapes)")
INPUTS_HELP = f"input roles when the names do not say, e.g. latent=x,timestep=t,class=y (roles: {', '.join(ROLES)})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The dynamo exporter warns at every export that torchvision's ops are not registered: nothing to do.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    if not hasattr(args, "func"):
        args = parser.parse_args(["sample", *(argv or [])])
    try:
        rc = args.func(args) or 0
        sys.stdout.flush()  # a reader that left shows here, where it is handled, not at the exit's flush
        return rc
    except FcpassError as exc:
        # One line even when the message quotes a multi-line library error (e.g. torch.load's).
        print(f"fcpass: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fcpass: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`fcpass inspect m.onnx | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line as every other error (and the place to read more)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fcpass", description="Compile adaptive caches into exported Diffusion Transformers.")
    p.add_argument("--version", action="version", version=f"fcpass {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(metavar="COMMAND")

    e = sub.add_parser("export", help="export a PyTorch DiT to static-shaped ONNX")
    e.add_argument("--arch", required=True, help="digits, dit-{s,b,l,xl}-{2,4,8}, pixart-tiny, pixart-xl-2")
    e.add_argument("--image-size", type=int, default=256, help="image side in pixels (default %(default)s)")
    e.add_argument("--weights", type=Path, help="checkpoint (official DiT .pt, or diffusers layout)")
    e.add_argument("--batch", type=int, default=2, help="static batch (2 = one sample with guidance)")
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript); default %(default)s")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    e.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    e.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="inputs, outputs, transformer blocks, MACs, and the cache plan if any")
    i.add_argument("model", type=Path, help="an exported DiT, a graph written by fcpass optimize, or a segments folder")
    i.add_argument("--json", action="store_true", help="everything found, as JSON")
    i.add_argument("--block-pattern", help=BLOCK_PATTERN_HELP)
    i.add_argument("--inputs", help=INPUTS_HELP)
    i.add_argument("--dims", metavar="NAME=N,...", help=DIMS_HELP)
    i.set_defaults(func=cmd_inspect)

    o = sub.add_parser("optimize", help="rewrite a DiT graph into a cache-aware graph")
    o.add_argument("model", type=Path, nargs="?", help="exported DiT (default: the bundled digits model)")
    o.add_argument("-o", "--output", type=Path, required=True,
                   help="the cache-aware graph to write (never the input); a folder with --lowering segments")
    o.add_argument("--for", dest="for_policies", nargs="+", metavar="POLICY",
                   help="compile what these policies need and nothing more (their region sets, probes, previous "
                        "outputs, token caching), in place of --regions, --taylor, --no-probes and --tokens, and "
                        "keep their options as the graph's defaults for fcpass sample; "
                        "e.g. --for fastcache:levels=stack,approx=taylor1")
    o.add_argument("--regions", default="blocks,tail,stack", help="region sets: blocks, tail (1..L-1), stack")
    o.add_argument("--taylor", action="store_true", help="keep each region's previous output (for taylor1)")
    o.add_argument("--no-probes", dest="probes", action="store_false",
                   help="leave out FBCache's and TeaCache's statistics: TeaCache's runs block 0's normalisation and "
                        "modulation at every step, a fifth of what a skipped stack costs on the bundled model")
    o.add_argument("--tokens", choices=["duca", "toca"],
                   help="compile token-level caching (top-k token gather/scatter per block) with this k schedule")
    o.add_argument("--motion-ratio", type=float, metavar="RHO",
                   help="compile FastCache's motion tokens: the stack can run on its ceil(RHO*N) most salient tokens "
                        "(sample with --policy fastcache:motion=1)")
    o.add_argument("--motion-context", action="store_true",
                   help="with --motion-ratio: the motion tokens also attend to every other token's keys and values, "
                        "cached at the step it was last computed (needs --regions stack)")
    o.add_argument("--token-merge", action="store_true",
                   help="with --motion-ratio: k-NN density merging of all tokens into ceil(RHO*N) instead of the top-k")
    o.add_argument("--merge-neighbours", type=int, default=5, metavar="K", help="token merging: neighbourhood size")
    o.add_argument("--merge-weight", type=float, default=1.0, metavar="LAMBDA", help="token merging: weight of motion")
    o.add_argument("--token-score", choices=["vnorm", "attention", "saliency", "random"], help="token scores (default vnorm)")
    o.add_argument("--calibrate", type=int, default=0, metavar="N", help="fit approximations on N trajectories")
    o.add_argument("--calib-steps", "--steps", dest="calib_steps", type=int, default=50, help=CALIB_STEPS_HELP)
    o.add_argument("--calib-eps", type=float, default=0.05, help="relative error that counts as a good skip")
    _calibration_runtime_args(o)
    o.add_argument("--block-pattern", help=BLOCK_PATTERN_HELP)
    o.add_argument("--inputs", help=INPUTS_HELP)
    o.add_argument("--batch", type=int, metavar="N",
                   help="the batch to compile a graph whose batch axis is dynamic at (default 2: one sample with "
                        "guidance per call); a static graph keeps its own")
    o.add_argument("--dims", metavar="NAME=N,...", help=DIMS_HELP)
    o.add_argument("--lowering", default="if", metavar="{if,segments}",
                   help="if: one .fc.onnx with an If per region; segments: -o names a folder of If-free "
                        "head/branch/tail graphs the host chooses between (no If: CUDA-graph friendly)")
    _sampling_args(o, calibrating=True)
    o.set_defaults(func=cmd_optimize)

    s = sub.add_parser("sample", help="sample with an (optimized) graph on ONNX Runtime")
    s.add_argument("model", type=Path, nargs="?", help="ONNX graph (default: the bundled digits model)")
    s.add_argument("--policy", default=None, metavar="NAME[:KEY=VALUE,...]",
                   help="on cache-aware graphs: none, fora, fastcache, taylorseer, delta-dit, fbcache, teacache, "
                        "magcache, duca, toca; options after a colon, e.g. teacache:threshold=0.2")
    s.add_argument("--alpha", type=float, help="fastcache: significance level of the chi-square test (default 0.05; "
                                                "smaller skips more)")
    s.add_argument("--dof", choices=["elements", "tokens"],
                   help="fastcache: degrees of freedom of the test, N*D (elements, default) or N (tokens)")
    s.add_argument("--max-skips", type=int, help="fastcache, magcache: consecutive skips of a region before it must "
                                                   "compute (default 3)")
    s.add_argument("--warmup", type=int, help="leading steps computed in full (default: the policy's own)")
    s.add_argument("--interval", type=int, help="FORA's interval")
    s.add_argument("--approx", choices=["reuse", "residual", "linear", "affine", "taylor1"],
                   help="fora, fastcache: what stands in for a skipped region (default: reuse for fora, linear for "
                        "fastcache; taylor1 needs a graph optimized with --taylor)")
    s.add_argument("--sigma-scale", type=float, help="fastcache: scale every calibrated sigma^2")
    s.add_argument("--levels", help="fastcache: regions that take the test, e.g. stack,blocks")
    s.add_argument("--level", choices=["blocks", "stack"], help="fora, taylorseer: per block or the whole stack")
    s.add_argument("--threshold", type=float, help="fbcache, teacache, magcache: their skip threshold")
    s.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu or cuda")
    s.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's, one per core)")
    s.add_argument("--engine", type=Path, metavar="PATH",
                   help="run this TensorRT engine (fcpass build of MODEL) instead of ONNX Runtime; for a segments "
                        "folder, the folder of engines built from it")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="TensorRT segments: launch each engine directly instead of replaying captured CUDA graphs")
    s.add_argument("--inputs", help=INPUTS_HELP + " (plain graphs; a cache-aware graph keeps those it was optimized with)")
    s.add_argument("--dims", metavar="NAME=N,...", help=DIMS_HELP + " (plain graphs; a cache-aware graph has fixed sizes)")
    s.add_argument("--out", type=Path, help="PNG grid of the samples")
    s.add_argument("--out-npy", type=Path, help="final samples as .npy")
    s.add_argument("--report", type=Path, help="JSON report: timing, MACs, every step's decisions")
    s.add_argument("--baseline", action="store_true",
                   help="also run the uncached graph, print speedup (two runs of each, ABBA) and PSNR")
    _sampling_args(s)
    s.set_defaults(func=cmd_sample)

    cal = sub.add_parser("calibrate", help="fit TeaCache's polynomial or MagCache's ratios into a cache-aware graph's plan")
    cal.add_argument("model", type=Path, help="a graph written by fcpass optimize")
    cal.add_argument("-o", "--output", type=Path, required=True, help="the recalibrated graph (never the input)")
    cal.add_argument("--for", dest="peer", required=True, choices=["teacache", "magcache"],
                     help="the policy whose calibration to fit")
    cal.add_argument("--calibrate", type=int, default=8, metavar="N", help="trajectories")
    cal.add_argument("--calib-steps", "--steps", dest="calib_steps", type=int, default=50, help=CALIB_STEPS_HELP)
    cal.add_argument("--inputs", help=INPUTS_HELP)
    _calibration_runtime_args(cal)
    _sampling_args(cal, calibrating=True)
    cal.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("tune", help="the fastest setting of each policy that holds a PSNR target, with a plot")
    t.add_argument("model", type=Path, help="a graph written by fcpass optimize (calibrated)")
    t.add_argument("--target-psnr", type=float, default=30.0, help="mean PSNR (dB) against the uncached samples")
    t.add_argument("--policies", nargs="+", metavar="NAME[:KEY=VALUE,...]",
                   help="policies to tune (default: those the graph was compiled --for, else fora at stack level, "
                        "fastcache, fbcache, teacache, magcache, taylorseer at stack level); fixing the knob in a spec "
                        "evaluates just that setting")
    t.add_argument("--samples", type=int, default=10, help="samples of the calibration set (classes cycled)")
    t.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the fastest counts")
    t.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    t.add_argument("--provider", default="cpu", help="ONNX Runtime provider: cpu or cuda")
    t.add_argument("--plot", type=Path, default=Path("tune.png"), help="speed against quality, one curve per policy")
    t.add_argument("--json", type=Path, help="every setting measured, as JSON")
    t.add_argument("--inputs", help=INPUTS_HELP)
    _sampling_args(t)
    t.set_defaults(func=cmd_tune, seed=1234)

    c = sub.add_parser("compare", help="PSNR and SSIM of B against A")
    c.add_argument("a", type=Path, help="reference samples (.npy, e.g. fcpass sample --out-npy without a policy)")
    c.add_argument("b", type=Path, help="samples to score against A (.npy, the same shape)")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="plot a sampling report's decisions as a step x region heatmap")
    r.add_argument("report", type=Path, help="the JSON that fcpass sample --report wrote")
    r.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    r.set_defaults(func=cmd_report)

    k = sub.add_parser("check", help="static checks that TensorRT 10.x/11.x can build a (cache-aware) graph")
    k.add_argument("model", type=Path, help="an ONNX graph or a segments folder")
    k.add_argument("--target", default="tensorrt", help="the runtime to check for: tensorrt")
    k.add_argument("--json", action="store_true", help="the violations as a JSON list")
    k.set_defaults(func=cmd_check)

    b = sub.add_parser("build", help="build a TensorRT engine (needs fcpass[trt] and an NVIDIA GPU)")
    b.add_argument("model", type=Path, help="an ONNX graph (cache-aware or not) or a segments folder")
    b.add_argument("-o", "--output", type=Path, required=True,
                   help="the engine (plan) file; for a segments folder, a folder of engines")
    precision = b.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="allow fp16 kernels (TensorRT 10.x)")
    precision.add_argument("--bf16", action="store_true", help="allow bf16 kernels (TensorRT 10.x)")
    b.add_argument("--timing-cache", type=Path, metavar="FILE", help="read (if present) and update this timing cache")
    b.add_argument("--workspace", type=int, metavar="MB", help="workspace memory pool limit")
    b.add_argument("--batch", type=int, default=2, help="opt/max batch of the profile if axis 0 is dynamic")
    b.add_argument("--verbose", dest="trt_verbose", action="store_true", help="TensorRT's verbose log")
    b.set_defaults(func=cmd_build)
    return p


def _calibration_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="cpu",
                   help="ONNX Runtime provider of the calibration runs: cpu or cuda (default %(default)s)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads of the calibration runs (default: one per core)")


def _sampling_args(p: argparse.ArgumentParser, calibrating: bool = False) -> None:
    """What to draw and how. Calibrating commands take their steps from --calib-steps (--steps there) and
    no --seed: their trajectories start from a seed of their own, never the noise of the samples they
    are scored on."""
    p.add_argument("--scheduler-config", type=Path,
                   help="diffusers scheduler_config.json: DDIM, CogVideoX's DDIM, flow-matching Euler, DPM-Solver or "
                        "UniPC (default: the one beside the model, or the bundled model's own)")
    if not calibrating:
        p.add_argument("--steps", type=int, default=50, help="sampling steps per sample (default %(default)s)")
    p.add_argument("--class", dest="classes", type=int, nargs="+", help="class labels to draw")
    p.add_argument("--prompt-embeds", type=Path, help=".npy of caption embeddings (N, L, C)")
    p.add_argument("--pooled-embeds", type=Path,
                   help=".npy of pooled caption embeddings (N, P), one row per caption, for graphs that take them "
                        "(SD3's pooled_projections)")
    p.add_argument("--negative-embeds", type=Path,
                   help=".npy of guidance's unconditional caption embeddings (the encoded empty or negative prompt), "
                        "one row for every caption or one per caption (default: zeros)")
    p.add_argument("--negative-pooled-embeds", type=Path,
                   help=".npy of the unconditional pooled embeddings, beside --negative-embeds (default: zeros)")
    p.add_argument("--prompt-mask", type=Path,
                   help=".npy (N, L) of the captions' attention masks, for graphs that take one (PixArt's "
                        "encoder_attention_mask; default: ones)")
    p.add_argument("--negative-mask", type=Path, help=".npy of the unconditional captions' masks (default: ones)")
    p.add_argument("--resolution", type=_pixels, metavar="HxW",
                   help="image size in pixels: what a graph with PixArt-alpha's size conditions (resolution, aspect_ratio "
                        "inputs) is told it draws (default: the latent's size times 8), and the grid of a packed latent "
                        "(Flux's; default: square)")
    p.add_argument("--guidance-scale", type=float, default=1.5,
                   help="classifier-free guidance scale; 1 runs without guidance; a graph with a guidance input "
                        "(FLUX.1-dev) takes it there instead (default %(default)s)")
    p.add_argument("--true-cfg-scale", type=float, default=1.0,
                   help="a graph with a guidance input: classifier-free guidance on top of it, against the negative "
                        "embeddings (--negative-embeds; zeros by default), as its pipelines' true_cfg_scale "
                        "(default %(default)s: none)")
    p.add_argument("--uncond-class", type=int, help="the null label of guidance's unconditional half (default: a DiT's own, its class count)")
    if not calibrating:
        p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")


# --- export / inspect ---------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from fcpass.export import ExportSpec, export
    from fcpass.onnx_io import check_distinct, check_file_output

    if args.weights is not None:
        check_distinct(args.weights, args.output)
    check_file_output(args.output)
    spec = ExportSpec(args.arch, args.image_size, args.batch, args.exporter, args.opset)
    path = export(spec, args.output, weights=args.weights, verify=not args.no_verify)
    print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from fcpass.discover import discover_blocks
    from fcpass.graphinfo import GraphIndex, graph_macs, sized
    from fcpass.onnx_io import load_model
    from fcpass.passes.segments import is_segments_artefact
    from fcpass.plan import has_plan, read_plan
    from fcpass.roles import graph_inputs, graph_outputs, infer_roles, parse_role_overrides
    from fcpass.static_shapes import dynamic_axes, parse_dims

    if is_segments_artefact(args.model):
        return _inspect_segments(args)
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
        bmap = discover_blocks(model, roles.latent.name, args.block_pattern)
        from fcpass.branches import branches_of

        split = branches_of(index, bmap.blocks, roles.latent.name)
        info["blocks"] = {
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
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
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
    if "plan" in info:
        plan = info["plan"]
        print(f"cache plan (fcpass {plan['version']}): {len(plan['regions'])} regions, {len(plan['states'])} state tensors")
        if plan.get("compiled_for"):
            specs = " ".join(name + "".join(f"{',' if i else ':'}{k}={v}" for i, (k, v) in enumerate(opts.items()))
                             for name, opts in plan["compiled_for"].items())
            print(f"  compiled for {specs} (fcpass sample --policy NAME takes these options unless told otherwise)")
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
    return 0


def _inspect_segments(args: argparse.Namespace) -> int:
    """The manifest of a segments folder: its step program, one line per segment or branch."""
    from fcpass.passes.segments import read_manifest

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


# --- optimize -------------------------------------------------------------------------------

def cmd_optimize(args: argparse.Namespace) -> int:
    from fcpass.onnx_io import data_file
    from fcpass.optimize import OptimizeOptions, optimize
    from fcpass.passes.motion_tokens import MergeOptions

    model_path = args.model or _bundled_onnx()
    graph = {"regions": tuple(x.strip() for x in args.regions.split(",") if x.strip()), "taylor": args.taylor,
             "probes": args.probes, "tokens": args.tokens, "motion_ratio": args.motion_ratio}
    if args.for_policies:
        from fcpass.policy_graph import graph_for

        paths = [p for p in args.for_policies if p.endswith(".onnx") or Path(p).exists()]
        if paths:  # `--for` takes every word after it, the model's path too
            raise FcpassError(f"--for takes policies, not {paths[0]}; put the model first: "
                              f"fcpass optimize {paths[0]} -o OUT --for {' '.join(p for p in args.for_policies if p not in paths)}")

        flags = [flag for flag, given in (("--regions", args.regions != "blocks,tail,stack"), ("--taylor", args.taylor),
                                          ("--no-probes", not args.probes), ("--tokens", args.tokens)) if given]
        if flags:
            raise FcpassError(f"--for decides {', '.join(flags)}; drop {'them' if len(flags) > 1 else 'it'} or --for")
        graph = graph_for(args.for_policies, args.motion_ratio)
    options = OptimizeOptions(
        calibrate=args.calibrate,
        calib_steps=args.calib_steps,
        calib_eps=args.calib_eps,
        calib_provider=args.provider,
        calib_threads=args.threads,
        block_pattern=args.block_pattern,
        inputs=args.inputs,
        token_score=args.token_score,
        motion_context=args.motion_context,
        token_merge=MergeOptions(args.merge_neighbours, args.merge_weight) if args.token_merge else None,
        lowering=args.lowering,
        batch=args.batch,
        dims=args.dims,
        for_policies=tuple(args.for_policies or ()),
        **graph,
    )
    # Only calibration samples; without it a model needs no scheduler config to be optimized.
    setup = _sampling_setup(args, model_path) if args.calibrate else None
    plan = optimize(model_path, args.output, options, setup)
    blocks = len({b for r in plan.regions for b in r.blocks})
    lowered = ""
    if options.lowering == "segments":
        from fcpass.passes.segments import read_manifest

        lowered = f", lowered to {read_manifest(args.output)['segments']} If-free segments"
    elif (data := data_file(args.output)) is not None:
        lowered = f", its weights in {data} (keep the two files together)"
    print(f"wrote {args.output}: {len(plan.regions)} regions over {blocks} blocks"
          f"{', calibrated' if args.calibrate else ''}{lowered}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fcpass.calibrate import CalibrationOptions, calibrate_peers
    from fcpass.onnx_io import check_distinct, check_file_output, load_model
    from fcpass.optimize import save_compiled
    from fcpass.plan import read_plan, write_plan

    check_distinct(args.model, args.output)
    check_file_output(args.output)
    model = load_model(args.model)
    plan = read_plan(model, str(args.model))
    setup = _sampling_setup(args, args.model)
    options = CalibrationOptions(trajectories=args.calibrate, steps=args.calib_steps, provider=args.provider,
                                 threads=args.threads)
    result = calibrate_peers(model, plan, setup, args.peer, options)
    write_plan(model, plan)
    save_compiled(model, args.output)
    if args.peer == "teacache":
        print(f"wrote {args.output}: teacache polynomial {', '.join(f'{c:.4g}' for c in result['coefficients'])} "
              f"(relative fit residual {result['rel_residual']:.3f} over {result['points']} points)")
    else:
        ratios = np.asarray(result["ratios"])
        print(f"wrote {args.output}: magcache ratios for {len(ratios)} steps, "
              f"{ratios.min():.4f} .. {ratios.max():.4f}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from fcpass import tune
    from fcpass.onnx_io import atomic_path, check_file_output
    from fcpass.runner import load_denoiser

    if args.samples < 1:
        raise FcpassError(f"--samples {args.samples} must be at least 1")
    if args.repeats < 1:
        raise FcpassError(f"--repeats {args.repeats} must be at least 1")
    for path in (args.plot, args.json):
        if path:
            check_file_output(path)
    if args.threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    setup = _sampling_setup(args, args.model)
    request = setup["request"]
    if request.classes is not None and args.classes is None:
        request.classes = [request.classes[i % len(request.classes)] for i in range(args.samples)]
    denoiser = load_denoiser(args.model, "none", {}, provider=args.provider, inputs=setup["inputs"], threads=args.threads)
    if not hasattr(denoiser, "plan"):
        raise FcpassError(f"{args.model} is not cache-aware; run: fcpass optimize {args.model} -o model.fc.onnx --calibrate 8")
    classifier = None
    if setup.get("arch") == "digits":
        from fcpass.quality import DigitClassifier

        classifier = DigitClassifier()
    policies = args.policies or tune.default_policies(denoiser.plan)
    for spec in policies:
        tune.settings(spec)  # unknown policies fail before any sampling
    result = tune.tune(denoiser, setup, policies, args.target_psnr, args.repeats, classifier, str(args.model))
    text = tune.table(result)
    print(text)
    tune.plot(tune.curves_of(result), args.target_psnr, args.plot,
              f"{args.model.name}: {request.count} samples x {request.steps} steps")
    print(f"wrote {args.plot}")
    if args.json:
        with atomic_path(args.json, suffix=".json") as tmp:
            tmp.write_text(json.dumps(tune.to_json(result), indent=1))
    return 0


# --- sample ---------------------------------------------------------------------------------

def _bundled_onnx() -> Path:
    from models.digits import ONNX

    if not ONNX.exists():
        raise FcpassError(f"the bundled model {ONNX} is missing; reinstall fcpass or run tools/train_digits.py")
    return ONNX


def _export_meta(model: Any) -> dict[str, Any]:
    from fcpass.export import EXPORT_METADATA_KEY

    for prop in model.metadata_props:
        if prop.key == EXPORT_METADATA_KEY:
            return json.loads(prop.value)
    return {}


def _sampling_setup(args: argparse.Namespace, model_path: Path) -> dict[str, Any]:
    """Scheduler, request defaults and roles for a graph: from flags, else its export metadata."""
    from fcpass.onnx_io import load_model
    from fcpass.passes.segments import interface_model, is_segments_artefact, read_manifest
    from runtimes.sampler import SampleRequest
    from runtimes.schedulers import load_config, scheduler_from_config

    if is_segments_artefact(model_path):  # a segments folder: its manifest holds the export metadata
        model = interface_model(read_manifest(model_path))
    else:
        model = load_model(model_path, load_weights=False)
    meta = _export_meta(model)
    config = meta.get("config", {})
    sched_path = args.scheduler_config
    if sched_path is None:
        beside = Path(model_path).parent / "scheduler_config.json"
        if meta.get("arch") == "digits":
            from models.digits import SCHEDULER_CONFIG

            sched_path = SCHEDULER_CONFIG
        elif beside.is_file():  # where tools/export_diffusers.py, and a diffusers scheduler folder, keep it
            log.info("sampling with %s (no --scheduler-config given)", beside)
            sched_path = beside
        else:
            raise FcpassError(f"{model_path} is not the bundled model and has no scheduler_config.json beside it; pass "
                              "--scheduler-config scheduler_config.json")
    # read once for the whole command; a bad config fails here, before a large model loads
    scheduler_config = load_config(sched_path)
    scheduler_from_config(scheduler_config)
    prompt = _embeddings(args.prompt_embeds, "prompt embeddings", rank=3)
    pooled = _embeddings(args.pooled_embeds, "pooled embeddings", rank=2)
    negative = _embeddings(args.negative_embeds, "negative embeddings", rank=3)
    negative_pooled = _embeddings(args.negative_pooled_embeds, "negative pooled embeddings", rank=2)
    mask = _embeddings(args.prompt_mask, "prompt mask", rank=2)
    negative_mask = _embeddings(args.negative_mask, "negative mask", rank=2)
    classes = args.classes
    if classes is None and prompt is None:
        classes = list(range(min(int(config.get("num_classes", 10)), 10)))
    uncond = args.uncond_class
    if uncond is None and config.get("family") == "dit":
        uncond = int(config["num_classes"])
    if config.get("family") == "dit":
        # An out-of-range label would only surface as an ONNX Runtime Gather error mid-sampling.
        n = int(config["num_classes"])
        bad = next((c for c in classes or [] if not 0 <= c < n), None)
        if bad is not None:
            raise FcpassError(f"--class {bad} is out of range: {model_path} has {n} classes; use labels 0..{n - 1}")
        rows = n + int(float(config.get("class_dropout_prob", 0.0)) > 0)  # the null label's row, if trained
        if args.uncond_class is not None and not 0 <= uncond < rows:
            raise FcpassError(
                f"--uncond-class {uncond} is out of range: {model_path}'s label table has {rows} rows; use 0..{rows - 1}"
            )
    elif classes and (rows := _label_rows(model, getattr(args, "inputs", None))) is not None:
        # No export metadata: the label table the class input indexes says how many labels there are.
        flag, bad = next(((f, c) for f, c in [*(("--class", c) for c in classes), ("--uncond-class", uncond)]
                          if c is not None and not 0 <= c < rows), (None, None))
        if flag is not None:
            raise FcpassError(f"{flag} {bad} is out of range: {model_path}'s label table has {rows} rows; "
                              f"use 0..{rows - 1}")
    request = SampleRequest(classes=classes, prompt_embeds=prompt, pooled_embeds=pooled, negative_embeds=negative,
                            negative_pooled=negative_pooled, prompt_mask=mask, negative_mask=negative_mask,
                            resolution=args.resolution,
                            guidance_scale=args.guidance_scale, true_cfg_scale=args.true_cfg_scale,
                            uncond_class=uncond)
    if hasattr(args, "steps"):  # sampling commands; calibrating ones take both from their own options
        request.steps, request.seed = args.steps, args.seed
    return {"scheduler_config": scheduler_config, "request": request, "inputs": getattr(args, "inputs", None),
            "arch": meta.get("arch")}


def _pixels(text: str) -> tuple[int, int]:
    """`1024x768` (height x width) or `1024` (square), in pixels."""
    height, _, width = text.lower().partition("x")
    try:
        size = (int(height), int(width or height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels, e.g. 1024x768") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be at least 1 pixel")
    return size


def _embeddings(path: Path | None, what: str, rank: int) -> np.ndarray | None:
    """Caption embeddings (rank 3), pooled ones or caption masks (rank 2) from a .npy file; one sample's may drop
    its leading axis."""
    if path is None:
        return None
    from fcpass.quality import load_npy

    array = load_npy(path, what, "save them with numpy.save").astype(np.float32)
    return array[None] if array.ndim == rank - 1 else array


def _label_rows(model: Any, inputs: str | None) -> int | None:
    """Rows of the label table the graph's class input indexes, where it has one."""
    from fcpass.graphinfo import label_rows
    from fcpass.plan import has_plan, read_plan
    from fcpass.roles import infer_roles, parse_role_overrides

    if has_plan(model):
        name = read_plan(model).roles.get("class")
    else:
        labels = infer_roles(model, parse_role_overrides(inputs)).class_labels
        name = labels.name if labels else None
    return label_rows(model, name) if name else None


def cmd_sample(args: argparse.Namespace) -> int:
    from fcpass.onnx_io import check_file_output
    from fcpass.runner import load_denoiser, run_sampling

    for path in (args.out, args.out_npy, args.report):  # before sampling, not after
        if path:
            check_file_output(path)
    model_path = args.model or _bundled_onnx()
    setup = _sampling_setup(args, model_path)
    options = {k: getattr(args, k) for k in ("alpha", "dof", "max_skips", "warmup", "interval", "approx",
                                             "sigma_scale", "levels", "level", "threshold")}
    denoiser = load_denoiser(model_path, args.policy, options, provider=args.provider, inputs=setup["inputs"],
                             engine=args.engine, cuda_graphs=args.cuda_graphs, threads=args.threads, dims=args.dims)
    result, report = run_sampling(denoiser, setup, model_path, args.policy)
    if args.baseline:
        if args.policy in (None, "none"):
            raise FcpassError("--baseline compares a cache policy with the uncached graph; add --policy fastcache")
        base = load_denoiser(model_path, "none", {}, provider=args.provider, inputs=setup["inputs"], engine=args.engine,
                             cuda_graphs=args.cuda_graphs, threads=args.threads)
        base_result, _ = run_sampling(base, setup, model_path, "none")
        # Timed cached, uncached, uncached, cached: a drift in the machine's speed during the four
        # runs weighs on both sides alike, where one run of each would put it all on one side.
        # Only the wall times of the repeats count: no report, no classifier.
        from runtimes.sampler import sample
        from runtimes.schedulers import scheduler_from_config

        scheduler = scheduler_from_config(setup["scheduler_config"])
        base_again = sample(base, scheduler, setup["request"], progress=False)
        cached_again = sample(denoiser, scheduler, setup["request"], progress=False)
        from fcpass.quality import compare_batches

        q = compare_batches(base_result.clips(), result.clips())
        base_wall = (base_result.wall_seconds + base_again.wall_seconds) / 2
        report["baseline"] = {"wall_seconds": base_wall, "macs": base_result.macs_executed,
                              "psnr_mean": q["psnr_mean"], "ssim_mean": q["ssim_mean"]}
        report["speedup"] = base_wall / ((result.wall_seconds + cached_again.wall_seconds) / 2)
        report["mac_ideal_speedup"] = base_result.macs_executed / max(result.macs_executed, 1)
    _write_outputs(args, result, report)
    _print_summary(report)
    return 0


def _write_outputs(args: argparse.Namespace, result: Any, report: dict[str, Any]) -> None:
    from fcpass.onnx_io import atomic_path

    if args.out:
        from fcpass.images import save_grid

        save_grid(result.clips(), args.out)
        print(f"wrote {args.out}")
    if args.out_npy:
        with atomic_path(args.out_npy, suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, result.images)  # through a handle: np.save(path) would append ".npy" to the temp name
        print(f"wrote {args.out_npy}")
    if args.report:
        with atomic_path(args.report) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.report}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _print_summary(report: dict[str, Any]) -> None:
    steps = report["steps"]
    line = (f"{_count(report['samples'], 'sample')} x {steps} steps on {report['provider']}: "
            f"{report['wall_seconds']:.3f} s, {report['macs'] / 1e9:.2f} GMACs "
            f"({report['macs_fraction'] * 100:.1f}% of uncached)")
    if report.get("accuracy") is not None:
        line += f", digit accuracy {report['accuracy']:.2f}"
    print(line)
    if "speedup" in report:
        b = report["baseline"]
        print(f"uncached (same graph, every region computing): {b['wall_seconds']:.3f} s -> speedup {report['speedup']:.2f}x "
              f"(MAC-ideal {report['mac_ideal_speedup']:.2f}x; two runs of each, ABBA), PSNR {b['psnr_mean']:.2f} dB, "
              f"SSIM {b['ssim_mean']:.4f}")


# --- compare / report -----------------------------------------------------------------------

def cmd_compare(args: argparse.Namespace) -> int:
    from fcpass.quality import compare_batches, load_npy

    a, b = load_npy(args.a), load_npy(args.b)
    if a.ndim == 3:
        a, b = a[None], b[None]
    q = compare_batches(a, b)
    print(f"PSNR {q['psnr_mean']:.2f} dB  SSIM {q['ssim_mean']:.4f}  ({_count(q['n'], 'sample')})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fcpass.report import plot_report

    plot_report(args.report, args.output)
    print(f"wrote {args.output}")
    return 0


# --- check / build (TensorRT) ---------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    from fcpass.onnx_io import load_model
    from fcpass.passes.segments import is_segments_artefact, read_manifest, segment_files
    from fcpass.trt_check import check_graph

    if is_segments_artefact(args.model):  # every segment of a segments folder
        paths = [args.model / f for f in segment_files(read_manifest(args.model))]
    else:
        paths = [args.model]
    violations = []
    for path in paths:
        found = check_graph(load_model(path, load_weights=False), args.target, base_dir=path.parent)
        if len(paths) > 1:  # name the segment file in front of the subgraph path
            found = [dataclasses.replace(v, path=" > ".join(filter(None, [path.name, v.path]))) for v in found]
        violations += found
    if args.json:
        print(json.dumps([v.to_json() for v in violations], indent=2))
    else:
        for v in violations:
            print(v.format())
        if not violations:
            segs = f" in any of its {len(paths)} segments" if len(paths) > 1 else ""
            print(f"{args.model}: no violations of the {args.target} rules{segs}")
    if violations:
        print(_count(len(violations), "violation"), file=sys.stderr)
        return 2
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from fcpass.passes.segments import is_segments_artefact
    from fcpass.trt_build import BuildOptions, build_engine, build_segments

    options = BuildOptions(fp16=args.fp16, bf16=args.bf16, timing_cache=args.timing_cache,
                           workspace_mb=args.workspace, batch=args.batch, verbose=args.trt_verbose)
    if is_segments_artefact(args.model):
        built = build_segments(args.model, args.output, options)
        engines = list(built.engines.values())
        size = sum(e.engine_bytes for e in engines) / 2**20
        print(f"wrote {built.output}: {len(engines)} engines (one per segment), {size:.2f} MiB, "
              f"{sum(e.layers for e in engines)} layers, no If conditionals")
        print(f"  run it with: fcpass sample {args.model} --engine {built.output}")
        return 0
    s = build_engine(args.model, args.output, options)
    print(f"wrote {s.output}: {s.engine_bytes / 2**20:.2f} MiB, {s.layers} layers, {s.conditionals} If conditionals"
          f"{f', dynamic batch 1..{args.batch}' if s.dynamic_batch else ''}")
    for t in s.io:
        if not t.name.startswith("fc"):
            print(f"  {t.mode.lower():<6} {t.name:<24} {t.dtype:<8} {list(t.shape)}")
    n_fc = sum(t.name.startswith("fc") for t in s.io)
    if n_fc:
        print(f"  ... and {n_fc} cache tensors (fc*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
