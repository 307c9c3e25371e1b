"""Tiny offline diffusion models and pipelines for tests (the configs of real ones: `difftune.architectures`).

The builders live in production modules, because `difftune demo` and the shipped sd-mini use them too:
`difftune.zoo.tiny` (tiny seeded SD, SDXL, DiT and PixArt pipelines, `randomize_adapter`), `difftune.zoo.tiny_mmdit`
(SD3 and Flux) and `difftune.zoo.tokenizers` (the offline CLIP and T5 tokenizer writers). This module gathers them for
tests under one name; no production module imports it. ``build_on_meta``, ``sd15_unet_config``, ``sdxl_unet_config``
and ``dit_xl2_config`` are re-exported from `difftune.architectures` so that older imports keep working.

Example:
    >>> pipe = tiny_sd_pipeline()
    >>> image = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images[0]  # (32, 32, 3)
"""

from __future__ import annotations

from .architectures import build_on_meta, dit_xl2_config, sd15_unet_config, sdxl_unet_config
from .zoo.tiny import (
    PIPELINE_KINDS,
    randomize_adapter,
    save_tiny_pipeline,
    tiny_dit,
    tiny_dit_pipeline,
    tiny_pixart_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet,
)
from .zoo.tiny_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline
from .zoo.tokenizers import DEFAULT_WORDS, write_clip_tokenizer, write_t5_tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "PIPELINE_KINDS",
    "build_on_meta",
    "dit_xl2_config",
    "randomize_adapter",
    "save_tiny_pipeline",
    "sd15_unet_config",
    "sdxl_unet_config",
    "tiny_dit",
    "tiny_dit_pipeline",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_unet",
    "write_clip_tokenizer",
    "write_t5_tokenizer",
]
