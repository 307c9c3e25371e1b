"""Small offline tokenizers written from a word list: a byte-level BPE CLIP tokenizer (the shipped sd-mini's, and the
tiny test pipelines') and a T5-style Unigram one (the tiny PixArt's).

Nothing is downloaded: the vocabulary and merges are built here so that every given word is one token, and
``CLIPTokenizer.from_pretrained(folder)`` / ``T5Tokenizer.from_pretrained(folder)`` load the result offline.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from transformers import T5Tokenizer

__all__ = ["DEFAULT_WORDS", "write_clip_tokenizer", "write_t5_tokenizer"]

#: Words that the tiny tokenizers map to a single token each.
DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "painting", "drawing", "style", "sks",
    "cat", "dog", "person", "man", "woman", "car", "house", "tree", "red", "blue", "green", "black", "white",
    "digit", "handwritten", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_PIECE = re.compile(r"[^\W\d_]+|\d|(?:[^\w\s]|_)+")  # one piece of CLIP's pre-tokenizer split


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
