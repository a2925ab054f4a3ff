"""A worker that dies the first time it reads a task's arguments, for the retry test of tests/test_ray.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _revive(marker: str, data: dict[str, Any]) -> dict[str, Any]:
    """Unpickling on a worker: the first one to get here (no `marker` yet) leaves the marker and dies at once, as a
    machine lost mid-run does; every later one gets the config."""
    path = Path(marker)
    if not path.exists():
        path.touch()
        os._exit(1)
    return dict(data)


class DiesOnce(dict):
    """A scheduler config that kills the first worker process that unpickles it (see `_revive`)."""

    def __init__(self, data: dict[str, Any], marker: Path) -> None:
        super().__init__(data)
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return _revive, (self.marker, dict(self))
