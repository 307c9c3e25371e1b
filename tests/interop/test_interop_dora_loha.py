"""DoRA, LoHa and (IA)³ files: DoRA written by diffusers/peft loads with peft's output; our DoRA exports load in
diffusers (as DoRA) and lycoris-lora (``dora_scale``) with our ΔW and import back; LoHa exports load in lycoris-lora
and import as ``loha``; (IA)³ exports as full ΔW."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import difftune as dt
from difftune.interop.export import export_adapter
from difftune.methods.verbs import get_config, hosts
from difftune.testing import randomize_adapter, tiny_sd_pipeline, tiny_unet

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([50])), {
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}


@torch.no_grad()
def _out(unet):
    args, kw = _inputs()
    return unet(*args, **kw).sample


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def _dw(model, name):
    return {n: h.adapters[name].delta_params(h.base_params()) for n, h in hosts(model) if name in h.adapters}


def _peft_dora(unet, alpha):
    """peft's DoRA on ``unet`` with random factors and magnitudes away from their ‖W0 + sBA‖ init."""
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=alpha, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    unet.add_adapter(config)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return config


def test_a_diffusers_dora_file_loads_with_peft_output(tmp_path):
    """What diffusers' training scripts write: peft's state dict through `convert_state_dict_to_diffusers` (it
    renames attention factors to ``lora.down``/``lora.up``) and `save_lora_weights` with the LoraConfig metadata."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd_pipeline(seed=0)
    config = _peft_dora(pipe.unet, alpha=3)
    want = _out(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".lora_magnitude_vector") for k in keys) and any(".lora.down." in k for k in keys)
    ours = tiny_sd_pipeline(seed=0)
    assert _relative(_out(ours.unet), want) > 1e-2  # the DoRA changes the output
    dt.load_adapter(ours, path, name="dora")
    config = get_config(ours.unet, "dora")
    assert config.use_dora and (config.rank, config.alpha) == (2, 3.0)
    assert _relative(_out(ours.unet), want) <= 1e-4


def test_a_peft_save_pretrained_dora_loads_with_peft_output(tmp_path):
    """peft's ``save_pretrained``: ``base_model.model.*`` keys, the config (α ≠ r) in adapter_config.json beside."""
    from peft import get_peft_model

    unet = tiny_unet(0)
    model = get_peft_model(unet, _peft_dora(tiny_unet(0), alpha=5))  # a config; the factors come from this model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    want = _out(model)
    model.save_pretrained(tmp_path / "peft")
    ours = tiny_unet(0)
    dt.load_adapter(ours, tmp_path / "peft" / "adapter_model.safetensors", name="dora")
    assert (get_config(ours, "dora").alpha, get_config(ours, "dora").use_dora) == (5.0, True)
    assert _relative(_out(ours), want) <= 1e-4


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    """Our trained-looking DoRA (α ≠ r, convs included) on the tiny SD UNet, saved."""
    pipe = tiny_sd_pipeline(seed=0)
    dt.inject(pipe, dt.LoRAConfig(rank=3, alpha=5.0, target_modules=TARGETS, use_dora=True), name="dora")
    randomize_adapter(pipe.unet, "dora", seed=1, std=0.2)
    with torch.no_grad():
        for _, host in hosts(pipe.unet):
            m = host.adapters["dora"].lora_magnitude_vector
            norm = host.base_layer.weight.flatten(1).norm(dim=1).view(m.shape)
            m.copy_(norm * (1 + 0.3 * torch.randn(m.shape, generator=torch.Generator().manual_seed(m.numel()))))
    return pipe, dt.save_adapter(pipe, tmp_path_factory.mktemp("dora") / "a", name="dora")


def test_diffusers_export_builds_dora_in_load_lora_weights(dora, tmp_path):
    pipe, folder = dora
    report = export_adapter(folder, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    assert report.max_error == 0.0 and report.modules == 49
    with safe_open(str(report.path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        conv = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector")
    assert meta["unet.use_dora"] is True and conv.shape == (1, 32, 1, 1)  # peft's conv layout
    theirs = tiny_sd_pipeline(seed=0)
    theirs.load_lora_weights(str(report.path))
    q = theirs.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert "default_0" in q.lora_magnitude_vector  # diffusers built a DoRA layer
    assert _relative(_out(theirs.unet), _out(pipe.unet)) <= 1e-4


def test_kohya_dora_export_loads_in_lycoris_and_imports_back(dora, tmp_path, lycoris_loader):
    pipe, folder = dora
    report = export_adapter(folder, tmp_path / "dora.safetensors", "kohya")
    assert report.max_error == 0.0
    sd = load_file(report.path)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (32, 1, 1, 1)  # LyCORIS: (d_out, 1...)
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"].shape == (64, 1)
    with safe_open(str(report.path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["dora_wd"] is True
    base = tiny_unet(0)
    modules = lycoris_loader(report.path, base)
    ours = _dw(pipe.unet, "dora")
    assert len(modules) == len(ours) == 49 and all(m.wd for m in modules.values())  # weight-decomposed (DoRA)
    worst = 0.0
    for name, delta in ours.items():
        module = modules["lora_unet_" + name.replace(".", "_")]
        w0 = base.get_submodule(name).weight
        merged, _ = module.get_merged_weight()  # LyCORIS's W0 + ΔW (its norm adds a 1.2e-7 eps)
        worst = max(worst, float((merged.reshape(w0.shape) - w0 - delta["weight"]).abs().max()))
    assert worst <= 1e-6
    back = tiny_unet(0)
    dt.load_adapter(back, report.path, name="back")
    config = get_config(back, "back")
    assert (config.rank, config.alpha, config.use_dora) == (3, 5.0, True)
    again = _dw(back, "back")
    assert again.keys() == ours.keys() and all(torch.equal(again[k]["weight"], ours[k]["weight"]) for k in ours)


def test_dora_diff_export_is_its_dense_delta(tmp_path, sd_dir, lycoris_loader):
    """The diff format needs ΔW itself, which for DoRA depends on W0: computed in the base model."""
    from difftune.generation import load_pipeline

    pipe = load_pipeline(sd_dir, device="cpu")
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["to_q", "conv1"], use_dora=True), name="dora")
    randomize_adapter(pipe.unet, "dora", seed=3, std=0.2)
    folder = dt.save_adapter(pipe, tmp_path / "dora", name="dora", base_model=str(sd_dir))
    report = export_adapter(folder, tmp_path / "diff.safetensors", "diff")
    assert report.max_error == 0.0
    modules = lycoris_loader(report.path, load_pipeline(sd_dir, device="cpu").unet)
    for name, delta in _dw(pipe.unet, "dora").items():
        diff, _ = modules["lora_unet_" + name.replace(".", "_")].get_diff_weight()
        torch.testing.assert_close(diff.reshape(delta["weight"].shape), delta["weight"], atol=1e-6, rtol=0)


def _kohya_lora(prefix="lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", d=64, **extra):
    g = torch.Generator().manual_seed(0)
    return {f"{prefix}.lora_down.weight": torch.randn(2, d, generator=g),
            f"{prefix}.lora_up.weight": torch.randn(d, 2, generator=g), f"{prefix}.alpha": torch.tensor(2.0),
            **{f"{prefix}.{k}": v for k, v in extra.items()}}


@pytest.mark.parametrize(("sd", "match"), [
    (_kohya_lora(dora_scale=torch.ones(1, 64)), "wd_on_out=False"),  # a norm per input column
    ({**_kohya_lora(dora_scale=torch.ones(64, 1)),
      **_kohya_lora("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k")}, "all DoRA or none"),
    ({"lora_unet_conv_in.hada_w1_a": torch.zeros(32, 2), "lora_unet_conv_in.hada_w1_b": torch.zeros(2, 36),
      "lora_unet_conv_in.hada_w2_a": torch.zeros(32, 2), "lora_unet_conv_in.hada_w2_b": torch.zeros(2, 36),
      "lora_unet_conv_in.dora_scale": torch.ones(32, 1, 1, 1)}, "dora_scale\\) on a LoHa/LoKr"),
])
def test_dora_files_difftune_cannot_represent_are_refused(tmp_path, sd, match):
    save_file(sd, tmp_path / "bad.safetensors")
    unet = tiny_unet(0)
    with pytest.raises(dt.DifftuneError, match=match):
        dt.load_adapter(unet, tmp_path / "bad.safetensors")
    assert not list(hosts(unet))


@pytest.fixture(scope="module")
def loha(tmp_path_factory):
    unet = tiny_unet(0)
    dt.inject(unet, dt.LoHaConfig(rank=2, alpha=3.0, target_modules=TARGETS), name="loha")
    randomize_adapter(unet, "loha", seed=2, std=0.5)
    return unet, dt.save_adapter(unet, tmp_path_factory.mktemp("loha") / "a", name="loha")


@torch.no_grad()
def test_loha_export_loads_in_lycoris_and_imports_as_loha(loha, tmp_path, lycoris_loader):
    unet, folder = loha
    report = export_adapter(folder, tmp_path / "loha.safetensors", "loha")
    assert report.max_error == 0.0 and report.modules == 49
    sd = load_file(report.path)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.hada_w1_b"].shape == (2, 32 * 9) and float(sd[f"{conv}.alpha"]) == 3.0
    modules = lycoris_loader(report.path, tiny_unet(0))
    ours = _dw(unet, "loha")
    assert len(modules) == 49 and {type(m).__name__ for m in modules.values()} == {"LohaModule"}
    worst = 0.0
    for name, delta in ours.items():
        module = modules["lora_unet_" + name.replace(".", "_")]
        # get_weight is what LyCORIS adds in its forward (its get_diff_weight applies α/r a second time)
        worst = max(worst, float((module.get_weight(module.shape) - delta["weight"]).abs().max()))
    assert worst <= 1e-6
    back = tiny_unet(0)
    dt.load_adapter(back, report.path, name="back")
    config = get_config(back, "back")
    assert (config.method, config.rank, config.alpha) == ("loha", 2, 3.0)
    again = _dw(back, "back")
    assert again.keys() == ours.keys() and all(torch.equal(again[k]["weight"], ours[k]["weight"]) for k in ours)
    with pytest.raises(dt.DifftuneError, match="'loha'"):  # other methods have their own formats
        export_adapter(dt.save_adapter(_lora_unet(), tmp_path / "lora"), tmp_path / "x.safetensors", "loha")
    from difftune.cli import main

    assert main(["export", str(folder), "--out", str(tmp_path / "cli.safetensors")]) == 0  # loha's default format
    assert load_file(tmp_path / "cli.safetensors").keys() == sd.keys()


def _lora_unet():
    unet = tiny_unet(0)
    dt.inject(unet, dt.LoRAConfig(rank=2, target_modules=["to_q"]))
    return unet


def test_loha_files_of_mixed_ranks_and_with_lora_modules(tmp_path):
    """Per-module ranks/alphas: zero-padded, α/r folded into W1a (same ΔW); LoHa beside LoRA modules: one ``lora``."""
    g = torch.Generator().manual_seed(4)
    q, conv = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_conv_in"

    def hada(prefix, d_out, d_in, r, alpha):
        return {f"{prefix}.hada_w1_a": torch.randn(d_out, r, generator=g),
                f"{prefix}.hada_w1_b": torch.randn(r, d_in, generator=g),
                f"{prefix}.hada_w2_a": torch.randn(d_out, r, generator=g),
                f"{prefix}.hada_w2_b": torch.randn(r, d_in, generator=g), f"{prefix}.alpha": torch.tensor(alpha)}

    mixed = {**hada(q, 64, 64, 2, 1.0), **hada(conv, 32, 4 * 9, 3, 6.0)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    with_lora = {**hada(q, 64, 64, 2, 1.0), **_kohya_lora("lora_unet_conv_in", d=32)}
    with_lora["lora_unet_conv_in.lora_down.weight"] = torch.randn(2, 4, 3, 3, generator=g)
    save_file(with_lora, tmp_path / "with_lora.safetensors")
    for path, method in ((tmp_path / "mixed.safetensors", "loha"), (tmp_path / "with_lora.safetensors", "lora")):
        unet = tiny_unet(0)
        dt.load_adapter(unet, path, name="x")
        assert get_config(unet, "x").method == method
        want = load_file(path)
        w = _dw(unet, "x")["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]["weight"]
        w1 = want[f"{q}.hada_w1_a"] @ want[f"{q}.hada_w1_b"]
        torch.testing.assert_close(w, 0.5 * w1 * (want[f"{q}.hada_w2_a"] @ want[f"{q}.hada_w2_b"]),
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ia3_exports_as_its_dense_delta_from_the_base(tmp_path, sd_dir, lycoris_loader):
    from difftune.generation import load_pipeline

    pipe = load_pipeline(sd_dir, device="cpu")
    dt.inject(pipe, dt.IA3Config(target_modules=["to_k", "proj_in", "ff.net.2"]), name="ia3")
    randomize_adapter(pipe.unet, "ia3", seed=5, std=0.3)
    folder = dt.save_adapter(pipe, tmp_path / "ia3", name="ia3", base_model=str(sd_dir))
    report = export_adapter(folder, tmp_path / "diff.safetensors", "diff")
    assert report.max_error == 0.0
    sd = load_file(report.path)
    assert "lora_unet_mid_block_attentions_0_proj_in.diff_b" in sd  # an output scale changes the bias too
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2.diff_b" not in sd  # an input scale not
    modules = lycoris_loader(report.path, load_pipeline(sd_dir, device="cpu").unet)
    for name, delta in _dw(pipe.unet, "ia3").items():
        w, b = modules["lora_unet_" + name.replace(".", "_")].get_diff_weight()
        torch.testing.assert_close(w.reshape(delta["weight"].shape), delta["weight"], atol=1e-6, rtol=0)
        if "bias" in delta:
            torch.testing.assert_close(b, delta["bias"], atol=1e-6, rtol=0)
