"""LoRA/SaRA/KronA exports read by the real loaders (diffusers, lycoris-lora), and their files imported back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import difftune as dt
from difftune.interop.export import export_adapter
from difftune.interop.importer import import_file, load_foreign
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter, tiny_sd_pipeline, tiny_unet

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT = dict(prompt="lower newer", num_inference_steps=2, output_type="np", guidance_scale=3.0)


@torch.no_grad()
def _deltas(model, name):
    return {n: h.adapters[name].delta_params(h.base_params()) for n, h in hosts(model) if name in h.adapters}


def _image(pipe):
    return pipe(generator=torch.Generator().manual_seed(0), **PROMPT).images


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    """A UNet LoRA (convs included, α ≠ r) and a text-encoder LoRA, saved; the pipeline holding them."""
    tmp = tmp_path_factory.mktemp("lora")
    pipe = tiny_sd_pipeline(seed=0)
    dt.inject(pipe, dt.LoRAConfig(rank=4, alpha=6.0, target_modules=UNET_TARGETS), name="style")
    randomize_adapter(pipe.unet, "style", seed=1)
    dt.inject(pipe, dt.LoRAConfig(rank=2, alpha=3.0, target_modules=TE_TARGETS), name="te",
              component="text_encoder")
    randomize_adapter(pipe.text_encoder, "te", seed=2)
    return pipe, dt.save_adapter(pipe, tmp / "style", name="style"), dt.save_adapter(pipe, tmp / "te", name="te")


def test_diffusers_export_gives_load_lora_weights_the_same_image(lora_pair, tmp_path):
    pipe, style, te = lora_pair
    report = export_adapter([style, te], tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    assert report.max_error == 0.0
    assert report.modules == len(_deltas(pipe.unet, "style")) + len(_deltas(pipe.text_encoder, "te")) == 49 + 12
    with safe_open(str(report.path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"], meta["text_encoder.r"], meta["text_encoder.lora_alpha"]) == (
        4, 6.0, 2, 3.0)
    want = _image(pipe)
    theirs = tiny_sd_pipeline(seed=0)
    theirs.load_lora_weights(str(report.path))
    assert theirs.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    ours = tiny_sd_pipeline(seed=0)
    assert dt.load_adapter(ours, report.path, name="imported") == "imported"
    assert set(dt.list_adapters(ours)) == {"imported", "imported_text_encoder"}
    got_theirs, got_ours = _image(theirs), _image(ours)
    assert np.abs(want - _image(tiny_sd_pipeline(seed=0))).max() > 1e-2  # the adapters change the image
    assert np.abs(got_theirs - got_ours).max() <= 1e-4
    assert np.abs(got_ours - want).max() <= 1e-4


def test_kohya_unet_export_gives_load_lora_weights_the_same_image(lora_pair, tmp_path):
    pipe, style, _ = lora_pair
    report = export_adapter(style, tmp_path / "style.safetensors", "kohya")
    sd = load_file(report.path)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert sd[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert float(sd[f"{conv}.alpha"]) == 6.0
    with safe_open(str(report.path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("4", "6", "networks.lora")
    reference = tiny_sd_pipeline(seed=0)
    dt.load_adapter(reference, style)
    theirs, ours = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=0)
    theirs.load_lora_weights(str(report.path))
    dt.load_adapter(ours, report.path)
    want = _image(reference)
    assert np.abs(_image(theirs) - want).max() <= 1e-4 and np.abs(_image(ours) - want).max() <= 1e-4


def test_text_encoder_kohya_keys_carry_text_model(lora_pair, tmp_path):
    pipe, style, te = lora_pair
    report = export_adapter([style, te], tmp_path / "both.safetensors", "kohya")
    keys = load_file(report.path)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys and report.max_error == 0.0
    fresh = tiny_sd_pipeline(seed=0)
    dt.load_adapter(fresh, report.path, name="both")
    for comp, ours, back in (("unet", "style", "both"), ("text_encoder", "te", "both_text_encoder")):
        a, b = _deltas(getattr(pipe, comp), ours), _deltas(getattr(fresh, comp), back)
        assert a.keys() == b.keys() and all(torch.equal(a[k]["weight"], b[k]["weight"]) for k in a)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_gives_identical_delta(lora_pair, tmp_path, fmt):
    pipe, style, _ = lora_pair
    out = export_adapter(style, tmp_path / f"{fmt}.safetensors", fmt).path
    unet = tiny_unet(0)
    load_foreign(unet, out, name="back")
    config = next(h.adapters["back"].config for _, h in hosts(unet) if "back" in h.adapters)
    assert (config.rank, config.alpha) == (4, 6.0)  # the same LoRA, not a folded one
    dt.save_adapter(unet, tmp_path / "back")
    again = tiny_unet(0)
    dt.load_adapter(again, tmp_path / "back")
    ours, back = _deltas(pipe.unet, "style"), _deltas(again, "back")
    assert ours.keys() == back.keys() and all(torch.equal(ours[k]["weight"], back[k]["weight"]) for k in ours)


def test_lycoris_loads_every_export(lora_pair, tmp_path, lycoris_loader, lycoris_error):
    pipe, style, te = lora_pair
    ours = _deltas(pipe.unet, "style")
    for fmt, kind in (("kohya", "LoConModule"), ("diff", "FullModule")):
        report = export_adapter(style, tmp_path / f"{fmt}.safetensors", fmt)
        modules = lycoris_loader(report.path, tiny_unet(0))
        assert len(modules) == len(ours) == report.modules == 49
        assert {type(m).__name__ for m in modules.values()} == {kind}
        assert lycoris_error(modules, ours) <= 1e-6
    report = export_adapter(te, tmp_path / "te.safetensors", "kohya")
    te_modules = lycoris_loader(report.path, tiny_sd_pipeline(seed=0).text_encoder.text_model
                                if hasattr(tiny_sd_pipeline(seed=0).text_encoder, "text_model") else
                                _wrap_text_model(tiny_sd_pipeline(seed=0).text_encoder), prefix="lora_te")
    assert len(te_modules) == 12
    te_ours = {f"text_model.{k}": v for k, v in _deltas(pipe.text_encoder, "te").items()}
    assert lycoris_error(te_modules, te_ours, prefix="lora_te") <= 1e-6
    krona = tiny_unet(0)
    dt.inject(krona, dt.KronAConfig(factor_mode="lycoris", target_modules=["to_q", "to_v", "proj_in"]))
    randomize_adapter(krona, "default", seed=3)
    folder = dt.save_adapter(krona, tmp_path / "krona")
    report = export_adapter(folder, tmp_path / "lokr.safetensors", "lokr")
    modules = lycoris_loader(report.path, tiny_unet(0))
    kron = _deltas(krona, "default")
    assert len(modules) == len(kron) == report.modules == 20 and report.max_error <= 1e-6
    assert lycoris_error(modules, kron) <= 1e-6


def _wrap_text_model(text_encoder):
    """A module whose child ``text_model`` is the transformers 5 CLIPTextModel, so kohya paths resolve."""
    holder = torch.nn.Module()
    holder.text_model = text_encoder
    return holder


def test_sara_exports_as_diff_and_as_an_svd_lora(tmp_path, sd_dir, lycoris_loader, lycoris_error, capsys):
    from difftune.cli import main
    from difftune.generation import load_pipeline

    pipe = load_pipeline(sd_dir, device="cpu")
    dt.inject(pipe, dt.SaRAConfig(threshold=2e-2, target_modules=["to_q", "to_k", "proj_in", "norm1", "conv1"]),
              name="sara")
    randomize_adapter(pipe.unet, "sara", seed=5, std=0.01)
    folder = dt.save_adapter(pipe, tmp_path / "sara", base_model=str(sd_dir))
    ours = _deltas(pipe.unet, "sara")
    report = export_adapter(folder, tmp_path / "sara_diff.safetensors", "diff")
    assert report.max_error == 0.0 and report.modules == len(ours)
    sd = load_file(report.path)
    resnet = "lora_unet_down_blocks_0_resnets_0"
    assert {f"{resnet}_norm1.w_norm", f"{resnet}_conv1.diff_b"} <= set(sd)
    modules = lycoris_loader(report.path, tiny_unet(0))
    assert len(modules) == len(ours) and {type(m).__name__ for m in modules.values()} == {"FullModule", "NormModule"}
    assert lycoris_error(modules, ours) <= 1e-6
    with pytest.raises(dt.DifftuneError, match="--rank R"):
        export_adapter(folder, tmp_path / "x.safetensors", "kohya")
    assert main(["export", str(folder), "--format", "kohya", "--rank", "2", "--out",
                 str(tmp_path / "sara_lora.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "max |ΔW_file − ΔW_ours|" in printed and "rank-2 SVD approximation" in printed and "left out" in printed
    full_rank = export_adapter(folder, tmp_path / "full.safetensors", "kohya", rank=64)
    approx = full_rank.approximation
    assert approx["rank"] == 64 and approx["max_abs"] > 0  # biases and norms have no LoRA form
    low = export_adapter(folder, tmp_path / "low.safetensors", "kohya", rank=1)
    assert low.approximation["relative_fro"] > approx["relative_fro"]


def test_kohya_key_for_a_missing_module_is_named(tmp_path):
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_qq"
    good = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{good}.lora_down.weight": torch.zeros(2, 64), f"{good}.lora_up.weight": torch.zeros(64, 2),
               f"{key}.lora_down.weight": torch.zeros(2, 64), f"{key}.lora_up.weight": torch.zeros(64, 2)},
              tmp_path / "bad.safetensors")
    unet = tiny_unet(0)
    with pytest.raises(dt.DifftuneError, match=key):
        dt.load_adapter(unet, tmp_path / "bad.safetensors")
    assert not list(hosts(unet))  # nothing half-loaded


@pytest.mark.parametrize(("sd", "match"), [
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3), "lora_unet_conv_in.hada_w1_a": torch.zeros(1)},
     r"parts \['hada_w1_a', 'lora_down.weight'\]"),
    ({"lora_unet_conv_in.lokr_w1": torch.zeros(2, 2), "lora_unet_conv_in.lokr_t2": torch.zeros(1)}, "Tucker"),
    ({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3), "unet.conv_in.weird": torch.zeros(1)},
     r"no diffusers/peft LoRA keys .*unet.conv_in.weird"),
    ({"unet.conv_inn.lora_A.weight": torch.zeros(2, 4), "unet.conv_inn.lora_B.weight": torch.zeros(4, 2)},
     r"not in this UNet2DConditionModel.*conv_inn"),
])
def test_unknown_keys_are_errors(tmp_path, sd, match):
    save_file(sd, tmp_path / "bad.safetensors")
    unet = tiny_unet(0)
    with pytest.raises(dt.DifftuneError, match=match):
        dt.load_adapter(unet, tmp_path / "bad.safetensors")
    assert not list(hosts(unet))


def test_loha_and_full_imports_match_lycoris(tmp_path, lycoris_loader, lycoris_error):
    g = torch.Generator().manual_seed(0)
    q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    loha = {f"{q}.hada_w1_a": torch.randn(64, 3, generator=g), f"{q}.hada_w1_b": torch.randn(3, 64, generator=g),
            f"{q}.hada_w2_a": torch.randn(64, 3, generator=g), f"{q}.hada_w2_b": torch.randn(3, 64, generator=g),
            f"{q}.alpha": torch.tensor(2.0),
            f"{conv}.hada_w1_a": torch.randn(32, 2, generator=g),
            f"{conv}.hada_w1_b": torch.randn(2, 288, generator=g),  # a 3×3 conv: (r, d_in·k·k)
            f"{conv}.hada_w2_a": torch.randn(32, 2, generator=g),
            f"{conv}.hada_w2_b": torch.randn(2, 288, generator=g),
            f"{conv}.alpha": torch.tensor(1.0)}
    save_file(loha, tmp_path / "loha.safetensors")
    full = {f"{q}.diff": torch.randn(64, 64, generator=g), f"{conv}.diff": torch.randn(32, 32, 3, 3, generator=g)}
    save_file(full, tmp_path / "full.safetensors")
    for path, method in ((tmp_path / "loha.safetensors", "loha"), (tmp_path / "full.safetensors", "diff")):
        unet = tiny_unet(0)
        dt.load_adapter(unet, path, name="x")
        assert dt.list_adapters(unet)["x"]["method"] == method
        modules = lycoris_loader(path, tiny_unet(0))
        assert len(modules) == 2
        assert lycoris_error(modules, _deltas(unet, "x")) <= 1e-5


def test_imported_lora_combines_with_other_methods(lora_pair, tmp_path, sd_dir):
    _, style, _ = lora_pair
    kohya = export_adapter(style, tmp_path / "style.safetensors", "kohya").path
    pipe = tiny_sd_pipeline(seed=0)
    dt.load_adapter(pipe, kohya, name="style", weight=0.5)
    dt.inject(pipe, dt.KronAConfig(a1=8, a2=8), name="subject")
    randomize_adapter(pipe.unet, "subject", seed=7)
    assert {n: i["method"] for n, i in dt.list_adapters(pipe).items()} == {"style": "lora", "subject": "krona"}
    before = _image(pipe)
    dt.fuse(pipe)
    assert np.abs(_image(pipe) - before).max() <= 1e-4


def test_cli_import_and_export(lora_pair, tmp_path, sd_dir, capsys):
    from difftune.cli import main

    pipe, style, te = lora_pair
    assert main(["export", str(style), str(te), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert "max |ΔW_file − ΔW_ours| = 0.000e+00" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "k.safetensors"), "--model", str(sd_dir), "--out",
                 str(tmp_path / "imported")]) == 0
    assert {p.name for p in (tmp_path / "imported").iterdir()} == {"unet", "text_encoder"}
    fresh = tiny_sd_pipeline(seed=0)
    dt.load_adapter(fresh, tmp_path / "imported" / "unet")
    dt.load_adapter(fresh, tmp_path / "imported" / "text_encoder")
    a, b = _deltas(pipe.text_encoder, "te"), _deltas(fresh.text_encoder, "default_text_encoder")
    assert a.keys() == b.keys() and all(torch.equal(a[k]["weight"], b[k]["weight"]) for k in a)
    written = import_file(export_adapter(style, tmp_path / "d.safetensors", "diffusers").path, sd_dir, tmp_path / "d")
    assert written == [tmp_path / "d"] and dt.serialization.read_header(written[0])["component"] == "unet"
