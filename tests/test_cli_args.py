"""The CLI's arguments: `fcpass COMMAND --help` documents every one (the policy defaults it quotes are the
policies' own), a usage error is one line and exit code 2 as every other error, and no command takes
a flag it would ignore."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from fcpass.cli import build_parser, main
from fcpass.contract.roles import ROLES
from models.digits import ONNX
from runtimes.policies import FastCacheConfig, ForaConfig, MagCacheConfig


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def help_of(command: str, flag: str) -> str:
    action = next(a for a in commands()[command]._actions if flag in a.option_strings)
    return action.help % vars(action)


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_argument_has_help(command: str) -> None:
    parser = commands()[command]
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions if not a.help]
    assert not bare, f"fcpass {command}: no help for {', '.join(bare)}"
    parser.format_help()  # every %(default)s and %(choices)s expands


def test_quoted_defaults_and_roles_are_the_code_s_own() -> None:
    assert f"(roles: {', '.join(ROLES)})" in help_of("optimize", "--inputs")
    assert f"default {FastCacheConfig.alpha}" in help_of("sample", "--alpha")
    assert FastCacheConfig.max_skips == MagCacheConfig.max_skips
    assert f"default {FastCacheConfig.max_skips}" in help_of("sample", "--max-skips")
    approx = help_of("sample", "--approx")
    assert f"{ForaConfig.approx} for fora" in approx and f"{FastCacheConfig.approx} for fastcache" in approx
    assert f"({FastCacheConfig.dof}, default)" in help_of("sample", "--dof")


@pytest.mark.parametrize(("argv", "fragment"), [
    (["sample", "--threads", "x"], "argument --threads: invalid int value: 'x'"),
    (["optimize"], "the following arguments are required: -o/--output"),
    (["report", "r.json", "-o", "d.png", "--dpi", "300"], "unrecognized arguments: --dpi 300"),
])
def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and fragment in err and err.rstrip().endswith("--help"), err


@pytest.mark.parametrize("command", ["optimize", "calibrate"])
def test_calibrating_commands_take_steps_for_their_trajectories_and_no_seed(command: str) -> None:
    """Calibration samples --calib-steps steps from its own seed: --steps is that flag there, and a --seed
    it took would do nothing."""
    options = commands()[command]._option_string_actions
    assert options["--steps"] is options["--calib-steps"]
    assert "--seed" not in options and "--seed" in commands()["sample"]._option_string_actions
    args = commands()[command].parse_args(["m.onnx", "-o", "x.onnx", "--steps", "7"]
                                          + (["--for", "teacache"] if command == "calibrate" else []))
    assert args.calib_steps == 7 and not hasattr(args, "steps")


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_leaves_stops_the_output_quietly(unbuffered: str) -> None:
    """`fcpass inspect m.onnx | head -1`: no traceback when head closes the pipe, and the shell's SIGPIPE status,
    whether a print or (block-buffered stdout) the last flush meets the closed pipe."""
    read, write = os.pipe()
    os.close(read)  # closed before anything is written: every write fails, however little is written
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run([sys.executable, "-c", "import sys; from fcpass.cli import main; sys.exit(main(sys.argv[1:]))",
                               "inspect", str(ONNX)], check=False, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
    assert done.returncode == 141
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
