"""The flow-matching objective of SD3 and Flux (rectified flow, Esser et al. 2024, arXiv 2403.03206), as diffusers'
DreamBooth LoRA scripts train them:

    x_t = (1 − σ) x0 + σ ε,    target v = ε − x0,    loss = mean_b[ w(σ_b) · mean((v̂ − v)²) ]

σ is the training scheduler's (`FlowMatchEulerDiscreteScheduler`, built from the pipeline's config, so SD3's static
shift applies as in its scheduler; Flux's dynamic shift is an inference-time setting and, as in diffusers' script, not
applied in training) at an index u · N, with u drawn from ``train.timestep_density`` (diffusers'
`compute_density_for_timestep_sampling`: ``logit_normal``, ``mode``, ``uniform``). w is ``train.loss_weighting``
(`compute_loss_weighting_for_sd3`: ``sigma_sqrt`` σ⁻², ``cosmap`` 2 / (π (1 − 2σ + 2σ²)), ``none`` 1). The
denoiser gets the timestep σ · N (a float; `difftune.families.FlowFamily.predict` passes it on as each model wants).

Every draw comes from the global torch RNG (ε on the latents' device, u on the CPU), which accelerate checkpoints,
so resumed runs draw what the uninterrupted one drew.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import bad_value
from ..families import Family, FlowFamily
from ..methods.plugin import Noised


def configure_family(cfg: Any, family: Family) -> None:
    """Give ``family`` the run's settings; for a flow-matching family refuse the DDPM-only ones (no meaning there)."""
    family.configure(cfg.train)
    if not family.flow:
        return
    name = type(family.pipe).__name__
    hint = f"{name} trains by flow matching (velocity target); see train.timestep_density and train.loss_weighting"
    if cfg.train.snr_gamma is not None:
        raise bad_value("train.snr_gamma", cfg.train.snr_gamma, "null for a flow-matching pipeline", hint)
    if cfg.train.noise_offset:
        raise bad_value("train.noise_offset", cfg.train.noise_offset, "0 for a flow-matching pipeline", hint)
    for key in ("zero_terminal_snr", "debiased_estimation"):  # both reshape the DDPM noise schedule's SNR
        if getattr(cfg.train, key):
            raise bad_value(f"train.{key}", True, "false for a flow-matching pipeline", hint)
    if cfg.model.prediction_type is not None:
        raise bad_value("model.prediction_type", cfg.model.prediction_type, "null for a flow-matching pipeline", hint)


def draw_sigmas(scheduler: Any, train: Any, density: str, batch_size: int) -> tuple[Tensor, Tensor]:
    """(timesteps σ · N, σ), both float32 (B,) on the CPU, for ``batch_size`` samples."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(density, batch_size, logit_mean=train.logit_mean,
                                              logit_std=train.logit_std, mode_scale=train.mode_scale)
    n = int(scheduler.config.num_train_timesteps)
    # the "mode" density reaches u = 1 at u₀ = 0: clamp to the last index rather than index past the table
    indices = (u * n).long().clamp(0, n - 1)
    return scheduler.timesteps[indices].float(), scheduler.sigmas[indices].float()


def flow_noised(scheduler: Any, train: Any, family: FlowFamily, latents: Tensor, kwargs: dict[str, Any]) -> Noised:
    """ε, σ and x_t for x0 ``latents``; the target is the velocity ε − x0."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    timesteps, sigmas = draw_sigmas(scheduler, train, train.timestep_density or family.density, latents.shape[0])
    sigma = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - sigma) * latents + sigma * noise
    return Noised(latents, noise, timesteps.to(latents.device), noisy, noise - latents, kwargs)


def flow_loss(pred: Tensor, noised: Noised, weighting: str, num_train_timesteps: int) -> Tensor:
    """The weighted MSE of velocity ``pred`` to ``noised.target`` (per-sample mean, then the batch mean)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = noised.timesteps.float() / num_train_timesteps
    weights = compute_loss_weighting_for_sd3(weighting, sigmas).float()
    per_sample = ((pred.float() - noised.target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    return (weights * per_sample).mean()
