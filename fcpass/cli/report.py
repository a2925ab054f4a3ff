"""`fcpass report`: a sampling report's decisions as a step x region heatmap."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="plot a sampling report's decisions as a step x region heatmap")
    r.add_argument("report", type=Path, help="the JSON that fcpass sample --report wrote")
    r.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    r.set_defaults(func=cmd_report)



def cmd_report(args: argparse.Namespace) -> int:
    from fcpass.report import plot_report

    plot_report(args.report, args.output)
    print(f"wrote {args.output}")
    return 0
