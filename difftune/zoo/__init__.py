"""The reference models shipped with difftune (sd-mini, dit-mini) and the real MNIST data they are built from."""

from __future__ import annotations

from pathlib import Path

from ..errors import bad_value

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODELS = ("sd-mini", "dit-mini")


def path(name: str) -> Path:
    """Folder of a shipped reference pipeline (``DiffusionPipeline.from_pretrained(path("sd-mini"))``)."""
    if name not in MODELS:
        raise bad_value("name", name, f"one of the shipped reference models {MODELS}")
    return ASSETS / name
