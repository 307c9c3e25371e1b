"""Adapters in diffusers pipelines: SD, SDXL, DiT and PixArt, through difftune's API and the pipelines/ files."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import difftune as dt
from difftune import testing
from difftune.methods.verbs import adapter_parameters, hosts
from difftune.testing import randomize_adapter

BUILDERS = {
    "sd": testing.tiny_sd_pipeline,
    "sdxl": testing.tiny_sdxl_pipeline,
    "dit": testing.tiny_dit_pipeline,
    "pixart": testing.tiny_pixart_pipeline,
}


def _run(pipe, kind):
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0), "output_type": "np"}
    if kind == "dit":
        return pipe(class_labels=[1], **kwargs).images
    if kind == "pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return pipe(prompt="a photo of a cat", **kwargs).images


def _build(kind, tok_dir):
    pipe = BUILDERS[kind](seed=0) if kind == "dit" else BUILDERS[kind](tokenizer_dir=None, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_pipeline_adapter_lifecycle(kind, tmp_path, tok_dir):
    pipe = _build(kind, tok_dir)
    base = _run(pipe, kind)
    names = dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), name="s")
    assert names
    randomize_adapter(pipe.unet if kind in ("sd", "sdxl") else pipe.transformer, "s", std=0.3)
    adapted = _run(pipe, kind)
    assert np.abs(adapted - base).max() > 1e-3
    path = dt.save_adapter(pipe, tmp_path / "s")
    assert dt.serialization.read_header(path)["component"] == ("unet" if kind in ("sd", "sdxl") else "transformer")

    fresh = _build(kind, tok_dir)
    assert dt.load_adapter(fresh, path, weight=1.0) == "s"
    np.testing.assert_array_equal(_run(fresh, kind), adapted)
    info = dt.list_adapters(fresh)["s"]
    assert info["method"] == "lora" and info["weight"] == 1.0 and info["modules"] == len(names)

    dt.set_adapter_weights(fresh, {"s": 0.0})
    np.testing.assert_allclose(_run(fresh, kind), base, atol=1e-6)
    dt.set_adapter_weights(fresh, {"s": 1.0})
    dt.fuse(fresh)
    assert dt.list_adapters(fresh)["s"]["fused"]
    np.testing.assert_allclose(_run(fresh, kind), adapted, atol=1e-4)
    dt.unfuse(fresh)
    np.testing.assert_array_equal(_run(fresh, kind), adapted)

    refs = [weakref.ref(p) for p in adapter_parameters(fresh.unet if kind in ("sd", "sdxl") else fresh.transformer)]
    dt.delete_adapter(fresh, "s")
    gc.collect()
    assert all(r() is None for r in refs)
    assert dt.list_adapters(fresh) == {}
    np.testing.assert_array_equal(_run(fresh, kind), base)


def test_two_adapters_on_one_pipeline(tmp_path, tok_dir):
    pipe = _build("sd", tok_dir)
    for name, seed in (("a", 1), ("b", 2)):
        dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v"]), name=name)
        randomize_adapter(pipe.unet, name, seed=seed, std=0.3)
        dt.save_adapter(pipe, tmp_path / name, name=name)
    fresh = _build("sd", tok_dir)
    dt.load_adapter(fresh, tmp_path / "a", weight=0.5)
    dt.load_adapter(fresh, tmp_path / "b", weight=0.25)
    assert {n: i["weight"] for n, i in dt.list_adapters(fresh).items()} == {"a": 0.5, "b": 0.25}
    host = next(h for _, h in hosts(fresh.unet))
    x = torch.randn(3, host.base_layer.in_features)
    with torch.no_grad():
        expected = host.base_layer(x) + 0.5 * host.adapters["a"].delta(x, host.base_layer, host.base_params()) \
            + 0.25 * host.adapters["b"].delta(x, host.base_layer, host.base_params())
        torch.testing.assert_close(host(x), expected, atol=1e-6, rtol=0)


def test_adapter_on_text_encoder_component(tmp_path, tok_dir):
    pipe = _build("sd", tok_dir)
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]), name="te", component="text_encoder")
    randomize_adapter(pipe.text_encoder, "te", std=0.5)
    out = _run(pipe, "sd")
    path = dt.save_adapter(pipe, tmp_path / "te", name="te")
    assert dt.serialization.read_header(path)["component"] == "text_encoder"
    fresh = _build("sd", tok_dir)
    dt.load_adapter(fresh, path)
    assert dt.list_adapters(fresh)["te"]["component"] == "text_encoder"
    np.testing.assert_array_equal(_run(fresh, "sd"), out)


@pytest.mark.parametrize(("kind", "file_kind"), [("sd", "stable_diffusion"), ("dit", "dit")])
def test_pipelines_folder_as_custom_pipeline(kind, file_kind, tmp_path):
    """The documented route: DiffusionPipeline.from_pretrained(dir, custom_pipeline=difftune.pipelines.path(...))."""
    from diffusers import DiffusionPipeline

    import difftune.pipelines

    model_dir = testing.save_tiny_pipeline(kind, tmp_path / "model")
    pipe = _build(kind, None)
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v"]), name="s")
    randomize_adapter(pipe.unet if kind == "sd" else pipe.transformer, "s", std=0.3)
    dt.save_adapter(pipe, tmp_path / "s", name="s")

    custom = DiffusionPipeline.from_pretrained(
        model_dir, custom_pipeline=difftune.pipelines.path(file_kind), trust_remote_code=True
    )
    custom.set_progress_bar_config(disable=True)
    assert type(custom).__name__.startswith("Difftune")
    custom.load_adapter(tmp_path / "s", weight=1.0)
    one = _run(custom, kind)
    custom.set_adapter_weights({"s": 0.25})
    quarter = _run(custom, kind)
    assert np.abs(one - quarter).max() > 1e-3
    assert custom.list_adapters()["s"]["weight"] == 0.25
    custom.fuse_adapters()
    np.testing.assert_allclose(_run(custom, kind), quarter, atol=1e-4)
    custom.unfuse_adapters()
    custom.delete_adapter("s")
    assert custom.list_adapters() == {}


def test_pipeline_classes_do_not_shadow_diffusers_methods():
    from diffusers import DiTPipeline, PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from difftune.pipeline_mixin import DifftuneAdapterMixin

    ours = {n for n in vars(DifftuneAdapterMixin) if not n.startswith("_")}
    for stock in (StableDiffusionPipeline, StableDiffusionXLPipeline, DiTPipeline, PixArtAlphaPipeline):
        assert not ours & set(dir(stock)), stock


def test_adapter_names_are_unique_across_components(tmp_path):
    pipe = _build("sd", None)
    dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["to_q"]), name="style")
    with pytest.raises(dt.DifftuneError, match="already loaded.*'unet'"):
        dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["q_proj"]), name="style", component="text_encoder")
    path = dt.save_adapter(pipe, tmp_path / "style")
    with pytest.raises(dt.DifftuneError, match="already loaded"):
        dt.load_adapter(pipe, path)


def test_component_errors(tok_dir):
    pipe = _build("sd", tok_dir)
    with pytest.raises(dt.DifftuneError, match="`component`.*'vae2'"):
        dt.inject(pipe, dt.LoRAConfig(), component="vae2")
    with pytest.raises(dt.DifftuneError, match="`pipe`"):
        dt.list_adapters("not a pipeline")


def test_an_adapter_for_another_denoiser_family_says_so_in_words(tmp_path):
    """Issue 20: an sd-mini (UNet) adapter loaded into dit-mini names both families, not a component list."""
    from difftune import zoo

    sd = zoo.load("sd-mini")
    dt.inject(sd, dt.LoRAConfig(rank=2, target_modules=["to_q"]))
    path = dt.save_adapter(sd, tmp_path / "unet-lora", base_model="sd-mini")
    dit = zoo.load("dit-mini")
    with pytest.raises(dt.DifftuneError, match=r"made for a UNet \(sd-mini\); this pipeline \(DiTPipeline\)'s "
                                               r"denoiser is a DiT transformer"):
        dt.load_adapter(dit, path)
    assert dt.list_adapters(dit) == {}


def test_one_vocabulary_with_the_peft_words_as_aliases():
    """fuse / unfuse / delete_adapter are the verbs; merge / unmerge / remove are the same function objects."""
    assert dt.merge is dt.fuse and dt.unmerge is dt.unfuse and dt.remove is dt.delete_adapter
    assert {"fuse", "unfuse", "delete_adapter", "merge", "unmerge", "remove"} <= set(dt.__all__)


def test_delete_adapter_removes_all_by_default_and_can_bake_them_in():
    unet = testing.tiny_unet(0)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 3, 32)
    for name in ("a", "b"):
        dt.inject(unet, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v"]), name=name)
        randomize_adapter(unet, name, seed=len(name) + ord(name), std=0.3)
    adapted = unet(x, t, encoder_hidden_states=text).sample
    dt.fuse(unet, "a")
    dt.delete_adapter(unet)  # every adapter, the fused one unfused: the original weights bit for bit
    assert not list(hosts(unet)) and dt.list_adapters(unet) == {}
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())

    for name in ("a", "b"):
        dt.inject(unet, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v"]), name=name)
        randomize_adapter(unet, name, seed=len(name) + ord(name), std=0.3)
    dt.delete_adapter(unet, merge=True)  # peft's merge_and_unload: plain modules, the adapted output
    assert not list(hosts(unet))
    torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample, adapted, atol=1e-5, rtol=1e-5)
