"""Training: ``main(cfg)`` for every method; ``python -m difftune.train CONFIG.yaml --set a.b=c``."""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig


def main(cfg: TrainConfig) -> Path:
    """Train; see `difftune.train.trainer.main` (imported lazily: it pulls in accelerate and diffusers)."""
    from .trainer import main as _main

    return _main(cfg)


__all__ = ["TrainConfig", "main"]
