"""Base-model checks before an adapter loads (issue 28): a KIND adapter made for another DiT of the same shapes loaded
without a word and gave noise."""

from __future__ import annotations

import pytest

from apps.studio import Request, Studio
from apps.studio.compat import model_names
from apps.studio.library import MixItem
from difftune.errors import DifftuneError


def test_model_names():
    assert model_names("/models/sd15/") == {"sd15"}
    assert model_names("runwayml/stable-diffusion-v1-5") == {"runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5"}
    snapshot = "/root/.cache/huggingface/hub/models--runwayml--stable-diffusion-v1-5/snapshots/0123abcd"
    assert model_names(snapshot) == {"runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5"}
    assert model_names("") == set() and model_names(None) == set()


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
