"""Base-model checks before an adapter loads (issue 28): a KIND adapter made for another DiT of the same shapes loaded
without a word and gave noise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apps.studio import Request, Studio
from apps.studio.compat import flag, model_names
from apps.studio.library import MixItem
from difftune.errors import DifftuneError


def test_model_names():
    assert model_names("/models/sd15/") == {"sd15"}
    assert model_names("runwayml/stable-diffusion-v1-5") == {"runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5"}
    snapshot = "/root/.cache/huggingface/hub/models--runwayml--stable-diffusion-v1-5/snapshots/0123abcd"
    assert model_names(snapshot) == {"runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5"}
    assert model_names("") == set() and model_names(None) == set()



def test_rows_flag_adapters_made_for_another_model():
    kind = {"kind": "adapter", "method": "kind", "base_model": "/x/dit-a", "badges": "kind · base dit-a"}
    assert flag(kind, "dit-b", {"dit-b"})["badges"].endswith("⚠ made for dit-a, not dit-b: refused here")
    lora = {**kind, "method": "lora"}
    assert "may not do here what it did there" in flag(lora, "dit-b", {"dit-b"})["badges"]
    assert flag(kind, "dit-a", {"dit-a"}) == kind and flag({**kind, "base_model": ""}, "b", {"b"})["badges"] == kind[
        "badges"]  # its own model, or no base recorded: no warning


@pytest.fixture(scope="module")
def two_dits(tmp_path_factory):
    """Two tiny DiTs of one architecture (other weights) and, made on the first, a KIND adapter and a LoRA."""
    from difftune.methods import METHODS

    if "kind" not in METHODS:
        pytest.skip("KIND is not registered in this checkout")
    import difftune as dt
    from difftune.generation import load_pipeline
    from difftune.methods.kind import KINDConfig
    from difftune.testing import randomize_adapter, save_tiny_pipeline

    base = tmp_path_factory.mktemp("compat")
    a = save_tiny_pipeline("dit", base / "dit-a", seed=0)
    b = save_tiny_pipeline("dit", base / "dit-b", seed=1)
    pipe = load_pipeline(a)
    dt.inject(pipe, KINDConfig(learngenes=2, tailors_per_class=2, classes=[0, 1], init="random"), name="kind")
    randomize_adapter(pipe.transformer, "kind", std=0.5)
    dt.save_adapter(pipe, base / "adapters" / "kind", name="kind", base_model=str(a))
    dt.delete_adapter(pipe, "kind")
    dt.inject(pipe, dt.LoRAConfig(rank=2, alpha=2), name="lora")
    randomize_adapter(pipe.transformer, "lora", std=0.3)
    dt.save_adapter(pipe, base / "adapters" / "lora", name="lora", base_model=str(a))
    return a, b, base / "adapters"


def test_kind_for_another_base_is_refused_naming_both_models(two_dits, tmp_path):
    a, b, root = two_dits
    other = Studio(b, root, out=tmp_path / "out-b")
    with pytest.raises(DifftuneError) as e:
        other.generate(Request(steps=2, class_label=1, mix=[MixItem("kind", 1.0)]))
    msg = str(e.value)
    assert "'kind'" in msg and "'dit-a'" in msg and "'dit-b'" in msg and "noise" in msg
    assert "kind" not in other.main.loaded  # refused before loading: nothing half-loaded stays
    # a LoRA for another base of the same shapes runs, and the image says it was made elsewhere
    r = other.generate(Request(steps=2, class_label=1, mix=[MixItem("lora", 0.5)]))
    assert any("lora: made for the model 'dit-a', not 'dit-b'" in n for n in r.notes)
    # on the model they were made for: both load, no note
    own = Studio(a, root, out=tmp_path / "out-a")
    r = own.generate(Request(steps=2, class_label=1, mix=[MixItem("kind", 1.0), MixItem("lora", 0.5)]))
    assert r.notes == [] and set(own.main.loaded) == {"kind", "lora"}


@pytest.fixture(scope="module")
def bk_student(studio_files, tmp_path_factory):
    """A BK-Small student of the tiny SD (no mid block), saved as its own pipeline folder (no plan recorded)."""
    from difftune.compress.block_removal import build_student
    from difftune.generation import load_pipeline

    pipe = load_pipeline(studio_files[0])
    pipe.unet = build_student(pipe.unet, "small")
    out = tmp_path_factory.mktemp("bk") / "bk-small"
    pipe.save_pretrained(str(out))
    return out


def test_ab_against_a_bk_student_names_what_it_cannot_hold(studio_files, bk_student, tmp_path):
    """Issue 28: A/B against a BK student failed for adapters on removed blocks without saying which. Now B runs
    what the student holds (the plan found from the two configs), and the notes name the rest."""
    from apps.studio.partner import find_plan

    model, root, keys, _ = studio_files
    st = Studio(model, root, compare=bk_student, out=tmp_path / "out")
    assert st.compare_slot.plan == "small" and find_plan(st.main.denoiser.config, st.main.denoiser.config) is None
    control = Image.new("RGB", (32, 32))
    mix = [MixItem(keys["style"], 0.8), MixItem(keys["edges"], 0.5)]
    a, b = st.compare(Request(prompt="a cat", steps=2, seed=4, mix=mix, control=control), "model")
    assert f"<lora:{keys['style']}:0.8>" in a.infotexts[0] and f"<adapter:{keys['edges']}:0.5>" in a.infotexts[0]
    # B: the LoRA without its mid-block layers, the CSC adapter (hint encoder tied to the teacher's blocks) left out
    assert f"<lora:{keys['style']}:0.8>" in b.infotexts[0] and keys["edges"] not in b.infotexts[0]
    lora_note = next(n for n in b.notes if n.startswith(f"{keys['style']}:"))
    assert "lie on blocks bk-small removed" in lora_note and "mid_block" in lora_note
    assert any(n.startswith(f"{keys['edges']}: bk-small cannot hold it") for n in b.notes)
    # the LoRA's kept layers do run on B: B with it differs from B without it
    plain = st.generate(Request(prompt="a cat", steps=2, seed=4), slot=st.compare_slot)
    with Image.open(b.images[0]) as x, Image.open(plain.images[0]) as y:
        assert np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() > 0
