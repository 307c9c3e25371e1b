"""Validation loss (``validation.loss``): the denoising loss on a held-out image folder at fixed timesteps.

Each evaluation encodes every held-out image (center crop, no flip; the posterior's mean, not a sample), noises it
at each of ``validation.loss.timesteps`` with noise from a generator seeded by the run's seed, and averages the
default loss's MSE over images and timesteps. The noise is the same at every evaluation and in every run with that
seed, so the curve shows the weights only; nothing is drawn from the global RNG, so exact resume is untouched. The
denoiser is in eval mode meanwhile (adapter dropout off). It runs where the validation grid is made: at the start,
every ``validation.every_steps`` and at the end, on the main process; logged as ``val_loss`` and printed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import bad_value
from .config import TrainConfig
from .data import CaptionFolder, ClassFolder, collate
from .loss import Frozen, StepInputs, encode_posterior


def held_out(cfg: TrainConfig, conditioning: str) -> Any:
    """The held-out data set at ``data.resolution`` (center crop, no flip)."""
    d, field_ = cfg.data, "validation.loss.path"
    common = {"resolution": d.resolution, "center_crop": True, "random_flip": False, "seed": cfg.seed,
              "field": field_}
    if conditioning == "class":
        return ClassFolder(cfg.validation.loss.path, **common)
    return CaptionFolder(cfg.validation.loss.path, caption_ext=d.caption_ext,
                         default_caption=d.default_caption or d.instance_prompt, **common)


@torch.no_grad()
def validation_loss(cfg: TrainConfig, frozen: Frozen, denoiser: nn.Module, device: torch.device) -> float:
    """The mean denoising loss of ``denoiser`` on the held-out folder at the fixed timesteps."""
    timesteps = cfg.validation.loss.timesteps
    n_train = frozen.noise_scheduler.config.num_train_timesteps
    if max(timesteps) >= n_train:
        raise bad_value("validation.loss.timesteps", timesteps, f"each below the scheduler's {n_train} steps")
    data = held_out(cfg, frozen.family.conditioning)
    gen = torch.Generator().manual_seed(cfg.seed)
    vae, size = frozen.pipe.vae, cfg.validation.loss.batch_size
    was_training = denoiser.training
    denoiser.eval()
    total, count = 0.0, 0
    for first in range(0, len(data), size):
        batch = collate([data[i] for i in range(first, min(first + size, len(data)))])
        step = StepInputs(batch, denoiser, denoiser, None, frozen, cfg, device, 0)
        mean, _ = encode_posterior(vae, batch["pixel_values"].to(device))
        latents = (mean - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
        if frozen.family.conditioning == "class":
            cond = {"class_labels": batch["class_label"].to(device)}
        else:
            cond = frozen.family.encode(batch["caption"], device)
        geometry = (batch["original_size"], batch["crop_top_left"])
        kwargs = frozen.family.denoiser_kwargs(cond, latents, geometry)
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=gen).to(device)
            ts = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
            noisy = frozen.noise_scheduler.add_noise(latents, noise, ts)
            sched = frozen.noise_scheduler
            target = noise if step.prediction_type == "epsilon" else sched.get_velocity(latents, noise, ts)
            pred = step.predict(denoiser, noisy, ts, kwargs)
            total += float(torch.nn.functional.mse_loss(pred, target.float(), reduction="sum"))
            count += pred.numel()
    denoiser.train(was_training)
    return total / count


def report_validation_loss(cfg: TrainConfig, accelerator: Any, frozen: Frozen, denoiser: nn.Module,
                           step: int) -> float | None:
    """Compute, print and log (``val_loss``) the validation loss at ``step`` when ``validation.loss.path`` is set."""
    if not cfg.validation.loss.path:
        return None
    value = validation_loss(cfg, frozen, denoiser, accelerator.device)
    print(f"[difftune] validation loss (step {step}): {value:.6f}", flush=True)
    accelerator.log({"val_loss": value}, step=step)
    return value
