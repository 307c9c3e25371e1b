"""``data.cache_latents`` / ``data.cache_text_embeddings``: the frozen encoders run once per item, before training.

The caches are filled before the first step, in index order and in chunks of ``train.batch_size`` (the last chunk
wraps around, so every VAE call has the shape of a training batch), whatever step the run starts or resumes from.
A cached value is then a function of the data and the encoders only: a resumed run reads exactly what the
uninterrupted run read. (Filled lazily from the training batches, a resumed run re-encoded in other batches than
the uninterrupted run, and the cached and fresh posteriors had different memory layouts, which changed the random
draws: issue 19.)

Cached latents are the posterior's mean and std; a fresh sample is drawn every step (`loss._latents`), as without
the cache. Only the encoder passes are saved.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import TrainConfig
from .data import collate
from .loss import Frozen, encode_posterior

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
        _fill_latents(frozen, dataset, cfg.train.batch_size, d.num_workers, cfg.seed)


def _fill_latents(frozen: Frozen, dataset: Any, chunk: int, num_workers: int, seed: int) -> None:
    n = len(dataset)
    logger.info("caching the VAE posterior of %d item(s)", n)
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
            mean, std = encode_posterior(frozen.pipe.vae, batch[f"{prefix}pixel_values"])
            for index, m, s in zip(batch["index"].tolist(), mean.cpu(), std.cpu()):
                frozen.latent_cache.setdefault((prefix, index), (m.clone(), s.clone()))
