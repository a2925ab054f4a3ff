"""Running the CLI in a test: the one-line error contract."""

from __future__ import annotations

import pytest

from fcpass.cli import main


def user_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    """Run the CLI; check the one-line error contract; return the message."""
    capsys.readouterr()  # drop anything a fixture printed
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, f"exit code {rc}; stderr: {err!r}"
    assert "Traceback" not in err + out
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith("fcpass: error: ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]
