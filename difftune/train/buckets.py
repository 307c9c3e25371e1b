"""Aspect-ratio buckets (``data.buckets: true``): photos of any shape train at their own aspect ratio.

The buckets are every (width, height) with both sides multiples of ``data.bucket_step`` in
``[data.bucket_min_size, data.bucket_max_size]`` whose area is the largest that stays within ``data.resolution²``
(kohya sd-scripts' scheme). Each image goes to the bucket whose aspect ratio is nearest its own (in log scale, so
2:1 and 1:2 are as far from 1:1), is resized, keeping its aspect ratio, to the smallest size that covers the
bucket, and the small excess is cropped: an image is never stretched. An image whose crop would cut more than
``data.bucket_max_crop`` of a side fits no bucket and is refused.

`BucketBatchSampler` makes batches that each hold one bucket; like `build.EpochBatchSampler` its order is a pure
function of (seed, epoch), so a resumed run sees the batches the uninterrupted run saw.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..errors import DifftuneError, bad_value

Size = tuple[int, int]  #: (width, height) in pixels


def make_buckets(resolution: int, min_size: int, max_size: int, step: int) -> list[Size]:
    """The buckets for target area ``resolution²`` (``data.resolution``, checked by `DataConfig` to lie within
    ``[min_size, max_size]``), sorted by aspect ratio (width / height).

    Raises:
        DifftuneError: no bucket exists for these settings (naming the key).
    """
    area = resolution * resolution
    found: set[Size] = set()
    for w in range(min_size, resolution + 1, step):  # the tall buckets (and the square); the wide ones mirror them
        h = min(max_size, (area // w) // step * step)  # the tallest bucket of width w within the target area
        if h >= w:
            found.add((w, h))
            found.add((h, w))
    if not found:
        raise bad_value("data.bucket_step", step, f"a step that fits a bucket between data.bucket_min_size "
                        f"({min_size}) and data.bucket_max_size ({max_size}) for data.resolution {resolution}")
    return sorted(found, key=lambda s: (s[0] / s[1], s[0]))


def image_size(path: Path) -> Size:
    """(width, height) of the image at ``path`` as training sees it (after its EXIF rotation), from its header."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that rotate by 90 degrees
            w, h = h, w
    return w, h


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``size``'s (ties: the first, the narrower)."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def cover_size(size: Size, bucket: Size) -> Size:
    """The size ``size`` is resized to, keeping its aspect ratio, to cover ``bucket`` with the least excess."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def crop_fraction(size: Size, bucket: Size) -> float:
    """The share of its longer-relative side an image of ``size`` loses when cropped to ``bucket``."""
    w, h = cover_size(size, bucket)
    return max(1 - bucket[0] / w, 1 - bucket[1] / h)


def assign(paths: Sequence[Path], buckets: Sequence[Size], max_crop: float, root: Path) -> list[int]:
    """The bucket index of each image.

    Raises:
        DifftuneError: an image fits no bucket (its crop would exceed ``max_crop``), naming ``data.buckets``.
    """
    known: dict[Path, int] = {}  # an image repeated (data.repeats) is read once
    for p in paths:
        if p in known:
            continue
        size = image_size(p)
        i = nearest_bucket(size, buckets)
        cut = crop_fraction(size, buckets[i])
        if cut > max_crop:
            lo, hi = buckets[0], buckets[-1]
            raise bad_value("data.buckets", True, "a bucket for every image", (
                f"{p.relative_to(root).as_posix()} is {size[0]}x{size[1]} (aspect {size[0] / size[1]:.2f}); the "
                f"nearest bucket {buckets[i][0]}x{buckets[i][1]} would crop {cut:.0%} of it, more than "
                f"data.bucket_max_crop={max_crop}. The buckets span aspect {lo[0] / lo[1]:.2f} to "
                f"{hi[0] / hi[1]:.2f}: "
                "lower data.bucket_min_size / raise data.bucket_max_size, raise data.bucket_max_crop, or crop "
                "the image"))
        known[p] = i
    return [known[p] for p in paths]


def describe(buckets: Sequence[Size], bucket_of: Sequence[int]) -> str:
    """One line of bucket statistics: images per used bucket, widest first."""
    counts = Counter(bucket_of)
    parts = [f"{buckets[i][0]}x{buckets[i][1]}: {n}" for i, n in sorted(counts.items())]
    return f"{len(bucket_of)} image(s) in {len(counts)} of {len(buckets)} bucket(s) (WxH: images): " + ", ".join(parts)


class BucketBatchSampler:
    """Batches of dataset indices for one process, each batch from one bucket.

    Epoch e draws from ``torch.Generator().manual_seed(seed + e)``: each bucket's indices are permuted and cut into
    batches (a bucket's last batch wraps around within the bucket, so every batch is full), then the batches are
    shuffled together and dealt to the processes in turn (wrapping around so each process gets as many).
    ``set_epoch(epoch, start)`` skips the first ``start`` batches, as `build.EpochBatchSampler` does.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        if not bucket_of:
            raise DifftuneError("no images to put in buckets")
        self.bucket_of, self.batch_size = list(bucket_of), batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.members: dict[int, list[int]] = {}
        for index, b in enumerate(self.bucket_of):
            self.members.setdefault(b, []).append(index)
        self.n_batches = sum(math.ceil(len(m) / batch_size) for m in self.members.values())
        self.per_epoch = math.ceil(self.n_batches / num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_epoch - self.start

    def batches(self) -> list[list[int]]:
        """Every batch of the current epoch, across processes, in the order they are dealt."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for b in sorted(self.members):
            idx = self.members[b]
            perm = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
            total = math.ceil(len(perm) / self.batch_size) * self.batch_size
            perm = (perm * math.ceil(total / len(perm)))[:total]
            batches += [perm[i:i + self.batch_size] for i in range(0, total, self.batch_size)]
        order = torch.randperm(len(batches), generator=gen).tolist()
        dealt = [batches[i] for i in order]
        total = self.per_epoch * self.num_replicas
        return (dealt * math.ceil(total / len(dealt)))[:total]

    def __iter__(self) -> Iterator[list[int]]:
        dealt = self.batches()
        for b in range(self.start, self.per_epoch):
            yield dealt[b * self.num_replicas + self.rank]
