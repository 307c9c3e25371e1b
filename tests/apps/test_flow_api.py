"""The studio's HTTP API (gradio_client) on SD3 and Flux (issue 26, item 4): generate with a LoRA at weight 0.5 gives
the image of ``dt.load_adapter(..., weight=0.5)``; the listing names the methods that do not apply, with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flow_case import FAMILIES
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module", params=FAMILIES)
def flow_served(request, flow_files, tmp_path_factory):
    """(family, client): the studio on the family's tiny pipeline, served on 127.0.0.1 for the module."""
    from apps.studio import Studio
    from apps.studio.ui import launch

    family = request.param
    studio = Studio(*flow_files[family], out=tmp_path_factory.mktemp(f"{family}-api-out"))
    demo = launch(studio, block=False)
    try:
        yield family, gradio_client.Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def _image(item) -> np.ndarray:
    """A gallery item as gradio_client returns it: a dict {"image": {...}} or (path, caption)."""
    if isinstance(item, dict):
        item = item.get("image", item)
        item = item["path"] if isinstance(item, dict) else item
    elif isinstance(item, (list, tuple)):
        item = item[0]
    with Image.open(item) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def _generate(client, mix, **kw):
    args = dict(p="a cat", neg="", st=3, g=3.0, w=32, h=32, samp="Euler", b=1, s=3, rnd=False, mix=json.dumps(mix),
                fu=False, tr=True, ctrl=None, ex="none", cs=1.0, cl=None, md="txt2img", im=None, mk=None, sg=0.75)
    args.update(kw)
    return client.predict(*args.values(), api_name="/generate")


def test_generate_with_a_lora_at_half_weight(flow_served, flow_files):
    import difftune as dt
    from difftune.generation import generate, load_pipeline

    family, client = flow_served
    folder, root = flow_files[family]
    gallery, seed, text, _ = _generate(client, [{"key": "lora", "weight": 0.5}])
    assert seed == 3 and "<lora:lora:0.5>" in text
    pipe = load_pipeline(folder)
    dt.load_adapter(pipe, root / "lora", weight=0.5)
    want = np.asarray(generate(pipe, prompt="a cat", seed=3, steps=3, guidance=3.0, height=32, width=32)[0],
                      dtype=np.int16)
    assert np.abs(_image(gallery[0]) - want).max() <= 1  # PNG rounding only
    # img2img through the API too
    gallery = _generate(client, [], md="img2img", im=gradio_client.handle_file(_init_png(flow_files[family][1])))[0]
    assert _image(gallery[0]).shape == (32, 32, 3)


def _init_png(root) -> str:
    path = root.parent / "init.png"
    if not path.is_file():
        Image.new("RGB", (20, 20), (200, 30, 30)).save(path)
    return str(path)


def test_listing_names_what_does_not_apply(flow_served):
    family, client = flow_served
    by_key = {e["key"]: e for e in client.predict(api_name="/list_adapters")}
    assert "skip connections" in by_key["scedit"]["incompatible"] and "⛔" in by_key["scedit"]["badges"]
    assert "class label" in by_key["kind"]["incompatible"]
    assert "incompatible" not in by_key["lora"]
    with pytest.raises(Exception, match="cannot be used"):  # noqa: PT011 (gradio_client raises AppError)
        _generate(client, [{"key": "kind", "weight": 1.0}])
    if family == "flux":
        with pytest.raises(Exception, match="negative prompt"):  # noqa: PT011
            _generate(client, [], neg="a dog")
