"""LoRA's unfused output on a linear layer accumulates B's product into the base output in one GEMM
(`LoRAAdapter.forward`): the same values as the general ``out + w · δ(x)`` route up to float rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import difftune as dt
from difftune.methods.base import Adapter
from difftune.methods.lora import LoRAAdapter


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 16), nn.Conv2d(4, 4, 3))
    dt.inject(model, dt.LoRAConfig(rank=4, alpha=8, target_modules=["0"]), name="a")
    for name, p in model.named_parameters():
        if "lora_" in name:
            nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("weight", [1.0, 0.3, 2, -1.5])
def test_the_gemm_route_is_the_general_one(weight, monkeypatch):
    layer = _model()[0]
    adapter = layer.adapters["a"]
    layer.adapter_weights["a"] = weight
    x = torch.randn(3, 5, 24, requires_grad=True)
    fast = layer(x)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
    calls = []
    monkeypatch.setattr(LoRAAdapter, "forward", lambda self, *a: calls.append(1) or Adapter.forward(self, *a))
    general = layer(x)
    (g_general,) = torch.autograd.grad(general.square().sum(), x)
    assert calls  # the general route ran the second time
    moved = (general - layer.base_layer(x)).abs().max()
    assert moved > 1.0  # the adapter changes the output far beyond the tolerance
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast, g_general, rtol=1e-5, atol=1e-4)
    assert isinstance(adapter, LoRAAdapter)


def test_per_item_weights_and_other_dtypes_take_the_general_route(monkeypatch):
    layer = _model()[0]
    calls = []
    monkeypatch.setattr(Adapter, "forward", lambda self, *a: calls.append(a[2]) or a[1])
    x = torch.randn(2, 24)
    layer(x)
    assert not calls  # one weight, fp32: the GEMM route
    layer.adapters["a"].forward(x.double(), layer.base_layer(x).double(), 1.0, layer.base_layer, {})
    weights = torch.tensor([[1.0], [0.5]])
    layer.adapters["a"].forward(x, layer.base_layer(x), weights, layer.base_layer, {})
    assert len(calls) == 2 and calls[1] is weights
