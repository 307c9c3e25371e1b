"""Masked loss (``data.masks``): a grayscale mask per training image weights the loss in latent space.

The mask of ``photos/a.jpg`` is ``<data.masks>/a.<any image extension>`` (the same relative name), of the image's own
size: white trains, black is ignored, grey weighs in between. It gets the image's resize, crop and flip (its item's
generator replayed, as `control.ControlFolder` does for condition images), is area-averaged down to the latents'
size, and multiplies the squared error elementwise (kohya sd-scripts' ``masked_loss``): a masked region gives the
loss no gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DifftuneError
from .buckets import image_size


def find_masks(paths: list[Path], root: Path, mask_root: Path, masks: list[Path],
               field: str = "data.masks") -> dict[Path, Path]:
    """``{image: its mask}`` for every image (relative to ``root``) from ``masks``, the images in ``mask_root``.

    Raises:
        DifftuneError: naming ``field`` (``data.masks``, ``data.datasets[i].masks``): an image without a mask, or a
            mask whose size differs from its image's.
    """
    by_stem = {p.relative_to(mask_root).with_suffix("").as_posix(): p for p in masks}
    found, missing, wrong = {}, [], []
    for p in dict.fromkeys(paths):
        stem = p.relative_to(root).with_suffix("").as_posix()
        if stem not in by_stem:
            missing.append(stem)
            continue
        if image_size(by_stem[stem]) != image_size(p):
            wrong.append(f"{by_stem[stem].relative_to(mask_root).as_posix()} is "
                         f"{'x'.join(map(str, image_size(by_stem[stem])))}, its image "
                         f"{p.relative_to(root).as_posix()} {'x'.join(map(str, image_size(p)))}")
            continue
        found[p] = by_stem[stem]
    if missing:
        raise DifftuneError(f"`{field}`: no mask in {mask_root} for {len(missing)} image(s), e.g. {missing[:3]}. "
                            "Give each image a grayscale mask with the same name (white: train, black: ignore)")
    if wrong:
        raise DifftuneError(f"`{field}`: {len(wrong)} mask(s) in {mask_root} differ in size from their image: "
                            f"{'; '.join(wrong[:3])}. A mask must have its image's width and height")
    return found


def mask_item(pixels: Tensor) -> Tensor:
    """The augmented mask image (3, H, W) in [-1, 1] as a (1, H, W) weight in [0, 1]."""
    return ((pixels[:1] + 1.0) / 2.0).clamp(0.0, 1.0)


def latent_mask(batch: dict[str, Any], latents: Tensor) -> Tensor | None:
    """The batch's masks (B, 1, H, W) area-averaged to the latents' (h, w); None when the batch has no masks."""
    if "mask" not in batch:
        return None
    mask = batch["mask"].to(latents.device, torch.float32)
    return F.interpolate(mask, size=latents.shape[-2:], mode="area")
