"""Data-free batch sources, for methods whose trainer plugin has its own objective (``TrainerPlugin.objective``).

``data.kind: prompts`` yields captions (from ``data.prompts`` and/or ``data.prompts_file``), ``data.kind: none``
yields indices only (``data.num_samples`` per epoch). Items carry no randomness: the epoch's order comes from the
trainer's batch sampler, a pure function of (seed, epoch), so exact resume holds as with images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import DifftuneError, bad_value


def read_prompts(prompts: list[str], prompts_file: str | os.PathLike[str] | None) -> list[str]:
    """``prompts`` followed by the non-blank lines of ``prompts_file`` (stripped); at least one in all."""
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise bad_value("data.prompts_file", str(path), "a text file with one prompt per line", f"{path} {what}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise bad_value("data.prompts_file", str(path), "a UTF-8 text file", str(e)) from e
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise DifftuneError(f"no prompts: data.prompts is empty and data.prompts_file ({prompts_file}) has only "
                            "blank lines. Give at least one prompt")
    return out


class PromptDataset(Dataset):
    """Captions without images. Items: ``{"caption": str, "index": int}``; ``repeats`` copies per epoch."""

    def __init__(self, prompts: list[str], repeats: int = 1) -> None:
        if not prompts:
            raise bad_value("prompts", prompts, "at least one prompt")
        self.prompts = list(prompts) * repeats

    def __len__(self) -> int:
        return len(self.prompts)

    def set_epoch(self, epoch: int) -> None:
        """Nothing depends on the epoch (the sampler shuffles); kept for the trainer's dataset interface."""

    def captions(self) -> list[str]:
        """The distinct prompts, sorted."""
        return sorted(set(self.prompts))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} prompt(s)")
        index %= len(self)
        return {"caption": self.prompts[index], "index": index}


class IndexDataset(Dataset):
    """``num_samples`` items that are only their index: ``{"index": int}``."""

    def __init__(self, num_samples: int) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise bad_value("data.num_samples", num_samples, "an integer >= 1")
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Nothing depends on the epoch (the sampler shuffles); kept for the trainer's dataset interface."""

    def captions(self) -> list[str]:
        """No captions."""
        return []

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} item(s)")
        return {"index": index % len(self)}
