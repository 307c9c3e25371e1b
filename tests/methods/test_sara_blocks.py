"""SaRA trained unfused (issue 27): the base keeps W0, M is read off it, and a stock Linear/Conv2d runs with its weight
W0 + w·Δ made a block of output channels at a time (`sara.unfused.UnfusedLayer`). The new route is compared with the
route it replaces for training (fused: Δ written into the weights) and with autograd through a dense copy; the
blocks are different kernel calls from one whole-weight call, so values are compared with a tolerance, and the
adapters here move outputs and gradients far more than it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import difftune as dt
import difftune.methods.sara.unfused as unfused
from difftune.errors import DifftuneError
from difftune.methods.sara import SaRAAdamW, SaRAAdapter, SaRAConfig
from difftune.methods.verbs import adapter_parameters, hosts
from difftune.testing import randomize_adapter, tiny_unet

THETA = 0.02


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([10, 500])), {
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=g).to(dtype)}


def _adapters(model, name="s"):
    return [h.adapters[name] for _, h in hosts(model) if name in h.adapters]


def _layer_model(layer: nn.Module, weight: float = 0.7, threshold: float = 0.3) -> nn.Module:
    model = nn.Sequential(layer)
    dt.inject(model, SaRAConfig(target_modules=["0"], threshold=threshold), name="s", weight=weight)
    randomize_adapter(model, "s", seed=5, std=0.2)
    return model


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * probe).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in adapter_parameters(model, "s")]


LAYERS = {
    "linear_rank1": (lambda: nn.Linear(12, 10), (12,)),
    "linear_rank2": (lambda: nn.Linear(12, 10), (5, 12)),
    "linear_rank3": (lambda: nn.Linear(12, 10), (2, 5, 12)),
    "linear_no_bias": (lambda: nn.Linear(12, 10, bias=False), (3, 12)),
    "conv_strided": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv_dilated": (lambda: nn.Conv2d(6, 10, 3, dilation=2, padding=2), (2, 6, 8, 8)),
    "conv_grouped": (lambda: nn.Conv2d(6, 10, 3, groups=2, padding=1), (2, 6, 8, 8)),
    "conv_unbatched": (lambda: nn.Conv2d(6, 10, 1), (6, 5, 5)),
}


@pytest.mark.parametrize("chunk", [unfused.CHUNK, 40])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_blocks_equal_the_dense_route_on_every_layer_form(kind, chunk, monkeypatch):
    """Outputs, input gradients and ∂L/∂Δ (weight and bias) of `UnfusedLayer` equal autograd through a dense copy
    with Δ written in (the unmerged route that keeps no positions-free form), in one block and in many (CHUNK=40)."""
    monkeypatch.setattr(unfused, "CHUNK", chunk)  # before injection: the per-block counts follow the blocks
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = _layer_model(make())
    dense = copy.deepcopy(model)
    adapter = _adapters(model)[0]
    assert "weight" in adapter._derived and len(adapter._derived["weight"][1]) == len(
        unfused.row_blocks(tuple(model[0].base_layer.weight.shape), model[0].base_layer.groups
                           if hasattr(model[0].base_layer, "groups") else 1))
    calls = []
    original = unfused.UnfusedLayer.forward
    monkeypatch.setattr(unfused.UnfusedLayer, "forward", staticmethod(
        lambda *a: calls.append(1) or original(*a)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out, gx, gd = _grads(model, x)
    assert calls, "the blocked route was not taken"
    monkeypatch.setattr(SaRAAdapter, "layer_output", lambda self, x, layer, weight: None)
    ref_out, ref_gx, ref_gd = _grads(dense, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    assert len(gd) == len(ref_gd) == len(adapter.pnames)
    for g, r in zip(gd, ref_gd):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        assert r.abs().max() > 1e-2  # the selection is not empty and the gradient reaches it
    base_out = model[0].base_layer(x)
    assert (out - base_out).abs().max() > 1e-2  # Δ changes the output by far more than the tolerance


def test_a_layer_larger_than_a_block_never_exists_twice_whole(monkeypatch):
    """The weight is made CHUNK entries at a time, forward and backward: no call runs with the whole weight."""
    monkeypatch.setattr(unfused, "CHUNK", 64)
    model = _layer_model(nn.Conv2d(8, 16, 3, padding=1))
    sizes = []
    conv2d, conv_input = torch.nn.functional.conv2d, torch.nn.grad.conv2d_input
    monkeypatch.setattr(unfused.F, "conv2d", lambda x, w, *a: sizes.append(w.numel()) or conv2d(x, w, *a))
    monkeypatch.setattr(torch.nn.grad, "conv2d_input",
                        lambda s, w, g, *a: sizes.append(w.numel()) or conv_input(s, w, g, *a))
    _grads(model, torch.randn(2, 8, 6, 6))
    per_row = 8 * 3 * 3
    assert len(sizes) == 2 * 16 and max(sizes) == per_row  # 72 > 64: one output channel per block


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unfused_training_equals_fused_training_on_the_unet(checkpointing):
    """Three optimizer steps of SaRAAdamW, unfused (the default) and fused: the same Δ, and fused then unfused the
    unfused model restores the base bit for bit. With gradient checkpointing and bf16 autocast too."""
    results = []
    for fused in (False, True):
        model = tiny_unet(0)
        originals = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = SaRAAdamW(model, threshold=THETA, lr=1e-3, fused_training=fused, rank_weight=0.1, rank_min_dim=16)
        if checkpointing:
            model.enable_gradient_checkpointing()
            model.train()
        args, kwargs = _inputs()
        losses, grads = [], []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=checkpointing):
                loss = model(*args, **kwargs).sample.float().pow(2).mean()
            loss.backward()
            losses.append(float(loss))
            grads.append(torch.cat([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert all(bool(a._derived) != fused for a in _adapters(model, "sara"))
        if not fused:
            assert all(torch.equal(originals[n.replace(".base_layer", "")], p) for n, p in model.named_parameters()
                       if "sara_" not in n), "unfused training wrote the base"
            with torch.no_grad():
                unfused_out = model(*args, **kwargs).sample
            dt.fuse(model)
            with torch.no_grad():
                torch.testing.assert_close(model(*args, **kwargs).sample, unfused_out, rtol=1e-4, atol=1e-5)
            dt.unfuse(model)
            assert all(torch.equal(originals[n.replace(".base_layer", "")], p) for n, p in model.named_parameters()
                       if "sara_" not in n), "unfuse after training unfused is not exact"
        results.append((losses, grads, torch.cat([p.detach() for g in opt.param_groups for p in g["params"]])))
    (losses, grads, delta), (fused_losses, fused_grads, fused_delta) = results
    assert delta.abs().max() > 1e-4 and losses[-1] < losses[0]
    tol = 2e-2 if checkpointing else 1e-5  # bf16 rounds each route's products differently
    assert losses == pytest.approx(fused_losses, rel=tol)
    for g, f in zip(grads, fused_grads):
        assert (g - f).abs().max() <= tol * f.abs().max()
    if not checkpointing:  # (in bf16 the gradients above are the comparison: ~1 % apart, Adam flips more signs)
        # Adam's first steps are ±lr wherever |g| >> ε: an entry whose gradient is ~0 (|g| ~ 1e-9, the median
        # ~1e-4) may take the other sign from a rounding difference; everywhere else Δ agrees
        clear = fused_grads[0].abs() > 1e-3 * fused_grads[0].abs().max()
        assert clear.float().mean() > 0.5
        torch.testing.assert_close(delta[clear], fused_delta[clear], rtol=1e-4, atol=1e-6)


def test_per_entry_state_is_delta_only_until_fused():
    """Freshly injected, SaRA keeps no tensor per selected entry besides Δ (no positions, no W0[M]); fusing keeps
    them (exact unfuse needs W0[M]) and unfusing restores the base bit for bit."""
    model = tiny_unet(0)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    randomize_adapter(model, "s", seed=3, std=0.05)

    def kept() -> int:
        return sum(b.numel() * b.element_size() for a in _adapters(model) for n, b in a.named_buffers()
                   if b is not None and not n.startswith("sara_base_"))

    selected = sum(a.selected() for a in _adapters(model))
    assert selected > 10_000 and kept() == 0
    dt.fuse(model)
    assert kept() >= 5 * selected  # W0[M] (4 bytes) and the positions (about 1 byte) per selected entry
    dt.unfuse(model)
    assert all(torch.equal(originals[n.replace(".base_layer", "")], p) for n, p in model.named_parameters()
               if "sara_" not in n)


def test_a_cast_keeps_m_and_a_write_under_a_derived_m_is_refused():
    """A dtype cast rounds W0 across θ: the adapter keeps M and W0[M] as read before the cast (its output equals
    the same adapter kept as positions beforehand). A base written in place while M is read off it is refused."""
    model = tiny_unet(0)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s")
    randomize_adapter(model, "s", seed=3, std=0.05)
    kept = copy.deepcopy(model)
    for a in _adapters(kept):
        for p in a.pnames:
            a._materialize(p)
    model.double()
    kept.double()
    assert not any(a._derived for a in _adapters(model))
    args, kwargs = _inputs(torch.float64)
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs).sample, kept(*args, **kwargs).sample)

    fresh = tiny_unet(0)
    dt.inject(fresh, SaRAConfig(threshold=THETA), name="s")
    _, host = next((n, h) for n, h in hosts(fresh) if isinstance(h.base_layer, nn.Conv2d))
    with torch.no_grad():
        host.base_layer.weight.mul_(3)
    with pytest.raises(DifftuneError, match="no longer select the entries"):
        fresh(*_inputs()[0], **_inputs()[1])


def test_a_checkpoint_leaves_no_byte_per_entry_behind():
    """Saving a checkpoint reads which entries still train (all, before PPA): the next step frees that all-True mask
    again (one byte per selected entry that LoRA does not keep); after PPA the mask stays and is obeyed."""
    from difftune.methods.plugin import plugin_for

    model = tiny_unet(0)
    opt = SaRAAdamW(model, threshold=THETA, lr=1e-3)
    plugin = plugin_for(SaRAConfig(threshold=THETA), "sara")
    tensors = plugin.checkpoint_tensors(model)
    assert any(k.rsplit(".", 1)[-1].startswith("train_") for k in tensors)

    def masks() -> int:
        return sum(b is not None for a in _adapters(model, "sara") for n, b in a.named_buffers() if "train_" in n)

    assert masks() > 0
    args, kwargs = _inputs()
    model(*args, **kwargs).sample.pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert masks() == 0
    summary = opt.progress()
    assert summary["after"] < summary["before"]
    model(*args, **kwargs).sample.pow(2).mean().backward()
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    opt.step()
    assert masks() > 0
    for a in _adapters(model, "sara"):
        for p in a.pnames:
            stay = ~a.train_mask(p)
            moved = a.delta_vector(p).detach() != before.pop(0)
            assert not bool((moved & stay).any())
