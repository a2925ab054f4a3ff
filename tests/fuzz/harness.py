"""The property every fuzz case checks, and the tally of how each case ended.

For every generated input a reader either works, or raises FcpassError with one line naming the
problem and its fix (through the CLI: exit code 2 and one line on stderr). Never another exception,
never longer than a time bound, never a file left behind, never the input changed. `tools/fuzz.py`
runs the same cases for longer and prints the tally.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fcpass.contract.errors import FcpassError

# (reader, outcome) -> cases; outcome is "worked", "error" (one clear line) or "failure"
TALLY: Counter[tuple[str, str]] = Counter()
# the first failure of each reader, for the long run's report
FAILURES: dict[str, str] = {}
LAST_ERROR: list[str] = [""]  # the error line of the last CLI case, for tests that read it
SECONDS_PER_CASE = float(os.environ.get("FCPASS_FUZZ_CASE_SECONDS", "20"))


# An error without a "; <fix>" clause names its fix if it states what is allowed ("--alpha 2.0 must be in (0, 1)").
FIX_WORDS = ("must be", "must have", "must name", "use ", "choose ", "pass ", "drop ", "run ")


class Hang(Exception):
    """A case ran past its time bound."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def digest(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (files or folders)."""
    out: dict[str, str] = {}
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def where(exc: BaseException) -> str:
    """The project's innermost frame in `exc`'s traceback, as file:line (function)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/site-packages/" not in f.filename]
    f = (frames or traceback.extract_tb(exc.__traceback__))[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})"


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def one_clear_line(message: str) -> str | None:
    """Why `message` is not one line naming the problem and its fix, or None if it is."""
    text = message.strip()
    if not text:
        return "empty message"
    if "\n" in text:
        return "more than one line"
    if ";" not in text and not any(word in text for word in FIX_WORDS):
        return "names no fix (no '; <fix>' clause, no allowed values)"
    return None


@contextlib.contextmanager
def case_dir() -> Iterator[Path]:
    """A fresh folder for one case's files, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="fcfuzz."))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def check(reader: str, run: Callable[[], Any], inputs: list[Path] = (), folder: Path | None = None,
          outputs: tuple[str, ...] = (), seconds: float | None = None) -> str:
    """Run one case of `reader`; raise AssertionError if it breaks the property, else say how it ended.

    `inputs` must be unchanged afterwards; `folder` must hold nothing new but the names in `outputs`.
    """
    before, names = digest(list(inputs)), listing(folder) if folder else set()
    problem, outcome = None, "worked"
    try:
        with time_bound(seconds or SECONDS_PER_CASE):
            run()
    except FcpassError as exc:
        outcome = "error"
        if why := one_clear_line(str(exc)):
            problem = f"FcpassError with {why}: {exc}"
    except Hang as exc:
        problem = f"hang: {exc}"
    except Exception as exc:  # noqa: BLE001  (any other exception is what this harness looks for)
        problem = f"{type(exc).__name__}: {exc} at {where(exc)}"
    problem = problem or _left_behind(inputs, before, folder, names, outputs)
    return _record(reader, outcome, problem)


def _left_behind(inputs: Any, before: Any, folder: Path | None, names: set[str], outputs: tuple[str, ...]) -> str | None:
    """What a finished case broke of the property besides its outcome: an input changed, or files left in `folder`."""
    if digest(list(inputs)) != before:
        return "an input file changed"
    if folder is not None:
        extra = {n for n in listing(folder) - names if n.split("/")[0] not in outputs}
        if extra:
            return f"files left behind: {sorted(extra)}"
    return None


def check_cli(reader: str, argv: list[str], inputs: list[Path] = (), folder: Path | None = None,
              outputs: tuple[str, ...] = (), seconds: float | None = None) -> str:
    """`fcpass ARGV` exits 0, or 2 with one line on stderr; anything else breaks the property."""
    from fcpass.cli import main

    before, names = digest(list(inputs)), listing(folder) if folder else set()
    err, problem, outcome = io.StringIO(), None, "worked"
    try:
        with time_bound(seconds or SECONDS_PER_CASE), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse's usage errors and --help
                rc = exc.code if isinstance(exc.code, int) else 2
            if rc == 130:  # fcpass's own answer to Ctrl-C: the run is being stopped (tools/fuzz.py's deadline)
                raise KeyboardInterrupt
    except Hang as exc:
        rc, problem = None, f"hang: {exc}"
    except Exception as exc:  # noqa: BLE001
        rc, problem = None, f"traceback: {type(exc).__name__}: {exc} at {where(exc)}"
    # (an error raised mid-sampling follows the progress bar on its line: the bar never ends its line)
    lines = [line[line.index("fcpass"):] for line in err.getvalue().splitlines() if "fcpass" in line
             and line[line.index("fcpass"):].startswith(("fcpass: error:", "fcpass: interrupted", "fcpass ", "fcpass:"))]
    LAST_ERROR[0] = lines[-1] if lines else ""
    if problem is None and rc == 2:
        outcome = "error"
        if len(lines) != 1:
            problem = f"exit 2 with {len(lines)} error lines on stderr: {err.getvalue()!r}"
        elif why := one_clear_line(lines[0]):
            problem = f"error line with {why}: {lines[0]}"
    elif problem is None and rc != 0:
        problem = f"exit code {rc}: {err.getvalue()!r}"
    problem = problem or _left_behind(inputs, before, folder, names, outputs)
    return _record(reader, outcome, problem, argv)


def _record(reader: str, outcome: str, problem: str | None, argv: list[str] | None = None) -> str:
    if problem is not None:
        TALLY[reader, "failure"] += 1
        FAILURES.setdefault(reader, problem + (f" (argv {argv})" if argv else ""))
        raise AssertionError(f"{reader}: {problem}" + (f"\nargv: {argv}" if argv else ""))
    TALLY[reader, outcome] += 1
    return outcome


def table(tally: Counter[tuple[str, str]] | None = None) -> str:
    """The tally as a table: one row per reader, cases and how they ended."""
    tally = TALLY if tally is None else tally
    readers = sorted({r for r, _ in tally})
    rows = [f"{'reader':<22}{'cases':>8}{'worked':>8}{'error':>8}{'failure':>9}"]
    for r in readers:
        n = {o: tally[r, o] for o in ("worked", "error", "failure")}
        rows.append(f"{r:<22}{sum(n.values()):>8}{n['worked']:>8}{n['error']:>8}{n['failure']:>9}")
    total = {o: sum(v for (_, oo), v in tally.items() if oo == o) for o in ("worked", "error", "failure")}
    rows.append(f"{'total':<22}{sum(total.values()):>8}{total['worked']:>8}{total['error']:>8}{total['failure']:>9}")
    return "\n".join(rows)


def examples(n: int) -> int:
    """`n` scaled by FCPASS_FUZZ_SCALE (tools/fuzz.py raises it for the long run)."""
    return max(1, int(n * float(os.environ.get("FCPASS_FUZZ_SCALE", "1"))))
