"""Fusing into fp32 weights adds each w·ΔW in place, and the W0 copy made at the first fuse stays after unfusing
while the weight is unchanged, so fusing again copies nothing (issue 27: a copy of W0, a working copy and a copy back
per layer made `dt.fuse` ~2.5× slower than diffusers' `fuse_lora`). The fused values are the same fp32 sum as before,
bit for bit, and unfuse still restores the original exactly, also after the weights were rewritten in between."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import difftune as dt
from difftune.methods.sara import SaRAConfig
from difftune.methods.verbs import refresh
from difftune.testing import randomize_adapter


class _FullSizeWrites(TorchDispatchMode):
    """Records out-of-place adds, copies and clones that produce or fill a tensor of ``shape`` (a copy of W)."""

    def __init__(self, shape: torch.Size, ops: tuple[str, ...] = ("aten.add", "aten.copy_")) -> None:
        super().__init__()
        self.shape, self.ops, self.seen = shape, ops, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in self.ops and isinstance(out, torch.Tensor) and out.shape == self.shape:
            self.seen.append(name)
        return out


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))


def test_fp32_fuse_adds_in_place_and_gives_the_same_sum():
    net = _net()
    w0 = net[2].weight.detach().clone()
    for i, name in enumerate(("a", "b")):
        dt.inject(net, dt.LoRAConfig(rank=2, target_modules=["2"]), name=name)
        randomize_adapter(net, name, seed=i, std=0.2)
    dt.set_adapter_weights(net, {"a": 0.7, "b": 1.0})
    host = net[2]
    deltas = [host.adapters[n].delta_weight(w0) for n in ("a", "b")]
    expected = w0 + 0.7 * deltas[0]  # the fp32 sum fuse has always written, in adapter order
    expected = expected + 1.0 * deltas[1]
    x = torch.randn(3, 16)
    unfused = net(x)
    with _FullSizeWrites(w0.shape) as mode:
        dt.fuse(net)
    assert mode.seen == [], f"fuse made a working copy of the fp32 weight: {mode.seen}"
    assert torch.equal(host.base_layer.weight, expected)
    torch.testing.assert_close(net(x), unfused, atol=1e-6, rtol=0)
    for _ in range(50):
        dt.unfuse(net)
        dt.fuse(net)
    dt.unfuse(net)
    assert torch.equal(host.base_layer.weight, w0)


def test_in_place_fuse_with_a_sparse_adapter_on_the_same_weight_unfuses_exactly():
    net = _net()
    originals = {n: p.detach().clone() for n, p in net.named_parameters()}
    dt.inject(net, SaRAConfig(threshold=0.05, target_modules=["2"]), name="s")
    dt.inject(net, dt.LoRAConfig(rank=2, target_modules=["2"]), name="l")
    for i, name in enumerate(("s", "l")):
        randomize_adapter(net, name, seed=i, std=0.05)
    x = torch.randn(3, 16)
    unfused = net(x)
    dt.fuse(net, "s")  # sparse first, then the dense one takes its W0 after the sparse entries are restored
    dt.fuse(net, "l")
    torch.testing.assert_close(net(x), unfused, atol=1e-6, rtol=0)
    dt.set_adapter_weights(net, {"l": 0.5, "s": 2.0})  # rewrites the merged weight from W0
    dt.unfuse(net, "s")
    dt.fuse(net, "s")
    reweighted = net(x)
    dt.unfuse(net)
    torch.testing.assert_close(net(x), reweighted, atol=1e-6, rtol=0)
    dt.remove(net)
    assert all(torch.equal(originals[n], p) for n, p in net.named_parameters())


def _lora_net(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    net = _net()
    dt.inject(net, dt.LoRAConfig(rank=2, target_modules=["2"]), name="a")
    randomize_adapter(net, "a", seed=seed, std=0.2)
    return net, net[2]


_COPIES = ("aten.clone", "aten.copy_", "aten.add")


def test_fusing_again_copies_nothing_and_cycles_stay_bit_identical():
    net, host = _lora_net()
    w0 = host.base_layer.weight.detach().clone()
    dt.fuse(net)
    fused = host.base_layer.weight.detach().clone()
    dt.unfuse(net)
    assert torch.equal(host.base_layer.weight, w0)
    for _ in range(20):
        with _FullSizeWrites(w0.shape, _COPIES) as mode:
            dt.fuse(net)
        assert mode.seen == [], f"fusing again copied the weight: {mode.seen}"
        assert torch.equal(host.base_layer.weight, fused)
        dt.unfuse(net)
        assert torch.equal(host.base_layer.weight, w0)


def _rewrite(net: nn.Module, layer: nn.Module, how: str) -> None:
    with torch.no_grad():
        if how == "in_place":
            layer.weight.mul_(3)
        elif how == "load_state_dict":
            layer.load_state_dict({k: v * 3 for k, v in layer.state_dict().items()})
        elif how == "to_double":
            net.double()
        else:  # .data bypasses version counters: refresh() is the way to say so
            layer.weight.data.mul_(3)
            refresh(net)


@pytest.mark.parametrize("how", ["in_place", "load_state_dict", "to_double", "data_and_refresh"])
def test_a_weight_rewritten_between_unfuse_and_fuse_is_the_new_base(how: str):
    net, host = _lora_net()
    dt.fuse(net)
    dt.unfuse(net)  # the copy of W0 is kept
    layer = host.base_layer
    _rewrite(net, layer, how)
    new = layer.weight.detach().clone()
    assert torch.equal(host.base_value("weight"), new)  # what adapters read as W0 (DoRA's norm, ...)
    expected = new + host.adapters["a"].delta_weight(new).to(new.dtype)
    dt.fuse(net)
    torch.testing.assert_close(layer.weight, expected, atol=1e-6, rtol=0)
    dt.unfuse(net)
    assert torch.equal(layer.weight, new)


def test_a_sparse_adapter_beside_a_kept_copy_still_restores_its_entries():
    net, host = _lora_net()
    w0 = host.base_layer.weight.detach().clone()
    dt.inject(net, SaRAConfig(threshold=0.05, target_modules=["2"]), name="s")
    randomize_adapter(net, "s", seed=3, std=0.05)
    x = torch.randn(3, 16)
    unfused = net(x)
    for _ in range(3):
        dt.fuse(net, "a")
        dt.fuse(net, "s")
        torch.testing.assert_close(net(x), unfused, atol=1e-6, rtol=0)
        dt.unfuse(net, "a")  # the copy is kept while SaRA stays fused
        torch.testing.assert_close(net(x), unfused, atol=1e-6, rtol=0)
        dt.unfuse(net)
        assert torch.equal(host.base_layer.weight, w0)


def test_the_kept_copy_goes_with_the_last_dense_adapter():
    net, host = _lora_net()
    dt.inject(net, SaRAConfig(threshold=0.05, target_modules=["2"]), name="s")
    dt.fuse(net)
    dt.unfuse(net)
    assert "original_weight" in host._buffers  # kept for the next fuse of the LoRA
    dt.remove(net, "a")
    assert not any(k.startswith("original_") for k in host._buffers)
    dt.fuse(net, "s")
    dt.unfuse(net)
    assert not any(k.startswith("original_") for k in host._buffers)
