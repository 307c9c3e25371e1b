"""Image datasets for fine-tuning: captioned folders, class folders and DreamBooth instance/class pairs.

Augmentation is a pure function of ``(seed, epoch, index)``: each item draws from its own
``np.random.default_rng([seed, epoch, index])``, never from a global RNG, so a resumed run sees bit-identical batches
whatever the dataloader's worker count or prefetching. Call ``set_epoch`` at the start of every epoch (on the
dataset the workers use: with ``persistent_workers`` the workers keep the epoch they were started with).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..errors import DifftuneError, bad_value
from .buckets import assign
from .captions import CaptionOptions, process_caption, read_metadata
from .masks import find_masks, mask_item

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def preprocess(
    image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """A PIL image as a float32 ``(3, resolution, resolution)`` tensor in ``[-1, 1]``: `preprocess_geometry` at a
    square size, without the geometry."""
    return preprocess_geometry(image, (resolution, resolution), center_crop, random_flip, rng)[0]


def preprocess_geometry(
    image: Image.Image, size: tuple[int, int], center_crop: bool, random_flip: bool, rng: np.random.Generator
) -> tuple[torch.Tensor, tuple[int, int, int, int], bool]:
    """Resize ``image`` (any mode; converted to RGB), keeping its aspect ratio, to just cover ``size`` = (width,
    height) (Lanczos); crop the center, else at offsets drawn from ``rng``; then flip horizontally with probability
    0.5 when ``random_flip``, drawn from ``rng`` after the offsets.

    Returns:
        The float32 tensor ``(3, height, width)`` in ``[-1, 1]`` and the geometry SDXL conditions on:
        ``(original height, original width, crop top, crop left)``, the crop's offsets in the resized image
        (measured from the right edge when flipped, so they describe the flipped image the model sees), and
        whether it was flipped (`cache` keeps both orientations' latents and picks by it).
    """
    image = image.convert("RGB")
    out_w, out_h = size
    orig_w, orig_h = image.size
    scale = max(out_w / orig_w, out_h / orig_h)
    w, h = max(out_w, round(orig_w * scale)), max(out_h, round(orig_h * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    if center_crop:
        left, top = (w - out_w) // 2, (h - out_h) // 2
    else:
        left, top = int(rng.integers(0, w - out_w + 1)), int(rng.integers(0, h - out_h + 1))
    image = image.crop((left, top, left + out_w, top + out_h))
    flipped = bool(random_flip and rng.random() < 0.5)
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = w - left - out_w
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), (orig_h, orig_w, top, left), flipped


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except _UNREADABLE as e:
        raise DifftuneError(f"cannot read image {path}: {e}. It was readable when the dataset was built") from e


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() alone passes truncated JPEGs that fail later, mid-training
    except _UNREADABLE:
        return False
    return True


def _check_int(field: str, value: object, minimum: int, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise bad_value(field, value, expected)
    return int(value)


def _check_resolution(resolution: object) -> int:
    expected = "a positive integer multiple of 8"
    res = _check_int("data.resolution", resolution, 1, expected)
    if res % 8:
        raise bad_value("data.resolution", resolution, expected, f"try {max(8, res // 8 * 8)}")
    return res


#: the folders `difftune zoo data` writes (difftune/zoo/mnist.py), named in the error for a missing one
ZOO_DATA = ("pretrain-captions", "pretrain-classes", "subject-nine", "style-bold", "style-bold-reg", "heldout")


def check_dir(root: str | os.PathLike[str], field: str) -> Path:
    """``root`` as a Path if it is an existing folder; a `DifftuneError` naming config ``field`` otherwise."""
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "does not exist"
        hint = f"{path} {what}"
        if not path.exists() and path.parent.name == "data" and path.name in ZOO_DATA:
            # a folder the shipped sd-mini/dit-mini recipes use: say which command writes it
            hint += f"; the shipped recipes' data is written by `difftune zoo data --out {path.parent}`"
        raise bad_value(field, str(path), "an existing folder of images", hint)
    return path


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, skipping hidden files and folders), sorted by relative path."""
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(s.startswith(".") for s in rel.parts):
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _readable(paths: list[Path], root: Path, field: str) -> list[Path]:
    """Drop unreadable images with one warning; error when none are left."""
    ok = {p: _is_readable(p) for p in paths}
    good = [p for p in paths if ok[p]]
    bad = [p.relative_to(root).as_posix() for p in paths if not ok[p]]
    if bad:
        more = ", ..." if len(bad) > 3 else ""
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {root}: {', '.join(bad[:3])}{more}", stacklevel=3)
    if not good:
        raise DifftuneError(
            f"no usable images in {root} (`{field}`): found {len(paths)} file(s) with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}, {len(bad)} unreadable. Put readable images in the folder or fix `{field}`"
        )
    return good


class ImageDataset(Dataset):
    """A list of records ``{"path": Path, **fields}`` turned into augmented tensors.

    ``item i`` is ``{"pixel_values": Tensor(3, res, res), **fields, "index": i, "original_size": (h, w),
    "crop_top_left": (top, left)}`` (the last two LongTensors: the geometry SDXL's ``time_ids`` carry). After
    `use_buckets`, item i's pixels have its bucket's shape instead.
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        self.resolution = _check_resolution(resolution)
        self.repeats = _check_int("data.repeats", repeats, 1, "an integer >= 1")
        self.seed = _check_int("seed", seed, 0, "a non-negative integer")
        self.center_crop, self.random_flip = bool(center_crop), bool(random_flip)
        self.records = list(records) * self.repeats
        self.epoch = 0
        self.buckets: list[tuple[int, int]] | None = None  #: (width, height) of each bucket, after `use_buckets`
        self.bucket_of: list[int] | None = None  #: each item's bucket index, after `use_buckets`
        self.caption_options = CaptionOptions()  #: kohya-style tag handling (`difftune.train.captions`)
        self.masks: dict[Path, Path] | None = None  #: each image's loss mask, after `use_masks`
        #: the index of item 0 in the whole data set when this folder is one of several (`folders.ConcatFolders`):
        #: items report their index in the whole and draw from its generator, so no two folders share a stream
        self.offset = 0

    def use_buckets(self, buckets: Sequence[tuple[int, int]], max_crop: float, root: Path) -> None:
        """Give each item the bucket nearest its image's aspect ratio (`difftune.train.buckets.assign`: raises a
        `DifftuneError` naming ``data.buckets`` for an image that fits none)."""
        self.bucket_of = assign([r["path"] for r in self.records], buckets, max_crop, root)
        self.buckets = list(buckets)

    def use_masks(self, mask_root: Path, root: Path, field: str = "data.masks") -> None:
        """Give each item its image's mask (``"mask"``: (1, H, W) in [0, 1]; `difftune.train.masks`)."""
        self.masks = find_masks([r["path"] for r in self.records], root, mask_root, find_images(mask_root), field)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the item index, determines the augmentation."""
        self.epoch = _check_int("epoch", epoch, 0, "a non-negative integer")

    def captions(self) -> list[str]:
        """The distinct captions of the items, sorted (empty for class folders)."""
        return sorted({r["caption"] for r in self.records if "caption" in r})

    def rng(self, index: int) -> np.random.Generator:
        """The generator for item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, self.offset + index])

    def pixels(self, path: Path, rng: np.random.Generator) -> torch.Tensor:
        """Load and augment one image (at the square resolution)."""
        return preprocess(_load_image(path), self.resolution, self.center_crop, self.random_flip, rng)

    def augmented(self, index: int, path: Path, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Item ``index``'s image at its size (its bucket's, else the square resolution) and its geometry."""
        size = (self.resolution,) * 2 if self.bucket_of is None else self.buckets[self.bucket_of[index]]
        pixels, (h, w, top, left), flipped = preprocess_geometry(_load_image(path), size, self.center_crop,
                                                                 self.random_flip, rng)
        return {"pixel_values": pixels, "original_size": torch.tensor([h, w]),
                "crop_top_left": torch.tensor([top, left]), "flipped": torch.tensor(flipped)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} item(s)")
        index %= len(self)
        record = self.records[index]
        item = self.augmented(index, record["path"], self.rng(index))
        item.update((k, v) for k, v in record.items() if k != "path")
        if self.masks is not None:  # the image's resize, crop and flip: the item's generator replayed
            mask = self.augmented(index, self.masks[record["path"]], self.rng(index))
            item["mask"] = mask_item(mask["pixel_values"])
        if "caption" in item and self.caption_options.active:  # a stream of its own: the pixels stay as they were
            rng = np.random.default_rng([self.seed, self.epoch, self.offset + index, 1])
            item["caption"] = process_caption(item["caption"], self.caption_options, rng)
        item["index"] = self.offset + index
        return item


class CaptionFolder(ImageDataset):
    """Images with captions from ``metadata.jsonl``, else a sidecar file, else ``default_caption``.

    Items: ``{"pixel_values", "caption", "index"}``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_ext: str = ".txt",
        default_caption: str | None = None,
        repeats: int = 1,
        seed: int = 0,
        field: str = "data.path",
    ) -> None:
        self.root = check_dir(root, field)
        paths = _readable(find_images(self.root), self.root, field)
        meta_path = self.root / "metadata.jsonl"
        meta = read_metadata(meta_path) if meta_path.is_file() else {}
        ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"
        records, missing = [], []
        for p in paths:
            rel, sidecar = p.relative_to(self.root).as_posix(), p.with_suffix(ext)
            if rel in meta:
                caption = meta[rel]
            elif sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8").strip()
            elif default_caption is not None:
                caption = default_caption
            else:
                missing.append(rel)
                continue
            records.append({"path": p, "caption": caption})
        if missing:
            more = ", ..." if len(missing) > 3 else ""
            raise DifftuneError(
                f"no caption for {len(missing)} image(s) in {self.root}: {', '.join(missing[:3])}{more}. "
                f"Add a {ext} file with the same name next to each image (or a metadata.jsonl), "
                "or set `default_caption` / `instance_prompt`"
            )
        super().__init__(records, resolution, center_crop, random_flip, repeats, seed)


class ClassFolder(ImageDataset):
    """One subfolder per class; integer folder names are the labels, else the sorted position is.

    Items: ``{"pixel_values", "class_label", "index"}``. ``class_names`` maps label -> folder name.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        seed: int = 0,
        field: str = "data.path",
    ) -> None:
        self.root = check_dir(root, field)
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise DifftuneError(
                f"no usable images in {self.root} (`{field}`): no class subfolders. "
                "Put each class's images in its own subfolder (named by label, e.g. 0/ 1/, or by class name)"
            )
        if all(re.fullmatch(r"\d+", name) for name in folders):
            labels = {name: int(name) for name in folders}
            if len(set(labels.values())) != len(labels):
                raise bad_value(field, folders, "class folders with distinct integer names", "e.g. 3 and 03 clash")
        else:
            labels = {name: i for i, name in enumerate(folders)}
        self.class_names: dict[int, str] = {label: name for name, label in sorted(labels.items(), key=lambda x: x[1])}
        found = [(p, label) for label, name in self.class_names.items() for p in find_images(self.root / name)]
        readable = set(_readable([p for p, _ in found], self.root, field))
        records = [{"path": p, "class_label": label} for p, label in found if p in readable]
        super().__init__(records, resolution, center_crop, random_flip, repeats, seed)


class DreamBoothDataset(Dataset):
    """Instance images with one prompt, optionally paired with class images for prior preservation.

    Items: ``{"pixel_values", "caption", "index"}``, plus ``"class_pixel_values"`` and ``"class_caption"`` when
    class images are given. Item ``i`` uses instance ``i % n_instances`` and class image ``i % n_class``.
    """

    def __init__(
        self,
        instance_root: str | os.PathLike[str],
        instance_prompt: str,
        resolution: int,
        class_root: str | os.PathLike[str] | None = None,
        class_prompt: str | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        seed: int = 0,
        field: str = "data.path",
        class_field: str = "data.class_path",
    ) -> None:
        if not isinstance(instance_prompt, str) or not instance_prompt.strip():
            raise bad_value("instance_prompt", instance_prompt, "a non-empty string", "e.g. 'a photo of sks dog'")
        root = check_dir(instance_root, field)
        inst = [{"path": p, "caption": instance_prompt} for p in _readable(find_images(root), root, field)]
        self.instances = ImageDataset(inst, resolution, center_crop, random_flip, repeats, seed)
        self.classes: ImageDataset | None = None
        if class_root is not None:
            if not isinstance(class_prompt, str) or not class_prompt.strip():
                hint = f"set it (e.g. 'a photo of a dog') or unset `{class_field}`"
                raise bad_value("class_prompt", class_prompt, "a non-empty string when class images are given", hint)
            croot = check_dir(class_root, class_field)
            cls = [{"path": p, "caption": class_prompt} for p in _readable(find_images(croot), croot, class_field)]
            self.classes = ImageDataset(cls, resolution, center_crop, random_flip, 1, seed)

    #: as `ImageDataset.offset`: item 0's index in the whole data set (kept by the instances, whose generator uses it)
    offset = property(lambda self: self.instances.offset, lambda self, v: setattr(self.instances, "offset", v))

    def __len__(self) -> int:
        n = len(self.instances)
        return max(n, len(self.classes)) if self.classes is not None else n

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the item index, determines the augmentation."""
        self.instances.set_epoch(epoch)
        if self.classes is not None:
            self.classes.set_epoch(epoch)

    def captions(self) -> list[str]:
        """The distinct captions (instance prompt, class prompt), sorted."""
        return sorted(set(self.instances.captions()) | set(self.classes.captions() if self.classes else []))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} item(s)")
        index %= len(self)
        rng = self.instances.rng(index)  # one stream per item: instance draws first, then the class image
        i = index % len(self.instances)
        item = {**self.instances.augmented(i, self.instances.records[i]["path"], rng),
                "caption": self.instances.records[i]["caption"], "index": self.offset + index}
        if self.classes is not None:
            c = index % len(self.classes)
            item.update((f"class_{k}", v) for k, v in self.classes.augmented(c, self.classes.records[c]["path"],
                                                                             rng).items())
            item["class_caption"] = self.classes.records[c]["caption"]
        return item


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: stack tensors, list strings, turn ``class_label`` and ``index`` (ints) into LongTensors.

    DreamBooth's instance and class parts stay under separate keys; the trainer concatenates them.
    """
    if not examples:
        raise bad_value("examples", examples, "a non-empty list of dataset items")
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values).contiguous()
        elif key in ("class_label", "index") or all(isinstance(v, (int, np.integer)) for v in values):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            batch[key] = list(values)
    return batch
