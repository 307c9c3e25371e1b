"""Captions: reading them (``metadata.jsonl``) and kohya-style tag handling (``data.shuffle_caption``,
``data.keep_tokens``, ``data.caption_tag_dropout``).

A caption is a comma-separated list of tags ("sks woman, smiling, outdoors, red coat"). As in kohya sd-scripts, the
first ``keep_tokens`` tags stay in place (the trigger word), the others are shuffled, then each of them is dropped
with probability ``caption_tag_dropout``, and the tags are joined again with ", ". The whole-caption dropout
(``data.label_dropout``) is separate and happens in the loss.

Every draw comes from the generator the dataset hands in, one per (seed, epoch, index) and apart from the image
augmentation's, so the captions of a resumed run equal those of the uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DifftuneError


@dataclass(frozen=True)
class CaptionOptions:
    """How the tags of each caption are processed per epoch (see the module docstring)."""

    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0

    @property
    def active(self) -> bool:
        """Whether processing changes any caption."""
        return self.shuffle or self.tag_dropout > 0


def process_caption(caption: str, options: CaptionOptions, rng: np.random.Generator) -> str:
    """``caption`` with its tags shuffled and dropped as ``options`` says, drawing from ``rng``.

    The first ``options.keep_tokens`` tags are never moved or dropped. Empty tags (",,") are removed. A caption with
    no comma is one tag: it only moves or drops when ``keep_tokens`` is 0.
    """
    if not options.active:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    fixed, flex = tags[: options.keep_tokens], tags[options.keep_tokens:]
    if options.shuffle and len(flex) > 1:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if options.tag_dropout > 0:
        keep = rng.random(len(flex)) >= options.tag_dropout  # one draw per tag, always: the stream stays aligned
        flex = [t for t, k in zip(flex, keep) if k]
    return ", ".join(fixed + flex)


def read_metadata(path: Path) -> dict[str, str]:
    """``{relative file name: caption}`` from a ``metadata.jsonl``."""
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DifftuneError(f"{path}, line {n}: not valid JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DifftuneError(f'{path}, line {n}: expected an object with a "file_name" string, got {line[:80]!r}')
        text = row.get("text", row.get("caption"))
        if text is None:
            continue
        if not isinstance(text, str):
            raise DifftuneError(f'{path}, line {n}: "text"/"caption" must be a string, got {text!r}')
        captions[Path(row["file_name"]).as_posix().removeprefix("./")] = text
    return captions
