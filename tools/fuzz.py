"""The long fuzz run: the cases of tests/fuzz, drawn afresh round after round for N minutes.

    python tools/fuzz.py --minutes 10 [--scale 3] [--seed 1]
    python tools/fuzz.py --engine atheris --minutes 5 [--readers onnx.load plan.text] [--seed 1]

hypothesis (the default): each round runs the fuzz tests in a fresh process with its own hypothesis seed
(printed, so a failing round replays with `FCPASS_FUZZ_SEED=S python -m pytest tests/fuzz
--hypothesis-seed=S`), `--scale` times the CI share's cases per test.

atheris: the coverage-guided targets of tests/fuzz/atheris_targets.py, one reader after another, each for
its share of the time; a reader whose property breaks is restarted for the rest of its share (at most
three times), and the input that broke it is kept under --crashes (replay it with `python
tests/fuzz/atheris_targets.py READER --seeds DIR FILE`).

At the end it prints how many cases of each reader ran and how each ended: worked, one-line error (for
kill.* rows: the process was killed mid-write), or failure; the exit code is 1 if any case failed or
any round did not pass. The last round is stopped at the deadline (SIGINT) and the cases it ran are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fuzz.harness import table  # noqa: E402

CUT = -2  # run_round's exit code for a round stopped at the deadline: its cases so far are counted


def run_round(seed: int, scale: float, seconds: float) -> tuple[Counter, dict[str, str], int]:
    """One pytest run of tests/fuzz; at `seconds` it is interrupted (SIGINT: pytest still writes the tally of the
    cases it ran) and then, if it does not stop within two minutes, killed."""
    with tempfile.TemporaryDirectory(prefix="fcfuzz-round.") as d:
        out = Path(d) / "tally.json"
        env = {**os.environ, "FCPASS_FUZZ_SEED": str(seed), "FCPASS_FUZZ_SCALE": str(scale),
               "FCPASS_FUZZ_TALLY": str(out), "FCPASS_FUZZ_KILLS": str(max(1, round(2 * scale)))}
        junit = Path(d) / "junit.xml"  # (a round stopped at the deadline exits 2 whatever its tests did)
        cmd = [sys.executable, "-m", "pytest", "tests/fuzz", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
               f"--junitxml={junit}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = CUT
        if rc == CUT and junit.exists():
            suite = ElementTree.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            if suite is not None and int(suite.get("failures", 0)) + int(suite.get("errors", 0)):
                rc = 1  # a test failed before the deadline
        doc = json.loads(out.read_text()) if out.exists() else {"tally": [], "failures": {}}
    return Counter({(r, o): n for r, o, n in doc["tally"]}), doc["failures"], rc


def run_atheris(reader: str, seconds: float, seed: int, seeds: Path, crashes: Path) -> tuple[Counter, dict[str, str], int]:
    """One libFuzzer run of `reader`'s target for `seconds`: its tally, first failure and exit code. An input
    that broke the property is moved to `crashes`."""
    with tempfile.TemporaryDirectory(prefix="fcfuzz-atheris.") as d:
        out = Path(d) / "tally.json"
        cmd = [sys.executable, str(ROOT / "tests" / "fuzz" / "atheris_targets.py"), reader, "--seeds", str(seeds),
               "--tally", str(out), f"-max_total_time={max(1, int(seconds))}", f"-seed={seed}",
               f"-artifact_prefix={d}/", "-rss_limit_mb=4096", "-timeout=60"]
        try:
            rc = subprocess.run(cmd, check=False, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=seconds + 300).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        doc = json.loads(out.read_text()) if out.exists() else {"tally": [], "failures": {}}
        for found in Path(d).glob("*-*"):
            if found.name.split("-")[0] in ("crash", "timeout", "oom", "leak", "slow"):
                crashes.mkdir(parents=True, exist_ok=True)
                kept = shutil.move(found, crashes / f"{reader}-{found.name}")
                print(f"  kept {kept}", flush=True)
    return Counter({(r, o): n for r, o, n in doc["tally"]}), doc["failures"], rc


def summary(heading: str, total: Counter, failures: dict[str, str], bad: str | None) -> int:
    """Print the tally and each reader's first failure; the exit code: 1 if anything failed or a run did not pass."""
    print(f"\n{heading}:")
    print(table(total))
    for reader, why in sorted(failures.items()):
        print(f"failure in {reader}: {why[:300]}")
    if bad:
        print(bad)
    return 1 if failures or bad else 0


def main_atheris(args: argparse.Namespace) -> int:
    try:
        from tests.fuzz.atheris_targets import READERS
    except ImportError as exc:
        print(f"the atheris engine needs atheris ({exc}): pip install atheris")
        return 2
    if args.seeds is None:  # one folder for every reader's runs (the first builds the seeds), removed at the end
        with tempfile.TemporaryDirectory(prefix="fcfuzz-seeds.") as d:
            args.seeds = Path(d)
            return main_atheris(args)
    readers = args.readers or READERS
    if unknown := sorted(set(readers) - set(READERS)):
        print(f"no atheris target for {', '.join(unknown)}; choose among {', '.join(READERS)}")
        return 2
    rng = random.Random(args.seed)
    seeds = args.seeds
    crashes = args.crashes.resolve()
    total: Counter = Counter()
    failures: dict[str, str] = {}
    bad_runs: list[str] = []
    share = 60 * args.minutes / len(readers)
    print(f"atheris: {len(readers)} readers, {share:.0f} s each, seeds in {seeds}", flush=True)
    startup = 10.0  # a target's imports and warm-up on its seeds before fuzzing starts: measured from each run
    for reader in readers:
        end, runs = time.monotonic() + share, 0
        while time.monotonic() < end - startup - 1 and runs < 4:
            seed = args.seed if args.seed is not None and runs == 0 else rng.randrange(1, 2**31)
            start = time.monotonic()
            fuzz = max(1, int(end - start - startup))
            tally, failed, rc = run_atheris(reader, fuzz, seed, seeds, crashes)
            if rc == 0:
                startup = max(1.0, time.monotonic() - start - fuzz)
            runs += 1
            total.update(tally)
            for name, why in failed.items():
                failures.setdefault(name, f"{why} (seed {seed})")
            print(f"{reader}: seed {seed}, {sum(tally.values())} cases, {time.monotonic() - start:.0f} s, "
                  f"{'passed' if rc == 0 and not failed else f'FAILED (exit {rc})'}", flush=True)
            if rc == 0 and not failed:
                break
            bad_runs.append(f"{reader} (seed {seed})")
    bad = f"runs that did not pass: {', '.join(bad_runs)}; their inputs are in {crashes}" if bad_runs else None
    return summary(f"atheris, {args.minutes:g} minutes", total, failures, bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, required=True, help="how long to run (rounds start until it is spent)")
    ap.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis",
                    help="hypothesis: the generated cases of tests/fuzz; atheris: its coverage-guided targets")
    ap.add_argument("--scale", type=float, default=2.0, help="cases per test, as a multiple of the CI share's (hypothesis)")
    ap.add_argument("--seed", type=int, help="the first round's seed (default: random)")
    ap.add_argument("--readers", nargs="+", help="the readers to fuzz (atheris; default: all)")
    ap.add_argument("--seeds", type=Path, help="the atheris targets' seeds folder, built there if empty (default: a "
                                               "fresh temporary one)")
    ap.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"),
                    help="where the atheris engine keeps inputs that broke the property (default: fuzz-crashes)")
    args = ap.parse_args(argv)
    if args.engine == "atheris":
        return main_atheris(args)
    rng = random.Random(args.seed)
    end = time.monotonic() + 60 * args.minutes
    total: Counter = Counter()
    failures: dict[str, str] = {}
    bad_rounds: list[int] = []
    rounds = 0
    while time.monotonic() < end:
        seed = args.seed if args.seed is not None and rounds == 0 else rng.randrange(2**31)
        start = time.monotonic()
        tally, failed, rc = run_round(seed, args.scale, end - start)
        rounds += 1
        total.update(tally)
        for reader, why in failed.items():
            failures.setdefault(reader, f"{why} (seed {seed})")
        if rc not in (0, CUT):
            bad_rounds.append(seed)
        ended = "passed" if rc == 0 else "stopped at the deadline" if rc == CUT else f"FAILED (pytest exit {rc})"
        print(f"round {rounds}: seed {seed}, {sum(tally.values())} cases, {time.monotonic() - start:.0f} s, {ended}",
              flush=True)
    bad = f"rounds that did not pass: seeds {bad_rounds}" if bad_rounds else None
    return summary(f"{rounds} rounds in {args.minutes:g} minutes (scale {args.scale:g})", total, failures, bad)


if __name__ == "__main__":
    sys.exit(main())
