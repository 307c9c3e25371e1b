"""Block removal for transformer denoisers: DiT and PixArt (one stack of ``transformer_blocks``), SD3 (joint MMDiT
blocks) and Flux (19 joint blocks, then 38 single-stream blocks in FLUX.1), as Flux "lite" models are made.

A `RemovalPlan` keeps, per stack, a list of block indices (``blocks`` for ``transformer_blocks``, ``single_blocks``
for Flux's ``single_transformer_blocks``) or drops every k-th block (``drop_every``, ``single_drop_every``). On an
MMDiT a stack the plan says nothing about keeps all its blocks; a DiT/PixArt plan must say something. The student is
the teacher's class with ``num_layers`` (and ``num_single_layers``) set to the kept counts; student block j of a
stack is the teacher's j-th kept block.

SD3 builds its last joint block without a context output (``context_pre_only``: no context feed-forward, no
``to_add_out``, and a context norm that yields only the attention input's scale and shift). A plan may drop the
teacher's last block: the student's new last block then takes every weight of its teacher block that it has, and
its context modulation (``norm1_context.linear``: AdaLayerNormContinuous, rows ``scale, shift``) gets the teacher
block's AdaLayerNormZero rows ``scale_msa, shift_msa``; both norms compute ``LN(x)·(1 + scale) + shift`` with the
same ε, so the context stream's attention input is unchanged (`sd3_context_rows`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..errors import bad_value

__all__ = ["feature_output_index", "is_mmdit_config", "kept_stacks", "sd3_context_rows", "stack_moves",
           "transformer_feature_pairs", "transformer_student_config"]

#: (stack attribute, config count key, plan field for kept indices, plan field for drop_every)
_JOINT = ("transformer_blocks", "num_layers", "blocks", "drop_every")
_SINGLE = ("single_transformer_blocks", "num_single_layers", "single_blocks", "single_drop_every")


def is_mmdit_config(config: dict[str, Any]) -> bool:
    """Whether a transformer config is an SD3 or Flux MMDiT's (text joins the image in joint attention)."""
    return "joint_attention_dim" in config


def _is_sd3(config: dict[str, Any]) -> bool:
    return is_mmdit_config(config) and "num_single_layers" not in config


def _stacks(config: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [_JOINT, _SINGLE] if "num_single_layers" in config else [_JOINT]


def _kept(n: int, blocks: list[int] | None, every: int | None, field: str, default_all: bool,
          plan_name: str = "custom") -> list[int]:
    if blocks is not None:
        keep = list(blocks)
    elif every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 2:
            raise bad_value(f"plan.{field.replace('blocks', 'drop_every')}", every,
                            "an integer ≥ 2 (drop blocks k-1, 2k-1, ...)")
        keep = [i for i in range(n) if (i + 1) % every]
    elif default_all:
        keep = list(range(n))
    else:
        raise bad_value("plan", plan_name, "`blocks: [...]` or `drop_every: k` for a transformer denoiser",
                        "base/small/tiny are UNet plans; e.g. {drop_every: 2} keeps half of the blocks")
    if not keep or any(isinstance(i, bool) or not isinstance(i, int) for i in keep) or keep != sorted(set(keep)) \
            or keep[0] < 0 or keep[-1] >= n:
        raise bad_value(f"plan.{field}", keep, f"increasing block indices in 0..{n - 1} (at least one)")
    return keep


def kept_stacks(config: dict[str, Any], plan: Any) -> dict[str, list[int]]:
    """Stack attribute → the teacher block indices the plan keeps, in order (every stack of the model).

    Raises:
        DifftuneError: a plan that names no stack of the model, ``single_blocks`` on a model without single
            blocks, or indices out of range / not increasing.
    """
    stacks = _stacks(config)
    mmdit = is_mmdit_config(config)
    if "num_single_layers" not in config and plan.single_blocks is not None:  # (single_drop_every is ignored)
        raise bad_value("plan.single_blocks", plan.single_blocks,
                        "nothing: this model has no single-stream blocks (Flux only)")
    if mmdit and all(getattr(plan, f) is None for s in stacks for f in s[2:]):
        raise bad_value("plan", plan.name, "at least one of " + ", ".join(f for s in stacks for f in s[2:]),
                        "e.g. {drop_every: 2} keeps every other joint block")
    return {attr: _kept(int(config[count]), getattr(plan, field), getattr(plan, every), field, mmdit, plan.name)
            for attr, count, field, every in stacks}


def transformer_student_config(config: dict[str, Any], plan: Any) -> dict[str, Any]:
    """The student's config: kept-block counts, and SD3.5's dual-attention layers renumbered."""
    cfg = dict(config)
    kept = kept_stacks(cfg, plan)
    for attr, count, _, _ in _stacks(cfg):
        cfg[count] = len(kept[attr])
    if cfg.get("dual_attention_layers"):
        dual = set(cfg["dual_attention_layers"])
        cfg["dual_attention_layers"] = [j for j, t in enumerate(kept["transformer_blocks"]) if t in dual]
    return cfg


def stack_moves(config: dict[str, Any], plan: Any) -> tuple[list[tuple[str, str]], re.Pattern]:
    """(student prefix, teacher prefix) of every kept block, and a pattern matching any block key of the teacher."""
    kept = kept_stacks(dict(config), plan)
    moves = [(f"{attr}.{j}.", f"{attr}.{t}.") for attr, keep in kept.items() for j, t in enumerate(keep)]
    return moves, re.compile(r"^(" + "|".join(re.escape(a) for a in kept) + r")\.\d+\.")


def transformer_feature_pairs(config: dict[str, Any], plan: Any) -> list[tuple[str, str]]:
    """(teacher block, student block) per kept block of every stack: student block j ↔ the teacher block just before
    the next kept one (the end of the span that j replaces)."""
    cfg = dict(config)
    counts = {attr: int(cfg[count]) for attr, count, _, _ in _stacks(cfg)}
    out = []
    for attr, keep in kept_stacks(cfg, plan).items():
        ends = [*keep[1:], counts[attr]]
        out += [(f"{attr}.{ends[j] - 1}", f"{attr}.{j}") for j in range(len(keep))]
    return out


def feature_output_index(config: dict[str, Any]) -> int:
    """Which element of a block's tuple output is its hidden state: MMDiT blocks return (context, image) and the
    image stream is distilled; UNet stages return (hidden, skips)."""
    return 1 if is_mmdit_config(dict(config)) else 0


def sd3_context_rows(config: dict[str, Any], key: str, teacher: Tensor, want: torch.Size) -> Tensor | None:
    """The student's ``norm1_context.linear`` weight/bias of SD3's last joint block from a teacher block that was not
    last (AdaLayerNormZero rows ``shift, scale, gate, ...`` → AdaLayerNormContinuous rows ``scale, shift``), or None
    when ``key`` is not such a tensor."""
    if not _is_sd3(dict(config)) or not key.endswith(("norm1_context.linear.weight", "norm1_context.linear.bias")):
        return None
    dim = want[0] // 2
    if teacher.shape[0] != 6 * dim or teacher.shape[1:] != want[1:]:
        return None
    return torch.cat([teacher[dim:2 * dim], teacher[:dim]])
