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
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 1_000_000


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
