"""`fcpass build`: a TensorRT engine from a graph, or a folder of engines from a segments folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    b = sub.add_parser("build", help="build a TensorRT engine (needs fcpass[trt] and an NVIDIA GPU)")
    b.add_argument("model", type=Path, help="an ONNX graph (cache-aware or not) or a segments folder")
    b.add_argument("-o", "--output", type=Path, required=True,
                   help="the engine file; for a segments folder, a folder of engines")
    precision = b.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="allow fp16 kernels (TensorRT 10.x)")
    precision.add_argument("--bf16", action="store_true", help="allow bf16 kernels (TensorRT 10.x)")
    b.add_argument("--timing-cache", type=Path, metavar="FILE", help="read (if present) and update this timing cache")
    b.add_argument("--workspace", type=int, metavar="MB", help="workspace memory pool limit")
    b.add_argument("--batch", type=int, default=2, help="opt/max batch of the profile if axis 0 is dynamic")
    b.add_argument("--verbose", dest="trt_verbose", action="store_true", help="TensorRT's verbose log")
    b.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    from fcpass.compiler.trt_build import BuildOptions, build_engine, build_segments
    from fcpass.contract.manifest import is_segments_artefact

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
