"""b-bit packing: exact round trips for every b, odd lengths and large tensors; the byte layout; bad input."""

from __future__ import annotations

import pytest
import torch

from difftune import DifftuneError
from difftune.compress import pack, packed_size, unpack

BITS = range(1, 9)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 15, 17, 1001])
def test_round_trip_every_width_and_odd_lengths(bits, n):
    values = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits * 1000 + n))
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_size(n, bits) == (n * bits + 7) // 8
    out = unpack(packed, bits, n)
    assert out.dtype == torch.uint8 and torch.equal(out, values.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_large_and_extreme_values(bits):
    n = 3_000_001  # several million values, not a multiple of 8
    values = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits))
    values[:5] = (1 << bits) - 1  # all ones at the start, zeros at the end: catches bit bleed between values
    values[-5:] = 0
    assert torch.equal(unpack(pack(values, bits), bits, n), values.to(torch.uint8))


def test_byte_layout_is_lsb_first():
    # value i sits at bits [i*b, (i+1)*b): 1 | 2<<2 | 3<<4 | 0<<6 = 57; then 1 | 3<<2 = 13
    assert pack(torch.tensor([1, 2, 3, 0, 1, 3]), 2).tolist() == [57, 13]
    # 3-bit values straddle bytes: 7 | 5<<3 | 6<<6 = 7 + 40 + 384 → bytes 0xAF (175) and 0x01
    assert pack(torch.tensor([7, 5, 6]), 3).tolist() == [175, 1]
    assert pack(torch.tensor([[1, 0], [1, 1]]), 1).tolist() == [0b1101]  # multi-dim input is flattened row-major


def test_meta_tensors_give_the_packed_size():
    out = pack(torch.empty(1000, dtype=torch.uint8, device="meta"), 3)
    assert out.is_meta and out.shape == (375,)


def test_bad_input_is_refused():
    with pytest.raises(DifftuneError, match=r"`bits` must be an integer in 1\.\.8, got 9"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(DifftuneError, match="`bits`"):
        pack(torch.zeros(4, dtype=torch.uint8), True)
    with pytest.raises(DifftuneError, match=r"must lie in \[0, 3\].*\[0, 4\]"):
        pack(torch.tensor([0, 4]), 2)
    with pytest.raises(DifftuneError, match=r"\[-1, 0\]"):
        pack(torch.tensor([-1, 0]), 2)
    with pytest.raises(DifftuneError, match="an integer tensor"):
        pack(torch.zeros(4), 2)
    with pytest.raises(DifftuneError, match="holds 3 bytes, but 8 values of 4 bits take 4"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(DifftuneError, match="1-D uint8"):
        unpack(torch.zeros(4, dtype=torch.int32), 4, 8)
