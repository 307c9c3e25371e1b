"""kohya-style caption handling (issue 25): shuffle_caption, keep_tokens, caption_tag_dropout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import difftune as dt
from difftune.config import load_config
from difftune.train import TrainConfig, main
from difftune.train.captions import CaptionOptions, process_caption
from difftune.train.data import CaptionFolder
from difftune.train.loss import StepInputs

REPO = Path(__file__).resolve().parents[2]
TAGS = "sks woman, smiling, outdoors, red coat, city street, evening light, bokeh"


def test_a_shuffled_caption_keeps_its_first_keep_tokens_tags():
    options = CaptionOptions(shuffle=True, keep_tokens=2)
    tags = TAGS.split(", ")
    orders = set()
    for seed in range(20):
        out = process_caption(TAGS, options, np.random.default_rng(seed)).split(", ")
        assert out[:2] == tags[:2] and sorted(out) == sorted(tags)  # kept in place, nothing lost
        orders.add(tuple(out))
    assert len(orders) > 10  # the rest is really shuffled


def test_tag_dropout_drops_only_unkept_tags_at_its_rate():
    options = CaptionOptions(keep_tokens=1, tag_dropout=0.5)
    kept = [process_caption(TAGS, options, np.random.default_rng(seed)).split(", ") for seed in range(400)]
    assert all(k[0] == "sks woman" for k in kept)
    rate = 1 - np.mean([len(k) - 1 for k in kept]) / 6
    assert 0.45 < rate < 0.55, rate
    assert [t for t in kept[0] if t in TAGS.split(", ")] == kept[0]  # the order of the rest unchanged (no shuffle)
    assert process_caption("a,, b ,c", CaptionOptions(), np.random.default_rng(0)) == "a,, b ,c"  # off: as written


def _folder(root: Path) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (36, 40), (i * 40, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(TAGS)
    return root


def test_dataset_captions_are_a_pure_function_of_seed_epoch_index(tmp_path):
    root = _folder(tmp_path / "imgs")

    def captions(seed: int, epoch: int) -> list[str]:
        ds = CaptionFolder(root, 16, seed=seed)
        ds.caption_options = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout=0.2)
        ds.set_epoch(epoch)
        return [ds[i]["caption"] for i in range(len(ds))]

    assert captions(0, 3) == captions(0, 3)  # two runs, same seed and epoch
    assert captions(0, 3) != captions(0, 4) and captions(0, 3) != captions(1, 3)
    assert len(set(captions(0, 0))) > 1  # items differ within an epoch
    # pixels do not change when captions are processed: the caption stream is apart from the augmentation's
    ds = CaptionFolder(root, 16, center_crop=False, random_flip=True)
    plain = ds[2]["pixel_values"]
    ds.caption_options = CaptionOptions(shuffle=True, tag_dropout=0.5)
    assert (ds[2]["pixel_values"] == plain).all()


def test_difftune_train_feeds_shuffled_captions(tmp_path, monkeypatch):
    from difftune.testing import save_tiny_pipeline

    seen: list[str] = []
    draw = StepInputs.draw
    monkeypatch.setattr(StepInputs, "draw", lambda self, prefix="": seen.extend(self.batch["caption"])
                        or draw(self, prefix))
    cfg = load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={save_tiny_pipeline('sd', tmp_path / 'sd')}", f"data.path={_folder(tmp_path / 'imgs')}",
        f"output_dir={tmp_path / 'out'}", "validation.prompts=[]", "train.max_steps=4", "data.shuffle_caption=true",
        "data.keep_tokens=1", "data.caption_tag_dropout=0.1"])
    main(cfg)
    assert len(seen) == 8 and all(c.startswith("sks woman, ") for c in seen)
    assert len(set(seen)) > 4  # the same caption file, shuffled differently per item and epoch


@pytest.mark.parametrize(("sets", "key"), [
    (["data.keep_tokens=-1"], "data.keep_tokens"),
    (["data.caption_tag_dropout=1.0"], "data.caption_tag_dropout"),
    (["data.shuffle_caption=true", "data.cache_text_embeddings=true"], "data.shuffle_caption"),
    (["data.kind=classes", "data.shuffle_caption=true"], "data.shuffle_caption"),
])
def test_bad_caption_settings_name_the_key(tmp_path, sets, key):
    with pytest.raises(dt.DifftuneError, match=re.escape(f"`{key}`")):
        load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
            "model.path=sd-mini", f"data.path={tmp_path}", *sets])
