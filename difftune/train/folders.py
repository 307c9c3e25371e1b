"""The image data set of a run: one folder (``data.path``) or several (``data.datasets``) trained as one.

Each folder (`dataconfig.DatasetEntry`) is read with its own repeats, caption suffix, default caption, masks and
DreamBooth prompts and class images; `ConcatFolders` then lines them up, folder after folder. Item ``i`` of the
whole reports index ``i`` and draws its augmentation from ``(seed, epoch, i)``, so the order, the augmentation, the
latent cache keys and exact resume work across folders as within one; with buckets, every folder's images go to the
same buckets and `buckets.BucketBatchSampler` batches (and deals to the DDP processes) the whole.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DifftuneError, bad_value
from ..families import Family
from .buckets import make_buckets
from .captions import CaptionOptions
from .config import TrainConfig
from .data import CaptionFolder, ClassFolder, DreamBoothDataset, ImageDataset, check_dir
from .dataconfig import DatasetEntry


class ConcatFolders(Dataset):
    """Several folders' data sets as one: item ``i`` is item ``i - offset`` of the folder holding it, with
    ``offset`` (that folder's ``offset``) the number of items of the folders before it."""

    def __init__(self, parts: list[Any]) -> None:
        if not parts:
            raise DifftuneError("no image folders to train on")
        self.parts, self.starts, total = list(parts), [], 0
        for part in self.parts:
            part.offset = total
            self.starts.append(total)
            total += len(part)
        self.total = total
        bucketed = [getattr(p, "bucket_of", None) is not None for p in self.parts]
        self.buckets = self.parts[0].buckets if all(bucketed) else None
        self.bucket_of = [b for p in self.parts for b in p.bucket_of] if all(bucketed) else None
        #: some folders have masks: the items of the others get a mask of ones (all of the image trains), so every
        #: batch has one
        self.masked = any(getattr(p, "masks", None) is not None for p in self.parts)

    @property
    def caption_options(self) -> CaptionOptions:
        return self.parts[0].caption_options

    @caption_options.setter
    def caption_options(self, options: CaptionOptions) -> None:
        for part in self.parts:
            part.caption_options = options

    def __len__(self) -> int:
        return self.total

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def captions(self) -> list[str]:
        """The distinct captions of every folder, sorted."""
        return sorted({c for part in self.parts for c in part.captions()})

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} item(s)")
        index %= len(self)
        k = bisect.bisect_right(self.starts, index) - 1
        item = self.parts[k][index - self.starts[k]]
        if self.masked and "mask" not in item:
            item["mask"] = torch.ones((1, *item["pixel_values"].shape[1:]))
        return item


def build_folders(cfg: TrainConfig, family: Family) -> Any:
    """The data set of ``data.kind`` captions, classes or dreambooth: each of ``cfg.data.entries()`` read (with
    buckets and masks as asked), several lined up by `ConcatFolders`; one folder is returned as it is."""
    d = cfg.data
    common = {"resolution": d.resolution, "center_crop": d.center_crop, "random_flip": d.random_flip,
              "seed": cfg.seed}
    buckets = _buckets(cfg, family) if d.buckets else None
    parts = []
    for e in d.entries():
        path_key = e.key_of("path")
        if d.kind == "dreambooth":
            part = DreamBoothDataset(e.path, e.instance_prompt, class_root=e.class_path, class_prompt=e.class_prompt,
                                     repeats=e.repeats, field=path_key, class_field=e.key_of("class_path"), **common)
        elif d.kind == "classes":
            part = ClassFolder(e.path, repeats=e.repeats, field=path_key, **common)
        else:
            part = CaptionFolder(e.path, caption_ext=e.caption_extension, default_caption=e.default_caption,
                                 repeats=e.repeats, field=path_key, **common)
        if buckets is not None:
            part.use_buckets(buckets, d.bucket_max_crop, part.root)
        if e.masks:
            part.use_masks(check_dir(e.masks, e.key_of("masks")), part.root, e.key_of("masks"))
        parts.append(part)
    if d.kind == "classes":
        _check_labels(parts, d.entries())
    dataset = parts[0] if len(parts) == 1 else ConcatFolders(parts)
    if d.kind == "captions":
        dataset.caption_options = CaptionOptions(d.shuffle_caption, d.keep_tokens, d.caption_tag_dropout)
    return dataset


def _buckets(cfg: TrainConfig, family: Family) -> list[tuple[int, int]]:
    """The buckets of ``data.buckets`` (`difftune.train.buckets`), checked against the pipeline."""
    d = cfg.data
    scale = int(getattr(family.pipe, "vae_scale_factor", 8))
    if d.bucket_step % scale:
        raise bad_value("data.bucket_step", d.bucket_step, f"a multiple of the VAE's scale factor {scale}",
                        "each bucket's latents must have whole sides")
    if cfg.train.objective == "autoencode":
        raise bad_value("data.buckets", True, "false with train.objective autoencode",
                        "the VAE's latent scale is measured on same-sized images")
    if type(getattr(family.pipe, "transformer", None)).__name__ == "DiTTransformer2DModel":
        raise bad_value("data.buckets", True, "false for a DiT transformer",
                        "diffusers' DiTTransformer2DModel un-patchifies its output as a square (height = width), so "
                        "DiT trains at the square data.resolution; several folders (data.datasets) still work")
    return make_buckets(d.resolution, d.bucket_min_size, d.bucket_max_size, d.bucket_step)


def _check_labels(parts: list[ImageDataset], entries: list[DatasetEntry]) -> None:
    """Class folders of several data sets must agree on which name each label is (a label is one class)."""
    names: dict[int, tuple[str, str]] = {}
    for part, e in zip(parts, entries):
        for label, name in part.class_names.items():
            seen = names.setdefault(label, (name, e.key))
            if seen[0] != name:
                raise bad_value(e.key_of("path"), e.path, f"class folders whose label {label} is {seen[0]!r} as "
                                f"in {seen[1]}", f"its folder {name!r} has label {label}: name the class folders "
                                "by their integer labels (0/, 1/, ...) or give every data set the same classes")
