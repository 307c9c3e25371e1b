"""SaRA unfused, M kept as positions (loaded or once fused): the dense copy the layer runs with is made once and kept
until Δ, the weight or the base changes (issue 27: it was rebuilt on every forward). Outputs are compared with a
model whose weights hold W0 + w·Δ written by hand, the computation the per-forward copy did (same kernels, so equal
bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch

import difftune as dt
from difftune.methods.sara import SaRAAdapter, SaRAConfig
from difftune.methods.verbs import adapter_parameters, hosts, refresh
from difftune.testing import randomize_adapter, tiny_unet

THETA = 0.02


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([10, 500])), {
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=g).to(dtype)}


def _out(model, grad=False):
    args, kwargs = _inputs(next(model.parameters()).dtype)
    with torch.set_grad_enabled(grad):
        return model(*args, **kwargs).sample


def _adapted(weight=0.7):
    base = tiny_unet(0)
    model = copy.deepcopy(base)
    dt.inject(model, SaRAConfig(threshold=THETA), name="s", weight=weight)
    randomize_adapter(model, "s", seed=3, std=0.01)
    # fused once, M is kept as positions, as in an adapter loaded from a file: the route with a kept dense copy
    # (freshly injected, M is read off the base and each call makes its weights in blocks: test_sara_blocks.py)
    dt.fuse(model)
    dt.unfuse(model)
    assert not any(a._derived for a in _adapters(model))
    return base, model


def _reference(base, model, name="s"):
    """``base`` with ``current[M] + w · Δ`` written into its own parameters (what each forward used to copy)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for host_name, host in hosts(model):
            adapter, w = host.adapters[name], host.adapter_weights[name]
            layer = ref.get_submodule(host_name)
            for p in adapter.pnames:
                flat = getattr(layer, p).view(-1)
                idx = adapter.index(p)
                flat[idx] = flat.index_select(0, idx) + (w * adapter.delta_vector(p)).to(flat.dtype)
    return ref


def _adapters(model, name="s"):
    return [h.adapters[name] for _, h in hosts(model) if name in h.adapters]


def _recording(monkeypatch):
    """Records the ids of the parameter tensors every functional_call runs a layer with."""
    seen = []
    call = torch.func.functional_call

    def record(module, params, *args, **kwargs):
        seen.append(tuple(id(t) for t in params.values()))
        return call(module, params, *args, **kwargs)

    monkeypatch.setattr(torch.func, "functional_call", record)
    return seen


def test_the_dense_copy_is_made_once_and_reused(monkeypatch):
    base, model = _adapted()
    seen = _recording(monkeypatch)
    first = _out(model)
    calls = len(seen)
    second = _out(model)
    assert calls and seen[:calls] == seen[calls:], "a forward with nothing changed rebuilt a dense weight"
    assert torch.equal(first, second)
    assert torch.equal(first, _out(_reference(base, model)))


@pytest.mark.parametrize("change", ["delta", "weight", "base", "dtype", "data_and_refresh"])
def test_the_copy_follows_every_change(change):
    base, model = _adapted()
    before = _out(model)
    adapter = _adapters(model)[0]
    pname = adapter.pnames[0]
    with torch.no_grad():
        if change == "delta":  # an optimizer's in-place step
            for a in _adapters(model):
                a.delta_vector(a.pnames[0]).mul_(3)
        elif change == "weight":
            dt.set_adapter_weights(model, {"s": -0.4})
        elif change == "base":  # new base values loaded in place into one layer (of both models)
            name, host = next(iter(hosts(model)))
            for layer in (host.base_layer, base.get_submodule(name)):
                layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
        elif change == "dtype":
            model.double()
            base.double()
            assert not any(a._dense for a in _adapters(model)), "a move must not leave copies on the old device"
        else:  # a write through .data bypasses version counters: refresh() is the way to catch up
            adapter.delta_vector(pname).data.mul_(5)
            refresh(model)
    after = _out(model)
    assert not torch.equal(after, before)
    assert torch.equal(after, _out(_reference(base, model)))


def test_gradients_still_reach_delta_and_fuse_frees_the_copy():
    base, model = _adapted(weight=1.0)
    _out(model)
    assert all(a._dense for a in _adapters(model))
    out = _out(model, grad=True)
    out.square().mean().backward()
    grads = [a.delta_vector(p).grad for a in _adapters(model) for p in a.pnames]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.equal(out.detach(), _out(_reference(base, model)))  # the graph path gives the same values
    unfused = _out(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.fuse(model)
    assert not any(a._dense for a in _adapters(model)), "a fused adapter keeps no unfused copy"
    torch.testing.assert_close(_out(model), unfused, atol=1e-6, rtol=0)
    dt.unfuse(model)
    assert all(torch.equal(originals[n], p) for n, p in model.named_parameters())
    assert torch.equal(_out(model), unfused)


def test_a_copy_made_in_inference_mode_does_not_break_training_another_adapter():
    base, model = _adapted()
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_q"]), name="l")  # freezes SaRA, trains LoRA
    randomize_adapter(model, "l", seed=1, std=0.01)
    with torch.inference_mode():
        _out(model)
    _out(model, grad=True).square().mean().backward()  # an inference tensor saved for backward would raise here
    assert all(p.grad is not None for p in adapter_parameters(model, "l"))


def test_copies_of_the_model_leave_the_dense_copies_behind():
    _, model = _adapted()
    expected = _out(model)
    clone = copy.deepcopy(model)
    assert not any(a._dense for a in _adapters(clone))
    assert isinstance(_adapters(clone)[0], SaRAAdapter)
    assert torch.equal(_out(clone), expected)
