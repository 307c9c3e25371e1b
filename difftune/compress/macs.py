"""Sizes of denoisers without their weights: parameters, and multiply-accumulates (MACs) counted as thop does, on
the meta device; `plan_summary` is what ``difftune distill plan`` prints for a teacher and its block-removal students.

MACs follow thop (`count_macs`): conv and linear layers (output elements × input channels per group × kernel size)
and thop's normalizations; the attention matmuls, GroupNorm and activations are functional or uncounted, as in
BK-SDM's ``count_macs_params.py``. SD3 and Flux (`mmdit_macs`) are counted with the text tokens of their pipelines'
defaults: SD3 77 CLIP + 256 T5 = 333, Flux 512 T5; attention matmuls are not counted there either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .block_removal import RemovalPlan, build_student, is_unet_config, load_plan, student_config
from .transformer_removal import is_mmdit_config

__all__ = ["count_macs", "count_parameters", "denoiser_macs", "mmdit_macs", "native_resolution", "plan_summary",
           "unet_macs"]

#: Text tokens of one prompt as the pipelines encode it by default: SD3 concatenates 77 CLIP and 256 T5 tokens;
#: FluxPipeline's ``max_sequence_length`` is 512.
MMDIT_TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Multiply-accumulates of one forward, in thop's convention (BK-SDM's ``count_macs_params.py`` uses thop):
    ``nn.Conv*`` (output elements × in/groups × kernel size; bias not counted), ``nn.Linear`` (output elements ×
    in_features) and thop's normalizations (LayerNorm, BatchNorm, InstanceNorm: 2 per input element, 4 when affine).
    GroupNorm, activations and the attention matmuls (functional) are not counted, as in thop. Runs on the meta
    device (shapes only), so SD-sized models need no memory."""
    total = [0]
    norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        out = output if isinstance(output, Tensor) else output[0]
        if isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features
        elif isinstance(module, norms):
            affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
            total[0] += 2 * inputs[0].numel() * (2 if affine else 1)
        else:  # (B, C_out, *spatial): each output element sums in/groups × kernel products
            k = 1
            for d in module.kernel_size:
                k *= d
            total[0] += out.numel() * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *norms))]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def unet_macs(unet: nn.Module, resolution: int = 512, vae_scale: int = 8) -> int:
    """`count_macs` of one UNet forward at ``resolution`` px (batch 1, 77 text tokens), on the meta device.

    SDXL-style ``text_time`` UNets get their pooled text embedding and six size numbers as extra inputs."""
    cfg = unet.config
    size = resolution // vae_scale
    ctx = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    with torch.device("meta"):
        x = torch.zeros(1, cfg.in_channels, size, size)
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(1, 77, ctx)}
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
        meta = unet if all(p.is_meta for p in unet.parameters()) else type(unet).from_config(unet.config)
        return count_macs(meta, x, torch.zeros(1), **kwargs)


def mmdit_macs(model: nn.Module, resolution: int = 1024, text_tokens: int | None = None, vae_scale: int = 8) -> int:
    """`count_macs` of one SD3 or Flux transformer forward at ``resolution`` px (batch 1), on the meta device.

    Flux takes 2×2-packed latents ((resolution/16)² tokens) with position ids and, for [dev], a guidance value;
    ``text_tokens`` defaults to `MMDIT_TEXT_TOKENS` (the pipelines' defaults)."""
    cfg = model.config
    flux = "num_single_layers" in cfg
    tokens = text_tokens or MMDIT_TEXT_TOKENS["flux" if flux else "sd3"]
    size = resolution // vae_scale
    with torch.device("meta"):
        meta = model if all(p.is_meta for p in model.parameters()) else type(model).from_config(cfg)
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(1, tokens, cfg.joint_attention_dim),
                                  "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim),
                                  "timestep": torch.zeros(1)}
        if not flux:
            return count_macs(meta, torch.zeros(1, cfg.in_channels, size, size), **kwargs)
        n = (size // 2) ** 2
        kwargs.update(img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(tokens, 3),
                      guidance=torch.zeros(1) if cfg.guidance_embeds else None)
        return count_macs(meta, torch.zeros(1, n, cfg.in_channels), **kwargs)


def native_resolution(model: nn.Module, vae_scale: int = 8) -> int:
    """The image size a denoiser was made for, in px: its ``sample_size`` × the VAE factor; FLUX.1 (no sample size in
    its config) 1024."""
    sample = dict(model.config).get("sample_size")
    if sample is None:
        return 1024
    return int(sample[0] if isinstance(sample, (list, tuple)) else sample) * vae_scale


def denoiser_macs(model: nn.Module, resolution: int, vae_scale: int = 8) -> int | None:
    """`count_macs` of one forward at ``resolution`` px (batch 1) for a UNet, SD3/Flux or a class-conditional DiT;
    None for other denoisers (their extra inputs are not modelled here)."""
    cfg = model.config
    if is_unet_config(dict(cfg)):
        return unet_macs(model, resolution, vae_scale)
    if is_mmdit_config(dict(cfg)):
        return mmdit_macs(model, resolution, vae_scale=vae_scale)
    if getattr(cfg, "num_embeds_ada_norm", None) and getattr(cfg, "norm_type", "") == "ada_norm_zero":
        size = resolution // vae_scale
        with torch.device("meta"):
            meta = model if all(p.is_meta for p in model.parameters()) else type(model).from_config(cfg)
            return count_macs(meta, torch.zeros(1, cfg.in_channels, size, size), timestep=torch.zeros(1).long(),
                              class_labels=torch.zeros(1).long())
    return None


def plan_summary(teacher: nn.Module, plans: list[str | dict[str, Any] | RemovalPlan],
                 resolution: int | None = None) -> list[dict[str, Any]]:
    """Parameters and MACs of the teacher and of each plan's student, built on the meta device (no weights).

    Returns one row per model: ``model``, ``parameters``, ``macs`` (None where not counted), and both as fractions
    of the teacher's. ``resolution`` defaults to `native_resolution`; a plan's label is its name, or the plan as given
    when it has none."""
    res = resolution or native_resolution(teacher)
    for plan in plans:  # a bad plan fails before any model is built or counted
        student_config(dict(teacher.config), plan)
    meta = _on_meta(teacher)
    rows = []
    for label, plan in [("teacher", None), *[(_label(p), p) for p in plans]]:
        model = meta if plan is None else build_student(_on_meta(meta), plan)
        rows.append({"model": label, "parameters": count_parameters(model), "macs": denoiser_macs(model, res),
                     "resolution": res})
    for row in rows:
        row["parameters_ratio"] = row["parameters"] / rows[0]["parameters"]
        row["macs_ratio"] = None if row["macs"] is None else row["macs"] / rows[0]["macs"]
    return rows


def _label(plan: str | dict[str, Any] | RemovalPlan) -> str:
    name = load_plan(plan).name
    if name != "custom":
        return name
    return str(plan) if isinstance(plan, (str, dict)) else repr(plan)


def _on_meta(model: nn.Module) -> nn.Module:
    if all(p.is_meta for p in model.parameters()):
        return model
    with torch.device("meta"):
        return type(model).from_config(model.config)
