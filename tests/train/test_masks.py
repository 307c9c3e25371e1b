"""Masked loss (issue 25): a mask per image weights the loss in latent space; masked regions give zero gradient."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difftune as dt
from difftune.config import load_config
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, main
from difftune.train.data import CaptionFolder
from difftune.train.loss import StepInputs

REPO = Path(__file__).resolve().parents[2]


def _data(root: Path, mask_size=(32, 32), sizes=((32, 32),) * 4) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a photo of a cat")
        mask = np.zeros((mask_size[1], mask_size[0]), np.uint8)
        mask[:, mask_size[0] // 2:] = 255  # the right half trains, the left half is ignored
        Image.fromarray(mask, "L").save(masks / f"{i}.png")
    return images, masks


def _cfg(tmp_path: Path, images: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={save_tiny_pipeline('sd', tmp_path / 'sd')}", f"data.path={images}",
        f"output_dir={tmp_path / 'out'}", "validation.prompts=[]", *sets])


def test_masked_regions_give_zero_gradient(tmp_path, monkeypatch):
    images, masks = _data(tmp_path)
    preds = []
    predict = StepInputs.predict

    def spy(self, *args, **kwargs):
        pred = predict(self, *args, **kwargs)
        pred.retain_grad()
        preds.append(pred)
        return pred

    monkeypatch.setattr(StepInputs, "predict", spy)
    main(_cfg(tmp_path, images, f"data.masks={masks}", "train.max_steps=2", "data.label_dropout=0",
              "train.snr_gamma=5.0"))
    assert len(preds) == 2
    for pred in preds:
        width = pred.shape[-1]
        assert pred.grad is not None
        assert torch.count_nonzero(pred.grad[..., : width // 2]) == 0  # masked: no gradient at all
        assert torch.count_nonzero(pred.grad[..., width // 2:]) == pred.grad[..., width // 2:].numel()


def test_without_masks_every_latent_gets_gradient(tmp_path, monkeypatch):
    images, _ = _data(tmp_path)
    preds = []
    predict = StepInputs.predict
    monkeypatch.setattr(StepInputs, "predict", lambda self, *a, **k: (p := predict(self, *a, **k)).retain_grad()
                        or preds.append(p) or p)
    main(_cfg(tmp_path, images, "train.max_steps=1"))
    assert torch.count_nonzero(preds[0].grad) == preds[0].grad.numel()


def test_the_mask_follows_the_images_resize_crop_and_flip(tmp_path):
    images, masks = _data(tmp_path, (40, 36), ((40, 36),) * 4)
    for i in range(4):  # each mask: its image's red channel, so a mask augmented as its image equals that channel
        red = np.asarray(Image.open(images / f"{i}.png"))[..., 0]
        Image.fromarray(red, "L").save(masks / f"{i}.png")
    ds = CaptionFolder(images, 16, center_crop=False, random_flip=True)
    ds.use_masks(masks, images)
    offsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[1]
        assert item["mask"].shape == (1, 16, 16)
        assert torch.allclose(item["mask"][0], (item["pixel_values"][0] + 1) / 2, atol=1e-6)
        offsets.add(tuple(item["crop_top_left"].tolist()))
    assert len(offsets) > 1  # the crops really moved


def test_a_mask_of_another_size_is_refused(tmp_path):
    images, masks = _data(tmp_path, mask_size=(16, 16))
    with pytest.raises(dt.DifftuneError, match=r"`data.masks`.*0\.png is 16x16, its image 0\.png 32x32"):
        main(_cfg(tmp_path, images, f"data.masks={masks}"))


def test_a_missing_mask_or_folder_is_refused(tmp_path):
    images, masks = _data(tmp_path)
    (masks / "2.png").unlink()
    with pytest.raises(dt.DifftuneError, match=re.escape("`data.masks`: no mask") + r".*'2'"):
        main(_cfg(tmp_path, images, f"data.masks={masks}"))
    with pytest.raises(dt.DifftuneError, match=re.escape("`data.masks`")):
        main(_cfg(tmp_path, images, f"data.masks={tmp_path / 'nowhere'}"))
