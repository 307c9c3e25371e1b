"""Tiny random SD3 and Flux pipelines (flow matching, MMDiT transformers), built from configs in code like the other
tiny pipelines of `difftune.zoo.tiny`, which registers them as ``save_tiny_pipeline`` kinds ``"sd3"`` and ``"flux"``.

Both decode 32×32 images from a 2-level VAE with 16 latent channels (16×16 latents; Flux packs them into 2×2 patches,
8×8 = 64 tokens of 64 channels), and use `FlowMatchEulerDiscreteScheduler` with the released models' shift settings.

Example:
    >>> pipe = tiny_flux_pipeline()
    >>> image = pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np").images[0]
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
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

__all__ = ["tiny_flux_pipeline", "tiny_sd3_pipeline"]


def _tiny_vae16(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 2-level VAE (scale factor 2) with 16 latent channels and no quant convs, as SD3's and Flux's VAEs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _t5(tokenizer: T5Tokenizer, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def _tokenizers(tokenizer_dir: str | Path | None) -> tuple[CLIPTokenizer, T5Tokenizer]:
    base = None if tokenizer_dir is None else Path(tokenizer_dir)
    clip = load_tokenizer(None if base is None else base / "clip", write_clip_tokenizer, CLIPTokenizer)
    t5 = load_tokenizer(None if base is None else base / "t5", write_t5_tokenizer, T5Tokenizer)
    return clip, t5  # type: ignore[return-value]


def tiny_sd3_pipeline(tokenizer_dir: str | Path | None = None, seed: int = 0) -> StableDiffusion3Pipeline:
    """Build a tiny Stable Diffusion 3 pipeline: two CLIP encoders with projection (pooled 32 + 32) and a T5
    (d_model 64 = the joint attention width, which the CLIP states, 32 + 32 wide, are padded to), a 2-block MMDiT
    (patch 2, width 32) and SD3's flow-matching scheduler (shift 3).

    Args:
        tokenizer_dir: Folder for the tokenizers (``clip/`` and ``t5/`` below it, written if missing); ``None``
            uses fresh temporary folders.
        seed: Seed for every component's random weights.

    Returns:
        The pipeline, on CPU. Call it with ``height=32, width=32``.
    """
    clip_tok, t5_tok = _tokenizers(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        transformer = seeded(seed, lambda: SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=16,
        ))
        vae = seeded(seed, lambda: _tiny_vae16(1.5305, 0.0609))  # SD3's VAE scaling and shift
        config = clip_text_config(clip_tok, projection_dim=32)
        text_encoder = seeded(seed, lambda: CLIPTextModelWithProjection(config))
        text_encoder_2 = seeded(seed + 1, lambda: CLIPTextModelWithProjection(config))
        text_encoder_3 = seeded(seed, lambda: _t5(t5_tok, 64))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )


def tiny_flux_pipeline(tokenizer_dir: str | Path | None = None, seed: int = 0, guidance: bool = True) -> FluxPipeline:
    """Build a tiny FLUX.1 pipeline: CLIP (pooled 32) and T5 (d_model 32), a transformer of 1 joint and 2 single
    blocks (width 32 = 2 heads × 16, RoPE axes 4 + 6 + 6) over 2×2-packed 16-channel latents, with the guidance
    embedder of [dev] (``guidance=False``: [schnell]'s layout) and Flux's dynamically shifted scheduler.

    Args:
        tokenizer_dir: As for `tiny_sd3_pipeline`.
        seed: Seed for every component's random weights.
        guidance: Whether the transformer embeds a guidance scale (FLUX.1 [dev]).

    Returns:
        The pipeline, on CPU. Call it with ``height=32, width=32``.
    """
    clip_tok, t5_tok = _tokenizers(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        transformer = seeded(seed, lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
            axes_dims_rope=(4, 6, 6),
        ))
        vae = seeded(seed, lambda: _tiny_vae16(0.3611, 0.1159))  # Flux's VAE scaling and shift
        text_encoder = seeded(seed, lambda: CLIPTextModel(clip_text_config(clip_tok)))
        text_encoder_2 = seeded(seed, lambda: _t5(t5_tok, 32))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer)
