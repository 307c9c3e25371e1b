"""DoRA (``LoRAConfig(use_dora=True)``): equality with peft (output, ΔW, gradients), W0 from the host whatever else is
fused, exact fuse/unfuse, the adapter-weight semantics, config and file checks, and a trainer run."""

from __future__ import annotations

import copy

import pytest
import torch
from test_lora import Net
from torch import nn

import difftune as dt
from difftune.methods.host import AdapterHost
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter, tiny_unet

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"]


def _peft_pair(seed: int = 0, dropout: float = 0.0, rslora: bool = False):
    """Our DoRA and peft's on identical weights (peft's random A, B; magnitudes moved off their init)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    ours = Net()
    theirs = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=6, target_modules=["lin", "conv"], init_lora_weights=False, use_dora=True,
                   lora_dropout=dropout, use_rslora=rslora), copy.deepcopy(ours))
    dt.inject(ours, dt.LoRAConfig(rank=4, alpha=6, target_modules=["lin", "conv"], use_dora=True, dropout=dropout,
                                  use_rslora=rslora))
    with torch.no_grad():
        for mod in ("lin", "conv"):
            a, layer = getattr(ours, mod).adapters["default"], getattr(theirs, mod)
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.3 * torch.randn_like(magnitude))  # a trained magnitude, not ‖W0 + sBA‖ itself
            a.lora_A.copy_(layer.lora_A["default"].weight)
            a.lora_B.copy_(layer.lora_B["default"].weight)
            assert a.lora_magnitude_vector.shape == magnitude.shape  # peft's own shapes: files map 1:1
            a.lora_magnitude_vector.copy_(magnitude)
    return ours, theirs


@pytest.mark.parametrize("rslora", [False, True])
def test_equals_peft_dora_on_identical_weights(rslora):
    ours, theirs = _peft_pair(rslora=rslora)
    base = Net()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in theirs.state_dict().items() if "lora" not in k})
    x, img = torch.randn(4, 20), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        for got, want, b in zip(ours(x, img), theirs(x, img), base(x, img)):
            assert (want - b).abs().max() > 1e-2  # peft's DoRA really changes the output
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for mod in ("lin", "conv"):  # ΔW: peft's merged weight minus W0
            layer = getattr(theirs, mod)
            w0 = layer.base_layer.weight.detach().clone()
            layer.merge(adapter_names=["default"])
            ours_dw = getattr(ours, mod).adapters["default"].delta_weight(w0)
            torch.testing.assert_close(ours_dw, layer.base_layer.weight - w0, atol=1e-6, rtol=1e-5)
            layer.unmerge()


def test_gradients_equal_peft_with_the_norm_detached():
    """The paper's §4.3 (and peft): ‖W0 + sBA‖ is a constant in the backward pass; A, B and m get peft's gradients."""
    ours, theirs = _peft_pair(seed=1)
    x, img = torch.randn(4, 20), torch.randn(2, 3, 9, 9)
    for model in (ours, theirs):
        sum((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() for y in model(x, img)).backward()
    for mod in ("lin", "conv"):
        a, layer = getattr(ours, mod).adapters["default"], getattr(theirs, mod)
        for mine, peft in ((a.lora_A, layer.lora_A["default"].weight), (a.lora_B, layer.lora_B["default"].weight),
                           (a.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(mine.grad, peft.grad, atol=1e-5, rtol=1e-4)


def test_a_fresh_dora_changes_nothing_and_starts_at_peft_magnitudes():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = Net()
    x, img = torch.randn(2, 20), torch.randn(1, 3, 8, 8)
    before = net(x, img)
    theirs = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin", "conv"], use_dora=True),
                                     copy.deepcopy(net))
    dt.inject(net, dt.LoRAConfig(rank=2, target_modules=["lin", "conv"], use_dora=True))
    for a, b in zip(before, net(x, img)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # m / ‖W0‖ is exactly 1: bit-identical output
    for mod in ("lin", "conv"):
        torch.testing.assert_close(getattr(net, mod).adapters["default"].lora_magnitude_vector,
                                   getattr(theirs, mod).lora_magnitude_vector["default"].weight, atol=1e-6, rtol=1e-6)
    dt.fuse(net)
    for mod in ("lin", "conv"):  # W0 + ΔW with ΔW = 0 exactly
        assert torch.equal(getattr(net, mod).base_layer.weight, getattr(net, mod).original_weight)


def _unet_with(*configs):
    unet = tiny_unet(0)
    for name, config, seed in configs:
        dt.inject(unet, config, name=name)
        randomize_adapter(unet, name, seed=seed, std=0.2)
    return unet


def _dora_deltas(unet, name="dora"):
    with torch.no_grad():
        return {n: h.adapters[name].delta_weight(h.base_value("weight")) for n, h in hosts(unet) if name in h.adapters}


def test_fuse_unfuse_is_bit_identical_and_dora_ignores_what_else_is_fused():
    unet = _unet_with(("lora", dt.LoRAConfig(rank=3, target_modules=TARGETS), 1),
                      ("dora", dt.LoRAConfig(rank=2, alpha=3.0, target_modules=TARGETS, use_dora=True), 2))
    w0 = {n: h.base_layer.weight.detach().clone() for n, h in hosts(unet)}
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([50]))
    kw = {"encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    with torch.no_grad():
        unfused = unet(*args, **kw).sample
        alone = _dora_deltas(unet)
        dt.fuse(unet, "lora")
        beside = _dora_deltas(unet)
        torch.testing.assert_close(unet(*args, **kw).sample, unfused, atol=1e-5, rtol=0)
        dt.fuse(unet, "dora")
        both = unet(*args, **kw).sample
    assert alone.keys() == beside.keys() and all(torch.equal(alone[k], beside[k]) for k in alone)
    torch.testing.assert_close(both, unfused, atol=1e-5, rtol=0)
    for name, host in hosts(unet):  # W0 + w_l ΔW_lora + w_d ΔW_dora(W0), each from the true W0
        want = w0[name] + host.adapters["lora"].delta_weight(w0[name]) + alone[name]
        torch.testing.assert_close(host.base_layer.weight, want, atol=1e-6, rtol=0)
    for _ in range(20):
        dt.unfuse(unet)
        dt.fuse(unet, ["dora", "lora"])
    dt.unfuse(unet)
    assert all(torch.equal(h.base_layer.weight, w0[n]) for n, h in hosts(unet))


def test_dora_beside_fused_sara_sees_w0_without_remerging_each_call(monkeypatch):
    """With SaRA fused, W0 is the live weight with SaRA's entries restored (a copy); SaRA stays in sync meanwhile."""
    unet = _unet_with(("sara", dt.SaRAConfig(threshold=0.05, target_modules=TARGETS), 3),
                      ("dora", dt.LoRAConfig(rank=2, target_modules=TARGETS, use_dora=True), 4))
    alone = _dora_deltas(unet)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([50]))
    kw = {"encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    with torch.no_grad():
        unfused = unet(*args, **kw).sample
        dt.fuse(unet, "sara")
        beside = _dora_deltas(unet)
        writes = []
        monkeypatch.setattr(AdapterHost, "_write_merged", lambda self: writes.append(self))
        for _ in range(2):
            torch.testing.assert_close(unet(*args, **kw).sample, unfused, atol=1e-5, rtol=0)
    assert not writes  # reading W0 left SaRA's fused values marked current
    assert all(torch.equal(alone[k], beside[k]) for k in alone)


def test_weight_scales_the_whole_change_where_diffusers_scales_s_inside_the_norm():
    """Ours: W0 + w ΔW (w = 0 is off, weights combine linearly). peft/diffusers' set_adapters: s → w s inside the
    norm. The two agree at w = 1 only."""
    ours, theirs = _peft_pair(seed=2)
    x = torch.randn(3, 20)
    w0 = theirs.lin.base_layer.weight.detach()
    with torch.no_grad():
        base = nn.functional.linear(x, w0, theirs.lin.base_layer.bias)
        full = ours.lin(x) - base
        dt.set_adapter_weights(ours, {"default": 0.5})
        torch.testing.assert_close(ours.lin(x) - base, 0.5 * full, atol=1e-6, rtol=0)
        theirs.lin.set_scale("default", 0.5)
        assert (theirs.lin(x) - base - 0.5 * full).abs().max() > 1e-3
        theirs.lin.set_scale("default", 0.0)  # peft at 0: the magnitude rescaling m / ‖W0‖ stays on
        assert (theirs.lin(x) - base).abs().max() > 1e-3
        dt.set_adapter_weights(ours, {"default": 0.0})
        torch.testing.assert_close(ours.lin(x), base, atol=0, rtol=0)


@pytest.mark.parametrize(("kwargs", "match"), [({"use_dora": "yes"}, "`use_dora`"), ({"use_dora": 1}, "`use_dora`")])
def test_bad_use_dora_names_the_field(kwargs, match):
    with pytest.raises(dt.DifftuneError, match=match):
        dt.LoRAConfig(**kwargs)


def test_saved_magnitudes_must_match_use_dora(tmp_path):
    from difftune.serialization import read_tensors

    unet = _unet_with(("dora", dt.LoRAConfig(rank=2, target_modules=["to_q"], use_dora=True), 5))
    folder = dt.save_adapter(unet, tmp_path / "dora", name="dora")
    tensors = read_tensors(folder)
    assert sum(k.endswith(".lora_magnitude_vector") for k in tensors) == len(_dora_deltas(unet)) > 0
    with pytest.raises(dt.DifftuneError, match="`use_dora`"):
        dt.LoRAConfig(rank=2, target_modules=["to_q"]).check_saved(tensors)
    fresh = tiny_unet(0)
    dt.load_adapter(fresh, folder, name="dora")
    assert all(torch.equal(a, b) for a, b in zip(_dora_deltas(unet).values(), _dora_deltas(fresh).values()))


def test_trainer_trains_dora_from_the_config(sd_dir, tmp_path):
    """``method: {name: lora, use_dora: true}`` through the trainer (2 steps on the tiny SD pipeline): the saved
    adapter is a DoRA whose magnitudes and B moved."""
    from pathlib import Path

    import numpy as np
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from difftune.config import load_config
    from difftune.serialization import read_tensors
    from difftune.train import TrainConfig, main

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of a cat")
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(TrainConfig, repo / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={sd_dir}", f"data.path={data}", f"output_dir={tmp_path / 'out'}", "validation.prompts=[]",
        "method={name: lora, rank: 2, use_dora: true}", "optimizer.lr=1e-2"])
    result = main(cfg)
    info = dt.counting.inspect_adapter(result)
    assert info["method"] == "lora" and info["config"]["use_dora"] is True
    tensors = read_tensors(result)
    fresh = UNet2DConditionModel.from_pretrained(sd_dir / "unet")  # the trained base: m started at its ‖W0‖
    dt.inject(fresh, dt.LoRAConfig(rank=2, target_modules=info["config"]["target_modules"], use_dora=True))
    start = {n: h.adapters["default"].lora_magnitude_vector for n, h in hosts(fresh)}
    assert start and any(not torch.allclose(tensors[f"{n}.lora_magnitude_vector"], m) for n, m in start.items())
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in tensors.items())
