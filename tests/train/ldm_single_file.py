"""Write a diffusers SD1.x pipeline as one original-layout (CompVis LDM) checkpoint, the file users download from
model sites: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*``
(CLIP). The inverse of diffusers' ``convert_ldm_{unet,vae,clip}_checkpoint``; UNet names from difftune.interop.ldm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from difftune.interop.ldm import ldm_blocks, to_ldm


def _vae_key(key: str, n_up: int) -> str:
    """The LDM name of a diffusers AutoencoderKL parameter (diffusers' DIFFUSERS_TO_LDM_MAPPING["vae"], inverted)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    key = key.replace("mid_block.attentions.0", "mid.attn_1")
    for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"mid.attn_1.{old}.", f"mid.attn_1.{new}.")
    parts = key.split(".")
    if parts[1] == "down_blocks":  # encoder.down_blocks.i.resnets.j / .downsamplers.0.conv
        i = parts[2]
        rest = (["block", *parts[4:]] if parts[3] == "resnets" else ["downsample", *parts[5:]])
        return ".".join([parts[0], "down", i, *rest])
    if parts[1] == "up_blocks":  # LDM numbers the decoder's blocks from the lowest resolution up
        i = str(n_up - 1 - int(parts[2]))
        rest = (["block", *parts[4:]] if parts[3] == "resnets" else ["upsample", *parts[5:]])
        return ".".join([parts[0], "up", i, *rest])
    return key


def ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder under their original Stable Diffusion names."""
    out = {}
    blocks = ldm_blocks(pipe.unet)
    for key, value in pipe.unet.state_dict().items():
        name = to_ldm(key, blocks)
        assert name is not None, key
        out[f"model.diffusion_model.{name}"] = value
    n_up = len(pipe.vae.decoder.up_blocks)
    for key, value in pipe.vae.state_dict().items():
        if ".mid_block.attentions.0.to_" in key and key.endswith("weight"):
            value = value[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        out[f"first_stage_model.{_vae_key(key, n_up)}"] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; the original files keep the `text_model.` level
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{key}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def write_single_file(pipe: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm_state_dict(pipe), str(path))
    return path
