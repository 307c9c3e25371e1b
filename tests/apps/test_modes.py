"""img2img and inpainting for the SD families (issue 28): diffusers' pipelines built from the loaded one with
``from_pipe``, the adapters acting on them as on text-to-image; the infotext names the mode, strength and images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apps.studio import Limits, Request, Studio
from apps.studio.infotext import parse_infotext
from apps.studio.library import MixItem
from apps.studio.recall import settings
from difftune.errors import DifftuneError


@pytest.fixture(scope="module")
def studio(studio_files, tmp_path_factory):
    model, root, _, _ = studio_files
    return Studio(model, root, out=tmp_path_factory.mktemp("modes-out"), limits=Limits(max_steps=10, max_batch=2))


def _init() -> Image.Image:
    a = np.zeros((20, 20, 3), dtype=np.uint8)
    a[:, :10] = (220, 40, 40)  # any size: it is resized to the request's
    return Image.fromarray(a)


def _mask() -> Image.Image:
    m = Image.new("L", (20, 20), 0)
    m.paste(255, (10, 0, 20, 20))
    return m


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_img2img_and_inpaint_make_images_with_the_adapters(studio, studio_files):
    style = studio_files[2]["style"]
    calls = []
    run = dict(prompt="a cat", steps=8, seed=2, width=48, height=32, image=_init())
    i2i = studio.generate(Request(**run, mode="img2img", strength=0.5), progress=lambda i, n: calls.append(n))
    assert _pixels(i2i.images[0]).shape == (32, 48, 3) and calls and set(calls) == {4}  # int(8 × 0.5) steps ran
    p = parse_infotext(i2i.infotexts[0])["params"]
    assert p["Mode"] == "img2img" and p["Denoising strength"] == "0.5" and len(p["Init image"]) == 12
    # the img2img pipeline shares the loaded modules: an adapter acts on it
    with_lora = studio.generate(Request(**run, mode="img2img", strength=0.5, mix=[MixItem(style, 1.5)]))
    assert np.abs(_pixels(i2i.images[0]) - _pixels(with_lora.images[0])).max() > 0
    assert f"<lora:{style}:1.5>" in with_lora.infotexts[0]
    inpaint = studio.generate(Request(**run, mode="inpaint", strength=1.0, mask=_mask()))
    p = parse_infotext(inpaint.infotexts[0])["params"]
    assert _pixels(inpaint.images[0]).shape == (32, 48, 3) and p["Mode"] == "inpaint" and len(p["Mask"]) == 12
    # recall: the mode, strength and both images come back
    values, notes = settings(parse_infotext(inpaint.infotexts[0]), studio.main, studio.stored_image)
    assert values["mode"] == "inpaint" and values["strength"] == 1.0 and notes == []
    assert values["image"].size == (20, 20) and np.array_equal(np.asarray(values["mask"]), np.asarray(_mask()))
    # text-to-image after them still uses the loaded pipeline
    assert "Mode" not in parse_infotext(studio.generate(Request(prompt="a cat", steps=2)).infotexts[0])["params"]


def test_modes_are_checked(studio, tmp_path):
    for bad, field in ((dict(mode="outpaint"), "mode"), (dict(mode="img2img"), "init image"),
                       (dict(mode="inpaint", image=_init()), "mask"),
                       (dict(mode="img2img", image=_init(), strength=0), "strength")):
        with pytest.raises(DifftuneError, match=field):
            studio.generate(Request(prompt="a cat", steps=2, **bad))
    from difftune.testing import save_tiny_pipeline

    dit = Studio(save_tiny_pipeline("dit", tmp_path / "dit"), tmp_path / "adapters", out=tmp_path / "out")
    with pytest.raises(DifftuneError, match="SD families"):
        dit.generate(Request(steps=2, mode="img2img", image=_init()))
