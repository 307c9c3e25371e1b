"""Which component of a pipeline is the denoiser, and which family a pipeline belongs to: decided here, once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Component names that hold the denoiser, in the order they are looked for.
DENOISERS = ("unet", "transformer")


def denoiser_name(components: Iterable[str]) -> str | None:
    """The denoiser among a pipeline's component names (``unet``, else ``transformer``), or None."""
    names = set(components)
    return next((c for c in DENOISERS if c in names), None)


def component_of_model(model: Any) -> str:
    """The pipeline component a bare denoiser module is, from its class: ``unet`` for diffusers' UNets,
    ``transformer`` for its DiT, PixArt, SD3 and Flux transformers (every ``*Transformer2DModel``); ``""`` for
    anything else (a text encoder could be any of a pipeline's encoders)."""
    name = type(model).__name__
    if name.startswith("UNet2D"):
        return "unet"
    if name.endswith("Transformer2DModel"):
        return "transformer"
    return ""


def pipeline_kind(pipe: Any) -> str:
    """``"dit"``, ``"pixart"``, ``"sd3"``, ``"flux"``, ``"sdxl"``, ``"sd"`` (SD 1.x/2.x-like: one CLIP text encoder)
    or ``"other"``."""
    name = type(pipe).__name__
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if "DiT" in name:
        return "dit"
    if "PixArt" in name:
        return "pixart"
    if "XL" in name and getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
        return "sd"
    return "other"
