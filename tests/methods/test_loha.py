"""LoHa: equality with peft's LoHa (output and ΔW), the rank-r² identity, init, config validation."""

from __future__ import annotations

import copy

import pytest
import torch
from test_lora import Net

import difftune as dt
from difftune.interop.updates import loha_as_low_rank


def test_equals_peft_loha_on_identical_weights():
    from peft import LoHaConfig, inject_adapter_in_model

    torch.manual_seed(0)
    ours = Net()
    theirs = inject_adapter_in_model(LoHaConfig(r=3, alpha=5, target_modules=["lin", "conv"], init_weights=False),
                                     copy.deepcopy(ours))
    dt.inject(ours, dt.LoHaConfig(rank=3, alpha=5, target_modules=["lin", "conv"]))
    x, img = torch.randn(4, 20), torch.randn(2, 3, 9, 9)
    base = [y.detach() for y in ours(x, img)]
    with torch.no_grad():
        for mod in ("lin", "conv"):
            a, layer = getattr(ours, mod).adapters["default"], getattr(theirs, mod)
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                assert getattr(a, name).shape == getattr(layer, name)["default"].shape  # peft's (and LyCORIS's) shapes
                getattr(a, name).copy_(getattr(layer, name)["default"])
        for got, want, b in zip(ours(x, img), theirs(x, img), base):
            assert (want - b).abs().max() > 1e-2
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for mod in ("lin", "conv"):
            layer = getattr(theirs, mod)
            torch.testing.assert_close(getattr(ours, mod).adapters["default"].delta_weight(layer.base_layer.weight),
                                       layer.get_delta_weight("default"), atol=1e-6, rtol=1e-6)


def test_delta_is_exactly_its_rank_r_squared_lora():
    torch.manual_seed(1)
    net = Net()
    dt.inject(net, dt.LoHaConfig(rank=2, alpha=3, target_modules=["conv"]))
    a = net.conv.adapters["default"]
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    parts = {k: v.detach() for k, v in a.state_dict().items()} | {"alpha": torch.tensor(3.0)}
    lora = loha_as_low_rank(parts, "conv")
    assert lora.rank == 4
    dw = a.delta_weight(net.conv.weight)
    torch.testing.assert_close(lora.delta()["weight"].view(dw.shape), dw, atol=1e-5, rtol=1e-5)


def test_a_fresh_loha_changes_nothing():
    torch.manual_seed(0)
    net = Net()
    x, img = torch.randn(2, 20), torch.randn(1, 3, 8, 8)
    before = net(x, img)
    dt.inject(net, dt.LoHaConfig(target_modules=["lin", "conv"], rank=2))
    for a, b in zip(before, net(x, img)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert net.lin.adapters["default"].hada_w1_a.abs().max() > 0  # only W2b starts at zero (peft's init)


@pytest.mark.parametrize(("kwargs", "field"), [({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"),
                                               ({"alpha": 0.0}, "alpha"), ({"alpha": "4"}, "alpha"),
                                               ({"rank": 40, "target_modules": ["lin"]}, "rank")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(dt.DifftuneError, match=f"`{field}`"):
        config = dt.LoHaConfig(**{"target_modules": ["lin"], **kwargs})
        dt.inject(Net(), config)  # a rank above the layer's width is refused at injection


def test_saved_rank_must_match_the_config(tmp_path):
    from difftune.serialization import read_tensors

    net = Net()
    dt.inject(net, dt.LoHaConfig(rank=2, target_modules=["lin"]))
    tensors = read_tensors(dt.save_adapter(net, tmp_path / "loha"))
    with pytest.raises(dt.DifftuneError, match="`rank`"):
        dt.LoHaConfig(rank=3, target_modules=["lin"]).check_saved(tensors)
