"""DreamBooth class images generated with the base model (``data.num_class_images``), as diffusers'
train_dreambooth_lora does: before training, when a ``class_path`` holds fewer images than asked, the base pipeline
(without the adapter: it is loaded for this alone, then dropped) samples the rest with the ``class_prompt``.

Image ``i`` of a folder (counting the ones already there) is ``class-<i>.png``, sampled at the square
``data.resolution`` with ``validation.num_inference_steps`` and ``validation.guidance_scale`` from seed
``seed + i``, and written atomically: a run stopped midway leaves whole images, and the next one continues from
their count. Under DDP the main process generates and the others wait for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write
from ..generation import generate
from .config import TrainConfig
from .data import find_images
from .dataconfig import DatasetEntry

logger = logging.getLogger("difftune.train")


def missing_class_images(cfg: TrainConfig) -> list[tuple[DatasetEntry, int]]:
    """The folders that need class images, with how many each already holds."""
    out = []
    for e in cfg.data.entries():
        if e.class_path and e.num_class_images:
            folder = Path(e.class_path).expanduser()
            have = len(find_images(folder)) if folder.is_dir() else 0
            if have < e.num_class_images:
                out.append((e, have))
    return out


def ensure_class_images(cfg: TrainConfig, accelerator: Any) -> None:
    """Fill every ``class_path`` up to its ``num_class_images`` (main process; the others wait)."""
    todo = missing_class_images(cfg)
    if not todo:
        return
    if accelerator.is_main_process:
        from .build import load_training_pipeline

        pipe, _, _ = load_training_pipeline(cfg)  # the base model, fp32, without any adapter
        pipe.to(accelerator.device)
        for entry, have in todo:
            write_class_images(cfg, pipe, entry, have)
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    accelerator.wait_for_everyone()


def write_class_images(cfg: TrainConfig, pipe: Any, entry: DatasetEntry, have: int) -> list[Path]:
    """Sample ``entry.num_class_images - have`` class images into ``entry.class_path``, one per call from its own
    seed (a name already taken, e.g. by a user's own ``class-00003.png``, gets a suffix: nothing is overwritten)."""
    folder = Path(entry.class_path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    want, res, v = entry.num_class_images, cfg.data.resolution, cfg.validation
    print(f"[difftune] generating {want - have} class image(s) into {folder} ({entry.key_of('num_class_images')}"
          f"={want}, {have} there) with {entry.class_prompt!r}", flush=True)
    written = []
    for i in range(have, want):
        image = generate(pipe, prompt=entry.class_prompt, seed=cfg.seed + i, steps=v.num_inference_steps,
                         guidance=v.guidance_scale, height=res, width=res)[0]
        path, k = folder / f"class-{i:05d}.png", 0
        while path.exists():
            k += 1
            path = folder / f"class-{i:05d}-{k}.png"
        written.append(atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG")))
    logger.info("wrote %d class image(s) to %s", len(written), folder)
    return written
