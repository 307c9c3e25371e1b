"""flow-mini's architecture (`difftune.zoo.architectures.flow_mini`): an SD3 pipeline without T5 on sd-mini's VAE,
CLIP and tokenizer, which difftune saves, loads, trains from and generates with (the model itself is not trained yet:
docs/reference-models.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune import zoo
from difftune.errors import DifftuneError
from difftune.zoo.architectures import build

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flow_mini_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow-mini") / "pipeline"
    build("flow-mini", vae_from="sd-mini").save_pretrained(str(folder))
    return folder


def test_flow_mini_reuses_sd_mini_and_fits_every_caption():
    from difftune.zoo.mnist import PHRASINGS, SUBJECT_PROMPT

    pipe = build("flow-mini", vae_from=zoo.path("sd-mini"))
    sd = zoo.load("sd-mini", device="cpu")
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None and pipe.vae.config.shift_factor == 0.0
    assert pipe.tokenizer.get_vocab() == sd.tokenizer.get_vocab() and pipe.tokenizer.model_max_length == 8
    for key, value in sd.text_encoder.state_dict().items():  # sd-mini's CLIP is flow-mini's first encoder
        assert torch.equal(pipe.text_encoder.text_model.state_dict()[key], value), key
    for key, value in sd.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[key], value), key
    captions = [p.format(w=w) for p in PHRASINGS for w in ("zero", "seven", "eight")] + [SUBJECT_PROMPT]
    assert max(len(pipe.tokenizer(c).input_ids) for c in captions) == 8  # BOS + words + EOS: none truncated
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 3_483_920  # sd-mini's UNet: 4.67M


def test_flow_mini_needs_sd_mini():
    with pytest.raises(DifftuneError, match="model.vae_from"):
        build("flow-mini")


def test_saved_flow_mini_loads_trains_from_and_generates(flow_mini_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from difftune.cli import main
    from difftune.config import load_config
    from difftune.train import TrainConfig
    from difftune.train.build import load_training_pipeline

    # diffusers writes text_encoder_3/tokenizer_3 as [null, null] but refuses the folder unless they are passed
    with pytest.raises(ValueError, match="expected"):
        DiffusionPipeline.from_pretrained(str(flow_mini_dir))
    cfg = load_config(TrainConfig, ROOT / "configs/quickstart/flow-mini-lora.yaml", [f"model.path={flow_mini_dir}"])
    pipe, component, _ = load_training_pipeline(cfg)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and component == "transformer"
    out = tmp_path / "three.png"
    assert main(["generate", "--model", str(flow_mini_dir), "--prompt", "a handwritten digit three", "--steps", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_flow_mini_records_the_t5_length_every_sampler_uses(flow_mini_dir):
    """Without T5 the SD3 pipeline appends ``max_sequence_length`` zero tokens (default 256); flow-mini is trained
    with 8, which its folder records and `generate` / `eval` pass (images equal a call with 8, differ from 256)."""
    import json

    from difftune.eval import generate_digits
    from difftune.generation import call_defaults, generate, load_pipeline

    assert json.loads((flow_mini_dir / "model_index.json").read_text())["_difftune_call"] == {"max_sequence_length": 8}
    pipe = load_pipeline(flow_mini_dir, device="cpu")
    assert call_defaults(pipe) == {"max_sequence_length": 8}

    def direct(length: int) -> np.ndarray:
        g = torch.Generator("cpu").manual_seed(3)
        out = pipe(prompt="a handwritten digit two", num_inference_steps=2, generator=g, max_sequence_length=length)
        return np.asarray(out.images[0], dtype=np.float32)

    ours = np.asarray(generate(pipe, prompt="a handwritten digit two", seed=3, steps=2)[0], dtype=np.float32)
    assert np.abs(ours - direct(8)).max() <= 1.0  # the same call (uint8 rounding)
    assert np.abs(ours - direct(256)).max() > 1.0  # the length matters, so the test can fail
    images, _ = generate_digits(pipe, [2], 1, prompt="a handwritten digit two", seed=0, steps=2)
    g = torch.Generator("cpu").manual_seed(2000)
    want = pipe(prompt=["a handwritten digit two"], num_inference_steps=2, guidance_scale=4.0, generator=g,
                max_sequence_length=8).images[0]
    assert np.abs(np.asarray(images[0], np.float32) - np.asarray(want, np.float32)).max() <= 1.0


def test_training_uses_and_records_the_t5_length(flow_mini_dir):
    from types import SimpleNamespace

    from difftune.families import family_for
    from difftune.generation import call_defaults, load_pipeline

    pipe = load_pipeline(flow_mini_dir, device="cpu")
    family = family_for(pipe, pipe.transformer)
    family.configure(SimpleNamespace(max_sequence_length=None, guidance_scale=3.5))
    assert family.max_sequence_length == 8  # the recorded length, not the SD3 default 77
    family.configure(SimpleNamespace(max_sequence_length=5, guidance_scale=3.5))
    assert family.max_sequence_length == 5 and call_defaults(pipe) == {"max_sequence_length": 5}
    assert family.encode(["a handwritten digit two"], torch.device("cpu"))["encoder_hidden_states"].shape[1] == 8 + 5


@pytest.mark.parametrize("value", ["eight", 0, True, [8]])
def test_a_bad_recorded_call_setting_is_named(flow_mini_dir, tmp_path, value):
    import json
    import shutil

    from difftune.generation import load_pipeline

    folder = tmp_path / "edited"
    shutil.copytree(flow_mini_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_difftune_call"] = {"max_sequence_length": value}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DifftuneError, match=r"_difftune_call\.max_sequence_length.*model_index\.json"):
        load_pipeline(folder, device="cpu")
    index["_difftune_call"] = {"max_tokens": 8}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DifftuneError, match="max_tokens"):
        load_pipeline(folder, device="cpu")
