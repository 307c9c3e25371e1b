"""Building blocks of the tiny pipelines (`difftune.zoo.tiny`, `difftune.zoo.tiny_mmdit`): seeded construction, offline
tokenizers, tiny CLIP text configs."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import CLIPTextConfig, CLIPTokenizer, PreTrainedTokenizerBase

__all__ = ["clip_text_config", "load_tokenizer", "seeded"]

_MIN_TEXT_VOCAB = 1000
_M = TypeVar("_M", bound=torch.nn.Module)


def load_tokenizer(
    tokenizer_dir: str | Path | None, writer: Callable[[Path], Path], cls: type[PreTrainedTokenizerBase]
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from ``tokenizer_dir``, writing the default one there first if the folder has none."""
    folder = Path(tempfile.mkdtemp(prefix="difftune-tok-") if tokenizer_dir is None else tokenizer_dir)
    if not (folder / "tokenizer_config.json").is_file():
        writer(folder)
    return cls.from_pretrained(str(folder))


def seeded(seed: int, build: Callable[[], _M]) -> _M:
    """Seed torch, build one component and put it in eval mode (as ``from_pretrained`` would)."""
    torch.manual_seed(seed)
    return build().eval()


def clip_text_config(tokenizer: CLIPTokenizer, **kwargs: Any) -> CLIPTextConfig:
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
