"""SPM's trainer plugin: data-free erasing with latent anchoring (``difftune train`` with ``method.name: spm``).

Per micro-batch of B items (official: B = 1), with the membrane fully on (γ = 1, transport off while training):

1. each item picks a concept c (uniformly) and its surrogate s ("" by default); one t_to ∈ [1, T−1] for the batch;
2. x_t on-policy: from x_T ~ N(0, I), t_to DDIM steps of the *membrane-equipped* model with CFG
   (``sampling_guidance``) conditioned on c, without gradients; t = the schedule's timestep t_to (SD3/Flux: Euler
   flow-matching steps, and the ε below are their velocities: the erasing target is the same negative guidance);
3. targets from the same model with the membrane off (`disable`): ε(x_t, c), ε(x_t, s);
4. L_erase = MSE(ε'(x_t, c), ε(x_t, s) − η (ε(x_t, c) − ε(x_t, s)));
5. latent anchoring (``action: erase_with_la``): K anchors, L_LA = MSE(ε'(x_t, a), ε(x_t, a)); anchors are the
   ``anchors`` prompts when given, else random embeddings as the official code: Gaussian directions in the
   (L·D) embedding space, kept with probability 1 − cos(E(c), a), rescaled to ‖E(c)‖ × U(0.8, 1.2);
6. L = L_erase + λ_LA L_LA.

Deviation (methods.md §4(d) 3): the official code builds its anchor batch as [uncond, a1, uncond, a2, ...] and its
noise predictor keeps only one half, so half of its anchors are the empty prompt and a1, a2 are never used. Here
all K anchors are real anchors (the empty prompt is no anchor: it is the erasing target's neutral side).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DifftuneError
from ..plugin import TrainerPlugin, TrainingStep, register_plugin
from ..verbs import disable, enable, inject, model_part
from .adapter import SPMConfig, encode_concepts

#: Denoiser kwargs indexed by position, not by batch item (Flux's image/text position ids): shared, never repeated.
UNBATCHED = ("img_ids", "txt_ids")


def _repeat(kwargs: Any, n: int) -> Any:
    """Every batch-first tensor of the denoiser kwargs (nested dicts too) repeated ``n`` times along the batch."""
    if isinstance(kwargs, dict):
        return {k: v if k in UNBATCHED else _repeat(v, n) for k, v in kwargs.items()}
    if isinstance(kwargs, Tensor) and kwargs.dim() > 0:
        return kwargs.repeat_interleave(n, dim=0)
    return kwargs


def _cat(items: list[Any]) -> Any:
    if isinstance(items[0], dict):
        return {k: items[0][k] if k in UNBATCHED else _cat([i[k] for i in items]) for k in items[0]}
    if isinstance(items[0], Tensor) and items[0].dim() > 0:
        return torch.cat(items)
    return items[0]


def _sampler(step: TrainingStep, steps: int, b: int) -> Any:
    """The scheduler x_t is sampled with: DDIM on the training schedule, or for SD3/Flux (flow matching) the
    pipeline's Euler flow scheduler, set as the pipeline sets it (`families.flow_sampler`)."""
    from diffusers import DDIMScheduler

    if step.family.flow:
        from ...families import flow_sampler

        _, _, h, w = step.latent_shape(b)
        return flow_sampler(step.pipe, steps, h * w // 4, step.device)
    sched = DDIMScheduler.from_config(step.noise_scheduler.config)
    sched.set_timesteps(steps, device=step.device)
    return sched


def random_anchors(target: Tensor, k: int) -> Tensor:
    """K random anchor embeddings like ``target`` (L, D) (official ``sample``): global torch RNG only."""
    flat = target.flatten().float()
    out = []
    while len(out) < k:
        a = torch.randn(flat.shape, device=flat.device)
        a = a / a.norm()
        cos = F.cosine_similarity(a, flat, dim=0).clamp(min=0)
        if torch.rand((), device=flat.device) < 1 - cos:  # reject directions close to the target
            scale = flat.norm() * (0.8 + 0.4 * torch.rand((), device=flat.device))
            out.append((a * scale).view_as(target))
    return torch.stack(out).to(target.dtype)  # (K, L, D)


@register_plugin("spm")
class SPMPlugin(TrainerPlugin):
    """Trains the membrane with its own objective; needs no images (``data.kind: none`` or ``prompts``)."""

    def default_lr(self) -> float:
        return 1e-4  # the official unet_lr

    def prepare(self, pipe: Any, model: nn.Module) -> nn.Module:
        config = self.config
        inject(model, config, name=self.name, freeze_base=True)
        part = model_part(model, self.name)
        if part is not None:
            part.transport = False  # the membrane is fully on while it trains (official multiplier 1)
        if pipe is None:  # a bare model (the contract's gradient check): nothing to encode
            return model
        if not config.concepts:
            raise DifftuneError("SPM training needs at least one concept to erase: method.concepts: [...]")
        if part is None:
            raise DifftuneError("SPM erases concepts named in text; this denoiser is not text-conditioned")
        encode_concepts(pipe, self.name)  # E(c) for transport, with the training model's own encoder
        return model

    @torch.no_grad()
    def _sample_xt(self, step: TrainingStep, cond: dict[str, Any], uncond: dict[str, Any], b: int) -> tuple[Tensor,
                                                                                                       Tensor]:
        config: SPMConfig = self.config
        sched = _sampler(step, config.sampling_steps, b)
        t_to = int(torch.randint(1, config.sampling_steps, (1,)))
        latents = torch.randn(step.latent_shape(b), device=step.device) * getattr(sched, "init_noise_sigma", 1.0)
        both = _cat([uncond, cond])
        for t in sched.timesteps[:t_to]:
            x = torch.cat([latents, latents])
            eps = step.predict(step.denoiser, x, t.repeat(2 * b), both)
            e_u, e_c = eps.chunk(2)
            eps = e_u + config.sampling_guidance * (e_c - e_u)
            latents = sched.step(eps, t, latents).prev_sample
        return latents, sched.timesteps[t_to].repeat(b)

    def objective(self, step: TrainingStep) -> Tensor:
        config: SPMConfig = self.config
        b = len(step.batch["index"])
        picks = torch.randint(0, len(config.concepts), (b,)).tolist()
        concepts = [config.concepts[i] for i in picks]
        surrogates = [config.surrogates[i] if config.surrogates else "" for i in picks]
        shape = torch.zeros(step.latent_shape(b), device=step.device)
        cond = step.prompt_kwargs(concepts, shape)
        neutral = step.prompt_kwargs(surrogates, shape)
        x_t, t = self._sample_xt(step, cond, step.prompt_kwargs([""] * b, shape), b)
        disable(step.denoiser, self.name)
        try:
            with torch.no_grad():
                e_pos = step.predict(step.denoiser, x_t, t, cond)
                e_neu = step.predict(step.denoiser, x_t, t, neutral)
                anchors = self._anchors(step, cond, b)
                e_anchor = None if anchors is None else step.predict(
                    step.denoiser, x_t.repeat_interleave(config.num_anchors, 0),
                    t.repeat_interleave(config.num_anchors), anchors)
        finally:
            enable(step.denoiser, self.name)
        target = e_neu - config.guidance * (e_pos - e_neu)
        if anchors is None:
            return F.mse_loss(step.predict(step.model, x_t, t, cond), target)
        k = config.num_anchors
        # one student pass over [concept items; anchor items] (one forward per micro-batch, for DDP)
        x_all = torch.cat([x_t, x_t.repeat_interleave(k, 0)])
        pred = step.predict(step.model, x_all, torch.cat([t, t.repeat_interleave(k)]), _cat([cond, anchors]))
        erase = F.mse_loss(pred[:b], target)
        anchor = F.mse_loss(pred[b:], e_anchor)
        return erase + config.la_strength * anchor

    def _anchors(self, step: TrainingStep, cond: dict[str, Any], b: int) -> dict[str, Any] | None:
        """The denoiser kwargs of K anchors per item, (B·K, ...), or None without anchoring."""
        config: SPMConfig = self.config
        if config.action == "erase":
            return None
        k = config.num_anchors
        shape = torch.zeros(step.latent_shape(b * k), device=step.device)
        if config.anchors:
            idx = torch.randint(0, len(config.anchors), (b * k,)).tolist()
            return step.prompt_kwargs([config.anchors[i] for i in idx], shape)
        kwargs = _repeat(cond, k)
        states = cond["encoder_hidden_states"]  # (B, L, D)
        kwargs["encoder_hidden_states"] = torch.cat([random_anchors(s, k) for s in states])
        return kwargs
