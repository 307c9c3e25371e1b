"""The losses: the denoising loss (latents, conditioning, noise, Min-SNR) and the autoencoder loss.

Every random draw comes from the global torch RNG, in a fixed order per batch, which accelerate's checkpoints save
and restore: a resumed run draws the same latents, noise and timesteps as the uninterrupted one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig
from .families import Family


@dataclass
class Frozen:
    """The parts that do not train, and what they cache."""

    pipe: Any
    family: Family
    noise_scheduler: Any
    weight_dtype: torch.dtype
    text_cache: dict[str, dict[str, Tensor]]
    latent_cache: dict[tuple[str, int], tuple[Tensor, Tensor]]


def _latents(frozen: Frozen, pixels: Tensor, keys: list[tuple[str, int]] | None) -> Tensor:
    vae = frozen.pipe.vae
    if keys is not None and all(k in frozen.latent_cache for k in keys):
        mean = torch.stack([frozen.latent_cache[k][0] for k in keys]).to(pixels.device)
        std = torch.stack([frozen.latent_cache[k][1] for k in keys]).to(pixels.device)
    else:
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        if keys is not None:
            for k, m, s in zip(keys, mean.cpu(), std.cpu()):
                frozen.latent_cache[k] = (m, s)
    latents = mean + std * torch.randn_like(mean)  # a fresh sample of the posterior every step, as diffusers does
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _condition(frozen: Frozen, batch: dict[str, Any], prefix: str, drop: Tensor, device: torch.device,
               cache: bool) -> dict[str, Tensor]:
    fam = frozen.family
    if fam.conditioning == "class":
        labels = batch["class_label"].to(device)
        return {"class_labels": torch.where(drop.to(device), fam.null_labels(labels), labels)}
    captions = ["" if d else c for c, d in zip(batch[f"{prefix}caption"], drop.tolist())]
    if not cache:
        return fam.encode(captions, device)
    missing = sorted({c for c in captions if c not in frozen.text_cache})
    if missing:
        enc = fam.encode(missing, device)
        for i, c in enumerate(missing):
            frozen.text_cache[c] = {k: v[i].cpu() for k, v in enc.items()}
    keys = frozen.text_cache[captions[0]]
    return {k: torch.stack([frozen.text_cache[c][k] for c in captions]).to(device) for k in keys}


def diffusion_loss(cfg: TrainConfig, frozen: Frozen, denoiser: nn.Module, batch: dict[str, Any],
                   device: torch.device) -> Tensor:
    """The denoising loss on one batch (instance + prior-preservation parts for DreamBooth)."""
    parts = [("", 1.0)] + ([("class_", cfg.data.prior_loss_weight)] if "class_pixel_values" in batch else [])
    total = torch.zeros((), device=device)
    for prefix, weight in parts:
        pixels = batch[f"{prefix}pixel_values"].to(device)
        keys = [(prefix, int(i)) for i in batch["index"]] if cfg.data.cache_latents else None
        latents = _latents(frozen, pixels, keys)
        drop = torch.rand(latents.shape[0]) < cfg.data.label_dropout
        cond = _condition(frozen, batch, prefix, drop, device, cfg.data.cache_text_embeddings)
        total = total + weight * _denoising_loss(cfg, frozen, denoiser, latents, cond)
    return total


def _denoising_loss(cfg: TrainConfig, frozen: Frozen, denoiser: nn.Module, latents: Tensor,
                    cond: dict[str, Tensor]) -> Tensor:
    from diffusers.training_utils import compute_snr

    sched = frozen.noise_scheduler
    noise = torch.randn_like(latents)
    if cfg.train.noise_offset:
        noise = noise + cfg.train.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                             device=latents.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = sched.add_noise(latents, noise, t)
    prediction_type = cfg.model.prediction_type or sched.config.prediction_type
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    kwargs = frozen.family.denoiser_kwargs(cond, latents)
    key = "timestep" if "timestep" in _forward_params(denoiser) else None
    pred = (denoiser(noisy, timestep=t, **kwargs) if key else denoiser(noisy, t, **kwargs)).sample
    if pred.shape[1] == 2 * latents.shape[1]:  # learned-variance models (DiT, PixArt): train the mean half
        pred = pred[:, : latents.shape[1]]
    if cfg.train.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(sched, t)
    weights = torch.clamp(snr, max=cfg.train.snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


class AutoencoderLoss(nn.Module):
    """L1 + MSE reconstruction + kl_weight · KL for training the VAE; a module so DDP sees one forward."""

    def __init__(self, vae: nn.Module, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: Tensor) -> Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(rec, pixels) + F.mse_loss(rec, pixels) + self.kl_weight * posterior.kl().mean()


@torch.no_grad()
def set_latent_scale(vae: nn.Module, dataset: Any, n: int = 512) -> float:
    """scaling_factor = 1 / std of the latents over (up to) ``n`` training images, as SD's 0.18215 was chosen."""
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(min(n, len(dataset)))])
    latents = torch.cat([vae.encode(pixels[i:i + 64].to(vae.device, vae.dtype)).latent_dist.sample()
                         for i in range(0, len(pixels), 64)])
    scale = float(1.0 / latents.float().std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def _forward_params(module: nn.Module) -> set[str]:
    base = getattr(module, "module", module)  # DDP-wrapped
    return set(inspect.signature(base.forward).parameters)

