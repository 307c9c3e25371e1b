"""Complete recall (issue 28): the infotext holds every adapter with its row weight and method settings, the control
image reference, the class and the sampler; `recall.settings` puts all of it back; plain LoRAs are A1111's
``<lora:name:w>``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apps.studio import Limits, Request, Studio
from apps.studio.infotext import parse_infotext
from apps.studio.library import MixItem
from apps.studio.recall import CONTROLS, settings


@pytest.fixture(scope="module")
def studio(studio_files, tmp_path_factory):
    model, root, _, _ = studio_files
    return Studio(model, root, out=tmp_path_factory.mktemp("recall-out"), limits=Limits(max_steps=10, max_batch=2))


def _control() -> Image.Image:
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[8:24, 14:18] = 255  # a white bar: the structure the CSC adapter reads
    return Image.fromarray(a)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_control_scale_and_the_csc_row_weight_are_kept_apart(studio, studio_files):
    """The control scale replaced the CSC row's weight (a row at 0.3 ran and was recorded at the scale's 1); now it
    multiplies it and both are recorded."""
    edges = studio_files[2]["edges"]
    run = dict(prompt="a cat", steps=2, seed=3, control=_control())
    row = studio.generate(Request(**run, mix=[MixItem(edges, 0.3)], control_scale=1.0))
    text = row.infotexts[0]
    assert f"<adapter:{edges}:0.3>" in text and "Control scale: 1.0" in text
    # row 0.3 × scale 1 is the CSC adapter at 0.3, the same as row 1 × scale 0.3 (the same product, same kernels)
    scaled = studio.generate(Request(**run, mix=[MixItem(edges, 1.0)], control_scale=0.3))
    assert f"<adapter:{edges}:1>" in scaled.infotexts[0] and "Control scale: 0.3" in scaled.infotexts[0]
    full = studio.generate(Request(**run, mix=[MixItem(edges, 1.0)], control_scale=1.0))
    assert np.array_equal(_pixels(row.images[0]), _pixels(scaled.images[0]))
    assert np.abs(_pixels(row.images[0]) - _pixels(full.images[0])).max() > 0  # 0.3 is not 1


def test_plain_loras_are_a1111_lora_tags(studio, studio_files):
    keys = studio_files[2]
    listed = {e.key: e.sha256 for e in studio.entries()}
    r = studio.generate(Request(prompt="a cat", steps=2, mix=[MixItem(keys["style"], 0.8),
                                                              MixItem(keys["subject"], -0.5)]))
    text = r.infotexts[0]
    first = text.split("\n")[0]
    assert f"<lora:{keys['style']}:0.8>" in first and f"<adapter:{keys['subject']}:-0.5>" in first
    assert f"Lora hashes: \"{keys['style']}: {listed[keys['style']]}\"" in text
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "a cat"
    assert parsed["adapters"] == [
        {"key": keys["style"], "weight": 0.8, "hash": listed[keys["style"]], "method": "lora"},
        {"key": keys["subject"], "weight": -0.5, "hash": listed[keys["subject"]], "method": ""}]
    # an A1111 prompt: a tag with a second (text encoder) weight, a weight written ".5"
    a1111 = parse_infotext('a cat <lora:film:0.7:0.5> <lora:grain:.5>\nSteps: 20, Sampler: Euler a, Seed: 1, '
                           'Lora hashes: "film: 0123456789ab, grain: ba9876543210"')
    assert [(a["key"], a["weight"], a["hash"]) for a in a1111["adapters"]] == [
        ("film", 0.7, "0123456789ab"), ("grain", 0.5, "ba9876543210")]
    assert a1111["prompt"] == "a cat"


def test_send_to_generate_puts_every_setting_back(studio, studio_files):
    """Three adapters (a LoRA, an SPM, a CSC with its control image), the sampler and the method panels' settings."""
    keys = studio_files[2]
    sampler = [s for s in studio.main.samplers if s != next(iter(studio.main.samplers))][0]
    mix = [MixItem(keys["style"], 0.8), MixItem(keys["erase"], 0.4), MixItem(keys["edges"], 0.3)]
    r = studio.generate(Request(prompt="a cat", negative="blurry", steps=3, guidance=5.5, width=48, height=32,
                                sampler=sampler, seed=11, mix=mix, fused=True, transport=False, control=_control(),
                                extractor="sobel", control_scale=0.6))
    parsed = parse_infotext(r.infotexts[0])
    assert [(a["key"], a["weight"]) for a in parsed["adapters"]] == [(i.key, i.weight) for i in mix]
    values, notes = settings(parsed, studio.main, studio.stored_image)
    control = values.pop("control")
    assert values == {"prompt": "a cat", "negative": "blurry", "steps": 3, "guidance": 5.5, "width": 48,
                      "height": 32, "sampler": sampler, "seed": 11, "randomize": False, "fused": True,
                      "transport": False, "extractor": "sobel", "control_scale": 0.6, "mode": "txt2img"}
    assert notes == []
    assert np.array_equal(np.asarray(control.convert("RGB")), np.asarray(_control()))
    assert set(values) | {"control"} <= set(CONTROLS)
    # a reference this studio does not hold, a sampler this model lacks: named, the controls left as they are
    parsed["params"].update({"Control image": "0" * 12, "Sampler": "Nope"})
    values, notes = settings(parsed, studio.main, studio.stored_image)
    assert "control" not in values and "sampler" not in values and len(notes) == 2
    assert studio.stored_image("../../etc/passwd") is None


def test_recall_sets_the_dit_class(tmp_path):
    from difftune.testing import save_tiny_pipeline

    st = Studio(save_tiny_pipeline("dit", tmp_path / "dit"), tmp_path / "adapters", out=tmp_path / "out")
    sampler = list(st.main.samplers)[-1]
    r = st.generate(Request(steps=2, class_label=3, sampler=sampler))
    values, notes = settings(parse_infotext(r.infotexts[0]), st.main, st.stored_image)
    assert values["class_label"] == 3 and values["sampler"] == sampler and notes == []
    assert "prompt" not in values  # no prompt on a DiT: the hidden box keeps the text for the next SD model
    _, notes = settings(parse_infotext(r.infotexts[0].replace("Class: 3", "Class: 5000")), st.main, st.stored_image)
    assert notes and "5000" in notes[0]
