"""SD3 and Flux LoRA: `load_adapter` into the pipelines, and `difftune export --format diffusers` loaded by the
pipelines' own ``load_lora_weights`` giving the image difftune gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import difftune as dt
from difftune.cli import main
from difftune.counting import method_config
from difftune.methods.verbs import inject
from difftune.testing import randomize_adapter, tiny_flux_pipeline, tiny_sd3_pipeline

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def _image(pipe) -> np.ndarray:
    return pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np",
                max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_load_adapter_and_diffusers_export_give_the_same_image(kind, tmp_path):
    build = BUILDERS[kind]
    pipe = build()
    base = _image(pipe)
    # the MMDiT default targets: both streams of the joint blocks (and Flux's single blocks)
    inject(pipe.transformer, method_config("lora", {"rank": 2}, pipe.transformer), name="t")
    randomize_adapter(pipe.transformer, "t", seed=0, std=0.3)
    ours = _image(pipe)
    assert np.abs(ours - base).max() > 0.05  # the adapter changes the image, so the comparisons below can fail
    dt.save_adapter(pipe, tmp_path / "adapter", "t")

    loaded = build()
    assert dt.load_adapter(loaded, tmp_path / "adapter") == "t"
    np.testing.assert_allclose(_image(loaded), ours, atol=1e-6, rtol=0)

    out = tmp_path / f"{kind}.safetensors"
    assert main(["export", str(tmp_path / "adapter"), "--out", str(out), "--format", "diffusers"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    if kind == "flux":
        assert any(".single_transformer_blocks." in k for k in keys) and any(".add_q_proj." in k for k in keys)
    theirs = build()
    theirs.load_lora_weights(str(out))
    np.testing.assert_allclose(_image(theirs), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_generate_cli_with_an_adapter(kind, tmp_path):
    from PIL import Image

    from difftune.generation import generate
    from difftune.testing import save_tiny_pipeline

    folder = save_tiny_pipeline(kind, tmp_path / kind)
    pipe = BUILDERS[kind]()
    inject(pipe.transformer, method_config("lora", {"rank": 2}, pipe.transformer), name="t")
    randomize_adapter(pipe.transformer, "t", seed=0, std=0.3)
    dt.save_adapter(pipe, tmp_path / "adapter", "t")
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32",
            "--device", "cpu", "--seed", "5"]
    assert main([*args, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "base.png")]) == 0
    with_adapter = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.int16)
    expected = np.asarray(generate(pipe, prompt="a cat", seed=5, steps=2, height=32, width=32)[0], dtype=np.int16)
    assert np.abs(with_adapter - expected).max() <= 1  # the same image, up to uint8 rounding
    assert np.abs(with_adapter - np.asarray(Image.open(tmp_path / "base.png"), dtype=np.int16)).max() > 10
