"""The one exception type the CLI turns into a single line and exit code 2."""

from __future__ import annotations


class FcpassError(Exception):
    """A problem with the user's input or environment; the message names it and says how to fix it.

    Raise it with one sentence of the form "<what is wrong>: <what was found>; <how to fix it>".
    """
