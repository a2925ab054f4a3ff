"""The one exception type the CLI turns into a single line and exit code 2."""

from __future__ import annotations


class FcpassError(Exception):
    """A problem with the user's input or environment; the message names it and says how to fix it.

    Raise it with one sentence of the form "<what is wrong>: <what was found>; <how to fix it>".
    """


def first_clause(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of a library's error message, for a one-line FcpassError: some run to a
    paragraph (torch.load's weights-only refusal explains itself at length)."""
    return (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:limit]
