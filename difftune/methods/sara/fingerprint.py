"""SaRA's base check: a fingerprint of the base values saved with the adapter, compared when it is loaded (an adapter
of specific weights applies only to the exact base it was trained on, in any dtype)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...errors import DifftuneError


def fingerprint(param: Tensor) -> Tensor:
    """(numel, Σ W0², Σ W0) in float64: cheap, and far apart for different checkpoints."""
    w = param.detach().double().reshape(-1)
    return torch.stack([torch.tensor(float(w.numel()), dtype=torch.float64, device=w.device), w.square().sum(),
                        w.sum()]).cpu()


def check_base(name: str, saved: Tensor, param: Tensor, mask: Tensor, threshold: float) -> None:
    here = fingerprint(param)
    # A file whose tensors were converted to float16/bfloat16 holds a rounded fingerprint, and a count or sum beyond
    # 65,504 became inf there: compare within the file's rounding and skip what overflowed (the mask's size, checked
    # by `adopt`, and the θ test below still tell the base apart).
    rounding = 0.0 if saved.dtype == torch.float64 else torch.finfo(saved.dtype).eps
    saved = saved.double()
    n_saved, n_here = float(saved[0]), float(here[0])
    if math.isfinite(n_saved) and abs(n_saved - n_here) > rounding * n_here:
        raise DifftuneError(f"`{name}` has {int(n_here):,} entries, the adapter's mask {n_saved:,.0f}")
    # An fp16/bf16 copy of the same base differs by rounding only: at most 2·2^-8 relative in Σ W0², and it moves no
    # entry clearly across θ. Another checkpoint moves many (the energy test alone catches other initializations).
    scale = max(float(saved[1]), 1e-30)
    energy = abs(float(here[1]) - float(saved[1])) / scale if math.isfinite(float(saved[1])) else 0.0
    magnitude = param.detach().abs().reshape(-1).float()
    # Rounding to fp16/bf16 moves a value by < 0.4 %: only entries clearly on the other side of θ count as flips.
    clear = (magnitude - threshold).abs() > 1e-2 * threshold
    flipped = int(((magnitude < threshold) != mask)[clear].sum())
    if energy > 2 * torch.finfo(torch.bfloat16).eps or flipped > max(10, 1e-3 * int(mask.sum())):
        raise DifftuneError(
            f"the base values of `{name}` differ from those the adapter was trained on (Σ W0² differs by "
            f"{energy:.2e} relative, {flipped:,} entries cross θ={threshold:g}). SaRA stores changes to specific "
            "weights, so it only applies to the exact base model it was trained on (any dtype of it)."
        )
