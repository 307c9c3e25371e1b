"""``data.cache_latents`` / ``data.cache_text_embeddings``: the frozen encoders run once per item, before training.

The caches are filled before the first step, in index order and in chunks of ``train.batch_size`` (the last chunk
wraps around, so every VAE call has the shape of a training batch), whatever step the run starts or resumes from.
A cached value is then a function of the data and the encoders only: a resumed run reads exactly what the
uninterrupted run read. (Filled lazily from the training batches, a resumed run re-encoded in other batches than
the uninterrupted run, and the cached and fresh posteriors had different memory layouts, which changed the random
draws: issue 19.)

Cached latents are the posterior's mean and std; a fresh sample is drawn every step (`loss._latents`), as without
the cache. Only the encoder passes are saved. With ``data.random_flip`` each image is cached in both orientations
(the flipped one is the VAE's encoding of the mirrored pixels), and each step takes the one its item drew.

``data.cache_latents: disk`` keeps them in files too (`LatentStore`), so the next run reads them instead of
encoding. A file is keyed by the encoder's exact input (the image's pixels after their resize, crop and flip at
their bucket, so the image's content, the resolution and the bucket) under a folder keyed by the VAE's encoder
weights: an edited image, another resolution or bucket, or another VAE misses the cache, never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DifftuneError
from ..fileio import atomic_write
from .config import TrainConfig
from .data import collate
from .loss import Frozen, encode_posterior

VERSION = 1  #: part of every key: bump when the preprocessing or the stored format changes
logger = logging.getLogger("difftune.train")


def fill_caches(cfg: TrainConfig, frozen: Frozen, dataset: Any, device: torch.device) -> None:
    """Encode, as ``cfg.data`` asks, every caption of ``dataset`` (text families; the empty caption too when
    ``data.label_dropout`` is on) and every image (DreamBooth: and class image) once."""
    d = cfg.data
    if d.cache_text_embeddings and frozen.family.conditioning == "text":
        captions = sorted(set(dataset.captions()) | ({""} if d.label_dropout > 0 else set()))
        chunk = cfg.train.batch_size
        for i in range(0, len(captions), chunk):
            part = captions[i:i + chunk]
            enc = frozen.family.encode(part, device)
            for j, c in enumerate(part):
                frozen.text_cache[c] = {k: v[j].cpu() for k, v in enc.items()}
    if d.cache_latents:
        store = LatentStore(cache_root(d.cache_dir), frozen.pipe.vae) if d.cache_latents == "disk" else None
        _fill_latents(frozen, dataset, cfg.train.batch_size, d.num_workers, cfg.seed, d.random_flip, store)


def cache_root(cache_dir: str | None) -> Path:
    """``data.cache_dir``, else ``$XDG_CACHE_HOME/difftune/latents`` (``~/.cache/difftune/latents``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "difftune" / "latents"


def vae_fingerprint(vae: nn.Module) -> str:
    """A hash of what the VAE's posterior depends on: its encoder weights (names, dtypes, values) and config."""
    h = hashlib.sha256(f"difftune latents v{VERSION}".encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class LatentStore:
    """Posteriors on disk: ``<root>/<vae fingerprint>/<key[:2]>/<key>.safetensors`` holding ``mean`` and ``std``,
    ``key`` the hash of one image's encoder input (`key`). Written atomically; concurrent writers (DDP ranks)
    write the same bytes."""

    def __init__(self, root: Path, vae: nn.Module) -> None:
        self.folder = root / vae_fingerprint(vae)

    @staticmethod
    def key(pixels: Tensor) -> str:
        """The hash of one image's pixels (3, H, W) as the VAE receives them."""
        px = pixels.detach().cpu().float().contiguous()
        h = hashlib.sha256(f"v{VERSION} {tuple(px.shape)}".encode())
        h.update(px.numpy().tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        """The stored (mean, std), or None when the image was never encoded with this VAE."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            t = load_file(path)
            return t["mean"], t["std"]
        except (SafetensorError, KeyError, OSError) as e:
            raise DifftuneError(f"the latent cache file {path} is unreadable ({e}); delete it (or the folder "
                                f"{self.folder}) and the next run encodes the image again") from e

    def put(self, key: str, mean: Tensor, std: Tensor) -> None:
        atomic_write(self.path(key), lambda tmp: save_file({"mean": mean.contiguous(), "std": std.contiguous()},
                                                           tmp))


def _fill_latents(frozen: Frozen, dataset: Any, chunk: int, num_workers: int, seed: int, flip: bool,
                  store: LatentStore | None) -> None:
    n = len(dataset)
    logger.info("caching the VAE posterior of %d item(s)%s", n, f" in {store.folder}" if store else "")
    # with buckets, a chunk holds one bucket's items (a VAE call takes one image size), wrapping within the bucket
    of = getattr(dataset, "bucket_of", None) or [0] * n
    groups = [[i for i in range(n) if of[i] == b] for b in sorted(set(of))]
    chunks = [[g[(i + k) % len(g)] for k in range(chunk)] for g in groups for i in range(0, len(g), chunk)]
    # its own generator: the global RNG is not touched (a DataLoader iterator draws a seed from it otherwise)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, collate_fn=collate, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        for prefix in ("", "class_"):
            if f"{prefix}pixel_values" not in batch:
                continue
            pixels = batch[f"{prefix}pixel_values"]
            if f"{prefix}flipped" in batch:  # the unflipped pixels: the item may have drawn a flip
                pixels = torch.where(batch[f"{prefix}flipped"].view(-1, 1, 1, 1), pixels.flip(-1), pixels)
            for flag in (0, 1) if flip else (0,):
                _cache_chunk(frozen, store, prefix, flag, batch["index"].tolist(),
                             pixels.flip(-1) if flag else pixels)


def _cache_chunk(frozen: Frozen, store: LatentStore | None, prefix: str, flag: int, indices: list[int],
                 pixels: Tensor) -> None:
    """Cache one chunk's posteriors: read from ``store`` where it has them, else encoded (the whole chunk, in
    one VAE call of a training batch's shape) and written to it."""
    todo = {}
    for j, index in enumerate(indices):
        if (prefix, index, flag) in frozen.latent_cache or index in todo:
            continue
        found = store.get(key := store.key(pixels[j])) if store else None
        if found is not None:
            frozen.latent_cache[(prefix, index, flag)] = found
        else:
            todo[index] = (j, key if store else None)
    if not todo:
        return
    mean, std = encode_posterior(frozen.pipe.vae, pixels)
    for index, (j, key) in todo.items():
        m, s = mean[j].cpu().clone(), std[j].cpu().clone()
        frozen.latent_cache[(prefix, index, flag)] = (m, s)
        if store:
            store.put(key, m, s)
