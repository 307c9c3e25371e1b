"""kohya ``ss_*`` base-model metadata of exported files, read back the way A1111/Forge read it (``network.py``:
``ss_base_model_version`` starting ``sdxl_`` → SDXL, ``ss_v2 == "True"`` → SD2, other metadata → SD1)."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

import difftune as dt
from difftune.interop.export import ExportWarning, export_adapter
from difftune.interop.kohya_meta import base_version
from difftune.testing import randomize_adapter, save_tiny_pipeline, tiny_sd_pipeline, tiny_unet

UNET = ["to_q", "to_k", "to_v", "to_out.0"]
TE = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _a1111_version(path) -> str:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def _export(tmp_path, adapters, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_adapter(adapters, tmp_path / "out.safetensors", "kohya", **kw)
    with safe_open(str(report.path), "pt") as f:
        return f.metadata(), [w for w in caught if issubclass(w.category, ExportWarning)]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    folder = save_tiny_pipeline("sdxl", root / "base")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=UNET), name="u")
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=TE), name="t2", component="text_encoder_2")
    for comp, name in (("unet", "u"), ("text_encoder_2", "t2")):
        randomize_adapter(getattr(pipe, comp), name, seed=1)
    return dt.save_adapter(pipe, root / "u", name="u"), dt.save_adapter(pipe, root / "t2", name="t2")


def test_sdxl_unet_and_second_text_encoder_say_sdxl(sdxl, tmp_path):
    unet, te2 = sdxl
    meta, warned = _export(tmp_path, [unet])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False" and not warned
    assert _a1111_version(tmp_path / "out.safetensors") == "SDXL"
    meta, warned = _export(tmp_path, [te2])  # alone: text_encoder_2 exists only in SDXL, wherever its base is
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert len(warned) == 1 and "--format diffusers" in str(warned[0].message)


def test_sd2_from_the_context_width_and_sd1_from_the_folder(tmp_path):
    unet = tiny_unet(0, cross_attention_dim=1024)  # SD2's OpenCLIP-H context, with no base folder recorded
    dt.inject(unet, dt.LoRAConfig(rank=2, target_modules=UNET), name="s")
    meta, _ = _export(tmp_path, [dt.save_adapter(unet, tmp_path / "s2", name="s", base_model="")])
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert _a1111_version(tmp_path / "out.safetensors") == "SD2"
    folder = save_tiny_pipeline("sd", tmp_path / "sd1")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=UNET), name="s")
    meta, warned = _export(tmp_path, [dt.save_adapter(pipe, tmp_path / "s1", name="s")])
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False" and not warned
    assert meta["ss_v_parameterization"] == "False"  # the folder's scheduler predicts ε


def test_base_version_clues_in_order():
    assert base_version(["unet"], "stabilityai/stable-diffusion-xl-base-1.0", []) == ("sdxl", None)
    assert base_version(["unet"], "stabilityai/stable-diffusion-2-1", []) == ("sd2", None)
    assert base_version(["unet"], "runwayml/stable-diffusion-v1-5", []) == ("sd1", None)
    assert base_version(["transformer"], "my-dit", []) == (None, None)  # kohya has no version for a DiT


def test_kohya_text_encoder_export_warns_and_diffusers_indeed_ignores_it(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=TE), name="te", component="text_encoder")
    randomize_adapter(pipe.text_encoder, "te", seed=2)
    _, warned = _export(tmp_path, [dt.save_adapter(pipe, tmp_path / "te", name="te")])
    assert len(warned) == 1 and "load_lora_weights" in str(warned[0].message)
    # why the warning exists: diffusers loads the file without error and changes nothing in the text encoder
    fresh = tiny_sd_pipeline(seed=0)
    before = {n: p.clone() for n, p in fresh.text_encoder.named_parameters()}
    fresh.load_lora_weights(str(tmp_path / "out.safetensors"))
    fresh.fuse_lora()
    assert all(torch.equal(before[n], p) for n, p in fresh.text_encoder.named_parameters() if n in before)
