"""Text-encoder LoRA trained by the trainer (model.component: text_encoder), saved and exported for other tools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import difftune as dt
from difftune.config import load_config
from difftune.errors import DifftuneError
from difftune.generation import load_pipeline
from difftune.interop.export import export_adapter
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, main

REPO = Path(__file__).resolve().parents[2]
PROMPT = dict(prompt="lower newer", num_inference_steps=2, output_type="np", guidance_scale=3.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step text-encoder LoRA run on the tiny SD pipeline: (pipeline folder, captions folder, run folder)."""
    root = tmp_path_factory.mktemp("te")
    model = save_tiny_pipeline("sd", root / "sd")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("lower, newer" if i % 2 else "lower")
    cfg = _cfg(model, images, root / "out")
    result = main(cfg)
    return model, images, root / "out", result


def _cfg(model, images, out, *sets):
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={model}", f"data.path={images}", f"output_dir={out}", "model.component=text_encoder",
        "method={name: lora, rank: 2, target_modules: [q_proj, v_proj, fc1, fc2]}", "optimizer.lr=0.01",
        "validation.prompts=[]", *sets])


def test_text_encoder_lora_trains_and_saves_with_its_component(run):
    _, _, _, result = run
    header = dt.serialization.read_header(result)
    assert header["component"] == "text_encoder" and header["target_fingerprint"]["modules"] == 8
    tensors = load_file(result / "adapter_model.safetensors")
    assert all(k.startswith("encoder.layers.") for k in tensors)
    assert all(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith("lora_B"))  # B starts at 0


def test_exports_carry_the_text_encoder_prefix_and_load_in_diffusers(run, tmp_path):
    model, images, out, result = run
    kohya = export_adapter(result, tmp_path / "te_kohya.safetensors", "kohya")
    keys = load_file(kohya.path)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys and kohya.max_error == 0
    with safe_open(str(kohya.path), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_resolution"], meta["ss_network_dim"]) == ("2", "(32, 32)", "2")
    assert json.loads(meta["ss_tag_frequency"]) == {images.name: {"lower": 4, "newer": 2}}
    diffusers = export_adapter(result, tmp_path / "te.safetensors", "diffusers")
    assert all(k.startswith("text_encoder.encoder.layers.") for k in load_file(diffusers.path))
    plain, ours, theirs = (load_pipeline(model) for _ in range(3))
    dt.load_adapter(ours, result)
    theirs.load_lora_weights(str(diffusers.path))
    assert theirs.get_list_adapters() == {"text_encoder": ["default_0"]}
    base, want, got = (p(generator=torch.Generator().manual_seed(0), **PROMPT).images for p in (plain, ours, theirs))
    print("image change by the trained text-encoder LoRA:", np.abs(want - base).max())
    assert np.abs(want - base).max() > 1e-4  # the trained adapter changes the image, so equality means something
    assert np.abs(got - want).max() <= 1e-4


def test_cached_text_embeddings_are_refused_while_the_encoder_trains(run, tmp_path):
    model, images, _, _ = run
    with pytest.raises(DifftuneError, match="data.cache_text_embeddings"):
        main(_cfg(model, images, tmp_path / "out", "data.cache_text_embeddings=true"))
