"""Bit packing of small unsigned integers (codebook indices, quantization codes) into bytes.

Layout: value i of a b-bit stream occupies bits [i·b, (i+1)·b) of the packed bytes, least-significant bit first
(bit k of the stream is bit k % 8 of byte k // 8). n values take exactly ceil(n·b / 8) bytes; the unused high bits
of the last byte are zero. Eight b-bit values fill exactly b bytes, so both directions work on groups of eight
values held in one int64 (8·b <= 64 bits), with no loop over elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DifftuneError, bad_value

#: Values per packing group: 8 values of b bits are exactly b bytes for every b.
GROUP = 8
#: Groups handled per vectorized step; bounds the int64 temporaries to ~150 MB whatever the tensor's size.
_CHUNK_GROUPS = 1 << 21


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise bad_value("bits", bits, "an integer in 1..8", "Codes of b bits take values 0 .. 2**b - 1.")
    return bits


def packed_size(n: int, bits: int) -> int:
    """Bytes that `pack` returns for ``n`` values of ``bits`` bits: ceil(n·bits / 8)."""
    bits = _check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise bad_value("n", n, "a non-negative integer (the number of packed values)")
    return (n * bits + 7) // 8


def pack(values: Tensor, bits: int) -> Tensor:
    """Pack integer ``values`` (any shape, flattened row-major) of ``bits`` bits each into a 1-D uint8 tensor.

    Args:
        values: an integer tensor with every value in [0, 2**bits); meta tensors give a meta result of the right
            size (value checks need real values and are skipped there).
        bits: b in 1..8.

    Returns:
        A uint8 tensor of ``packed_size(values.numel(), bits)`` bytes on ``values``' device.

    Raises:
        DifftuneError: non-integer values, values out of range, or ``bits`` outside 1..8.
    """
    bits = _check_bits(bits)
    integer = isinstance(values, Tensor) and not (values.is_floating_point() or values.is_complex())
    if not integer or values.dtype == torch.bool:
        got = values.dtype if isinstance(values, Tensor) else type(values).__name__
        raise bad_value("values", got, "an integer tensor (uint8, int32, int64, ...)", "Round and cast codes first.")
    n = values.numel()
    flat = values.reshape(-1)
    if not flat.is_meta and n:
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= 1 << bits:
            raise DifftuneError(f"`values` must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got values in "
                                f"[{low}, {high}]. Hint: codes of b bits index at most 2**b entries")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    groups = -(-n // GROUP)
    padded = torch.zeros(groups * GROUP, dtype=torch.int64, device=flat.device)
    padded[:n] = flat
    shifts = torch.arange(GROUP, device=flat.device, dtype=torch.int64) * bits  # value j of a group sits at bit j·b
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = torch.empty(groups, bits, dtype=torch.uint8, device=flat.device)
    grouped = padded.view(groups, GROUP)
    for start in range(0, groups, _CHUNK_GROUPS):  # a loop over memory-bounded chunks, not over elements
        chunk = grouped[start:start + _CHUNK_GROUPS]
        word = (chunk << shifts).sum(dim=1)  # (g,): bit fields do not overlap, so the sum is their OR
        out[start:start + _CHUNK_GROUPS] = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8)  # (g, bits)
    return out.view(-1)[:packed_size(n, bits)].clone()


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """The ``n`` values of ``bits`` bits stored in ``packed`` (as written by `pack`), as a 1-D uint8 tensor.

    Args:
        packed: a 1-D uint8 tensor of exactly ``packed_size(n, bits)`` bytes.
        bits: b in 1..8, as given to `pack`.
        n: the number of values packed.

    Raises:
        DifftuneError: a tensor that is not 1-D uint8, or whose size does not match ``n`` and ``bits``.
    """
    bits = _check_bits(bits)
    size = packed_size(n, bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise bad_value("packed", got, "a 1-D uint8 tensor written by pack()")
    if packed.numel() != size:
        raise DifftuneError(f"`packed` holds {packed.numel()} bytes, but {n} values of {bits} bits take {size}; "
                            "the codes were packed with another bit width or count, or the tensor is truncated")
    if bits == 8:
        return packed.clone()
    groups = -(-n // GROUP)
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    padded[:size] = packed
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    shifts = torch.arange(GROUP, device=packed.device, dtype=torch.int64) * bits
    out = torch.empty(groups, GROUP, dtype=torch.uint8, device=packed.device)
    grouped = padded.view(groups, bits)
    mask = (1 << bits) - 1
    for start in range(0, groups, _CHUNK_GROUPS):
        word = (grouped[start:start + _CHUNK_GROUPS] << byte_shifts).sum(dim=1)  # (g,): b bytes → one int64
        out[start:start + _CHUNK_GROUPS] = ((word[:, None] >> shifts) & mask).to(torch.uint8)  # (g, 8)
    return out.view(-1)[:n].clone()
