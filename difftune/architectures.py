"""Published diffusion denoisers as diffusers configs, built on the meta device: shapes without weights.

Each entry of `ARCHITECTURES` is the ``config.json`` of a released checkpoint's denoiser (the fields that change the
weights' shapes, plus the ones that tell the models apart). Building one on the meta device allocates no memory and
reads no file, so adapter sizes and layer shapes of the real models can be computed and tested on any machine:

    >>> unet = build_architecture("sd15")
    >>> sum(p.numel() for p in unet.parameters())
    859520964

Parameter counts on diffusers 0.42 (``tests/test_architectures.py`` checks each one):

- ``sd15``: Stable Diffusion 1.5 UNet, 859,520,964
- ``sd21``: Stable Diffusion 2.1 (768-v) UNet, 865,910,724
- ``sdxl``: SDXL base 1.0 UNet, 2,567,463,684
- ``dit-b2``: DiT-B/2 256 px, 147,439,904 (130,315,808 in the original layout)
- ``dit-l2``: DiT-L/2 256 px, 511,609,888 (457,840,672)
- ``dit-xl2``: DiT-XL/2 256 px (``facebook/DiT-XL-2-256``), 749,826,464 (674,834,720)
- ``pixart-512``: PixArt-α XL/2 512 px, 610,856,096
- ``pixart-1024``: PixArt-α XL/2 1024-MS, 611,349,152
- ``sd3-medium``: Stable Diffusion 3 Medium MMDiT, 2,028,328,000 (the published 2B)
- ``sd35-large``: Stable Diffusion 3.5 Large MMDiT, 8,056,627,520 (the published 8.1B)
- ``flux-dev``: FLUX.1 [dev] transformer, 11,901,408,320 (the published 12B)
- ``flux-schnell``: FLUX.1 [schnell] transformer, 11,891,178,560 (dev without the guidance embedder)

diffusers' DiT gives every block its own copy of the timestep and class embedders (``norm1.emb``), where the
original DiT shares one; the counts in parentheses are without those copies, the figures of the DiT paper (which
also quotes the fixed positional embedding, a buffer here: e.g. 674,834,720 + 294,912 = 675,129,632 for XL/2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .components import denoiser_name
from .errors import bad_value

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_TARGETS",
    "FLUX_SINGLE_TARGETS",
    "JOINT_TARGETS",
    "Architecture",
    "build_architecture",
    "build_on_meta",
    "denoiser_on_meta",
    "dit_b2_config",
    "dit_l2_config",
    "dit_xl2_config",
    "flux_transformer_config",
    "mmdit_default_targets",
    "with_mmdit_targets",
    "pixart_alpha_config",
    "sd15_unet_config",
    "sd21_unet_config",
    "sd3_transformer_config",
    "sdxl_unet_config",
]


# ---------------------------------------------------------------------------------------------------------------
# Configs (each call returns a fresh dict: callers may edit it)


def sd15_unet_config() -> dict[str, Any]:
    """The Stable Diffusion 1.5 ``UNet2DConditionModel`` config (859,520,964 parameters; SD 1.4 is the same)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


def sd21_unet_config() -> dict[str, Any]:
    """The Stable Diffusion 2.1 (768 px, v-prediction) ``UNet2DConditionModel`` config (865,910,724 parameters).

    SD1.5's layout with 64-wide heads (``attention_head_dim`` counts heads here: 5, 10, 20, 20), OpenCLIP-H's 1024-wide
    text embeddings and linear ``proj_in``/``proj_out`` instead of 1×1 convolutions. SD 2.0 and 2.1-base have the same
    shapes (2.1-base: ``sample_size`` 64).
    """
    return {
        **sd15_unet_config(),
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "upcast_attention": True,  # 2.1 computes attention scores in fp32 (fp16 overflowed); no parameters
    }


def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL base 1.0 ``UNet2DConditionModel`` config (2,567,463,684 parameters).

    SD's UNet with three levels (no attention at the first), 2 and 10 transformer blocks per attention at the lower
    two, 64-wide heads over both text encoders' 2048-wide embeddings, and the ``text_time`` embedding of the pooled
    text embedding (1280) plus six size/crop numbers (6 × 256).
    """
    return {
        **sd15_unet_config(),
        "sample_size": 128,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 1280 + 6 × 256
    }


def _dit_config(num_layers: int, num_attention_heads: int, attention_head_dim: int) -> dict[str, Any]:
    """A class-conditional 256 px DiT with patch 2 (32×32×4 latents, 1,000 classes + the null class, learned σ)."""
    return {
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": attention_head_dim,
        "in_channels": 4,
        "out_channels": 8,  # ε and the interpolation weights of Σ
        "num_layers": num_layers,
        "dropout": 0.0,
        "attention_bias": True,
        "sample_size": 32,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-5,
    }


def dit_b2_config() -> dict[str, Any]:
    """DiT-B/2 at 256 px: 12 blocks, width 768 (12 heads × 64)."""
    return _dit_config(12, 12, 64)


def dit_l2_config() -> dict[str, Any]:
    """DiT-L/2 at 256 px: 24 blocks, width 1024 (16 heads × 64)."""
    return _dit_config(24, 16, 64)


def dit_xl2_config() -> dict[str, Any]:
    """DiT-XL/2 at 256 px (``facebook/DiT-XL-2-256``): 28 blocks, width 1152 (16 heads × 72)."""
    return _dit_config(28, 16, 72)


def pixart_alpha_config(resolution: int = 1024) -> dict[str, Any]:
    """The PixArt-α XL/2 ``PixArtTransformer2DModel`` config at ``resolution`` 512 or 1024 (the 1024-MS model).

    Both are 28 blocks of width 1152 (16 heads × 72) over T5-XXL embeddings (4096 wide). diffusers adds the
    resolution and aspect-ratio embedders (micro-conditions) only when ``sample_size`` is 128, as in the released
    1024-MS model (``PixArtMS`` in the original code); the 512 px model has none.
    """
    if resolution not in (512, 1024):
        raise bad_value("resolution", resolution, "512 or 1024 (the released PixArt-α XL/2 models)")
    return {
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 28,
        "dropout": 0.0,
        "cross_attention_dim": 1152,
        "attention_bias": True,
        "sample_size": resolution // 8,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "caption_channels": 4096,
    }


def sd3_transformer_config(large: bool = False) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of SD3 Medium (24 joint blocks of width 1536 = 24 heads × 64), or with
    ``large`` of SD3.5 Large (38 blocks of width 2432 = 38 heads × 64, RMS-normed q/k).

    Both take 16-channel latents in 2×2 patches, the three text encoders' 4096-wide sequence (CLIP-L and CLIP-G
    padded, then T5-XXL) and their 2048-wide pooled embeddings (768 + 1280).
    """
    width = 38 if large else 24
    config: dict[str, Any] = {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": width,
        "attention_head_dim": 64,
        "num_attention_heads": width,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 64 * width,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
    }
    if large:
        config.update(qk_norm="rms_norm", dual_attention_layers=())
    return config


def flux_transformer_config(guidance: bool = True) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config of FLUX.1: 19 joint (double) and 38 single blocks of width 3072 (24
    heads × 128) over 2×2-packed 16-channel latents (64 inputs), T5-XXL (4096) and CLIP-L pooled (768).

    ``guidance`` adds the embedder of the distilled guidance scale ([dev]); [schnell] has none.
    """
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": guidance,
        "axes_dims_rope": (16, 56, 56),
    }


#: The default targets of LoRA, LoHa and KronA: the attention projections of a UNet or DiT.
ATTENTION_TARGETS: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]

#: The default adapter targets of an MMDiT (`mmdit_default_targets`): in each joint block the image stream's
#: attention (q, k, v, out) and feed-forward, and the same for the context (text) stream (``add_*_proj``,
#: ``to_add_out``, ``ff_context``), the layers diffusers' DreamBooth LoRA scripts for SD3 and Flux adapt.
JOINT_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
#: Flux's single blocks add their linears: q, k, v (matched above), the MLP input and the fused output projection.
#: A regex, because a bare ``proj_out`` would also match the model's final projection.
FLUX_SINGLE_TARGETS: tuple[str, ...] = (r"single_transformer_blocks\.\d+\.proj_(mlp|out)",)


def mmdit_default_targets(model: nn.Module) -> list[str] | None:
    """The default ``target_modules`` for an SD3 or Flux transformer (`JOINT_TARGETS`, plus `FLUX_SINGLE_TARGETS`
    for Flux), or None for other denoisers (their methods' own defaults apply)."""
    kind = type(model).__name__
    if kind == "SD3Transformer2DModel":
        return list(JOINT_TARGETS)
    if kind == "FluxTransformer2DModel":
        return list(JOINT_TARGETS + FLUX_SINGLE_TARGETS)
    return None


def with_mmdit_targets(cls: type, fields: dict[str, Any], model: nn.Module | None) -> dict[str, Any]:
    """``fields`` (a method config's, without ``name``) with ``target_modules`` set to `mmdit_default_targets` when
    ``model`` is an SD3/Flux transformer, ``fields`` names no targets and the method's own default is the attention
    projections (LoRA, LoHa, KronA: on an MMDiT those would adapt only the image stream's attention)."""
    import dataclasses

    targets = mmdit_default_targets(model) if model is not None else None
    field = {f.name: f for f in dataclasses.fields(cls)}.get("target_modules")
    if targets and "target_modules" not in fields and field is not None \
            and field.default_factory is not dataclasses.MISSING and field.default_factory() == ATTENTION_TARGETS:
        return {**fields, "target_modules": targets}
    return fields


# ---------------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Architecture:
    """A published denoiser: the diffusers class that builds it and a function returning its config."""

    title: str  # what the checkpoint is called, for messages and help
    model_class: str  # the diffusers model class, e.g. "UNet2DConditionModel"
    config: Callable[[], dict[str, Any]]  # a fresh config dict for model_class.from_config

    def build(self) -> nn.Module:
        """The model on the meta device (see `build_on_meta`)."""
        import diffusers

        return build_on_meta(getattr(diffusers, self.model_class), self.config())


#: The architectures ``difftune inspect --architecture`` accepts, by name.
ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture("Stable Diffusion 1.5 UNet", "UNet2DConditionModel", sd15_unet_config),
    "sd21": Architecture("Stable Diffusion 2.1 UNet", "UNet2DConditionModel", sd21_unet_config),
    "sdxl": Architecture("SDXL base 1.0 UNet", "UNet2DConditionModel", sdxl_unet_config),
    "dit-b2": Architecture("DiT-B/2 (256 px)", "DiTTransformer2DModel", dit_b2_config),
    "dit-l2": Architecture("DiT-L/2 (256 px)", "DiTTransformer2DModel", dit_l2_config),
    "dit-xl2": Architecture("DiT-XL/2 (256 px)", "DiTTransformer2DModel", dit_xl2_config),
    "pixart-512": Architecture("PixArt-α XL/2 512 px", "PixArtTransformer2DModel", lambda: pixart_alpha_config(512)),
    "pixart-1024": Architecture("PixArt-α XL/2 1024-MS", "PixArtTransformer2DModel", pixart_alpha_config),
    "sd3-medium": Architecture("Stable Diffusion 3 Medium MMDiT", "SD3Transformer2DModel", sd3_transformer_config),
    "sd35-large": Architecture("Stable Diffusion 3.5 Large MMDiT", "SD3Transformer2DModel",
                               lambda: sd3_transformer_config(large=True)),
    "flux-dev": Architecture("FLUX.1 [dev] transformer", "FluxTransformer2DModel", flux_transformer_config),
    "flux-schnell": Architecture("FLUX.1 [schnell] transformer", "FluxTransformer2DModel",
                                 lambda: flux_transformer_config(guidance=False)),
}


def build_architecture(name: str) -> nn.Module:
    """The denoiser of the published architecture ``name`` on the meta device (shapes only, no memory).

    Args:
        name: A key of `ARCHITECTURES`, e.g. ``"sd15"`` or ``"dit-l2"``.

    Returns:
        The diffusers model, every parameter on the ``meta`` device.

    Raises:
        DifftuneError: ``name`` is not a known architecture (the message lists them).
    """
    if name not in ARCHITECTURES:
        raise bad_value("architecture", name, f"one of {list(ARCHITECTURES)}",
                        "A model not listed here can be sized from its local pipeline folder instead (--model)")
    return ARCHITECTURES[name].build()


def build_on_meta(model_cls: type, config: dict[str, Any]) -> nn.Module:
    """Instantiate ``model_cls.from_config(config)`` on the meta device: shapes only, no memory, no init cost.

    Args:
        model_cls: A diffusers model class (anything with ``from_config``), e.g. ``UNet2DConditionModel``.
        config: Its config, e.g. from `sd15_unet_config`.

    Returns:
        The model, with every parameter on the ``meta`` device.
    """
    with torch.device("meta"):
        return model_cls.from_config(config)


def denoiser_on_meta(model: str | Path, component: str | None = None) -> tuple[str, nn.Module]:
    """The (component, model) of a local pipeline folder, built from its config on the meta device (no weights read).

    Args:
        model: A local diffusers pipeline folder (with ``model_index.json``).
        component: The component to build; default the denoiser (``unet``, else ``transformer``).

    Returns:
        The component's name and its model on the meta device.

    Raises:
        DifftuneError: not a pipeline folder, or ``component`` is not one of its diffusers model components.
    """
    import diffusers

    folder = Path(model)
    index = folder / "model_index.json"
    if not index.is_file():
        raise bad_value("model", str(model), "a local diffusers pipeline folder (holding model_index.json)")
    entries = json.loads(index.read_text())
    if component is None:
        component = denoiser_name(entries)
    if component not in entries or not isinstance(entries[component], list):
        raise bad_value("component", component, f"a model component of {folder} ({sorted(entries)})")
    cls = getattr(diffusers, entries[component][1], None)
    if cls is None or not hasattr(cls, "load_config"):
        raise bad_value("component", component, "a diffusers model component (unet or transformer)")
    return component, build_on_meta(cls, cls.load_config(str(folder / component)))
