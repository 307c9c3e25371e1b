"""Flux LoRA files in the Black Forest Labs (BFL) layout, the naming ComfyUI, kohya sd-scripts and ai-toolkit use:
``lora_unet_double_blocks_{i}_img_attn_qkv``, ``lora_unet_single_blocks_{i}_linear1``, ...

BFL's reference Flux implementation fuses layers that diffusers' `FluxTransformer2DModel` keeps apart: a double
block's image (and text) attention has one ``qkv`` linear for diffusers' ``attn.to_q``/``to_k``/``to_v``
(``add_q_proj``/``add_k_proj``/``add_v_proj``), and a single block's ``linear1`` is ``attn.to_q``/``to_k``/``to_v``
and ``proj_mlp`` stacked along the output; how their LoRAs are fused and split again is `difftune.interop.fused`.
The final layer's modulation is (shift, scale) in BFL's order and (scale, shift) in diffusers': its rows are swapped
both ways. ComfyUI's dotted spelling of the same names (``diffusion_model.double_blocks.0.img_attn.qkv``) is read by
`difftune.interop.mmdit`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DifftuneError
from .fused import Layout
from .updates import LowRank, Update

__all__ = ["BFL", "BFL_PREFIX", "from_bfl", "is_bfl", "is_flux_adapter", "is_flux_module", "to_bfl", "write_bfl"]

BFL_PREFIX = "lora_unet"
#: BFL layer in double_blocks.{i} → diffusers module(s) in transformer_blocks.{i}
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),  # both orders: shift, scale, gate (attention), then the same for the MLP
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
#: BFL layer in single_blocks.{i} → diffusers module(s) in single_transformer_blocks.{i}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
#: BFL's layers outside the blocks → diffusers' modules
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_(.+)")
_PATH = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)")


def is_bfl(keys: list[str]) -> bool:
    """Whether kohya module names are BFL's (no UNet or other model has ``double_blocks``/``single_blocks``)."""
    return any(_BLOCK.match(k.removeprefix(BFL_PREFIX + "_")) for k in keys if k.startswith(BFL_PREFIX + "_"))


def is_flux_module(path: str) -> bool:
    """Whether a diffusers module path is one only Flux has (its single blocks)."""
    return path.startswith("single_transformer_blocks.")


def _bfl_layer(path: str) -> tuple[str, tuple[str, ...]]:
    """(BFL name without prefix, the diffusers members of that layer, in order) of a Flux module path."""
    m = _PATH.fullmatch(path)
    if m:
        kind, i, rest = m.groups()
        table, block = (SINGLE, "single") if kind == "single_transformer_blocks" else (DOUBLE, "double")
        for name, members in table.items():
            if rest in members:
                return f"{block}_blocks_{i}_{name}", tuple(f"{kind}.{i}.{x}" for x in members)
    for name, module in TOP.items():
        if path == module:
            return name, (module,)
    raise DifftuneError(f"module {path!r} has no name in the BFL Flux layout; kohya's Flux format holds the "
                        "transformer's linear layers (double/single blocks, embedders, final layer) only")


def _diffusers_members(name: str) -> tuple[str, ...]:
    """The diffusers module paths of a BFL module name (without prefix)."""
    m = _BLOCK.fullmatch(name)
    if m:
        kind, i, rest = m.groups()
        table, block = (DOUBLE, "transformer_blocks") if kind == "double" else (SINGLE, "single_transformer_blocks")
        if rest in table:
            return tuple(f"{block}.{i}.{x}" for x in table[rest])
    elif name in TOP:
        return (TOP[name],)
    raise DifftuneError(f"{BFL_PREFIX}_{name}: no such layer in the BFL Flux layout (known: double_blocks_<i>_"
                        f"{{{', '.join(DOUBLE)}}}, single_blocks_<i>_{{{', '.join(SINGLE)}}}, {', '.join(TOP)})")




def _swap(path: str, update: Update) -> bool:
    return path == "norm_out.linear"  # BFL (shift, scale), diffusers (scale, shift)


BFL = Layout("BFL Flux", _bfl_layer, _diffusers_members, _swap, BFL_PREFIX)


def to_bfl(updates: dict[str, LowRank]) -> dict[str, LowRank]:
    """{Flux module path: LoRA} → {BFL kohya name: LoRA}, fusing q/k/v (and a single block's MLP input) as BFL does.

    Raises:
        DifftuneError: a module with no BFL name, or a DoRA on a fused layer (its magnitudes would need the fused
            layer's norms; use the diffusers format).
    """
    return BFL.to_original(updates)


def from_bfl(updates: dict[str, Update]) -> dict[str, Update]:
    """{BFL kohya name: update} → {kohya name of the diffusers module (``lora_unet_transformer_blocks_0_attn_to_q``):
    update}, splitting fused layers (`difftune.interop.fused`)."""
    return BFL.from_original(updates)


def is_flux_adapter(header: dict[str, Any], paths: list[str], model: str | Path | None = None) -> bool:
    """Whether a saved adapter adapts a Flux transformer: its base's transformer config says so (``model`` or the
    recorded base), or, with no base at hand, it adapts modules only Flux has (single blocks)."""
    base = model or header.get("base_model")
    config = Path(base or ".") / "transformer" / "config.json"
    if base and config.is_file():
        try:
            return json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel"
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            pass  # unreadable: judge by the module names
    return any(map(is_flux_module, paths))


def write_bfl(tensors: dict[str, Tensor], updates: dict[str, LowRank], dtype: torch.dtype | None) -> dict[str, Any]:
    """Write a Flux transformer's LoRA in the BFL layout into ``tensors`` (`Layout.write`)."""
    return BFL.write(tensors, updates, dtype)
