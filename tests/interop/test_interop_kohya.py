"""kohya key names: module path ⇄ kohya name on real diffusers/transformers modules, and the errors for bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import difftune as dt
from difftune.interop.kohya import (
    base_layer,
    group_by_module,
    kohya_component,
    kohya_name,
    kohya_names,
    kohya_prefix,
    match_modules,
    read_safetensors,
    safetensors_keys,
)
from difftune.testing import tiny_sd_pipeline, tiny_unet

TO_OUT = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
TO_OUT_KOHYA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"


def test_names_map_both_ways_on_a_unet():
    unet = tiny_unet(0)
    assert kohya_name(TO_OUT, "lora_unet") == TO_OUT_KOHYA
    assert kohya_name("time_embedding.linear_1", "lora_unet") == "lora_unet_time_embedding_linear_1"
    names = kohya_names(unet, "lora_unet")
    modules = [n for n, _ in unet.named_modules() if n]
    assert set(names.values()) == set(modules)  # every module has a name; kohya_names refuses shared ones
    assert all(names[kohya_name(n, "lora_unet")] == n for n in modules)
    # and its LDM name (kohya's SDXL scripts, ComfyUI): the same module
    assert names["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_out_0"] == TO_OUT
    wanted = [TO_OUT_KOHYA, "lora_unet_time_embedding_linear_1", "lora_unet_down_blocks_0_resnets_0_conv1"]
    assert match_modules(unet, wanted, "lora_unet") == {
        TO_OUT_KOHYA: TO_OUT, "lora_unet_time_embedding_linear_1": "time_embedding.linear_1",
        "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1"}


def test_names_are_the_unadapted_models():
    unet = tiny_unet(0)
    before = kohya_names(unet, "lora_unet")
    dt.inject(unet, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_out.0"]))
    assert kohya_names(unet, "lora_unet") == before  # no base_layer hops, no adapter internals
    assert kohya_name(TO_OUT + ".base_layer", "lora_unet") == TO_OUT_KOHYA
    original = unet.get_submodule(TO_OUT).base_layer
    assert base_layer(unet, match_modules(unet, [TO_OUT_KOHYA], "lora_unet")[TO_OUT_KOHYA]) is original


def test_base_layer_errors_name_the_module():
    unet = tiny_unet(0)
    norm = "down_blocks.1.attentions.0.transformer_blocks.0.norm1"
    with pytest.raises(dt.DifftuneError, match=f"'{norm}' is a LayerNorm; Kronecker adapters need Linear or Conv2d"):
        base_layer(unet, norm, needed_by="Kronecker adapters")
    assert isinstance(base_layer(unet, norm, kinds=(nn.LayerNorm,)), nn.LayerNorm)
    with pytest.raises(dt.DifftuneError, match="'mid_block.nope' does not exist in this UNet2DConditionModel"):
        base_layer(unet, "mid_block.nope")


def test_unknown_keys_are_named():
    unet = tiny_unet(0)
    typo = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_qq"
    with pytest.raises(dt.DifftuneError, match=rf"1 module\(s\) in 'x.safetensors' .* prefix 'lora_unet'.*{typo}"):
        match_modules(unet, [TO_OUT_KOHYA, typo], "lora_unet", source="x.safetensors")
    with pytest.raises(dt.DifftuneError, match="another base model"):
        match_modules(unet, ["lora_unet_transformer_blocks_0_attn1_to_q"], "lora_unet")  # a DiT's key


def test_text_encoder_prefixes():
    assert [kohya_prefix(c) for c in ("", "unet", "text_encoder", "text_encoder_2")] == [
        "lora_unet", "lora_unet", "lora_te", "lora_te2"]
    assert kohya_prefix("transformer", guess=True) == "lora_transformer"
    assert kohya_prefix("text_encoder", "lora_te1") == "lora_te1"
    with pytest.raises(dt.DifftuneError, match="prefix for the adapter's component 'transformer'"):
        kohya_prefix("transformer")
    for bad in ("", "lora.unet"):
        with pytest.raises(dt.DifftuneError, match="non-empty key prefix without '.'"):
            kohya_prefix("unet", bad)
    assert kohya_component("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight") == "text_encoder"
    assert kohya_component("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "text_encoder"  # kohya's SDXL name
    assert kohya_component("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "text_encoder_2"
    assert kohya_component(TO_OUT_KOHYA) == "unet"
    assert kohya_component("lycoris_down_blocks_0_resnets_0_conv1") is None


def test_text_encoder_keys_in_kohyas_spelling():
    """kohya files name CLIP text-encoder modules by their transformers 4 path (``text_model.encoder...``)."""
    pipe = tiny_sd_pipeline()
    te, key = pipe.text_encoder, "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    name = match_modules(te, [key], "lora_te")[key]  # "encoder.layers.1..." with transformers 5, which dropped it
    assert name.endswith("encoder.layers.1.self_attn.q_proj") and isinstance(base_layer(te, name), nn.Linear)
    # keys of another component say which one
    with pytest.raises(dt.DifftuneError, match=r"lora_unet_\* keys address the unet \(pass component='unet'"):
        match_modules(te, [key, TO_OUT_KOHYA], "lora_te")
    with pytest.raises(dt.DifftuneError, match=r"lora_te1_\* keys address this component .* prefix='lora_te1'"):
        match_modules(te, [key.replace("lora_te_", "lora_te1_")], "lora_te")
    with pytest.raises(dt.DifftuneError, match=r"lora_te_\* keys address the text_encoder"):
        match_modules(pipe.unet, [key], "lora_unet")


def test_clashing_kohya_names_are_refused():
    model = nn.Module()
    model.a_b = nn.Module()
    model.a_b.c = nn.Linear(2, 2)
    model.a = nn.Module()
    model.a.b_c = nn.Linear(2, 2)
    with pytest.raises(dt.DifftuneError, match="'a_b.c' and 'a.b_c' .* same kohya name 'lora_unet_a_b_c'"):
        kohya_names(model, "lora_unet")


def test_group_by_module():
    tensors = {f"{TO_OUT_KOHYA}.lora_down.weight": 1, f"{TO_OUT_KOHYA}.alpha": 2, "lora_unet_conv_in.diff": 3}
    assert group_by_module(tensors) == {TO_OUT_KOHYA: {"lora_down.weight": 1, "alpha": 2},
                                        "lora_unet_conv_in": {"diff": 3}}
    with pytest.raises(dt.DifftuneError, match="'lora_unet_conv_in' is not '<kohya module name>.<tensor>'"):
        group_by_module({"lora_unet_conv_in": 1})


def test_reading_safetensors(tmp_path):
    tensors = {f"{TO_OUT_KOHYA}.lokr_w1": torch.ones(2, 2), f"{TO_OUT_KOHYA}.alpha": torch.tensor(1.0)}
    save_file(tensors, tmp_path / "ok.safetensors")
    back = read_safetensors(tmp_path / "ok.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert sorted(safetensors_keys(tmp_path / "ok.safetensors")) == sorted(tensors)
    with pytest.raises(dt.DifftuneError, match="`path` must be a LoKr file, got .*missing.safetensors.*not exist"):
        read_safetensors(tmp_path / "missing.safetensors", "a LoKr file")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(dt.DifftuneError, match="could not be read as safetensors"):
        safetensors_keys(tmp_path / "bad.safetensors")
