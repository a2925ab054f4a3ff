"""Reference DiT families in PyTorch, their checkpoint layouts, and the two bundled models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bundled:
    """A model shipped in this package: its exported graph, sampler config and the classifier that scores it."""

    arch: str
    onnx: Path
    scheduler_config: Path
    classifier: Path


def bundled(arch: str | None) -> Bundled | None:
    """The bundled model an export's `arch` names (`digits`, 64 tokens; `canvas`, 256 tokens), else None."""
    if arch == "digits":
        from models import digits as m
    elif arch == "canvas":
        from models import canvas as m  # type: ignore[no-redef]
    else:
        return None
    return Bundled(arch, m.ONNX, m.SCHEDULER_CONFIG, m.CLASSIFIER)
