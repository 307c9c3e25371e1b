"""Methods on SD3 and Flux transformers: an adapter saved from the bare transformer records its component (so its
diffusers export is named ``transformer.``), and the methods that do not apply to an MMDiT are refused by `inject`
with what to use instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

import difftune as dt
from difftune.cli import main
from difftune.counting import method_config
from difftune.testing import randomize_adapter, tiny_flux_pipeline, tiny_sd3_pipeline

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def _image(pipe) -> np.ndarray:
    return pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np",
                max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_adapter_saved_from_the_bare_transformer_exports_transformer_keys(kind, tmp_path):
    """Known bug (issue 26): saved from the module alone, the header had no component and the diffusers export was
    written under ``unet.`` keys, which StableDiffusion3Pipeline/FluxPipeline ignore."""
    pipe = BUILDERS[kind]()
    model = pipe.transformer
    dt.inject(model, method_config("lora", {"rank": 2}, model), name="t")
    randomize_adapter(model, "t", seed=0, std=0.3)
    ours = _image(pipe)
    dt.save_adapter(model, tmp_path / "adapter")  # the module, not the pipeline
    assert dt.serialization.read_header(tmp_path / "adapter")["component"] == "transformer"
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(tmp_path / "adapter"), "--out", str(out), "--format", "diffusers"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    theirs = BUILDERS[kind]()
    theirs.load_lora_weights(str(out))
    np.testing.assert_allclose(_image(theirs), ours, atol=1e-4, rtol=0)
    # an explicit component still wins over the class
    path = dt.serialization.save_adapter_file(model, tmp_path / "named", name="t", component="custom")
    assert dt.serialization.read_header(path)["component"] == "custom"


def test_component_from_the_model_class():
    from difftune.components import component_of_model
    from difftune.testing import tiny_dit, tiny_unet

    assert component_of_model(tiny_unet()) == "unet" and component_of_model(tiny_dit()) == "transformer"
    assert component_of_model(torch.nn.Linear(2, 2)) == ""  # nothing to go by: not recorded, as before


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("method, says", [
    ("scedit", "skip connections"), ("csc", "no control-image method"), ("kind", "takes no class labels")])
def test_methods_that_do_not_apply_are_refused_with_an_alternative(kind, method, says):
    model = BUILDERS[kind]().transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = method_config(method, {"classes": [0, 1], "tailors_per_class": 1, "learngenes": 2}
                           if method == "kind" else {}, model)
    with pytest.raises(dt.DifftuneError, match=says) as err:
        dt.inject(model, config)
    text = str(err.value)
    assert type(model).__name__ in text and "use LoRA, LoHa, KronA, SaRA or full fine-tuning" in text
    assert dt.list_adapters(model) == {} and model.state_dict().keys() == before.keys()


def test_kind_still_applies_to_class_conditional_dits_pixart_and_plain_modules():
    """PixArt gets its class labels per call (the studio's class picker, tests/apps/test_logic.py)."""
    from difftune.methods.kind import KINDConfig
    from difftune.testing import tiny_dit, tiny_pixart_pipeline

    cfg = {"learngenes": 2, "tailors_per_class": 1, "classes": [1]}
    assert dt.inject(tiny_dit(), KINDConfig(**cfg))  # DiTTransformer2DModel takes class_labels
    assert dt.inject(tiny_pixart_pipeline().transformer, KINDConfig(**cfg))
    assert dt.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), KINDConfig(target_modules=["0"], **cfg)) == ["0"]


def test_krona_on_flux_dev_counts_by_hand():
    """KronA 64 × 8 on the MMDiT default targets of FLUX.1 [dev] (the docs' figure): a1·a2 + (d_out/a1)(d_in/a2)
    per layer; every default target's sides divide (3072, 12288 out; 3072, 12288, 15360 in)."""
    from difftune.architectures import build_architecture
    from difftune.counting import count_trainable

    model = build_architecture("flux-dev")
    w, mlp = 3072, 12288

    def kron(d_in: int, d_out: int) -> int:
        return 64 * 8 + (d_out // 64) * (d_in // 8)

    joint = 2 * (4 * kron(w, w) + kron(w, mlp) + kron(mlp, w))  # each stream: q, k, v, out, ff in, ff out
    single = 3 * kron(w, w) + kron(w, mlp) + kron(w + mlp, w)  # q, k, v, proj_mlp, proj_out
    info = count_trainable(method_config("krona", {"a1": 64, "a2": 8}, model), model)
    assert info["modules"] == 19 * 12 + 38 * 5
    assert info["parameters"] == 19 * joint + 38 * single == 17_024_000
