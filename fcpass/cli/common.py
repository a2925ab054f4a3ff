"""What the commands share: argument groups and help texts, the bundled model, and the sampling setup a
command reads from its flags and the graph's export metadata."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.contract.errors import FcpassError
from fcpass.contract.roles import ROLES
from fcpass.sampling import SamplingSetup
from runtimes.sampler import SampleRequest

log = logging.getLogger("fcpass")

BLOCK_PATTERN_HELP = ("regex matching a block's scope name, with a group for its number (default: found from the "
                      "exporter's scopes, else from the graph's structure)")
CALIB_STEPS_HELP = ("sampling steps of each calibration trajectory, best the count you will sample with: the fits "
                    "and statistics are those of one step's change (default %(default)s)")
DIMS_HELP = ("sizes for dynamic axes other than the batch, by the names the export gave them, e.g. "
             "height=64,width=64 (fcpass inspect shows them in the inputs' shapes)")
INPUTS_HELP = f"input roles when the names do not say, e.g. latent=x,timestep=t,class=y (roles: {', '.join(ROLES)})"


def calibration_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="cpu",
                   help="ONNX Runtime provider of the calibration runs: cpu or cuda (default %(default)s)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads of the calibration runs (default: one per core)")


def ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help=f"run {what} on Ray (pip install 'fcpass[ray]'): alone, on a local cluster started for the "
                        "command; with the head's ADDRESS (HOST:PORT, as `ray start --head` prints it), on that cluster")


@contextmanager
def cluster_for(args: argparse.Namespace) -> Iterator[Any]:
    """The Ray cluster --ray names (fcpass.cluster.RayCluster), connected for the command; None without --ray."""
    if getattr(args, "ray", None) is None:
        yield None
        return
    if args.ray and (args.ray.endswith(".onnx") or Path(args.ray).exists()):
        raise FcpassError(f"--ray takes a cluster's address, not {args.ray}; put the model before --ray, or write "
                          "--ray=ADDRESS")
    from fcpass.cluster import ray_cluster

    with ray_cluster(args.ray or None, provider=args.provider, threads=args.threads) as cluster:
        yield cluster


def sampling_args(p: argparse.ArgumentParser, calibrating: bool = False) -> None:
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
    p.add_argument("--resolution", type=pixels, metavar="HxW",
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


def bundled_onnx() -> Path:
    from models.digits import ONNX

    if not ONNX.exists():
        raise FcpassError(f"the bundled model {ONNX} is missing; reinstall fcpass or run tools/train_digits.py")
    return ONNX


def export_meta(model: Any) -> dict[str, Any]:
    from fcpass.export import EXPORT_METADATA_KEY

    for prop in model.metadata_props:
        if prop.key == EXPORT_METADATA_KEY:
            return json.loads(prop.value)
    return {}


def sampling_setup(args: argparse.Namespace, model_path: Path) -> SamplingSetup:
    """Scheduler, request defaults and roles for a graph: from flags, else its export metadata."""
    from fcpass.contract.manifest import interface_model, is_segments_artefact, read_manifest
    from fcpass.contract.onnx_io import load_model

    if is_segments_artefact(model_path):  # a segments folder: its manifest holds the export metadata
        model = interface_model(read_manifest(model_path))
    else:
        model = load_model(model_path, load_weights=False)
    meta = export_meta(model)
    config = meta.get("config", {})
    scheduler_config = _scheduler_config(args.scheduler_config, model_path, meta.get("arch"))
    classes = args.classes
    uncond = args.uncond_class
    if config.get("family") == "dit":
        uncond = int(config["num_classes"]) if uncond is None else uncond
    elif args.prompt_embeds is None and uncond is None:
        uncond = null_label(model, model_path, getattr(args, "inputs", None), args.guidance_scale != 1)
    if classes is None and args.prompt_embeds is None:
        classes = list(range(min(int(config.get("num_classes", uncond if uncond is not None else 10)), 10)))
    _check_labels(args, model, model_path, config, classes, uncond)
    request = _request(args, classes, uncond)
    return SamplingSetup(scheduler_config=scheduler_config, request=request, inputs=getattr(args, "inputs", None),
                         arch=meta.get("arch"))


def _scheduler_config(given: Path | None, model_path: Path, arch: str | None) -> dict[str, Any]:
    """The scheduler config a command samples with, read once; a bad config fails here, before a large model loads."""
    from runtimes.schedulers import load_config, scheduler_from_config

    sched_path = given
    if sched_path is None:
        beside = Path(model_path).parent / "scheduler_config.json"
        from models import bundled

        if (model := bundled(arch)) is not None:
            sched_path = model.scheduler_config
        elif beside.is_file():  # where tools/export_diffusers.py, and a diffusers scheduler folder, keep it
            log.info("sampling with %s (no --scheduler-config given)", beside)
            sched_path = beside
        else:
            raise FcpassError(f"{model_path} is not the bundled model and has no scheduler_config.json beside it; pass "
                              "--scheduler-config scheduler_config.json")
    scheduler_config = load_config(sched_path)
    scheduler_from_config(scheduler_config)
    return scheduler_config


def _check_labels(args: argparse.Namespace, model: Any, model_path: Path, config: dict[str, Any],
                  classes: list[int] | None, uncond: int | None) -> None:
    """Class labels in range of the graph's label table: an out-of-range label would only surface as an ONNX
    Runtime Gather error mid-sampling."""
    if config.get("family") == "dit":
        n = int(config["num_classes"])
        bad = next((c for c in classes or [] if not 0 <= c < n), None)
        if bad is not None:
            raise FcpassError(f"--class {bad} is out of range: {model_path} has {n} classes; use labels 0..{n - 1}")
        rows = n + int(float(config.get("class_dropout_prob", 0.0)) > 0)  # the null label's row, if trained
        if args.uncond_class is not None and not 0 <= uncond < rows:
            raise FcpassError(
                f"--uncond-class {uncond} is out of range: {model_path}'s label table has {rows} rows; use 0..{rows - 1}"
            )
    elif classes and (rows := label_rows_of(model, getattr(args, "inputs", None))) is not None:
        # No export metadata: the label table the class input indexes says how many labels there are.
        flag, bad = next(((f, c) for f, c in [*(("--class", c) for c in classes), ("--uncond-class", uncond)]
                          if c is not None and not 0 <= c < rows), (None, None))
        if flag is not None:
            raise FcpassError(f"{flag} {bad} is out of range: {model_path}'s label table has {rows} rows; "
                              f"use 0..{rows - 1}")


def _request(args: argparse.Namespace, classes: list[int] | None, uncond: int | None) -> SampleRequest:
    """What to draw: labels or caption embeddings, sizes and guidance, from the flags."""
    request = SampleRequest(
        classes=classes,
        prompt_embeds=embeddings(args.prompt_embeds, "prompt embeddings", rank=3),
        pooled_embeds=embeddings(args.pooled_embeds, "pooled embeddings", rank=2),
        negative_embeds=embeddings(args.negative_embeds, "negative embeddings", rank=3),
        negative_pooled=embeddings(args.negative_pooled_embeds, "negative pooled embeddings", rank=2),
        prompt_mask=embeddings(args.prompt_mask, "prompt mask", rank=2),
        negative_mask=embeddings(args.negative_mask, "negative mask", rank=2),
        resolution=args.resolution, guidance_scale=args.guidance_scale, true_cfg_scale=args.true_cfg_scale,
        uncond_class=uncond)
    if hasattr(args, "steps"):  # sampling commands; calibrating ones take both from their own options
        request.steps, request.seed = args.steps, args.seed
    return request


def pixels(text: str) -> tuple[int, int]:
    """`1024x768` (height x width) or `1024` (square), in pixels."""
    height, _, width = text.lower().partition("x")
    try:
        size = (int(height), int(width or height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels, e.g. 1024x768") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be at least 1 pixel")
    return size


def embeddings(path: Path | None, what: str, rank: int) -> np.ndarray | None:
    """Caption embeddings (rank 3), pooled ones or caption masks (rank 2) from a .npy file; one sample's may drop
    its leading axis."""
    if path is None:
        return None
    from fcpass.quality import load_npy

    array = load_npy(path, what, "save them with numpy.save")
    if array.dtype.kind not in "biuf":
        raise FcpassError(f"{path} holds {array.dtype} values, not numbers; save the {what} as float32")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise FcpassError(f"{path} holds NaN or Inf; encode the {what} again (a half-precision overflow makes them)")
    if array.ndim not in (rank - 1, rank) or 0 in array.shape:
        raise FcpassError(f"{path} holds {what} of shape {array.shape}; they must have {rank} axes (or {rank - 1} for "
                          "one sample), none empty")
    return array[None] if array.ndim == rank - 1 else array


def null_label(model: Any, model_path: Path, inputs: str | None, say: bool) -> int | None:
    """Guidance's unconditional label of a class-conditional graph without export metadata: the last row of the
    label table its class input indexes (DiT's convention: num_classes + 1 rows, the last the null class, in
    facebookresearch's and diffusers' DiTs alike); None where the graph has no such table."""
    rows = label_rows_of(model, inputs)
    if rows is None or rows < 2:
        return None
    if say:
        log.info("guidance's null label: %d, the last row of %s's %d-row label table (the DiT convention; "
                 "--uncond-class overrides)", rows - 1, Path(model_path).name, rows)
    return rows - 1


def label_rows_of(model: Any, inputs: str | None) -> int | None:
    """Rows of the label table the graph's class input indexes, where it has one."""
    from fcpass.compiler.graphinfo import label_rows
    from fcpass.contract.plan import has_plan, read_plan
    from fcpass.contract.roles import infer_roles, parse_role_overrides

    if has_plan(model):
        name = read_plan(model).roles.get("class")
    else:
        labels = infer_roles(model, parse_role_overrides(inputs)).class_labels
        name = labels.name if labels else None
    return label_rows(model, name) if name else None


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def search_args(p: argparse.ArgumentParser, target_default: float | None) -> None:
    """The tuning search's flags (`fcpass tune`, `fcpass optimize --target-psnr`)."""
    p.add_argument("--target-psnr", type=float, default=target_default, metavar="DB",
                   help="the mean PSNR (dB) against the uncached samples that the chosen setting must hold on the "
                        "search's own seeds" + (f" (default {target_default:g})" if target_default is not None else
                                                 ": search every policy's knobs for the fastest setting that holds it, "
                                                 "compile the graph for that setting alone and store it in the plan"))
    p.add_argument("--policies", nargs="+", metavar="NAME[:KEY=VALUE,...]",
                   help="policies to search (default: fastcache, taylorseer, fora, fbcache, teacache, magcache; "
                        "fcpass tune: those the graph was compiled --for); options a spec fixes are not searched")
    p.add_argument("--budget", type=int, default=60, metavar="N", help="at most N trials (default %(default)s)")
    p.add_argument("--samples", type=int, default=10, help="samples per trial (classes cycled; default %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="the finalists' timing: passes of uncached, each finalist, uncached, each in reverse "
                        "(default %(default)s)")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="speed against quality of every trial, the chosen one marked (default: beside the output, "
                        "or tune.png)")
    p.add_argument("--json", type=Path, help="every trial, as JSON")


def search_options(args: argparse.Namespace, plot: Path) -> Any:
    """The search's options from its flags; the plot at `plot` unless --plot names one."""
    from fcpass.optimize_to_target import SearchOptions

    options = SearchOptions(target_psnr=args.target_psnr, policies=tuple(args.policies or ()), budget=args.budget,
                            samples=args.samples, repeats=args.repeats, provider=args.provider, threads=args.threads,
                            plot=args.plot or plot)
    options.check()
    return options


def write_search_json(path: Path | None, result: Any) -> None:
    if path is None:
        return
    from fcpass import tune
    from fcpass.contract.onnx_io import atomic_path

    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(tune.to_json(result), indent=1))
