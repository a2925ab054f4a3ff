"""`fcpass build`: a TensorRT engine from a (cache-aware) ONNX graph.

Written against TensorRT's documented Python API (TensorRT 10.x; 11.x differences noted):

1. the static rules of `fcpass.compiler.trt_check` run first, so a graph TensorRT cannot build is refused
   (with its first violation) before TensorRT is even imported;
2. `tensorrt` is imported lazily; a missing package or a machine without a usable CUDA GPU (the
   `trt.Builder` cannot be created) is one FcpassError line naming what is missing;
3. the graph's statistic gates are inlined (`fcpass.compiler.passes.inline_gates`: TensorRT would sync on
   each), and `trt.OnnxParser.parse(model, path)` parses it with the file's path, so external
   weights next to the file resolve; parser errors become one FcpassError (the first error and the count);
4. the builder config gets the workspace pool limit, the fp16/bf16 flag (removed in TensorRT 11,
   where networks are always strongly typed: convert the export's precision before optimizing), the
   timing cache (loaded if the file exists, saved atomically after the build) and, if an input's
   axis 0 is dynamic, one optimization profile for batch 1..N (opt = max = N);
5. `builder.build_serialized_network` builds the plan, which is deserialized once (`trt.Runtime`)
   for the summary of its I/O tensors and written atomically with `fcpass.contract.onnx_io.atomic_path`.

A segments folder (`fcpass optimize --lowering segments`) builds into a folder of engines
(`build_segments`): every segment is checked first, then built in turn with the same options (and
the same timing cache, which later segments reuse), beside `engines.json`, which maps each segment
to its engine and records the digest of the manifest they were built from. The folder is written
atomically: a failed build leaves nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from fcpass.compiler.passes.inline_gates import inline_gates
from fcpass.compiler.trt_check import check_graph
from fcpass.contract.engines import (
    ENGINES_FOLDER,
    ENGINES_FORMAT,
    ENGINES_INDEX,
    IOTensor,
    engine_file,
    import_tensorrt,
    io_tensor,
    is_engines_folder,
    manifest_digest,
)
from fcpass.contract.errors import FcpassError
from fcpass.contract.manifest import read_manifest, segment_files
from fcpass.contract.onnx_io import atomic_dir, atomic_path, check_distinct, check_file_output, load_model, subgraphs

log = logging.getLogger(__name__)



@dataclass
class BuildOptions:
    fp16: bool = False
    bf16: bool = False
    timing_cache: Path | None = None
    workspace_mb: int | None = None
    batch: int = 2  # opt and max batch of the profile when axis 0 is dynamic
    verbose: bool = False


@dataclass
class BuildSummary:
    output: Path
    layers: int
    engine_bytes: int
    conditionals: int  # If nodes in the ONNX graph, nested ones included
    io: list[IOTensor] = field(default_factory=list)
    dynamic_batch: bool = False


def build_engine(model_path: str | Path, output: str | Path, options: BuildOptions) -> BuildSummary:
    """Build a TensorRT engine for `model_path` and write it to `output`; nothing is written on failure."""
    model_path, output = Path(model_path), Path(output)
    check_distinct(model_path, output)
    check_file_output(output)
    if options.timing_cache is not None and options.timing_cache.resolve() in (model_path.resolve(), output.resolve()):
        raise FcpassError(
            f"--timing-cache {options.timing_cache} is the model or the engine path; choose another file "
            "(e.g. model.timing.cache)"
        )
    if options.fp16 and options.bf16:
        raise FcpassError("--fp16 and --bf16 exclude each other; choose one")
    if options.workspace_mb is not None and options.workspace_mb <= 0:
        raise FcpassError(f"--workspace {options.workspace_mb} is not a positive size in MB; pass e.g. --workspace 4096")
    if options.batch < 1:
        raise FcpassError(f"--batch {options.batch} is not a batch size; pass 1 or more")

    model = check_buildable(model_path)

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = create_builder(trt, logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode; 11: strongly typed
    parse_onnx(trt, network, logger, model, model_path)

    config = builder.create_builder_config()
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    for wanted, flag in ((options.fp16, "FP16"), (options.bf16, "BF16")):
        if wanted:
            if not hasattr(trt.BuilderFlag, flag):  # TensorRT 11 removed the weak-typing precision flags
                raise FcpassError(
                    f"--{flag.lower()} needs TensorRT 10.x: TensorRT {getattr(trt, '__version__', '11')} removed "
                    f"BuilderFlag.{flag}; convert the exported model to {flag.lower()} (NVIDIA ModelOpt AutoCast"
                    f"{', onnxconverter-common' if flag == 'FP16' else ''}) before fcpass optimize, which keeps the "
                    f"statistics' sums in fp32, and build that graph without --{flag.lower()}"
                )
            config.set_flag(getattr(trt.BuilderFlag, flag))
    load_timing_cache(config, options.timing_cache)
    dynamic = add_batch_profile(builder, network, config, options.batch)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FcpassError(
            f"TensorRT could not build an engine from {model_path} (see its log above); rerun with --verbose for details"
        )
    plan = memoryview(serialized)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise FcpassError(f"TensorRT built an engine for {model_path} but cannot load it; rerun with --verbose for details")
    io = [io_tensor(engine, i) for i in range(engine.num_io_tensors)]

    with atomic_path(output) as tmp:
        tmp.write_bytes(plan)
    if options.timing_cache is not None:
        save_timing_cache(config, options.timing_cache)
    return BuildSummary(output, int(engine.num_layers), plan.nbytes, count_conditionals(model.graph), io, dynamic)


def check_buildable(model_path: Path, listed_by: Path | None = None) -> onnx.ModelProto:
    """The graph TensorRT is given (weights not loaded, gates inlined); refused with its first
    violation of the static TensorRT rules."""
    model = inline_gates(load_model(model_path, load_weights=False)).model
    violations = check_graph(model, "tensorrt", base_dir=model_path.parent)
    if violations:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise FcpassError(
            f"{model_path} fails the TensorRT checks: {first.where}: {first.message}{more}; fix: {first.fix} "
            f"(fcpass check {listed_by or model_path} lists all)"
        )
    return model


@dataclass
class SegmentsBuildSummary:
    output: Path
    engines: dict[str, BuildSummary]  # segment file -> its engine


def build_segments(segments: str | Path, output: str | Path, options: BuildOptions) -> SegmentsBuildSummary:
    """One engine per segment of a segments folder, in a new folder `output` with its `engines.json`.

    Invariant: the folder holds an engine for every segment of the manifest or it does not exist.
    """
    from tqdm import tqdm

    segments, output = Path(segments), Path(output)
    check_distinct(segments, output)
    manifest = read_manifest(segments)
    files = segment_files(manifest)
    for file in files:  # every segment passes the static rules before the first (long) build starts
        check_buildable(segments / file, listed_by=segments)
    built: dict[str, BuildSummary] = {}
    with atomic_dir(output, is_engines_folder, ENGINES_FOLDER) as tmp:
        for file in tqdm(files, desc="fcpass build", unit="segment"):
            summary = build_engine(segments / file, tmp / engine_file(file), options)
            summary.output = output / engine_file(file)
            built[file] = summary
        index = {
            "format": ENGINES_FORMAT,
            "format_version": 1,
            "manifest_sha256": manifest_digest(segments),
            "tensorrt": getattr(import_tensorrt(), "__version__", "unknown"),
            "precision": "fp16" if options.fp16 else "bf16" if options.bf16 else "fp32",
            "engines": {file: engine_file(file) for file in files},
        }
        (tmp / ENGINES_INDEX).write_text(json.dumps(index, indent=1))
    return SegmentsBuildSummary(output, built)


# --- steps -----------------------------------------------------------------------------------

def create_builder(trt: ModuleType, logger: Any) -> Any:
    """`trt.Builder(logger)`; it fails (pybind11 returns nullptr) when CUDA cannot be initialised."""
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001  (TypeError from pybind11's nullptr, RuntimeError from CUDA)
        builder, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "the builder is None"
    if builder is None:
        raise FcpassError(
            f"TensorRT cannot create a builder ({why}): {_gpu_hint()}; run fcpass build on a machine with an "
            "NVIDIA GPU and its driver"
        )
    return builder


def _gpu_hint() -> str:
    """What is missing, as far as PyTorch (if installed) can tell."""
    try:
        import torch
    except ImportError:
        return "no usable CUDA GPU or driver (install cuda-python or torch to diagnose further)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return "CUDA is visible to PyTorch but TensorRT could not initialise it (driver/CUDA version mismatch?)"


def parse_onnx(trt: ModuleType, network: Any, logger: Any, model: onnx.ModelProto, model_path: Path) -> None:
    """Parse `model`, read from `model_path` (its external data resolves beside that file); raise on
    any parser error."""
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString(), str(model_path))
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if ok and not errors:
        return
    if not errors:
        raise FcpassError(f"TensorRT's ONNX parser rejected {model_path} without an error message; rerun with --verbose")
    first = errors[0]
    node_name = first.node_name() if hasattr(first, "node_name") else ""  # TensorRT >= 9
    where = f"node {first.node()}" + (f" ({node_name})" if node_name else "")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise FcpassError(
        f"TensorRT's ONNX parser rejected {model_path} at {where}: {first.desc()}{more}; "
        "run fcpass check on it and re-export the unsupported part"
    )


def load_timing_cache(config: Any, path: Path | None) -> None:
    """Give the config a timing cache, read from `path` if that exists (an empty one otherwise)."""
    if path is None:
        return
    data = b""
    if path.exists():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FcpassError(f"cannot read timing cache {path}: {exc.strerror}; pass a readable file") from None
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another device is rejected


def save_timing_cache(config: Any, path: Path) -> None:
    data = memoryview(config.get_timing_cache().serialize())
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def add_batch_profile(builder: Any, network: Any, config: Any, batch: int) -> bool:
    """One optimization profile (min 1, opt = max = batch) if any network input's axis 0 is dynamic."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in inputs if len(t.shape) > 0 and t.shape[0] == -1]
    if not dynamic:
        return False
    profile = builder.create_optimization_profile()
    for t in inputs:
        rest = tuple(t.shape)[1:]
        if len(t.shape) > 0 and t.shape[0] == -1:
            profile.set_shape(t.name, (1, *rest), (batch, *rest), (batch, *rest))
    config.add_optimization_profile(profile)
    return True


def count_conditionals(graph: onnx.GraphProto) -> int:
    return sum((node.op_type == "If") + sum(count_conditionals(g) for g in subgraphs(node)) for node in graph.node)
