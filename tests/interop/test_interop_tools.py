"""`difftune export` says who reads each format and warns when a file will not load fully in one of them;
``--format comfyui`` picks the format ComfyUI reads best; ``--format kohya-ldm`` writes LDM UNet names."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import difftune as dt
from difftune.generation import load_pipeline
from difftune.interop.export import ExportWarning, describe_report, export_adapter
from difftune.interop.tools import READERS, diffusers_ldm_problems, resolve_format
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter, save_tiny_pipeline, tiny_sd_pipeline

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
OTHER = ["proj_in", "conv1", "conv"]  # `conv`: the up/down samplers' convolutions
TE = ["q_proj", "v_proj", "fc1"]


@pytest.fixture(scope="module")
def adapters(sd_dir, tmp_path_factory):
    """Saved adapters on the tiny SD pipeline (base: ``sd_dir``), by name."""
    tmp = tmp_path_factory.mktemp("tools")
    pipe = load_pipeline(sd_dir, device="cpu")
    configs = {"lora": dt.LoRAConfig(rank=2, alpha=4.0, target_modules=ATTN + OTHER),
               "plain": dt.LoRAConfig(rank=2, alpha=2.0, target_modules=OTHER),
               "loha": dt.LoHaConfig(rank=2, target_modules=ATTN), "krona": dt.KronAConfig(a1=4, a2=4),
               "sara": dt.SaRAConfig(threshold=2e-2, target_modules=["to_q", "norm1"]),
               "spm": dt.SPMConfig(concepts=["cat"])}
    out = {}
    for name, config in configs.items():
        dt.inject(pipe, config, name=name)
        randomize_adapter(pipe.unet, name, seed=len(out), std=0.05)
        out[name] = dt.save_adapter(pipe, tmp / name, name=name, base_model=str(sd_dir))
        dt.delete_adapter(pipe, name)
    dt.inject(pipe, dt.LoRAConfig(rank=2, alpha=1.0, target_modules=TE), name="te", component="text_encoder")
    randomize_adapter(pipe.text_encoder, "te", seed=9, std=0.05)
    out["te"] = dt.save_adapter(pipe, tmp / "te", name="te", base_model=str(sd_dir))
    return out


def _export(adapters, out, fmt, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_adapter(adapters, out, fmt, **kw)
    return report, [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]


def test_comfyui_is_the_format_comfyui_reads_best(adapters, tmp_path):
    assert resolve_format("comfyui", ["lora", "spm"]) == "kohya" and resolve_format("kohya", ["sara"]) == "kohya"
    for name, fmt in (("lora", "kohya"), ("loha", "loha"), ("krona", "lokr"), ("sara", "diff"), ("spm", "kohya")):
        report, _ = _export(adapters[name], tmp_path / f"{name}.safetensors", "comfyui")
        assert report.format == fmt and report.max_error == 0.0, name
    report, _ = _export([adapters["lora"], adapters["te"]], tmp_path / "both.safetensors", "comfyui")
    assert report.format == "kohya"
    assert f"read by {READERS['kohya']}" in describe_report(report) and "ComfyUI" in READERS["kohya"]


def test_diffusers_exports_say_what_comfyui_will_not_load(adapters, tmp_path):
    """The issue's measurements: ComfyUI loaded 0 of 72 text-encoder modules and 64 of 192 SPM modules of our
    diffusers exports (attention projections and text encoders skipped; only "lora key not loaded" logged)."""
    _, warned = _export([adapters["lora"], adapters["te"]], tmp_path / "d.safetensors", "diffusers")
    (message,) = warned
    n_attn = sum(1 for k in load_file(tmp_path / "d.safetensors") if k.startswith("unet.") and ".to_" in k
                 and k.endswith("lora_A.weight"))
    total = sum(1 for k in load_file(tmp_path / "d.safetensors") if k.endswith("lora_A.weight"))
    n_te = sum(1 for k in load_file(tmp_path / "d.safetensors") if k.startswith("text_encoder.")
               and k.endswith("lora_A.weight"))
    assert n_attn and n_te
    assert f"ComfyUI loads {total - n_attn - n_te} of the file's {total} modules" in message
    assert f"skips the {n_attn} UNet attention projections" in message
    assert f"skips the {n_te} text-encoder modules" in message
    assert "scale 1 instead of α/r = 2.0" in message and "--format comfyui" in message
    _, warned = _export(adapters["spm"], tmp_path / "spm.safetensors", "diffusers")
    assert len(warned) == 1 and "UNet attention projections" in warned[0]
    # α = r on modules ComfyUI reads in diffusers spelling: nothing lost, nothing said; kohya: nothing either
    assert _export(adapters["plain"], tmp_path / "plain.safetensors", "diffusers")[1] == []
    assert _export(adapters["lora"], tmp_path / "k.safetensors", "kohya")[1] == []


def test_kohya_ldm_export(adapters, tmp_path):
    """LDM UNet names (the tiny UNet: input_blocks 1-4, output_blocks 0-5) and the same ΔW back through our reader;
    diffusers' SD1 pipeline does not map LDM names, which the export says."""
    report, warned = _export(adapters["lora"], tmp_path / "ldm.safetensors", "kohya-ldm")
    assert report.format == "kohya-ldm" and report.max_error == 0.0
    assert len(warned) == 1 and "only its SDXL pipelines map LDM UNet names" in warned[0]
    keys = load_file(report.path)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_2_0_op.lora_down.weight" in keys  # down_blocks.0.downsamplers.0.conv
    assert "lora_unet_output_blocks_1_2_conv.lora_down.weight" in keys  # up_blocks.0.upsamplers.0.conv
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    assert "read by ComfyUI, A1111/Forge" in describe_report(report)
    ours, back = tiny_sd_pipeline(), tiny_sd_pipeline()
    dt.load_adapter(ours, adapters["lora"], name="a")
    dt.load_adapter(back, report.path, name="b")
    a = {n: h.adapters["a"].delta_params(h.base_params()) for n, h in hosts(ours.unet) if "a" in h.adapters}
    b = {n: h.adapters["b"].delta_params(h.base_params()) for n, h in hosts(back.unet) if "b" in h.adapters}
    assert a.keys() == b.keys() and all(torch.equal(a[m]["weight"], b[m]["weight"]) for m in a)
    ref = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="not found in the base model"):  # why the warning exists (peft's error)
        ref.load_lora_weights(str(report.path))


def test_sdxl_kohya_ldm_export_loads_in_diffusers(tmp_path):
    """kohya's SDXL layout from an SDXL adapter: diffusers' SDXL pipeline reads it to the same image as ours."""
    folder = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    pipe = load_pipeline(folder, device="cpu")
    dt.inject(pipe, dt.LoRAConfig(rank=2, alpha=4.0, target_modules=ATTN + OTHER), name="x")
    randomize_adapter(pipe.unet, "x", seed=3, std=0.05)
    saved = dt.save_adapter(pipe, tmp_path / "x", name="x", base_model=str(folder))
    report, warned = _export(saved, tmp_path / "sdxl_ldm.safetensors", "kohya-ldm")
    assert report.max_error == 0.0 and warned == []
    assert any(k.startswith("lora_unet_middle_block_1_") for k in load_file(report.path))
    ref = load_pipeline(folder, device="cpu")
    ref.load_lora_weights(str(report.path))
    kw = dict(prompt="lower newer", num_inference_steps=2, output_type="np", guidance_scale=3.0)
    img = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    img_ref = ref(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(img - img_ref).max() <= 1e-4


def test_kohya_ldm_needs_a_unet_and_warns_for_diffusers_on_sd1_layouts(adapters, tmp_path):
    report, warned = _export([adapters["lora"], adapters["te"]], tmp_path / "both.safetensors", "kohya-ldm")
    assert len(warned) == 2 and "text-encoder part" in warned[0]  # the text encoder keeps its kohya names
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(report.path))
    sd15 = ["lora_unet_input_blocks_1_1_proj_in.alpha", "lora_unet_input_blocks_11_0_in_layers_2.alpha",
            "lora_unet_output_blocks_2_1_conv.alpha"]
    assert len(diffusers_ldm_problems(sd15)) == 2
    assert diffusers_ldm_problems(sd15[:1]) == [] and diffusers_ldm_problems(sd15[1:2]) == []
    with pytest.raises(dt.DifftuneError, match="--model"):
        export_adapter(adapters["lora"], tmp_path / "x.safetensors", "kohya-ldm", model=tmp_path / "nowhere")


def test_cli_export_formats(adapters, tmp_path, capsys):
    from difftune.cli import main

    assert main(["export", str(adapters["sara"]), "--format", "comfyui", "--out",
                 str(tmp_path / "s.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "(diff, " in out and f"read by {READERS['diff']}" in out
    assert main(["export", str(adapters["lora"]), "--format", "diffusers", "--out",
                 str(tmp_path / "d.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "difftune: warning: this diffusers-format file does not load fully in ComfyUI" in captured.err
    assert main(["export", str(adapters["lora"]), "--format", "kohya-ldm", "--out",
                 str(tmp_path / "l.safetensors")]) == 0
    assert "(kohya-ldm, " in capsys.readouterr().out
