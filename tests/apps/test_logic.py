"""The studio's logic without Gradio: folder safety, bounded inputs, mixes (merged = the live mix), infotext, DiT
classes, cancel."""

from __future__ import annotations

import os

import pytest
import torch

from apps.studio import Limits, Request, Studio, library
from apps.studio.engine import Cancelled
from apps.studio.infotext import format_infotext, parse_infotext
from apps.studio.library import MixItem
from difftune.errors import DifftuneError


@pytest.fixture(scope="module")
def studio(studio_files, tmp_path_factory):
    model, root, _, _ = studio_files
    return Studio(model, root, out=tmp_path_factory.mktemp("logic-out"), limits=Limits(max_steps=10, max_batch=2))


def test_keys_cannot_leave_the_folder(studio_files, tmp_path):
    root = studio_files[1]
    for key in ("../adapters/labs/style", "/etc", "labs/../../x", "", "labs\\style"):
        with pytest.raises(DifftuneError, match="adapter"):
            library.resolve(root, key)
    outside = tmp_path / "evil"
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_bytes(b"x")
    link = root / "planted"
    os.symlink(outside, link)
    try:
        with pytest.raises(DifftuneError, match="symlink out of the folder"):
            library.resolve(root, "planted")
        assert "planted" not in {e.key for e in library.scan(root)}
    finally:
        link.unlink()


def test_inputs_are_bounded(studio, studio_files):
    for bad, field in ((dict(steps=11), "steps"), (dict(batch=3), "batch"), (dict(width=30), "width"),
                       (dict(width=4096), "width"), (dict(guidance=float("nan")), "guidance"),
                       (dict(sampler="nope"), "sampler"), (dict(seed=2**40), "seed")):
        with pytest.raises(DifftuneError, match=field):
            studio.generate(Request(prompt="a cat", **{**dict(steps=2), **bad}))
    with pytest.raises(DifftuneError, match="weight"):
        library.parse_mix('[{"key": "labs/style", "weight": 3}]')


def test_merged_mix_equals_the_live_mix(studio, studio_files, tmp_path):
    from difftune.generation import load_pipeline
    from difftune.loading import load_adapter

    keys = studio_files[2]
    mix = [MixItem(keys["style"], 0.7), MixItem(keys["subject"], -1.2)]
    key, msg = studio.save_mix("logic-merged", mix, fused=False, how="merged")
    assert "merged 2 adapter(s)" in msg
    studio.main.apply_mix(studio.root, mix, fused=False)
    fresh = load_pipeline(studio_files[0])
    load_adapter(fresh, studio.root / key)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 4, 32)
    with torch.no_grad():
        live = studio.main.pipe.unet(x, t, ctx).sample
        merged = fresh.unet(x, t, ctx).sample
        studio.main.apply_mix(studio.root, [], fused=False)
        base = studio.main.pipe.unet(x, t, ctx).sample
    assert (live - base).abs().max() > 1e-3  # the mix does something
    assert torch.allclose(live, merged, atol=1e-4)


def test_fused_and_unfused_give_the_same_image(studio, studio_files):
    from PIL import Image

    mix = [MixItem(studio_files[2]["style"], 0.9)]
    a = studio.generate(Request(prompt="a cat", steps=2, seed=5, mix=mix, fused=False)).images[0]
    b = studio.generate(Request(prompt="a cat", steps=2, seed=5, mix=mix, fused=True)).images[0]
    pa, pb = list(Image.open(a).getdata()), list(Image.open(b).getdata())
    assert max(abs(u - v) for p, q in zip(pa, pb) for u, v in zip(p, q)) <= 2


def test_infotext_round_trip():
    text = format_infotext("a cat, sitting", "blurry, dark", {"Steps": 20, "Sampler": "Euler a", "Seed": 3,
                                                               "Model": "sd-mini"}, [("labs/style", 0.8, "abc123")])
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "a cat, sitting" and parsed["negative_prompt"] == "blurry, dark"
    assert parsed["params"]["Sampler"] == "Euler a" and parsed["params"]["Seed"] == "3"
    assert parsed["adapters"] == [{"key": "labs/style", "weight": 0.8, "hash": "abc123"}]


def test_cancel_stops_the_run_and_the_next_one_works(studio):
    def cancel_at_first_step(i, n):
        studio.cancel()

    with pytest.raises(Cancelled, match="cancelled at step"):
        studio.generate(Request(prompt="a cat", steps=5), progress=cancel_at_first_step)
    assert len(studio.generate(Request(prompt="a cat", steps=2)).images) == 1


def test_dit_class_picker(tmp_path):
    from difftune.testing import save_tiny_pipeline

    model = save_tiny_pipeline("dit", tmp_path / "dit")
    st = Studio(model, tmp_path / "adapters", out=tmp_path / "out")
    choices = st.main.class_choices()
    assert choices and choices[0][1] == 0
    r = st.generate(Request(steps=2, class_label=choices[1][1]))
    assert "Class: 1" in r.infotexts[0] and st.main.size_rule()[2]  # DiT samples at its one size
    with pytest.raises(DifftuneError, match="class"):
        st.generate(Request(steps=2, class_label=10**6))


def test_pixart_class_picker_feeds_kind(tmp_path):
    """A PixArt pipeline with a KIND adapter: the chosen class reaches the class gate (different class, different
    image; the same class, the same image)."""
    from difftune.methods import METHODS

    if "kind" not in METHODS:
        pytest.skip("KIND is not registered in this checkout")
    import difftune as dt
    from difftune.generation import load_pipeline
    from difftune.methods.kind import KINDConfig
    from difftune.testing import randomize_adapter, save_tiny_pipeline

    model = save_tiny_pipeline("pixart", tmp_path / "pixart")
    pipe = load_pipeline(model)
    dt.inject(pipe, KINDConfig(learngenes=2, tailors_per_class=2, classes=[0, 1], init="random"), name="kind")
    randomize_adapter(pipe.transformer, "kind", std=0.5)
    dt.save_adapter(pipe, tmp_path / "adapters" / "kind", name="kind")
    st = Studio(model, tmp_path / "adapters", out=tmp_path / "out")
    mix = [MixItem("kind", 1.0)]
    runs = [st.generate(Request(prompt="a cat", steps=2, guidance=1.0, mix=mix, class_label=c)) for c in (0, 1, 0)]
    from PIL import Image

    pixels = [list(Image.open(r.images[0]).getdata()) for r in runs]
    assert pixels[0] != pixels[1] and pixels[0] == pixels[2] and "Class: 1" in runs[1].infotexts[0]
