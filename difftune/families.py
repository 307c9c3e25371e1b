"""How each pipeline family conditions its denoiser: text (SD, SDXL, PixArt, SD3, Flux) or class labels (DiT).

A family turns a batch's captions or class labels into the keyword arguments of the denoiser's forward, and knows its
null condition (the empty prompt, or DiT's null class) for label dropout. The trainer knows no family by name.
SD3 and Flux (``flow = True``) train by flow matching (`difftune.train.flow`) and call their transformer themselves
(`FlowFamily.predict`): Flux on 2×2-packed latents with position ids and a guidance value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .components import denoiser_name, pipeline_kind
from .errors import DifftuneError


class Family:
    """Text-conditioned by default; subclasses override `encode` and `denoiser_kwargs`."""

    conditioning = "text"
    flow = False  #: trained by flow matching (rectified flow, velocity target) instead of DDPM noise prediction

    def __init__(self, pipe: Any, denoiser: nn.Module) -> None:
        self.pipe = pipe
        self.denoiser = denoiser

    @property
    def encoders(self) -> list[nn.Module]:
        return [m for m in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                if m is not None]

    def _tokens(self, tokenizer: Any, captions: list[str], max_length: int | None = None) -> Any:
        return tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt",
                         max_length=max_length or tokenizer.model_max_length)

    def _grad(self) -> Any:
        """Grad mode of the text-encoder pass: on only while an encoder trains (``model.component: text_encoder``),
        so the denoising loss reaches its adapter; frozen encoders run without a graph as before."""
        trains = any(p.requires_grad for enc in self.encoders for p in enc.parameters())
        return torch.set_grad_enabled(trains and torch.is_grad_enabled())

    def encode(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        """Condition tensors for ``captions`` (batch-first), as cached and fed to `denoiser_kwargs`."""
        enc = self.pipe.text_encoder
        ids = self._tokens(self.pipe.tokenizer, captions).input_ids.to(device)
        with self._grad():
            return {"encoder_hidden_states": enc(ids)[0]}

    def denoiser_kwargs(self, cond: dict[str, Tensor], latents: Tensor,
                        geometry: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
        """The denoiser's keyword arguments for ``latents``. ``geometry``: each image's original (height, width)
        and crop (top, left), both (B, 2), for families that condition on them (SDXL); None: square, uncropped
        images at the latents' size."""
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    def null_labels(self, labels: Tensor) -> Tensor:
        raise DifftuneError("this pipeline is not class-conditional")

    def prepare_training(self) -> None:
        """Turn off behaviour that would fight the trainer's own choices (see `DiTFamily`)."""

    def configure(self, train: Any) -> None:
        """Read the family's settings from the run's ``train`` section (see `FlowFamily`)."""


class SDXLFamily(Family):
    def encode(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        # As the SDXL pipeline: penultimate hidden states of both encoders, concatenated; pooled text from the second.
        states, pooled = [], None
        pairs = ((self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2))
        for tok, enc in pairs:
            with self._grad():
                out = enc(self._tokens(tok, captions).input_ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}

    def denoiser_kwargs(self, cond: dict[str, Tensor], latents: Tensor,
                        geometry: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
        b, _, h, w = latents.shape
        scale = self.pipe.vae_scale_factor
        target = torch.tensor([[h * scale, w * scale]] * b)
        if geometry is None:  # no image behind the latents: a square, uncropped image at their size
            original, crop = target, torch.zeros(b, 2, dtype=torch.long)
        else:
            original, crop = geometry
        # SDXL's micro-conditioning, per image: (original height, width, crop top, left, target height, width)
        time_ids = torch.cat([original.cpu(), crop.cpu(), target], dim=1)
        time_ids = time_ids.to(latents.device, cond["text_embeds"].dtype)
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": time_ids}}


class PixArtFamily(Family):
    max_length = 120  # PixArt-α's T5 sequence length

    def encode(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        tokens = self._tokens(self.pipe.tokenizer, captions, self.max_length)
        mask = tokens.attention_mask.to(device)
        with self._grad():
            states = self.pipe.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def denoiser_kwargs(self, cond: dict[str, Tensor], latents: Tensor,
                        geometry: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
        b, _, h, w = latents.shape
        extra: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser, "use_additional_conditions", False):
            scale = self.pipe.vae_scale_factor
            extra = {"resolution": torch.tensor([[h * scale, w * scale]] * b, device=latents.device),
                     "aspect_ratio": torch.tensor([[h / w]] * b, device=latents.device)}
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "encoder_attention_mask": cond["encoder_attention_mask"], "added_cond_kwargs": extra}


class DiTFamily(Family):
    conditioning = "class"

    @property
    def num_classes(self) -> int:
        return int(self.denoiser.config.num_embeds_ada_norm)

    @property
    def encoders(self) -> list[nn.Module]:
        return []

    def encode(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        raise DifftuneError("DiT is class-conditional: use data.kind 'classes' (one folder per class)")

    def denoiser_kwargs(self, cond: dict[str, Tensor], latents: Tensor,
                        geometry: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
        return {"class_labels": cond["class_labels"]}

    def null_labels(self, labels: Tensor) -> Tensor:
        return torch.full_like(labels, self.num_classes)  # the pipeline's null class for guidance

    def prepare_training(self) -> None:
        # diffusers' DiT drops labels inside every block's own label embedder (p = 0.1, drawn independently per
        # block) while in train mode. The trainer drops labels itself, once per sample, at data.label_dropout;
        # the in-model dropout is switched off so that setting is the only one.
        for module in self.denoiser.modules():
            if type(module).__name__ == "LabelEmbedding":
                module.dropout_prob = 0.0


class FlowFamily(Family):
    """SD3 and Flux: MMDiT transformers trained by flow matching, prompts encoded by the pipeline's own
    ``encode_prompt`` (CLIP pooled embeddings plus the T5 sequence)."""

    flow = True
    max_sequence_length = 77  #: T5 tokens per prompt (``train.max_sequence_length``)
    density = "logit_normal"  #: timestep density when ``train.timestep_density`` is null

    @property
    def encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    def configure(self, train: Any) -> None:
        from .basemodel import CALL_KEY
        from .generation import call_defaults

        recorded = call_defaults(self.pipe)
        if train.max_sequence_length is not None:
            self.max_sequence_length = train.max_sequence_length
        elif "max_sequence_length" in recorded:  # the length the pipeline's transformer was trained with
            self.max_sequence_length = recorded["max_sequence_length"]
        if getattr(self.pipe, "text_encoder_3", "absent") is None:
            # SD3 without T5 appends this many zero tokens: sampling must use the length training used, so a
            # pipeline saved from this run records it (basemodel.call_settings)
            self.pipe.register_to_config(**{CALL_KEY: {**recorded, "max_sequence_length": self.max_sequence_length}})
        self.guidance_scale = float(train.guidance_scale)

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """``model``'s velocity for x_t ``noisy`` (B, C, h, w) at ``timesteps`` (σ · 1000, float)."""
        return model(hidden_states=noisy, timestep=timesteps, return_dict=False, **kwargs)[0]

    def image_seq_len(self, height: int, width: int) -> int:
        """The transformer's image tokens for latents of ``height`` × ``width``, as the pipeline counts them for
        the dynamic shift's μ (SD3: patches of the transformer's ``patch_size``)."""
        p = int(self.denoiser.config.patch_size)
        return (height // p) * (width // p)


class SD3Family(FlowFamily):
    def encode(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        with self._grad():
            states, _, pooled, _ = self.pipe.encode_prompt(
                prompt=captions, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def denoiser_kwargs(self, cond: dict[str, Tensor], latents: Tensor,
                        geometry: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:  # MMDiT: unused
        return {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")}


class FluxFamily(FlowFamily):
    max_sequence_length = 512
    density = "uniform"  # diffusers' Flux script: weighting_scheme "none"
    guidance_scale = 3.5

    def encode(self, captions: list[str], device: torch.device) -> dict[str, Tensor]:
        with self._grad():
            states, pooled, _ = self.pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                                        max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def denoiser_kwargs(self, cond: dict[str, Tensor], latents: Tensor,
                        geometry: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:  # MMDiT: unused
        b, _, h, w = latents.shape
        states, ids = cond["encoder_hidden_states"], type(self.pipe)._prepare_latent_image_ids
        kwargs = {"encoder_hidden_states": states, "pooled_projections": cond["pooled_projections"],
                  # position ids as FluxPipeline makes them: (row, column) of each 2×2 patch, zeros for the text
                  "img_ids": ids(b, h // 2, w // 2, latents.device, states.dtype),
                  "txt_ids": torch.zeros(states.shape[1], 3, device=latents.device, dtype=states.dtype),
                  "guidance": None}
        if self.denoiser.config.guidance_embeds:  # [dev]: the distilled guidance scale is an input
            kwargs["guidance"] = torch.full((b,), self.guidance_scale, device=latents.device, dtype=torch.float32)
        return kwargs

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, kwargs: dict[str, Any]) -> Tensor:
        # Flux takes packed 2×2 patches and σ in [0, 1] (its pipeline divides the scheduler's timesteps by 1000)
        b, c, h, w = noisy.shape
        cls, scale = type(self.pipe), self.pipe.vae_scale_factor
        packed = cls._pack_latents(noisy, b, c, h, w)
        out = model(hidden_states=packed, timestep=timesteps / 1000, return_dict=False, **kwargs)[0]
        return cls._unpack_latents(out, h * scale, w * scale, scale)

    def image_seq_len(self, height: int, width: int) -> int:
        return (height // 2) * (width // 2)  # the packed 2×2 patches (FluxPipeline: latents.shape[1])


def flow_mu(config: Any, image_seq_len: int) -> float:
    """μ of the dynamic shift at ``image_seq_len`` image tokens from a flow scheduler's ``config``, as the SD3 and
    Flux pipelines compute it (`calculate_shift`: linear from base_shift at base_image_seq_len to max_shift at
    max_image_seq_len)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    missing = [k for k in keys if getattr(config, k, None) is None]
    if missing:
        raise DifftuneError(f"the scheduler config has no {', '.join(missing)}: the dynamic shift's μ needs them; set "
                            "them in the pipeline's scheduler/scheduler_config.json or turn the dynamic shift off")
    return float(calculate_shift(image_seq_len, *(getattr(config, k) for k in keys)))


def flow_sampler(pipe: Any, steps: int, image_seq_len: int, device: torch.device | str) -> Any:
    """The Euler flow-matching scheduler an SD3/Flux pipeline samples ``steps`` steps with, set up as the pipeline
    does: Flux's σ from 1 to 1/steps, shifted dynamically at ``image_seq_len`` packed tokens; SD3 the scheduler's
    own schedule (its static shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    c, kwargs = sched.config, {}
    if pipeline_kind(pipe) == "flux" and not getattr(c, "use_flow_sigmas", False):
        import numpy as np

        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)  # as FluxPipeline.__call__
    if c.use_dynamic_shifting:
        kwargs["mu"] = flow_mu(c, image_seq_len)
    sched.set_timesteps(None if "sigmas" in kwargs else steps, device=device, **kwargs)
    return sched


def family_for(pipe: Any, denoiser: nn.Module) -> Family:
    families = {"dit": DiTFamily, "pixart": PixArtFamily, "sdxl": SDXLFamily, "sd": Family, "sd3": SD3Family,
                "flux": FluxFamily}
    kind = pipeline_kind(pipe)
    if any(denoiser is getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")):
        # model.component: text_encoder trains an encoder through the loss of the pipeline's (frozen) denoiser
        denoiser = pipe.components[denoiser_name(pipe.components)]
    if kind not in families:
        raise DifftuneError(f"difftune does not know how to condition {type(pipe).__name__}; supported: SD 1.x/2.x, "
                            "SDXL, PixArt, DiT")
    return families[kind](pipe, denoiser)
