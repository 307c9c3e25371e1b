"""RTN: the per-channel error bound, storage sizes (tiny DiT and DiT-XL/2 on meta), the Linear-like protocol, and
`quantize_rtn_`'s selection and refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

import difftune as dt
from difftune import DifftuneError
from difftune.compress import (
    RTN_BITS,
    RTNLinear,
    get_replacement,
    quantize_rtn_,
    replaced_modules,
    rtn_quantize,
    tensor_bytes,
)
from difftune.targeting import find_targets
from difftune.testing import build_on_meta, dit_xl2_config, tiny_dit

#: The DiT block linears VQ4DiT quantizes (q, k, v, out, MLP in/out, adaLN): 7 per block in diffusers' layout.
BLOCK_LINEARS = [r"transformer_blocks\.\d+\.(attn1\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)|norm1\.linear)"]
MiB = 2**20


def _weight() -> torch.Tensor:
    w = torch.randn(6, 37, generator=torch.Generator().manual_seed(0))
    w[1] = w[1].abs() + 0.5  # all positive: the range is stretched to include 0
    w[2] = -w[2].abs()  # all negative
    w[3] = 0.0  # all zero: decodes exactly
    w[4, 5] = 40.0  # an outlier widens its row's scale only
    return w


@pytest.mark.parametrize("bits", RTN_BITS)
def test_error_bound_and_size(bits):
    linear = nn.Linear(37, 6)
    with torch.no_grad():
        linear.weight.copy_(_weight())
    q = RTNLinear.from_linear(linear, bits)
    deq = q.dequantized_weight()
    err = (linear.weight - deq).abs()  # (6, 37)
    bound = q.scale[:, None] / 2
    assert (err <= bound * (1 + 1e-5) + 1e-7).all(), (err / bound).max()
    assert torch.equal(deq[3], torch.zeros(37)) and torch.equal(q.bias, linear.bias)
    assert int(q.codes().max()) <= 2**bits - 1
    assert q.scale[4] > q.scale[0] * 5  # per-channel: the outlier row has its own scale
    # storage: ceil(n·b/8) code bytes, a fp32 scale and a uint8 zero point per row, the FP bias
    assert q.qweight.numel() == (6 * 37 * bits + 7) // 8
    assert tensor_bytes(q) == (6 * 37 * bits + 7) // 8 + 6 * (4 + 1 + 4)
    assert not any(t.is_floating_point() and t.numel() == 6 * 37 for t in q.state_dict().values())  # no dense W


def test_bound_is_tight_enough_to_matter():
    # 8-bit RTN must be much closer than 2-bit: the codes are used, not ignored
    linear = nn.Linear(64, 16)
    errs = {b: (linear.weight - RTNLinear.from_linear(linear, b).weight).abs().max().item() for b in (2, 8)}
    assert errs[8] < errs[2] / 30


def test_rtn_quantize_matches_the_module_and_meta_shapes():
    w = _weight()
    codes, scale, zero = rtn_quantize(w, 3)
    assert codes.shape == (6, 37) and scale.shape == zero.shape == (6,) and codes.dtype == zero.dtype == torch.uint8
    assert torch.allclose((codes.float() - zero.float()[:, None]) * scale[:, None], w, atol=scale.max().item() / 2)
    meta = rtn_quantize(torch.empty(8, 4, device="meta"), 2)
    assert all(t.is_meta for t in meta) and meta[0].shape == (8, 4)
    with pytest.raises(DifftuneError, match="inf or NaN"):
        rtn_quantize(torch.tensor([[1.0, float("nan")]]), 4)


def test_linear_protocol_forward_and_weight_property():
    linear = nn.Linear(16, 8)
    q = RTNLinear.from_linear(linear, 8)
    x = torch.randn(3, 5, 16)
    assert torch.equal(q(x), nn.functional.linear(x, q.dequantized_weight(), q.bias))
    assert torch.allclose(q(x), linear(x), atol=0.05)  # 8 bits is close to FP
    assert (q.in_features, q.out_features, q.weight.shape, q.weight.dtype) == (16, 8, (8, 16), torch.float32)
    assert q(x.half()).dtype == torch.float16
    assert "bits=8" in repr(q)
    assert get_replacement("rtn_linear") is RTNLinear


def test_assigning_weight_is_a_clear_error():
    model = tiny_dit()
    quantize_rtn_(model, 4, ["to_q"])
    layer = model.transformer_blocks[0].attn1.to_q
    for value in (nn.Parameter(torch.zeros(32, 32)), torch.zeros(32, 32)):
        with pytest.raises(DifftuneError, match=r"'transformer_blocks\.0\.attn1\.to_q' \(RTNLinear\) holds packed"):
            layer.weight = value


def test_quantize_selects_linears_and_keeps_the_rest():
    model = tiny_dit()
    fp = tiny_dit()
    names = quantize_rtn_(model, 4, [r"transformer_blocks\.\d+\..*"], exclude_modules=[r".*timestep_embedder\..*"])
    assert len(names) == 14 and set(replaced_modules(model)) == set(names)  # 7 linears × 2 blocks; containers skipped
    assert all(m.module_name == n for n, m in replaced_modules(model).items())
    assert isinstance(model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1, nn.Linear)
    assert torch.equal(model.proj_out_2.weight, fp.proj_out_2.weight)


def test_quantize_refusals_leave_the_model_unchanged():
    model = tiny_dit()
    for bits in (5, 2.0, True):
        with pytest.raises(DifftuneError, match="`bits` must be one of"):
            quantize_rtn_(model, bits, ["to_q"])
    with pytest.raises(DifftuneError, match="selects no nn.Linear"):
        quantize_rtn_(model, 4, ["norm1"])
    with pytest.raises(DifftuneError, match="no module of DiTTransformer2DModel matched"):
        quantize_rtn_(model, 4, ["to_qq"])
    with torch.no_grad():
        model.transformer_blocks[1].attn1.to_k.weight[0, 0] = float("inf")
    with pytest.raises(DifftuneError, match=r"cannot quantize 'transformer_blocks\.1\.attn1\.to_k'.*inf or NaN"):
        quantize_rtn_(model, 4, ["to_q", "to_k"])
    assert not replaced_modules(model)  # to_q of both blocks was built, but nothing was swapped in
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_v"]))
    with pytest.raises(DifftuneError, match="carries difftune adapters"):
        quantize_rtn_(model, 4, ["to_q"])


def test_dit_xl2_block_linears_sizes_on_meta():
    """Exact storage of 2-bit RTN on DiT-XL/2's 196 block linears, from shapes alone (no weights)."""
    model = build_on_meta(DiTTransformer2DModel, dit_xl2_config())
    fp = sum(tensor_bytes(model.get_submodule(n)) for n in find_targets(model, BLOCK_LINEARS))
    names = quantize_rtn_(model, 2, BLOCK_LINEARS)
    q = sum(tensor_bytes(m) for m in replaced_modules(model).values())
    assert len(names) == 196
    assert round(fp / MiB, 2) == 2553.35  # VQ4DiT's FP32 size of the blocks (668,860,416 weights + 483,840 biases)
    # codes at 2 bits/weight (VQ4DiT's 2-bit assignments: 159.47 MiB) + fp32 scale, uint8 zero, fp32 bias per row
    assert q == 668_860_416 * 2 // 8 + 483_840 * (4 + 1 + 4)
    assert round(q / MiB, 2) == 163.62 and fp / q > 15.6
