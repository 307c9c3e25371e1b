"""VQ4DiT calibration trajectories of SD3 and Flux (flow matching), beside DiT/PixArt's in `vq4dit_calib`.

The paper calibrates along the FP model's own sampling trajectory; for an MMDiT that is its pipeline's Euler
flow-matching sampler: x_T ~ N(0, I) at ``VQ4DiTConfig.resolution`` (default the pipeline's own size), prompts drawn
from ``VQ4DiTConfig.prompts`` and encoded by the pipeline's ``encode_prompt``, the schedule as the pipeline sets it
(`families.flow_sampler`; Flux: σ from 1 to 1/steps with its dynamic shift), and x ← scheduler.step(v, t, x) with
the FP velocity v. SD3 applies classifier-free guidance on v (``guidance`` > 1, empty negative prompt); FLUX.1 [dev]
is guidance-distilled: ``guidance`` is the value of its guidance embedding and there is no unconditional pass. Flux
latents stay packed (2×2 patches) along the trajectory, as in its pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..components import pipeline_kind
from ..errors import bad_value
from ..families import flow_sampler


class FlowTrajectory:
    """One calibration trajectory of an SD3 or Flux pipeline: the conditioning, x_T, and the scheduler's steps."""

    def __init__(self, pipe: Any, config: Any, gen: torch.Generator, device: torch.device) -> None:
        if not config.prompts:
            raise bad_value("prompts", config.prompts, f"a list of prompts for {type(pipe).__name__} calibration",
                            "SD3 and Flux are text-conditioned: give prompts whose style calibration should cover.")
        self.pipe, self.kind, self.guidance = pipe, pipeline_kind(pipe), float(config.guidance)
        pick = torch.randint(len(config.prompts), (config.batch,), generator=gen).tolist()
        prompts = [config.prompts[i] for i in pick]
        self.b = b = len(prompts)
        scale = pipe.vae_scale_factor
        size = config.resolution or int(getattr(pipe, "default_sample_size", 0) or
                                         pipe.transformer.config.sample_size) * scale
        if size % (2 * scale):
            raise bad_value("resolution", size, f"a multiple of {2 * scale} (the VAE factor × the 2×2 patches)")
        h = w = size // scale
        channels = pipe.transformer.config.in_channels
        with torch.no_grad():  # the text encoders are not calibrated: their graphs must not join the loss
            if self.kind == "sd3":
                self.cfg = self.guidance > 1
                pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                                  do_classifier_free_guidance=self.cfg)
                if self.cfg:
                    pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
                self.kwargs: dict[str, Any] = {"encoder_hidden_states": pos, "pooled_projections": pooled}
                self.x = torch.randn(b, channels, h, w, generator=gen).to(device)
            else:
                self.cfg = False
                states, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device)
                self.kwargs = {"encoder_hidden_states": states, "pooled_projections": pooled, "txt_ids": text_ids,
                               "img_ids": type(pipe)._prepare_latent_image_ids(b, h // 2, w // 2, device,
                                                                                states.dtype)}
                if pipe.transformer.config.guidance_embeds:
                    self.kwargs["guidance"] = torch.full((b,), self.guidance, device=device)
                self.x = torch.randn(b, h * w // 4, channels, generator=gen).to(device)  # packed 2×2 patches
        self.sched = flow_sampler(pipe, config.steps, h * w // 4, device)

    @property
    def timesteps(self) -> Tensor:
        return self.sched.timesteps

    def model_kwargs(self, t: Tensor) -> dict[str, Any]:
        """The transformer's keyword arguments at timestep ``t`` for the current x (SD3 with CFG: [uncond; cond])."""
        x = torch.cat([self.x, self.x]) if self.cfg else self.x
        ts = t.reshape(1).to(x.device).expand(x.shape[0])
        return {"hidden_states": x, "timestep": ts / 1000 if self.kind == "flux" else ts, **self.kwargs}

    def advance(self, pred: Tensor, t: Tensor) -> None:
        """x ← one Euler step with the FP teacher's velocity ``pred`` (guided for SD3 with CFG)."""
        v = pred
        if self.cfg:
            uncond, cond = v.chunk(2)
            v = uncond + self.guidance * (cond - uncond)
        self.x = self.sched.step(v, t, self.x).prev_sample
