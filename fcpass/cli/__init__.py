"""The `fcpass` command line: one module per command, each adding its subparser and holding its command
(parse, call, print). Every user-facing failure is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from fcpass import __version__
from fcpass.cli import build, calibrate, check, compare, export, inspect, optimize, report, sample, tune
from fcpass.contract.errors import FcpassError

COMMANDS = (export, inspect, optimize, sample, calibrate, tune, compare, report, check, build)


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
    for command in COMMANDS:
        command.add_parser(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
