from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.testing import save_tiny_pipeline


def _images(folder: Path, n: int, seed: int, captions: list[str] | None = None) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(captions[i % len(captions)])
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny SD and DiT pipelines and of small caption / class / DreamBooth data sets."""
    root = tmp_path_factory.mktemp("train")
    paths = {
        "sd": save_tiny_pipeline("sd", root / "sd"),
        "dit": save_tiny_pipeline("dit", root / "dit"),
        "captions": _images(root / "captions", 6, 0, ["a photo of a cat", "a photo of a dog", "a red car"]),
        "instance": _images(root / "instance", 3, 1),
        "class_images": _images(root / "class_images", 4, 2),
    }
    for label in ("0", "3"):
        _images(root / "classes" / label, 3, int(label) + 10)
    paths["classes"] = root / "classes"
    return paths
