"""Where SaRA's selected entries are. Saved as packed bits (one bit per entry of the tensor); kept in memory as one
byte per selected entry, the low byte of its flat index, with a count per block of 256 entries (4 bytes per block):
at the paper's densities about a quarter of 4-byte indices, which at equal trainable count is memory LoRA does not
spend (`bench/sara_memory.py`). The flat indices are decoded where an operation needs them, one tensor at a time."""

from __future__ import annotations

import torch
from torch import Tensor

#: entries per block: the low byte of a flat index is its place in the block
BLOCK = 256


def pack_bits(mask: Tensor) -> Tensor:
    """Bool (n,) → uint8 (⌈n/8⌉,); bit j of byte i is entry 8i + j."""
    n = mask.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.reshape(-1).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 (⌈n/8⌉,) → bool (n,), the inverse of `pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()


def encode(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Bool mask (any shape, n entries) → (low bytes uint8 (|M|,), counts int32 (⌈n/256⌉,)); `decode` inverts it."""
    idx = mask.reshape(-1).nonzero().squeeze(1)
    blocks = (mask.numel() + BLOCK - 1) // BLOCK
    # int32, not int16: DDP broadcasts every buffer at wrap time and gloo has no int16 ("Invalid scalar type")
    counts = torch.bincount(idx // BLOCK, minlength=blocks).to(torch.int32)
    return (idx % BLOCK).to(torch.uint8), counts


def decode(low: Tensor, counts: Tensor) -> Tensor:
    """The sorted flat indices of the selected entries: int32 (indexing accepts it), int64 past 2^31 entries."""
    dtype = torch.int32 if counts.numel() * BLOCK < 2**31 else torch.int64
    starts = torch.arange(counts.numel(), dtype=dtype, device=low.device) * BLOCK
    idx = torch.repeat_interleave(starts, counts.to(dtype), output_size=low.numel())
    return idx.add_(low)


def count(counts: Tensor) -> int:
    """How many entries are selected."""
    return int(counts.sum(dtype=torch.int64))
