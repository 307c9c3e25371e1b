"""SaRA's memory (issue 27): the positions of the selected entries cost a byte each, not a 4-byte index."""

from __future__ import annotations

import pytest
import torch

import difftune as dt
from difftune.methods.sara import SaRAConfig
from difftune.methods.sara.positions import BLOCK, count, decode, encode
from difftune.methods.verbs import hosts
from difftune.testing import tiny_unet


@pytest.mark.parametrize(("n", "density"), [(1, 1.0), (700, 0.0), (BLOCK * 5, 1.0), (1001, 0.3), (100_003, 0.05)])
def test_positions_decode_to_the_selected_indices(n: int, density: float):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < density
    low, counts = encode(mask)
    assert low.dtype == torch.uint8 and counts.dtype == torch.int32
    idx = decode(low, counts)
    assert idx.dtype == torch.int32 and torch.equal(idx.long(), mask.nonzero().squeeze(1))
    assert count(counts) == int(mask.sum())


def test_the_positions_cost_about_a_byte_per_selected_entry():
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=0.02), name="s")
    selected = blocks = kept = 0
    for _, host in hosts(model):
        adapter = host.adapters["s"]
        selected += adapter.selected()
        blocks += sum(-(-p.numel() // BLOCK) for p in host.base_layer.parameters(recurse=False))
        kept += sum(b.numel() * b.element_size() for n, b in adapter.named_buffers()
                    if not n.startswith(("w0_", "sara_base_")) and b is not None)
    # 1 byte per selected entry and 2 per block of 256 entries of the tensor (a 4-byte index each before)
    assert selected > 10_000 and kept == selected + 4 * blocks

