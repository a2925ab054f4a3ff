"""The long fuzz run: the cases of tests/fuzz, drawn afresh round after round for N minutes.

    python tools/fuzz.py --minutes 10 [--scale 3] [--seed 1]

Each round runs the fuzz tests in a fresh process with its own hypothesis seed (printed, so a failing
round replays with `FCPASS_FUZZ_SEED=S python -m pytest tests/fuzz --hypothesis-seed=S`), `--scale`
times the CI share's cases per test. At the end it prints how many cases of each reader ran and how
each ended: worked, one-line error (for kill.* rows: the process was killed mid-write), or failure;
the exit code is 1 if any case failed or any round did not pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fuzz.harness import table  # noqa: E402


def run_round(seed: int, scale: float, seconds: float) -> tuple[Counter, dict[str, str], int]:
    with tempfile.TemporaryDirectory(prefix="fcfuzz-round.") as d:
        out = Path(d) / "tally.json"
        env = {**os.environ, "FCPASS_FUZZ_SEED": str(seed), "FCPASS_FUZZ_SCALE": str(scale),
               "FCPASS_FUZZ_TALLY": str(out), "FCPASS_FUZZ_KILLS": str(max(1, round(2 * scale)))}
        cmd = [sys.executable, "-m", "pytest", "tests/fuzz", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}"]
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=seconds).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        doc = json.loads(out.read_text()) if out.exists() else {"tally": [], "failures": {}}
    return Counter({(r, o): n for r, o, n in doc["tally"]}), doc["failures"], rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, required=True, help="how long to run (rounds start until it is spent)")
    ap.add_argument("--scale", type=float, default=2.0, help="cases per test, as a multiple of the CI share's")
    ap.add_argument("--seed", type=int, help="the first round's seed (default: random)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    end = time.monotonic() + 60 * args.minutes
    total: Counter = Counter()
    failures: dict[str, str] = {}
    bad_rounds: list[int] = []
    rounds = 0
    while time.monotonic() < end:
        seed = args.seed if args.seed is not None and rounds == 0 else rng.randrange(2**31)
        start = time.monotonic()
        tally, failed, rc = run_round(seed, args.scale, max(end - start, 0) + 120)
        rounds += 1
        total.update(tally)
        for reader, why in failed.items():
            failures.setdefault(reader, f"{why} (seed {seed})")
        if rc != 0:
            bad_rounds.append(seed)
        print(f"round {rounds}: seed {seed}, {sum(tally.values())} cases, {time.monotonic() - start:.0f} s, "
              f"{'passed' if rc == 0 else f'FAILED (pytest exit {rc})'}", flush=True)
    print(f"\n{rounds} rounds in {args.minutes:g} minutes (scale {args.scale:g}):")
    print(table(total))
    for reader, why in sorted(failures.items()):
        print(f"failure in {reader}: {why[:300]}")
    if bad_rounds:
        print(f"rounds that did not pass: seeds {bad_rounds}")
    return 1 if failures or bad_rounds else 0


if __name__ == "__main__":
    sys.exit(main())
