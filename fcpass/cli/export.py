"""`fcpass export`: a PyTorch DiT to static-shaped ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    e = sub.add_parser("export", help="export a PyTorch DiT to static-shaped ONNX")
    e.add_argument("--arch", required=True, help="digits, canvas, dit-{s,b,l,xl}-{2,4,8}, pixart-tiny, pixart-xl-2")
    e.add_argument("--image-size", type=int, default=256, help="image side in pixels (default %(default)s)")
    e.add_argument("--weights", type=Path, help="checkpoint (official DiT .pt, or diffusers layout)")
    e.add_argument("--batch", type=int, default=2, help="static batch (2 = one sample with guidance)")
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript); default %(default)s")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    e.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    e.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    e.set_defaults(func=cmd_export)



def cmd_export(args: argparse.Namespace) -> int:
    from fcpass.contract.onnx_io import check_distinct, check_file_output
    from fcpass.export import ExportSpec, export

    if args.weights is not None:
        check_distinct(args.weights, args.output)
    check_file_output(args.output)
    spec = ExportSpec(args.arch, args.image_size, args.batch, args.exporter, args.opset)
    path = export(spec, args.output, weights=args.weights, verify=not args.no_verify)
    print(f"wrote {path}")
    return 0
