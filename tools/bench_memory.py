"""Resident memory of an ONNX Runtime session: the original graph against the compiled one, as written
and with its weights stored inline.

    python tools/bench_memory.py --arch dit-s-2 --image-size 32 --regions stack blocks,tail,stack

Exports the architecture (random weights, legacy exporter; the image size changes only the
activations, not the weights), compiles it with each region set and, for each graph, opens one
session in a fresh process and prints the resident memory that opening it added (VmRSS after minus
before, MiB): weights, prepacked weights, and whatever else ONNX Runtime keeps. "compiled, inline"
is the compiled graph saved as one file, to show what `fcpass optimize`'s external data saves
(`fcpass.compiler.passes.localize_weights.EXTERNAL_DATA_MIN_BYTES`).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from fcpass.contract.onnx_io import data_file, save_model
from fcpass.export import ExportSpec, export
from fcpass.optimize import OptimizeOptions, optimize

_CHILD = """
import sys, onnxruntime as ort
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
before = rss()
opts = ort.SessionOptions()
opts.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
print(rss() - before)
"""


def session_mib(path: Path) -> float:
    """MiB of resident memory a fresh process adds by opening a CPU session of `path`."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="dit-s-2")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--model", type=Path, help="an exported graph instead of --arch")
    ap.add_argument("--regions", nargs="+", default=["stack", "blocks,tail,stack"], help="region sets to compile")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            src = Path(tmp) / "model.onnx"
            export(ExportSpec(args.arch, args.image_size, exporter="legacy"), src)
        label = args.model.name if args.model else f"{args.arch} ({args.image_size}x{args.image_size})"
        weights = sum(t.ByteSize() for t in onnx.load(str(src)).graph.initializer) / 2**20
        print(f"{label}, {weights:.0f} MiB of weights; MiB resident after opening an ONNX Runtime CPU session:\n")
        print("| graph | as written | compiled, inline |\n|---|---:|---:|")
        print(f"| original | {session_mib(src):.0f} | |")
        for regions in args.regions:
            fc, inline = Path(tmp) / f"{regions}.fc.onnx", Path(tmp) / f"{regions}.inline.onnx"
            optimize(src, fc, OptimizeOptions(regions=tuple(regions.split(","))), None)
            save_model(onnx.load(str(fc)), inline)
            written = "external data" if data_file(fc) else "one file"
            print(f"| `--regions {regions}` ({written}) | {session_mib(fc):.0f} | {session_mib(inline):.0f} |")
    print(f"\nCommand: `{' '.join(['python tools/bench_memory.py', *sys.argv[1:]])}`")


if __name__ == "__main__":
    main()
