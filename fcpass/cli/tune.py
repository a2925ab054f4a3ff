"""`fcpass tune`: the fastest setting of each policy that holds a PSNR target."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from fcpass.cli.common import (
    INPUTS_HELP,
    sampling_args,
    sampling_setup,
)
from fcpass.contract.errors import FcpassError


def add_parser(sub: Any) -> None:
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
    sampling_args(t)
    t.set_defaults(func=cmd_tune, seed=1234)



def cmd_tune(args: argparse.Namespace) -> int:
    from fcpass import tune
    from fcpass.contract.onnx_io import atomic_path, check_file_output
    from fcpass.sampling import load_denoiser

    if args.samples < 1:
        raise FcpassError(f"--samples {args.samples} must be at least 1")
    if args.repeats < 1:
        raise FcpassError(f"--repeats {args.repeats} must be at least 1")
    for path in (args.plot, args.json):
        if path:
            check_file_output(path)
    if args.threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    setup = sampling_setup(args, args.model)
    request = setup.request
    if request.classes is not None and args.classes is None:
        request.classes = [request.classes[i % len(request.classes)] for i in range(args.samples)]
    denoiser = load_denoiser(args.model, "none", {}, provider=args.provider, inputs=setup.inputs, threads=args.threads)
    if not hasattr(denoiser, "plan"):
        raise FcpassError(f"{args.model} is not cache-aware; run: fcpass optimize {args.model} -o model.fc.onnx --calibrate 8")
    classifier = None
    if setup.arch == "digits":
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
