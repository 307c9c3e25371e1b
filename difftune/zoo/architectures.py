"""Untrained reference pipelines, built from configs in code: what ``model.architecture`` in a training YAML names.

- ``sd-mini``: Stable-Diffusion architecture for 32×32 digits: AutoencoderKL (f = 4, 8×8×4 latents), a 4.7M
  UNet2DConditionModel with cross-attention at 4×4 and in the mid block, a 3-layer CLIP text encoder (kept frozen
  at its seeded random initialization: the UNet learns to read it), a byte-level CLIP tokenizer with whole-word
  tokens for the digit words, the style word and the trigger, and DDIM sampling (trailing spacing,
  ``clip_sample=False``: clipping x0 to [-1, 1] is wrong for latents, and it broke classifier-free guidance).
- ``flow-mini``: Stable Diffusion 3 architecture (flow matching, an MMDiT transformer, patch 2 on the same 8×8
  latents) built on a trained sd-mini folder (``vae_from``): its VAE, CLIP text encoder and tokenizer are reused
  (see `flow_mini`).
- ``dit-mini``: class-conditional DiTTransformer2DModel (patch 2 on the same 8×8 latents); its label table has 1,000
  rows plus the null row because DiTPipeline hard-codes 1000 as the null class.

Training uses the DDPM view of the same schedule (linear betas 1e-4 … 0.02, 1,000 steps, epsilon).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ..basemodel import CALL_KEY
from ..errors import bad_value
from .mnist import DIGIT_WORDS, PHRASINGS, STYLE_WORD, TRIGGER

ARCHITECTURES = ("sd-mini", "dit-mini", "flow-mini")
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon", "clip_sample": False}


def vocabulary() -> list[str]:
    words = {w for p in PHRASINGS for w in p.format(w="").split()}
    return sorted(words | set(DIGIT_WORDS) | {STYLE_WORD, "thin", TRIGGER, "photo", "of"})


def vae_mini() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), norm_num_groups=32, scaling_factor=1.0,
    )


def unet_mini(cross_attention_dim: int = 64) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(96, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def dit_mini() -> Any:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=6, num_attention_heads=4,
        attention_head_dim=32, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
        attention_bias=True, norm_elementwise_affine=False,
    )


#: flow-mini's transformer: width 128 (4 heads × 32), 6 joint blocks, patch 2 on the 8×8 latents (16 image tokens)
FLOW_MINI = {"num_layers": 6, "num_attention_heads": 4, "attention_head_dim": 32}
#: CLIP tokens per prompt in flow-mini (its tokenizers' model_max_length): the longest caption, "a photo of the
#: number seven", is 6 words + BOS/EOS. SD3's pipeline pads prompts to this length; 77 would be 3× the compute.
FLOW_MINI_CLIP_TOKENS = 8
#: the zero "T5" tokens flow-mini reads (it has no T5): recorded in its folder (`difftune.basemodel.call_settings`)
#: so that every difftune sampler passes ``max_sequence_length`` = 8, not the SD3 pipeline's default 256
FLOW_MINI_T5_TOKENS = 8


def mmdit_mini() -> Any:
    from diffusers import SD3Transformer2DModel

    width = FLOW_MINI["num_attention_heads"] * FLOW_MINI["attention_head_dim"]
    # joint_attention_dim / pooled_projection_dim 128: the two 64-wide CLIP encoders' states and pooled outputs,
    # concatenated by the pipeline
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, **FLOW_MINI,
                                 joint_attention_dim=128, caption_projection_dim=width, pooled_projection_dim=128,
                                 pos_embed_max_size=8)


def flow_mini(sd_mini: str | Path, seed: int = 0) -> Any:
    """An untrained flow-mini: `StableDiffusion3Pipeline` on a trained sd-mini folder ``sd_mini``.

    From sd-mini: the VAE (``shift_factor`` 0: its latents have mean 0.008 over the training digits, which the SD3
    pipeline needs set), the CLIP text encoder as ``text_encoder`` (with a seeded 64 → 64 text projection, which
    SD3's pooled embedding needs) and the tokenizer for both CLIP slots, limited to `FLOW_MINI_CLIP_TOKENS`. The
    second CLIP encoder is a seeded random one of the same shape (both stay frozen, as sd-mini's: the transformer
    learns to read them). There is no T5 (``text_encoder_3=None``): the pipeline then appends
    ``max_sequence_length`` zero tokens to the prompt. The scheduler is `FlowMatchEulerDiscreteScheduler` with
    shift 1 (SD3's shift 3 is for 64×64-patch images; 16 tokens need none).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = str(sd_mini)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", model_max_length=FLOW_MINI_CLIP_TOKENS)
    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    config = clip.config
    config.projection_dim = config.hidden_size
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(config)
    text_encoder.text_model.load_state_dict(clip.state_dict())  # transformers 5: CLIPTextModel is the bare text model
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    torch.manual_seed(seed + 4)
    pipe = StableDiffusion3Pipeline(
        transformer=mmdit_mini(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.register_to_config(**{CALL_KEY: {"max_sequence_length": FLOW_MINI_T5_TOKENS}})
    return pipe


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=False)


def _pipeline_folder(folder: str | Path | None) -> Path | None:
    from . import MODELS, path

    if folder is None or (Path(folder) / "model_index.json").is_file() or str(folder) not in MODELS:
        return None if folder is None else Path(folder)
    return path(str(folder))


def build(architecture: str, seed: int = 0, vae_from: str | Path | None = None) -> Any:
    """An untrained pipeline of ``architecture``; ``vae_from`` (a pipeline folder, or a shipped model's name) supplies
    a trained VAE (flow-mini: a trained sd-mini, which it needs)."""
    from diffusers import AutoencoderKL, DiTPipeline, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizers import write_clip_tokenizer

    if architecture not in ARCHITECTURES:
        raise bad_value("model.architecture", architecture, f"one of {ARCHITECTURES}")
    vae_from = _pipeline_folder(vae_from)
    if architecture == "flow-mini":
        if vae_from is None:
            raise bad_value("model.vae_from", vae_from, "a trained sd-mini pipeline folder (or: sd-mini)",
                            "flow-mini reuses sd-mini's VAE, CLIP text encoder and tokenizer")
        return flow_mini(vae_from, seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(str(vae_from), subfolder="vae") if vae_from else vae_mini()
    if architecture == "dit-mini":
        torch.manual_seed(seed + 1)
        return DiTPipeline(transformer=dit_mini(), vae=vae, scheduler=_scheduler())
    tok_dir = write_clip_tokenizer(tempfile.mkdtemp(prefix="difftune-sdmini-tok-"), vocabulary())
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed + 3)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet_mini(),
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
