"""`fcpass check`: static checks that TensorRT can build a graph."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from fcpass.cli.common import (
    count,
)


def add_parser(sub: Any) -> None:
    k = sub.add_parser("check", help="static checks that TensorRT 10.x/11.x can build a (cache-aware) graph")
    k.add_argument("model", type=Path, help="an ONNX graph or a segments folder")
    k.add_argument("--target", default="tensorrt", help="the runtime to check for: tensorrt")
    k.add_argument("--json", action="store_true", help="the violations as a JSON list")
    k.set_defaults(func=cmd_check)



def cmd_check(args: argparse.Namespace) -> int:
    from fcpass.compiler.trt_check import check_graph
    from fcpass.contract.manifest import is_segments_artefact, read_manifest, segment_files
    from fcpass.contract.onnx_io import load_model

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
        print(count(len(violations), "violation"), file=sys.stderr)
        return 2
    return 0
