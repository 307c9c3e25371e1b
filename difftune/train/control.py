"""Captioned images paired with condition images, for SCEdit's CSC-Tuner (``data.kind: control``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import DifftuneError, bad_value
from .data import CaptionFolder, check_dir, find_images


class ControlFolder(CaptionFolder):
    """Captioned images with a condition image each (SCEdit's CSC-Tuner; ``data.kind: control``).

    The condition is read from ``condition_path`` (the same relative file name, any image extension) or extracted
    from the augmented image by ``condition`` (a `difftune.methods.scedit.EXTRACTORS` name, e.g. "canny"). A read
    condition gets the image's own crop and flip (the same per-item generator drives both).

    Items: ``{"pixel_values", "control": Tensor(3, res, res) in [0, 1], "caption", "index"}``.
    """

    def __init__(self, root: str | os.PathLike[str], resolution: int, condition: str | None = None,
                 condition_path: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        from ..methods.scedit.conditions import EXTRACTORS

        if (condition is None) == (condition_path is None):
            raise bad_value("data.condition/data.condition_path", (condition, condition_path),
                            "exactly one: an extractor name or a folder of condition images",
                            f"extractors: {sorted(EXTRACTORS)}")
        if condition is not None and condition not in EXTRACTORS:
            raise bad_value("data.condition", condition, f"one of {sorted(EXTRACTORS)}")
        super().__init__(root, resolution, **kwargs)
        self.condition = condition
        if condition_path is not None:
            cond_root = check_dir(condition_path, "data.condition_path")
            by_stem = {p.relative_to(cond_root).with_suffix("").as_posix(): p for p in find_images(cond_root)}
            missing = []
            for r in self.records:
                stem = r["path"].relative_to(self.root).with_suffix("").as_posix()
                if stem in by_stem:
                    r["condition_path"] = by_stem[stem]
                else:
                    missing.append(stem)
            if missing:
                raise DifftuneError(f"no condition image in {cond_root} (`data.condition_path`) for {len(missing)} "
                                    f"image(s), e.g. {missing[:3]}: give each image one with the same name")

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        record = self.records[item["index"]]
        if self.condition is not None:
            from ..methods.scedit.conditions import extract, to_tensor

            rgb = ((item["pixel_values"].permute(1, 2, 0).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
            item["control"] = to_tensor(extract(self.condition, rgb))[0]
        else:  # the image's crop and flip: the item's generator replayed from the start
            item["control"] = (self.pixels(record["condition_path"], self.rng(item["index"])) + 1.0) / 2.0
        item.pop("condition_path", None)
        return item
