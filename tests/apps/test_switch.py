"""The model dropdown (issue 28): the shipped models, the models folder and the Hub cache; switching without a
restart, the adapters re-validated; switching and back gives the same image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from apps.studio import Limits, Request, Studio
from apps.studio.catalog import models
from apps.studio.library import MixItem
from difftune.errors import DifftuneError


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_the_catalog_lists_shipped_folder_and_hub_models(tmp_path, studio_files):
    folder = tmp_path / "models"
    for rel in ("sd15", "bk/small"):
        (folder / rel / "unet").mkdir(parents=True)
        (folder / rel / "model_index.json").write_text("{}")
    (folder / "not-a-model").mkdir()
    snap = tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (tmp_path / "hub" / "models--org--tiny-sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-sd" / "refs" / "main").write_text("abc123")
    got = models(folder, studio_files[0], cache=tmp_path / "hub")
    assert next(iter(got.values())) == studio_files[0].resolve()  # the running model first
    assert got["sd15 (models folder)"] == (folder / "sd15").resolve()
    assert got["bk/small (models folder)"] == (folder / "bk" / "small").resolve()
    assert got["org/tiny-sd (Hub cache)"] == snap.resolve() and "sd-mini (shipped)" in got
    assert not any("not-a-model" in label for label in got)


def test_switching_the_model_and_back_gives_the_same_image(studio_files, tmp_path):
    from difftune.testing import save_tiny_pipeline

    model, root, keys, _ = studio_files
    save_tiny_pipeline("dit", tmp_path / "models" / "dit-x")
    st = Studio(model, root, out=tmp_path / "out", limits=Limits(max_steps=10), models=tmp_path / "models")
    sd_label = next(iter(st.model_choices()))
    run = dict(prompt="a cat", steps=3, seed=3)
    mix = [MixItem(keys["style"], 0.8), MixItem(keys["dit"], 0.5)]
    first = st.generate(Request(**run, mix=mix[:1]))
    kept, notes = st.switch_model("dit-x (models folder)", mix)
    assert st.main.kind == "dit" and st.main.label == "dit-x"
    # the SD LoRA is unticked (a UNet's adapter on a DiT), the DiT LoRA stays with a note: made for another DiT
    assert kept == [mix[1]] and any(n.startswith(f"{keys['style']}: made for a unet") for n in notes)
    assert any("made for the model 'dit-model', not 'dit-x'" in n for n in notes)
    assert st.generate(Request(steps=2, class_label=1, mix=kept)).images
    kept, notes = st.switch_model(sd_label, mix[:1])
    assert kept == mix[:1] and notes == [] and st.main.kind == "sd"
    again = st.generate(Request(**run, mix=mix[:1]))
    assert np.array_equal(_pixels(first.images[0]), _pixels(again.images[0]))  # same weights, same kernels
    with pytest.raises(DifftuneError, match="model"):
        st.switch_model(str(tmp_path / "models" / "dit-x"))  # a path, not a listed label


def test_switch_endpoint(served, studio_files):
    """Through the API: the dropdown's choices, a switch to the shipped dit-mini and back."""
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(served[1], verbose=False)
    labels = client.predict(api_name="/list_models")
    assert labels[0] == next(iter(served[0].model_choices())) and "dit-mini (shipped)" in labels
    mix = json.dumps([{"key": studio_files[2]["style"], "weight": 0.8}])
    try:
        got, notes = client.predict("dit-mini (shipped)", mix, api_name="/switch_model")[:2]
        assert json.loads(got) == [] and "unticked" in notes and served[0].main.kind == "dit"
    finally:
        got, notes = client.predict(labels[0], mix, api_name="/switch_model")[:2]
    assert [i["key"] for i in json.loads(got)] == [studio_files[2]["style"]] and served[0].main.kind == "sd"
