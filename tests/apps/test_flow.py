"""The studio on SD3 and Flux (issue 26, item 4): txt2img with its settings, the adapters of every method that applies
(mixed, weighted, fused, A/B), the methods that do not apply listed with the reason, the call settings a pipeline
folder records, and img2img / inpainting through diffusers' SD3 and Flux pipelines; on tiny pipelines built in code.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flow_case import FAMILIES, METHODS
from PIL import Image

from apps.studio import Request, Studio
from apps.studio.library import MixItem
from difftune.errors import DifftuneError


@pytest.fixture(scope="module")
def studios(flow_files, tmp_path_factory):
    return {f: Studio(*flow_files[f], out=tmp_path_factory.mktemp(f"{f}-out")) for f in FAMILIES}


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def _direct(folder, mix=(), **kw) -> np.ndarray:
    """The image `difftune.generation.generate` gives on a fresh pipeline with ``dt.load_adapter(..., weight=w)``."""
    import difftune as dt
    from difftune.generation import generate, load_pipeline

    pipe = load_pipeline(folder)
    for path, w in mix:
        dt.load_adapter(pipe, path, weight=w)
    return np.asarray(generate(pipe, **{"prompt": "a cat", "seed": 3, "steps": 3, "height": 32, "width": 32, **kw})[0],
                      dtype=np.int16)


RUN = dict(prompt="a cat", seed=3, steps=3, width=32, height=32)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_at_half_weight_equals_load_adapter(studios, flow_files, family):
    """Flux failed before its first step (its transformer records no sample size); both families now give the image
    of ``dt.load_adapter(..., weight=0.5)`` and ``generate`` at the same settings."""
    folder, root = flow_files[family]
    st = studios[family]
    got = _pixels(st.generate(Request(**RUN, guidance=3.0, mix=[MixItem("lora", 0.5)])).images[0])
    want = _direct(folder, [(root / "lora", 0.5)], guidance=3.0)
    plain = _direct(folder, guidance=3.0)
    # the same pipeline call on another load of the same files; PNG rounding only
    assert np.abs(got - want).max() <= 1 and np.abs(got - plain).max() > 8
    assert st.main.samplers and next(iter(st.main.samplers)) == "Euler"  # the flow scheduler by its A1111 name


@pytest.mark.parametrize("family", FAMILIES)
def test_size_steps_seed_and_batch(studios, family):
    st = studios[family]
    default, step, fixed = st.main.size_rule()
    # SD3: its sample size × VAE scale, multiples of VAE scale × patch; Flux: its pipeline's default, packed 2×2
    assert (default, step, fixed) == ((32 if family == "sd3" else 256), 4, False)
    calls = []
    r = st.generate(Request(**{**RUN, "width": 48, "steps": 2}, batch=2), progress=lambda i, n: calls.append((i, n)))
    assert [_pixels(p).shape for p in r.images] == [(32, 48, 3)] * 2 and calls[-1] == (2, 2)
    assert "Size: 48x32" in r.infotexts[0] and "Sampler: Euler" in r.infotexts[0]
    again = st.generate(Request(**{**RUN, "width": 48, "steps": 2}, batch=2))
    assert np.array_equal(_pixels(r.images[1]), _pixels(again.images[1]))
    with pytest.raises(DifftuneError, match="width.*multiple of 4"):  # SD3's pipeline raised a ValueError
        st.generate(Request(**{**RUN, "width": 34}))


def test_negative_prompt_on_sd3_and_refused_on_flux(studios, flow_files):
    sd3 = studios["sd3"]
    got = _pixels(sd3.generate(Request(**RUN, negative="a dog")).images[0])
    assert np.abs(got - _direct(flow_files["sd3"][0], negative_prompt="a dog", guidance=4.0)).max() <= 1
    assert np.abs(got - _pixels(sd3.generate(Request(**RUN)).images[0])).max() > 8
    with pytest.raises(DifftuneError) as e:  # FluxPipeline ignored it (true_cfg_scale 1): never silently
        studios["flux"].generate(Request(**RUN, negative="a dog"))
    assert "negative prompt" in str(e.value) and "true classifier-free guidance" in str(e.value)


def test_flux_guidance_reaches_the_transformer(studios):
    st = studios["flux"]
    seen = []
    handle = st.main.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True)
    try:
        st.generate(Request(**{**RUN, "steps": 2}, guidance=5.0))
    finally:
        handle.remove()
    assert len(seen) == 2 and all(g.shape == (1,) and float(g[0]) == 5.0 for g in seen)  # one pass: no doubled batch


def test_call_settings_of_the_folder_are_passed(flow_files, tmp_path):
    """A folder recording ``max_sequence_length`` 8 (as flow-mini does) gives the image of a direct call with 8; the
    studio called the pipeline with its default 256 T5 tokens."""
    from difftune.generation import load_pipeline

    folder = shutil.copytree(flow_files["sd3"][0], tmp_path / "sd3-t5-8")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_difftune_call": {"max_sequence_length": 8}}))
    got = _pixels(Studio(folder, tmp_path / "adapters", out=tmp_path / "out").generate(Request(**RUN)).images[0])
    pipe = load_pipeline(flow_files["sd3"][0])  # the same weights, called by hand

    def call(**kw):
        import torch

        return np.asarray(pipe(prompt="a cat", num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
                               generator=torch.Generator("cpu").manual_seed(3), **kw).images[0], dtype=np.int16)

    assert np.abs(got - call(max_sequence_length=8)).max() <= 1 and np.abs(got - call()).max() > 3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_mixes_fuses_and_compares(studios, family):
    """LoRA, LoHa, KronA, SaRA, full-ΔW and SPM at once: fused (SPM with transport stays unfused) gives the unfused
    image; SPM reports γ (Flux: one pass per prompt, the batch is not doubled: it failed with 2 γ for 1 item)."""
    st = studios[family]
    mix = [MixItem(m, w) for m, w in zip(METHODS, (0.5, -0.4, 0.3, 0.6, 0.2, 1.0))]
    unfused = st.generate(Request(**RUN, mix=mix))
    fused = st.generate(Request(**RUN, mix=mix, fused=True))
    assert np.abs(_pixels(unfused.images[0]) - _pixels(fused.images[0])).max() <= 2
    assert any(n.startswith("SPM spm: γ = 1.00 for the prompt") for n in unfused.notes)
    assert any("SPM with transport on runs unfused" in n for n in fused.notes)
    for m in METHODS:
        assert f":{m}:" in unfused.infotexts[0]
    a, b = st.compare(Request(**RUN, mix=[MixItem("krona", 1.0)]), "adapters")
    assert a.seed == b.seed and np.abs(_pixels(a.images[0]) - _pixels(b.images[0])).max() > 8


@pytest.mark.parametrize("family", FAMILIES)
def test_methods_that_do_not_apply_are_listed_with_the_reason(studios, family):
    from apps.studio import compat, rows

    st = studios[family]
    listing = {e.key: compat.flag(e.to_dict(), st.main.label, st.main.bases, st.main.unusable(st.root, e.key))
               for e in st.entries()}
    assert "skip connections" in listing["scedit"]["incompatible"]
    assert "class label" in listing["kind"]["incompatible"] and "⛔ incompatible" in listing["kind"]["badges"]
    assert all("incompatible" not in listing[m] for m in METHODS)
    usable = {s.label: s.usable for s in rows.layout(list(listing.values()), "", {})[0] if s.label}
    assert usable["scedit"] is usable["kind"] is False and usable["lora"] is True
    with pytest.raises(DifftuneError, match="cannot be used.*skip connections"):
        st.generate(Request(**RUN, mix=[MixItem("scedit", 1.0)]))
    assert "scedit" not in st.main.loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_and_inpaint(studios, family):
    """Both modes were refused for SD3 and Flux; they run through diffusers' own pipelines built with from_pipe."""
    st = studios[family]
    init = Image.new("RGB", (20, 20), (200, 30, 30))
    mask = Image.new("L", (20, 20), 0)
    mask.paste(255, (10, 0, 20, 20))
    calls = []
    i2i = st.generate(Request(**{**RUN, "steps": 4}, mode="img2img", image=init, strength=0.5),
                      progress=lambda i, n: calls.append(n))
    assert _pixels(i2i.images[0]).shape == (32, 32, 3) and set(calls) == {2}
    assert type(st.main.variant("img2img")).__name__ == {"sd3": "StableDiffusion3Img2ImgPipeline",
                                                          "flux": "FluxImg2ImgPipeline"}[family]
    lora = st.generate(Request(**{**RUN, "steps": 4}, mode="img2img", image=init, strength=0.5,
                               mix=[MixItem("lora", 1.0)]))
    assert np.abs(_pixels(i2i.images[0]) - _pixels(lora.images[0])).max() > 0  # shared modules: the adapter acts
    inpaint = st.generate(Request(**RUN, mode="inpaint", image=init, mask=mask, strength=1.0))
    assert _pixels(inpaint.images[0]).shape == (32, 32, 3) and "Mode: inpaint" in inpaint.infotexts[0]
    assert st.main.variant("inpaint").transformer is st.main.denoiser


def test_page_hides_flux_negative_prompt(studios):
    from apps.studio.recall import settings
    from apps.studio.ui import build_demo

    for family, visible in (("sd3", True), ("flux", False)):
        comps = [c["props"] for c in build_demo(studios[family]).config["components"] if "props" in c]
        negative = next(p for p in comps if p.get("label") == "Negative prompt")
        assert negative["visible"] is visible
        assert any(str(p.get("label", "")).startswith("Guidance (Flux") for p in comps) is (not visible)
    values, notes = settings({"prompt": "a cat", "negative_prompt": "a dog", "params": {}}, studios["flux"].main,
                             lambda ref: None)
    assert values["negative"] == "" and "takes no negative prompt" in notes[0]


def test_spm_on_flux_through_generate(flow_files):
    """`difftune.generation.generate` (and the studio) on Flux with an SPM: the adapter inputs were doubled for
    guidance > 1 as on SD, but Flux's guidance is embedded and its batch never doubled: 2 γ for 1 item, an error."""
    import difftune as dt
    from difftune.generation import generate, load_pipeline
    from difftune.methods.verbs import model_part

    folder, root = flow_files["flux"]
    pipe = load_pipeline(folder)
    dt.load_adapter(pipe, root / "spm", name="spm")
    images = generate(pipe, prompt="a cat", seed=3, steps=2, guidance=3.5, height=32, width=32, num_images=2)
    gamma = model_part(pipe.transformer, "spm").gamma
    assert len(images) == 2 and gamma.tolist() == [1.0, 1.0]  # one γ per image: "cat" is the whole concept


def test_a_kohya_bfl_flux_lora_imported_runs_in_the_studio(flow_files, tmp_path):
    """A kohya Flux LoRA in the BFL layout (ComfyUI's names, fused qkv), converted by `difftune import` into the
    adapters folder, is listed and gives the image of the adapter it was exported from."""
    from difftune.cli import main

    folder, root = flow_files["flux"]
    adapters = tmp_path / "adapters"
    shutil.copytree(root / "lora", adapters / "lora")
    file = tmp_path / "flux_lora.safetensors"
    assert main(["export", str(root / "lora"), "--out", str(file), "--format", "kohya"]) == 0
    assert main(["import", str(file), "--model", str(folder), "--out", str(adapters / "comfy")]) == 0
    st = Studio(folder, adapters, out=tmp_path / "out")
    assert {e.key: e.method for e in st.entries()} == {"comfy": "lora", "lora": "lora"}
    imported = st.generate(Request(**RUN, mix=[MixItem("comfy", 0.5)]))
    original = st.generate(Request(**RUN, mix=[MixItem("lora", 0.5)]))
    plain = st.generate(Request(**RUN))
    assert np.abs(_pixels(imported.images[0]) - _pixels(original.images[0])).max() <= 1
    assert np.abs(_pixels(imported.images[0]) - _pixels(plain.images[0])).max() > 8


def test_flux_infotext_names_the_distilled_guidance(studios):
    """Flux's guidance is written and read back as Forge's "Distilled CFG Scale" (its "CFG scale" is 1: no CFG runs);
    before, "CFG scale: 5" was written and a Forge image's "CFG scale: 1" was put back as the guidance."""
    from apps.studio.infotext import parse_infotext
    from apps.studio.recall import settings

    st = studios["flux"]
    text = st.generate(Request(**{**RUN, "steps": 2}, guidance=5.0)).infotexts[0]
    assert "CFG scale: 1, Distilled CFG Scale: 5.0" in text
    assert settings(parse_infotext(text), st.main, lambda ref: None)[0]["guidance"] == 5.0
    forge = "a cat\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1"
    assert settings(parse_infotext(forge), st.main, lambda ref: None)[0]["guidance"] == 3.5
    sd3 = studios["sd3"].generate(Request(**{**RUN, "steps": 2}, guidance=5.0)).infotexts[0]
    assert "CFG scale: 5.0" in sd3 and "Distilled" not in sd3
