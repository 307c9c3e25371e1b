"""Tiny offline diffusion models and pipelines for tests (the configs of real ones: `difftune.architectures`).

Nothing here touches the Hugging Face Hub. Tokenizers are written to local folders, and every model is built from a
config with seeded random weights, so the same seed always gives identical weights. Each pipeline generates a 32x32
image in well under a second on a CPU. ``build_on_meta``, ``sd15_unet_config``, ``sdxl_unet_config`` and
``dit_xl2_config`` are re-exported from `difftune.architectures` so that older imports keep working.

Example:
    >>> pipe = tiny_sd_pipeline()
    >>> image = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images[0]  # (32, 32, 3)
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .architectures import build_on_meta, dit_xl2_config, sd15_unet_config, sdxl_unet_config

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
    "tiny_pixart_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_unet",
    "write_clip_tokenizer",
    "write_t5_tokenizer",
]

#: Words that the tiny tokenizers map to a single token each.
DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "painting", "drawing", "style", "sks",
    "cat", "dog", "person", "man", "woman", "car", "house", "tree", "red", "blue", "green", "black", "white",
    "digit", "handwritten", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip

#: Pipeline kinds accepted by :func:`save_tiny_pipeline`.
PIPELINE_KINDS: tuple[str, ...] = ("sd", "sdxl", "dit", "pixart")

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_PIECE = re.compile(r"[^\W\d_]+|\d|(?:[^\w\s]|_)+")  # one piece of CLIP's pre-tokenizer split
_MIN_TEXT_VOCAB = 1000
_M = TypeVar("_M", bound=torch.nn.Module)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """Return CLIP's (GPT-2's) reversible byte -> printable unicode character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + rest, printable + [256 + i for i in range(len(rest))], strict=True)}


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Run byte-pair encoding on ``symbols``: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pair = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _normalize_words(words: Sequence[str]) -> list[str]:
    """Lowercase and de-duplicate ``words``; reject words that CLIP's pre-tokenizer would split."""
    if isinstance(words, str):
        raise TypeError("words must be a sequence of strings, not a single string")
    result: list[str] = []
    for word in words:
        norm = unicodedata.normalize("NFC", str(word)).lower()
        if not _CLIP_PIECE.fullmatch(norm):
            raise ValueError(
                f"cannot make {word!r} a single token: use letters only (or a single digit, or punctuation only)"
            )
        if norm not in result:
            result.append(norm)
    return result


def write_clip_tokenizer(path: str | Path, words: Sequence[str] = DEFAULT_WORDS) -> Path:
    """Write a small byte-level BPE CLIP tokenizer that ``CLIPTokenizer.from_pretrained(path)`` loads offline.

    The vocabulary is laid out like OpenAI CLIP's: the 256 byte-level characters, the same characters with the
    ``</w>`` end-of-word suffix, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (the last two
    ids). Merges are added until every word in ``words`` encodes as a single token. Any other text still
    tokenizes, one byte-level character per token at worst.

    Args:
        path: Folder to write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` into. It is created if needed.
        words: Words that become single tokens. They are lowercased, as CLIP lowercases its input. Each must be
            one piece under CLIP's pre-tokenizer: letters only, a single digit, or punctuation only.

    Returns:
        The folder, as a ``Path``.

    Raises:
        ValueError: If a word would be split by CLIP's pre-tokenizer.
        TypeError: If ``words`` is a single string.
    """
    byte_encoder = _bytes_to_unicode()
    chars = list(byte_encoder.values())
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in _normalize_words(words):
        encoded = "".join(byte_encoder[b] for b in word.encode("utf-8"))
        symbols = [*encoded[:-1], encoded[-1] + "</w>"]
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:  # a new merge has the highest rank, so it never changes words already done
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _apply_merges(symbols, ranks)
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    specials = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": _EOS, "unk_token": _EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return folder


def write_t5_tokenizer(path: str | Path, words: Sequence[str] = DEFAULT_WORDS) -> Path:
    """Write a small T5-style (Unigram, ``▁`` word prefix) tokenizer that ``T5Tokenizer.from_pretrained`` loads.

    Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5. Each of ``words`` (preceded by a space) is one token;
    other text falls back to single printable ASCII characters, and anything else maps to ``<unk>``.

    Args:
        path: Folder to save the tokenizer into (``tokenizer.json``, ``tokenizer_config.json``). Created if needed.
        words: Words that become single tokens (lowercased).

    Returns:
        The folder, as a ``Path``.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in _normalize_words(words)]
    pieces += [(chr(c), -5.0) for c in range(ord("!"), ord("~") + 1)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def _load_tokenizer(
    tokenizer_dir: str | Path | None, writer: Callable[[Path], Path], cls: type[PreTrainedTokenizerBase]
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from ``tokenizer_dir``, writing the default one there first if the folder has none."""
    folder = Path(tempfile.mkdtemp(prefix="difftune-tok-") if tokenizer_dir is None else tokenizer_dir)
    if not (folder / "tokenizer_config.json").is_file():
        writer(folder)
    return cls.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------------------------------
# Tiny models and pipelines
# --------------------------------------------------------------------------------------------------------------------


def _seeded(seed: int, build: Callable[[], _M]) -> _M:
    """Seed torch, build one component and put it in eval mode (as ``from_pretrained`` would)."""
    torch.manual_seed(seed)
    return build().eval()


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


def _clip_text_config(tokenizer: CLIPTokenizer, **kwargs: Any) -> CLIPTextConfig:
    """Return a tiny CLIP text config whose vocabulary and special ids match ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=max(_MIN_TEXT_VOCAB, len(tokenizer)),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
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
        return _seeded(
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
        return _seeded(
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
    tokenizer = _load_tokenizer(tokenizer_dir, write_clip_tokenizer, CLIPTokenizer)
    with torch.random.fork_rng(devices=[]):
        unet = tiny_unet(seed, cross_attention_dim=32)
        vae = _seeded(seed, _tiny_vae)
        text_encoder = _seeded(seed, lambda: CLIPTextModel(_clip_text_config(tokenizer)))
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
    tokenizer = _load_tokenizer(tokenizer_dir, write_clip_tokenizer, CLIPTokenizer)
    with torch.random.fork_rng(devices=[]):
        unet = _seeded(
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
        vae = _seeded(seed, lambda: _tiny_vae(scaling_factor=0.13025))
        text_encoder = _seeded(seed, lambda: CLIPTextModel(_clip_text_config(tokenizer)))
        text_config_2 = _clip_text_config(tokenizer, projection_dim=32, hidden_act="gelu")
        text_encoder_2 = _seeded(seed, lambda: CLIPTextModelWithProjection(text_config_2))
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
        vae = _seeded(seed, _tiny_vae)
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
    tokenizer = _load_tokenizer(tokenizer_dir, write_t5_tokenizer, T5Tokenizer)
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
        transformer = _seeded(
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
        vae = _seeded(seed, _tiny_vae)
        text_encoder = _seeded(seed, lambda: T5EncoderModel(t5_config))
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
        kind: One of ``"sd"``, ``"sdxl"``, ``"dit"``, ``"pixart"``.
        path: Folder to save into (``model_index.json`` plus one subfolder per component).
        seed: Seed for every component's random weights.

    Returns:
        The folder, as a ``Path``.

    Raises:
        ValueError: If ``kind`` is not a known pipeline kind.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {', '.join(PIPELINE_KINDS)}")
    folder = Path(path)
    with tempfile.TemporaryDirectory(prefix="difftune-tok-") as tokenizer_dir:
        pipeline = _BUILDERS[kind](tokenizer_dir, seed)
        pipeline.save_pretrained(str(folder))
    return folder


def randomize_adapter(model: torch.nn.Module, name: str, seed: int = 0, std: float = 0.1) -> None:
    """Give adapter ``name``'s parameters non-zero random values (N(0, std²)), seeded.

    Most methods start at ΔW = 0, which would make merge/round-trip tests vacuous; tests call this first.
    Floating-point buffers are left alone (they hold structure such as masks, not learned values).
    """
    from .methods.model import adapter_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std).to(p.dtype))
