"""Tiny random diffusion pipelines built from configs in code (SD, SDXL, DiT, PixArt; SD3 and Flux in `tiny_mmdit`),
for `difftune demo` and the tests (`difftune.testing` re-exports them).

Nothing here touches the Hugging Face Hub. Tokenizers are written to local folders (`difftune.zoo.tokenizers`), and
every model is built from a config with seeded random weights, so the same seed always gives identical weights. Each
pipeline generates a 32x32 image in well under a second on a CPU.

Example:
    >>> pipe = tiny_sd_pipeline()
    >>> image = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images[0]  # (32, 32, 3)
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .parts import clip_text_config, load_tokenizer, seeded
from .tokenizers import write_clip_tokenizer, write_t5_tokenizer

__all__ = ["PIPELINE_KINDS", "randomize_adapter", "save_tiny_pipeline", "tiny_dit", "tiny_dit_pipeline",
           "tiny_pixart_pipeline", "tiny_sd_pipeline", "tiny_sdxl_pipeline", "tiny_unet"]

#: Pipeline kinds accepted by :func:`save_tiny_pipeline`.
PIPELINE_KINDS: tuple[str, ...] = ("sd", "sdxl", "dit", "pixart", "sd3", "flux")

def _tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """Build a 2-level VAE (scale factor 2, 4 latent channels, ~0.66M parameters)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """Build a tiny SD1.x-like UNet (~1M parameters, 16x16 latents, cross-attention at the lower resolution).

    Args:
        seed: Seed for the random weights.
        cross_attention_dim: Width of the text embeddings the UNet attends to.

    Returns:
        The UNet, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        return seeded(
            seed,
            lambda: UNet2DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=cross_attention_dim,
                attention_head_dim=8,
                norm_num_groups=32,
            ),
        )


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    """Build a tiny class-conditional DiT (patch 2, 2 layers, 4 heads x 8, 1000 classes, 16x16 latents).

    Args:
        seed: Seed for the random weights.

    Returns:
        The transformer, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        return seeded(
            seed,
            lambda: DiTTransformer2DModel(
                sample_size=16,
                patch_size=2,
                num_layers=2,
                num_attention_heads=4,
                attention_head_dim=8,
                in_channels=4,
                out_channels=8,
                attention_bias=True,
                activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000,  # DiTPipeline uses class id 1000 as the null class for guidance
                norm_type="ada_norm_zero",
                norm_elementwise_affine=False,
            ),
        )


def tiny_sd_pipeline(tokenizer_dir: str | Path | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """Build a tiny Stable Diffusion 1.x pipeline (32x32 images, DDIM).

    Args:
        tokenizer_dir: Folder holding a CLIP tokenizer. If it has no ``tokenizer_config.json`` the default one
            from :func:`write_clip_tokenizer` is written there first; ``None`` uses a fresh temporary folder.
        seed: Seed for every component's random weights.

    Returns:
        The pipeline, on CPU, with no safety checker.
    """
    tokenizer = load_tokenizer(tokenizer_dir, write_clip_tokenizer, CLIPTokenizer)
    with torch.random.fork_rng(devices=[]):
        unet = tiny_unet(seed, cross_attention_dim=32)
        vae = seeded(seed, _tiny_vae)
        text_encoder = seeded(seed, lambda: CLIPTextModel(clip_text_config(tokenizer)))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(tokenizer_dir: str | Path | None = None, seed: int = 0) -> StableDiffusionXLPipeline:
    """Build a tiny SDXL pipeline (two CLIP text encoders, ``text_time`` micro-conditioning, 32x32 images, Euler).

    Args:
        tokenizer_dir: Folder holding a CLIP tokenizer, used for both tokenizers (see :func:`tiny_sd_pipeline`).
        seed: Seed for every component's random weights.

    Returns:
        The pipeline, on CPU, without the invisible watermarker.
    """
    tokenizer = load_tokenizer(tokenizer_dir, write_clip_tokenizer, CLIPTokenizer)
    with torch.random.fork_rng(devices=[]):
        unet = seeded(
            seed,
            lambda: UNet2DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 2),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + text_encoder_2 projection_dim 32
                cross_attention_dim=64,  # hidden sizes of both text encoders, concatenated
                norm_num_groups=32,
            ),
        )
        vae = seeded(seed, lambda: _tiny_vae(scaling_factor=0.13025))
        text_encoder = seeded(seed, lambda: CLIPTextModel(clip_text_config(tokenizer)))
        text_config_2 = clip_text_config(tokenizer, projection_dim=32, hidden_act="gelu")
        text_encoder_2 = seeded(seed, lambda: CLIPTextModelWithProjection(text_config_2))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )


def tiny_dit_pipeline(seed: int = 0) -> DiTPipeline:
    """Build a tiny class-conditional DiT pipeline (32x32 images, DDIM). Call it with ``class_labels=[...]``.

    Args:
        seed: Seed for every component's random weights.

    Returns:
        The pipeline, on CPU. It has no ``id2label`` table.
    """
    with torch.random.fork_rng(devices=[]):
        transformer = tiny_dit(seed)
        vae = seeded(seed, _tiny_vae)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def tiny_pixart_pipeline(tokenizer_dir: str | Path | None = None, seed: int = 0) -> PixArtAlphaPipeline:
    """Build a tiny PixArt-alpha pipeline (T5 encoder, 32x32 images, DDIM).

    Call it with ``use_resolution_binning=False`` (otherwise sizes snap to the 256-1024 px aspect bins) and
    ``clean_caption=False``.

    Args:
        tokenizer_dir: Folder holding a T5 tokenizer; the default one from :func:`write_t5_tokenizer` is written
            there if it has no ``tokenizer_config.json``. ``None`` uses a fresh temporary folder.
        seed: Seed for every component's random weights.

    Returns:
        The pipeline, on CPU.
    """
    tokenizer = load_tokenizer(tokenizer_dir, write_t5_tokenizer, T5Tokenizer)
    t5_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        transformer = seeded(
            seed,
            lambda: PixArtTransformer2DModel(
                sample_size=16,
                patch_size=2,
                num_layers=2,
                num_attention_heads=3,
                attention_head_dim=8,
                cross_attention_dim=24,  # = heads x head dim
                caption_channels=32,  # = T5 d_model
                in_channels=4,
                out_channels=8,
                attention_bias=True,
                activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=1e-6,
            ),
        )
        vae = seeded(seed, _tiny_vae)
        text_encoder = seeded(seed, lambda: T5EncoderModel(t5_config))
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


_BUILDERS: dict[str, Callable[[str, int], DiffusionPipeline]] = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "dit": lambda _tokenizer_dir, seed: tiny_dit_pipeline(seed),
    "pixart": tiny_pixart_pipeline,
}


def save_tiny_pipeline(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and save it so that ``DiffusionPipeline.from_pretrained(path)`` loads it offline.

    Args:
        kind: One of ``"sd"``, ``"sdxl"``, ``"dit"``, ``"pixart"``, ``"sd3"``, ``"flux"`` (`difftune.zoo.tiny_mmdit`).
        path: Folder to save into (``model_index.json`` plus one subfolder per component).
        seed: Seed for every component's random weights.

    Returns:
        The folder, as a ``Path``.

    Raises:
        ValueError: If ``kind`` is not a known pipeline kind.
    """
    from .tiny_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline

    builders = {**_BUILDERS, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
    if kind not in builders:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {', '.join(PIPELINE_KINDS)}")
    folder = Path(path)
    with tempfile.TemporaryDirectory(prefix="difftune-tok-") as tokenizer_dir:
        pipeline = builders[kind](tokenizer_dir, seed)
        pipeline.save_pretrained(str(folder))
    return folder


def randomize_adapter(model: torch.nn.Module, name: str, seed: int = 0, std: float = 0.1) -> None:
    """Give adapter ``name``'s parameters non-zero random values (N(0, std²)), seeded.

    Most methods start at ΔW = 0, which would make merge/round-trip tests vacuous; tests call this first, and
    `difftune demo` uses it in place of a trained adapter.
    Floating-point buffers are left alone (they hold structure such as masks, not learned values).
    """
    from ..methods.verbs import adapter_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std).to(p.dtype))
