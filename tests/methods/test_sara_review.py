"""Cases a review of SaRA trained unfused (`sara.unfused.UnfusedLayer`, `SaRAAdapter.layer_output`) found: each
failed on the first version, where the unfused route differed from the route it replaces (the base layer run with a
dense copy of its parameters, `param_overrides`) or refused a legitimate use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import difftune as dt
from difftune.methods.lora import LoRAConfig
from difftune.methods.sara import SaRAAdapter, SaRAConfig
from difftune.methods.verbs import adapter_parameters, merge, unmerge
from difftune.testing import randomize_adapter


def _model(freeze_base: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    dt.inject(model, SaRAConfig(target_modules=["0"], threshold=0.3), name="s", weight=0.7, freeze_base=freeze_base)
    randomize_adapter(model, "s", seed=5, std=0.2)
    return model


def _dense_route(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The model's output through the dense route (`param_overrides`), the unfused route switched off."""
    with monkeypatch.context() as m:
        m.setattr(SaRAAdapter, "layer_output", lambda self, x, layer, weight: None)
        return model(x)


def test_review_forward_hooks_on_the_base_layer_still_run(monkeypatch):
    """REVIEW: the unfused route computes the layer without calling it, so forward hooks registered on the base
    layer (feature taps, `difftune.compress.count_macs`, a hook that edits the output) are skipped: the dense and
    fused routes call the layer, and a hook's edit of the output is lost."""
    model = _model()
    calls = []
    model[0].base_layer.register_forward_hook(lambda module, inputs, out: calls.append(1) or out * 2)
    x = torch.randn(3, 12)
    out = model(x)
    ref = _dense_route(model, x, monkeypatch)
    assert len(calls) == 2, "the base layer's forward hook did not run on the unfused route"
    torch.testing.assert_close(out, ref)


def test_review_a_trainable_base_weight_gets_its_gradient(monkeypatch):
    """REVIEW: injected with ``freeze_base=False`` (or a base unfrozen later to train with SaRA), the base weight
    requires a gradient; `UnfusedLayer` reads it detached, so its gradient is silently dropped (None), where the
    dense route gives dL/dW."""
    model = _model(freeze_base=False)
    weight = model[0].base_layer.weight
    assert weight.requires_grad
    x = torch.randn(3, 12)
    _dense_route(model, x, monkeypatch).sum().backward()
    ref = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert weight.grad is not None, "the base weight's gradient was dropped on the unfused route"
    torch.testing.assert_close(weight.grad, ref)
    assert all(p.grad is not None for p in adapter_parameters(model, "s"))


def test_review_sara_injected_on_a_layer_with_a_merged_lora():
    """REVIEW: `verbs.inject` unmerges a layer's merged adapters, makes the new adapter (SaRA reads M off W0), then
    merges them back, before SaRA is in the host: the base then holds W0 + ΔLoRA under a derived M and the
    injection itself (its state_dict check) raises the "moved" error ("cast or written after injection"), though
    nothing was cast or written by the user. Fused LoRA + SaRA on top, or loading a SaRA file onto a model with a
    fused LoRA, is legitimate; before this change M was kept as positions at injection and it worked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    dt.inject(model, LoRAConfig(target_modules=["0"], rank=2), name="l")
    randomize_adapter(model, "l", seed=7, std=0.5)
    merge(model, "l")
    dt.inject(model, SaRAConfig(target_modules=["0"], threshold=0.3), name="s")
    randomize_adapter(model, "s", seed=5, std=0.2)
    x = torch.randn(3, 12)
    with torch.no_grad():
        fused = model(x)
        unmerge(model, "l")
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 10), lambda: nn.Conv2d(4, 6, 3)], ids=["linear", "conv"])
def test_review_a_float64_layer_under_autocast_stays_float64(make, monkeypatch):
    """REVIEW: autocast never casts float64 tensors (a stock layer and the dense route run in float64 under bf16
    autocast); `UnfusedLayer` cast the input and the weight to the autocast dtype (bf16), 1e-2 off."""
    torch.manual_seed(0)
    layer = make()
    model = nn.Sequential(layer).double()
    dt.inject(model, SaRAConfig(target_modules=["0"], threshold=0.3), name="s", weight=0.7)
    randomize_adapter(model, "s", seed=5, std=0.2)
    x = torch.randn((3, 12) if isinstance(layer, nn.Linear) else (2, 4, 6, 6), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        ref = _dense_route(model, x, monkeypatch)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
