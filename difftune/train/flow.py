"""The flow-matching objective of SD3 and Flux (rectified flow, Esser et al. 2024, arXiv 2403.03206), as diffusers'
DreamBooth LoRA scripts train them:

    x_t = (1 − σ) x0 + σ ε,    target v = ε − x0,    loss = mean_b[ w(σ_b) · mean((v̂ − v)²) ]

σ is drawn at an index i = ⌊u · N⌋, with u from ``train.timestep_density`` (diffusers'
`compute_density_for_timestep_sampling`: ``logit_normal``, ``mode``, ``uniform``), and shifted as the scheduler
(`FlowMatchEulerDiscreteScheduler`, built from the pipeline's config) defines shifts, starting from its unshifted
table σ₀ = (N − i) / N:

- ``train.flow_shift`` null, ``train.dynamic_shift`` off (diffusers' scripts): the scheduler's own table, which holds
  SD3's static shift; Flux's scheduler shifts dynamically, at inference only, so its table is σ₀;
- ``train.flow_shift`` s: the static shift σ = s σ₀ / (1 + (s − 1) σ₀) (s = 1: none);
- ``train.dynamic_shift`` true: σ = the scheduler's ``time_shift(μ, 1, σ₀)`` (exponential or linear, as its
  ``time_shift_type`` says) with μ = `calculate_shift` of each batch's image tokens (`families.flow_mu`), as the
  pipeline sets the scheduler at inference with ``use_dynamic_shifting``.

w is ``train.loss_weighting``
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
from ..families import Family, FlowFamily, flow_mu
from ..methods.plugin import Noised


def configure_family(cfg: Any, family: Family) -> None:
    """Give ``family`` the run's settings; for a flow-matching family refuse the DDPM-only ones (no meaning there)."""
    family.configure(cfg.train)
    if not family.flow:
        for key in ("flow_shift", "dynamic_shift"):
            value = getattr(cfg.train, key)
            if value is not None and value is not False:
                raise bad_value(f"train.{key}", value, f"null for {type(family.pipe).__name__}",
                                "it shifts the σ of flow-matching pipelines (SD3, Flux); this pipeline trains by "
                                "DDPM noise prediction on its scheduler's betas")
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


def draw_sigmas(scheduler: Any, train: Any, density: str, batch_size: int,
                image_seq_len: int | None = None) -> tuple[Tensor, Tensor]:
    """(timesteps σ · N, σ), both float32 (B,) on the CPU, for ``batch_size`` samples; ``image_seq_len``: the
    batch's image tokens, needed with ``train.dynamic_shift``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(density, batch_size, logit_mean=train.logit_mean,
                                              logit_std=train.logit_std, mode_scale=train.mode_scale)
    n = int(scheduler.config.num_train_timesteps)
    # the "mode" density reaches u = 1 at u₀ = 0: clamp to the last index rather than index past the table
    indices = (u * n).long().clamp(0, n - 1)
    if train.flow_shift is None and not train.dynamic_shift:
        return scheduler.timesteps[indices].float(), scheduler.sigmas[indices].float()
    # σ₀ as the scheduler's __init__ makes it (linspace(1, N, N) reversed, over N: exact in float32), then shifted
    # with the scheduler's own formulas (its __init__ for the static shift, its set_timesteps for the dynamic one)
    base = (n - indices).float() / n
    if train.dynamic_shift:
        if image_seq_len is None:
            raise ValueError("draw_sigmas: train.dynamic_shift needs the batch's image_seq_len")
        sigmas = scheduler.time_shift(flow_mu(scheduler.config, image_seq_len), 1.0, base).float()
    else:
        s = float(train.flow_shift)
        sigmas = s * base / (1 + (s - 1) * base)
    return sigmas * n, sigmas


def flow_noised(scheduler: Any, train: Any, family: FlowFamily, latents: Tensor, kwargs: dict[str, Any]) -> Noised:
    """ε, σ and x_t for x0 ``latents``; the target is the velocity ε − x0."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    tokens = family.image_seq_len(latents.shape[-2], latents.shape[-1])  # one size per batch (buckets)
    timesteps, sigmas = draw_sigmas(scheduler, train, train.timestep_density or family.density, latents.shape[0],
                                    tokens)
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
