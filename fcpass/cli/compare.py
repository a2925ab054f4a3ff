"""`fcpass compare`: PSNR and SSIM of one batch of samples against another."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fcpass.cli.common import (
    count,
)


def add_parser(sub: Any) -> None:
    c = sub.add_parser("compare", help="PSNR and SSIM of B against A")
    c.add_argument("a", type=Path, help="reference samples (.npy, e.g. fcpass sample --out-npy without a policy)")
    c.add_argument("b", type=Path, help="samples to score against A (.npy, the same shape)")
    c.set_defaults(func=cmd_compare)



def cmd_compare(args: argparse.Namespace) -> int:
    from fcpass.quality import compare_batches, load_npy

    a, b = load_npy(args.a), load_npy(args.b)
    if a.ndim == 3:
        a, b = a[None], b[None]
    q = compare_batches(a, b)
    print(f"PSNR {q['psnr_mean']:.2f} dB  SSIM {q['ssim_mean']:.4f}  ({count(q['n'], 'sample')})")
    return 0
