"""The tensors of one module in each file format `export.export_adapter` writes (kohya LoRA/DoRA, LyCORIS LoHa,
LyCORIS full ΔW), under the module's kohya key."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DifftuneError
from .updates import Hadamard, LowRank, Update

__all__ = ["write_diff", "write_kohya", "write_loha"]


def write_kohya(tensors: dict[str, Tensor], key: str, update: LowRank, dtype: torch.dtype) -> None:
    """lora_down / lora_up / alpha (and LyCORIS's dora_scale for a DoRA)."""
    r = update.rank
    # kohya clients scale by alpha / r; a file alpha reproducing our scale (α itself unless rsLoRA's α / √r)
    alpha = update.alpha if update.alpha is not None and not update.rslora else update.scale * r
    tensors[f"{key}.lora_down.weight"] = update.down.to(dtype).contiguous()
    tensors[f"{key}.lora_up.weight"] = update.up.to(dtype).contiguous()
    tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    if update.magnitude is not None:  # LyCORIS's layout (wd_on_out): one magnitude per output row, (d_out, 1[, 1, 1])
        tensors[f"{key}.dora_scale"] = update.magnitude.reshape(-1, *[1] * (update.up.dim() - 1)).to(dtype)


def write_loha(tensors: dict[str, Tensor], key: str, update: Hadamard, dtype: torch.dtype) -> None:
    for part in ("w1a", "w1b", "w2a", "w2b"):  # LyCORIS's names and shapes: (d_out, r) and (r, d_in·k·k)
        tensors[f"{key}.hada_{part[:2]}_{part[2]}"] = getattr(update, part).to(dtype).contiguous()
    tensors[f"{key}.alpha"] = torch.tensor(float(update.scale * update.rank), dtype=dtype)  # LyCORIS scales by α / r


def write_diff(tensors: dict[str, Tensor], key: str, update: Update, norm: bool, dtype: torch.dtype) -> None:
    names = {"weight": "w_norm", "bias": "b_norm"} if norm else {"weight": "diff", "bias": "diff_b"}
    for param, value in update.delta().items():
        if param not in names:
            raise DifftuneError(f"{key}: parameter {param!r} has no key in the diff format (weight and bias only)")
        tensors[f"{key}.{names[param]}"] = value.to(dtype).contiguous()
