"""The reference models shipped with difftune (sd-mini, dit-mini) and the real MNIST data they are built from.

Also here: `architectures` (the reference models' untrained configs), `tokenizers` (offline CLIP/T5 tokenizer writers)
and `tiny` (tiny random SD/SDXL/DiT/PixArt pipelines for `difftune demo` and the tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..basemodel import ASSETS, MODELS  # noqa: F401 (defined beside the resolver that finds them by name)
from ..errors import bad_value


def path(name: str) -> Path:
    """Folder of a shipped reference pipeline (``DiffusionPipeline.from_pretrained(path("sd-mini"))``)."""
    if name not in MODELS:
        raise bad_value("name", name, f"one of the shipped reference models {MODELS}")
    return ASSETS / name


def load(name: str, device: str | None = None) -> Any:
    """A shipped reference pipeline, ready to sample.

    For dit-mini, digit words work as labels too (``pipe.get_label_ids(["seven"])``): DiTPipeline does not save
    ``id2label``, so it is restored here. Its null class for guidance is 1000, as DiTPipeline hard-codes.
    """
    from ..generation import load_pipeline
    from .mnist import DIGIT_WORDS

    pipe = load_pipeline(path(name), device=device)
    if name == "dit-mini":
        pipe.labels = {word: i for i, word in enumerate(DIGIT_WORDS)}
    return pipe
