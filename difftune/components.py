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
