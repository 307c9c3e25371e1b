"""LoRA-specific behaviour: equality with peft, the real SD1.5 parameter count, config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import difftune as dt
from difftune.testing import build_on_meta, sd15_unet_config


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(20, 12)
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_equals_peft_lora_on_identical_weights(use_rslora):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    ours, theirs = Net(), Net()
    theirs.load_state_dict(ours.state_dict())
    x, img = torch.randn(4, 20), torch.randn(2, 3, 9, 9)
    base = ours(x, img)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], init_lora_weights=False,
                          use_rslora=use_rslora)
    theirs = inject_adapter_in_model(peft_cfg, theirs)
    dt.inject(ours, dt.LoRAConfig(rank=4, alpha=8, target_modules=["lin", "conv"], use_rslora=use_rslora))
    with torch.no_grad():
        for mod in ("lin", "conv"):
            a = getattr(ours, mod).adapters["default"]
            peft_layer = getattr(theirs, mod)
            a.lora_A.copy_(peft_layer.lora_A["default"].weight)
            a.lora_B.copy_(peft_layer.lora_B["default"].weight)
    for got, want, b in zip(ours(x, img), theirs(x, img), base):
        assert (want - b).abs().max() > 1e-2  # peft's non-default init really changes the output
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # peft's merged ΔW matches ours too
    for mod in ("lin", "conv"):
        torch.testing.assert_close(getattr(ours, mod).adapters["default"].delta_weight(getattr(ours, mod).weight),
                                   getattr(theirs, mod).get_delta_weight("default"), atol=1e-6, rtol=0)


def test_sd15_unet_lora_r4_qkvo_parameter_count():
    from diffusers import UNet2DConditionModel

    unet = build_on_meta(UNet2DConditionModel, sd15_unet_config())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    names = dt.inject(unet, dt.LoRAConfig(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert len(names) == 128
    assert dt.trainable_parameter_count(unet) == 797_184
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == 797_184


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rank": 0}, "rank"), ({"rank": "4"}, "rank"), ({"alpha": -1.0}, "alpha"), ({"dropout": 1.5}, "dropout"),
     ({"init": "zeros"}, "init"), ({"target_modules": []}, "target_modules"),
     ({"target_modules": [3]}, "target_modules")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(dt.DifftuneError, match=f"`{field}`"):
        dt.LoRAConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(dt.DifftuneError, match="unknown key.*'ranks'"):
        dt.LoRAConfig.from_dict({"ranks": 4})


def test_gaussian_init_and_zero_b_leave_output_unchanged():
    torch.manual_seed(0)
    net = Net()
    x, img = torch.randn(2, 20), torch.randn(1, 3, 8, 8)
    before = net(x, img)
    dt.inject(net, dt.LoRAConfig(rank=2, init="gaussian", target_modules=["lin", "conv"]))
    for a, b in zip(before, net(x, img)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
