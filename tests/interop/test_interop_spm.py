"""SPM interop: kohya rank-1 LoRA export (loaded by lycoris-lora and by diffusers' load_lora_weights with the same
ΔW), the concepts in the metadata, and the import of such files (official SPM files included) as SPMs again."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import difftune as dt
from difftune.interop.export import export_adapter
from difftune.interop.spm import file_concepts, load_spm
from difftune.methods.verbs import hosts, model_part
from difftune.testing import randomize_adapter, tiny_sd_pipeline, tiny_unet


def _deltas(model, name):
    return {n: h.adapters[name].delta_weight(h.base_value("weight")) for n, h in hosts(model) if name in h.adapters}


def _saved(tmp_path, alpha=1.0):
    unet = tiny_unet(0)
    dt.inject(unet, dt.SPMConfig(concepts=["cat", "kitten"], alpha=alpha), name="spm")
    randomize_adapter(unet, "spm", seed=1, std=0.3)
    return unet, dt.save_adapter(unet, tmp_path / "adapter", name="spm")


def test_export_writes_kohya_rank1_keys_and_the_concepts(tmp_path):
    unet, folder = _saved(tmp_path)
    out = export_adapter(folder, tmp_path / "spm.safetensors", "kohya").path
    with safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["prompts"] == "cat,kitten" and meta["rank"] == "1" and file_concepts(out) == ["cat", "kitten"]
    mods = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(mods) == len(_deltas(unet, "spm")) and all(m.startswith("lora_unet_") for m in mods)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert not any("concept" in k for k in keys)  # E(c) has no kohya key


def test_lycoris_lora_loads_the_export_with_our_delta_weights(tmp_path, monkeypatch):
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")
    unet, folder = _saved(tmp_path, alpha=0.5)  # α ≠ r: the scale must travel through `alpha`
    out = export_adapter(folder, tmp_path / "spm.safetensors", "kohya").path
    network, _ = create_lycoris_from_weights(1.0, str(out), tiny_unet(0))
    theirs = {m.lora_name: m for m in network.loras}
    ours = _deltas(unet, "spm")
    assert len(theirs) == len(ours)
    worst = 0.0
    for name, dw in ours.items():
        d, _ = theirs["lora_unet_" + name.replace(".", "_")].get_diff_weight()
        worst = max(worst, (d.reshape(dw.shape) - dw).abs().max().item())
    assert worst <= 1e-6


def test_diffusers_load_lora_weights_gives_the_fused_spm(tmp_path):
    """A kohya SPM in plain diffusers = the SPM with γ = 1 (transport off), as the official README says."""
    pipe = tiny_sd_pipeline()
    dt.inject(pipe, dt.SPMConfig(concepts=["cat"], matching="fixed"), name="spm")
    randomize_adapter(pipe.unet, "spm", seed=2, std=0.3)
    folder = dt.save_adapter(pipe, tmp_path / "a", name="spm")
    args = (torch.randn(1, 4, 16, 16), torch.tensor([300]))
    kw = {"encoder_hidden_states": torch.randn(1, 7, 32)}
    ours = pipe.unet(*args, **kw).sample
    other = tiny_sd_pipeline()
    other.load_lora_weights(str(export_adapter(folder, tmp_path / "spm.safetensors", "kohya").path))
    torch.testing.assert_close(other.unet(*args, **kw).sample, ours, atol=1e-5, rtol=0)


def test_import_gives_back_the_same_spm_and_official_files_load(tmp_path):
    unet, folder = _saved(tmp_path)
    out = export_adapter(folder, tmp_path / "spm.safetensors", "kohya").path
    fresh = tiny_unet(0)
    load_spm(fresh, out, name="back")
    assert dt.methods.verbs.get_config(fresh, "back").concepts == ["cat", "kitten"]
    for name, dw in _deltas(unet, "spm").items():
        torch.testing.assert_close(_deltas(fresh, "back")[name], dw, atol=0, rtol=0)
    assert model_part(fresh, "back").spm_concept_embeds.abs().sum() == 0  # E(c) is encoded from a text encoder
    # an official SPM file: the same kohya keys in fp16, metadata written by the official train_spm.py
    tensors = {k: v.half() for k, v in load_file(out).items()}
    save_file(tensors, tmp_path / "official.safetensors", metadata={"prompts": "snoopy", "rank": "1", "alpha": "1.0"})
    load_spm(fresh, tmp_path / "official.safetensors", name="official", gamma_mode="squared")
    cfg = dt.methods.verbs.get_config(fresh, "official")
    assert cfg.concepts == ["snoopy"] and cfg.gamma_mode == "squared"


def test_import_refuses_foreign_parts_and_mixed_ranks(tmp_path):
    unet, folder = _saved(tmp_path)
    out = export_adapter(folder, tmp_path / "spm.safetensors", "kohya").path
    tensors = load_file(out)
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    bad = dict(tensors)
    bad[key.replace("lora_down.weight", "hada_w1_a")] = torch.zeros(1)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(dt.DifftuneError, match="hada_w1_a"):
        load_spm(tiny_unet(0), tmp_path / "bad.safetensors")
    mixed = dict(tensors)
    mixed[key] = torch.zeros(2, *tensors[key].shape[1:])
    up = key.replace("lora_down", "lora_up")
    mixed[up] = torch.zeros(tensors[up].shape[0], 2, *tensors[up].shape[2:])
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(dt.DifftuneError, match="mixes ranks"):
        load_spm(tiny_unet(0), tmp_path / "mixed.safetensors")


def test_cli_export_import_and_erase_report(tmp_path, capsys):
    import json

    from difftune.cli import main
    from difftune.testing import save_tiny_pipeline
    from difftune.zoo import path as zoo_path

    model = save_tiny_pipeline("sd", tmp_path / "sd")
    unet, folder = _saved(tmp_path)
    assert main(["export", str(folder), "--out", str(tmp_path / "k.safetensors")]) == 0
    assert main(["export", str(folder), "--format", "lokr", "--out", str(tmp_path / "x.safetensors")]) != 0
    assert "`--format` must be kohya" in capsys.readouterr().err
    assert main(["import-spm", str(tmp_path / "k.safetensors"), "--model", str(model), "--out",
                 str(tmp_path / "back")]) == 0
    back = tiny_unet(0)
    dt.load_adapter(back, tmp_path / "back", name="b")
    assert model_part(back, "b").spm_concept_embeds.abs().sum() > 0  # E(c) encoded with the model's text encoder
    for name, dw in _deltas(unet, "spm").items():
        torch.testing.assert_close(_deltas(back, "b")[name], dw, atol=0, rtol=0)
    # difftune erase on the shipped sd-mini (tiny n: this checks the report, not the model)
    out = tmp_path / "erase.json"
    assert main(["erase", "--model", str(zoo_path("sd-mini")), "--erase", "seven", "--keep", "one", "--n", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["present"]) == {"seven", "one"} and 0 <= report["efficacy"] <= 1
    assert report["knobs"]["steps"] == 2 and report["knobs"]["guidance"] == 4.0 and report["knobs"]["n"] == 2
    assert "efficacy" in capsys.readouterr().out


def test_erase_judge_is_pluggable():
    from difftune.methods.spm.erase import evaluate_erasure
    from difftune.pipelines.difftune_stable_diffusion import DifftuneStableDiffusionPipeline

    pipe = DifftuneStableDiffusionPipeline(**tiny_sd_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def judge(images, concept):  # "shows the concept" for the first image of each prompt only
        seen.append(concept)
        return [i == 0 for i in range(len(images))]

    r = evaluate_erasure(pipe, ["cat"], ["dog", "car"], judge=judge, n=4, steps=1)
    assert seen == ["cat", "dog", "car"]
    assert r["efficacy"] == 0.75 and r["specificity"] == 0.25 and r["harmonic_mean"] == pytest.approx(0.375)
    assert r["knobs"]["judge"] == "judge"
    with pytest.raises(dt.DifftuneError, match="judge"):
        evaluate_erasure(pipe, ["cat"], [], judge="clip")
