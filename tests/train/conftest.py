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


def _photos(folder: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None, seed: int = 0,
            ext: str = ".txt") -> Path:
    """Random RGB photos ``0.png, 1.png, ...`` of the given (width, height) sizes, captioned in turn from
    ``captions`` (sidecar files with suffix ``ext``) when given."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}{ext}").write_text(captions[i % len(captions)])
    return folder


@pytest.fixture(scope="session")
def write_photos():
    """``write_photos(folder, sizes, captions=None, seed=0, ext=".txt")``: a folder of photos of any shape."""
    return _photos


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


@pytest.fixture(scope="session")
def mmdit(tiny, tmp_path_factory):
    """Paths of the tiny SD3 and Flux pipelines (``sd3``, ``flux``) and of the caption set (``captions``)."""
    root = tmp_path_factory.mktemp("mmdit")
    return {"captions": tiny["captions"], **{k: save_tiny_pipeline(k, root / k) for k in ("sd3", "flux")}}


@pytest.fixture
def stop_and_resume(tmp_path, capsys):
    """``run(make, step)``: train ``make(out)`` straight through, then resume a fresh folder holding only its
    checkpoint-``step`` (from another global RNG state); the two final digests and saved adapters must be equal.
    ``make(out, *sets)`` builds the run's config. Returns the adapter's tensors."""
    import re

    import torch
    from safetensors.torch import load_file

    from difftune.train import main

    def run(make, step: int) -> dict:
        full = main(make(tmp_path / "a" / "out"))
        ckpts = tmp_path / "b" / "out" / "checkpoints"
        ckpts.mkdir(parents=True)
        (tmp_path / "a" / "out" / "checkpoints" / f"checkpoint-{step}").rename(ckpts / f"checkpoint-{step}")
        torch.manual_seed(1234)  # the resumed process starts from some other RNG state
        resumed = main(make(tmp_path / "b" / "out", "checkpointing.resume_from_checkpoint=latest"))
        digests = re.findall(r"final trainable-weights digest (\w+)", capsys.readouterr().out)
        assert len(digests) == 2 and digests[0] == digests[1], digests
        a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return a

    return run
