"""Aspect-ratio buckets (issue 25): bucket geometry, one bucket per batch, SDXL's time_ids, exact resume, errors."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import difftune as dt
from difftune.config import load_config
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, main
from difftune.train.buckets import BucketBatchSampler, make_buckets
from difftune.train.data import CaptionFolder
from difftune.train.loss import StepInputs

REPO = Path(__file__).resolve().parents[2]
# (width, height) of the photos: wide, tall and square-ish, as a user's folder has them
SIZES = [(64, 32), (70, 36), (64, 30), (32, 64), (36, 70), (30, 64), (40, 40), (36, 40)]
BUCKETS = ["data.buckets=true", "data.bucket_min_size=16", "data.bucket_max_size=64", "data.bucket_step=8"]


def _photos(folder: Path, sizes=SIZES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a photo of a cat", "a red car"][i % 2])
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    return {"photos": _photos(root / "photos"), "sd": save_tiny_pipeline("sd", root / "sd"),
            "sdxl": save_tiny_pipeline("sdxl", root / "sdxl")}


def _cfg(photos, out: Path, kind: str = "sd", *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={photos[kind]}", f"data.path={photos['photos']}", f"output_dir={out}", "validation.prompts=[]",
        *BUCKETS, *sets])


def test_buckets_cover_the_target_area_with_step_multiples():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 and max(w, h) <= 1024
        assert w * h <= 512 * 512 and (w * (h + 64) > 512 * 512 or h + 64 > 1024)  # the tallest within the area


def test_a_batch_never_mixes_buckets_and_each_process_gets_its_share():
    bucket_of = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    one = BucketBatchSampler(bucket_of, 2, 1, 0, seed=7)
    ranks = [BucketBatchSampler(bucket_of, 2, 2, r, seed=7) for r in range(2)]
    for epoch in range(3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        batches = list(one)
        assert len(batches) == one.per_epoch == 2 + 1 + 2 + 1
        assert all(len(b) == 2 and len({bucket_of[i] for i in b}) == 1 for b in batches)
        assert {i for b in batches for i in b} == set(range(len(bucket_of)))  # every image, every epoch
        dealt = [list(s) for s in ranks]
        assert len(dealt[0]) == len(dealt[1]) == 3
        assert sorted(dealt[0] + dealt[1]) == sorted(batches)  # the processes split the same batches
    # a pure function of (seed, epoch): a new sampler, or a skipped start, gives the same batches
    again = BucketBatchSampler(bucket_of, 2, 1, 0, seed=7)
    again.set_epoch(2, start=2)
    assert list(again) == batches[2:]
    one.set_epoch(1)
    assert list(one) != batches


def test_items_take_their_bucket_without_stretching(photos):
    ds = CaptionFolder(photos["photos"], 32)
    buckets = make_buckets(32, 16, 64, 8)
    ds.use_buckets(buckets, 0.25, ds.root)
    for i, (w, h) in enumerate(SIZES):
        item = ds[i]
        bw, bh = buckets[ds.bucket_of[i]]
        assert item["pixel_values"].shape == (3, bh, bw)
        nearest = min(abs(math.log(b[0] / b[1] * h / w)) for b in buckets)
        assert abs(math.log(bw / bh * h / w)) == nearest  # the bucket of the nearest aspect ratio
        assert item["original_size"].tolist() == [h, w]
        scale = max(bw / w, bh / h)  # resized to cover the bucket with the aspect ratio kept, then center-cropped
        cover = (max(bw, round(w * scale)), max(bh, round(h * scale)))
        assert abs(cover[0] / cover[1] - w / h) < 0.05
        assert item["crop_top_left"].tolist() == [(cover[1] - bh) // 2, (cover[0] - bw) // 2]


def test_training_with_buckets_prints_statistics_and_batches_one_bucket(photos, tmp_path, capsys, monkeypatch):
    shapes = []
    draw = StepInputs.draw
    monkeypatch.setattr(StepInputs, "draw", lambda self, prefix="": shapes.append(
        tuple(self.batch["pixel_values"].shape)) or draw(self, prefix))
    main(_cfg(photos, tmp_path / "out", "sd", "train.max_steps=4"))
    out = capsys.readouterr().out
    assert re.search(r"\[difftune\] buckets: 8 image\(s\) in 3 of \d+ bucket\(s\) .*40x24: 3.*; 5 batch", out), out
    assert len(shapes) == 4 and len(set(shapes)) > 1  # several buckets trained, each batch of one size
    assert all(s[0] == 2 and s[2:] in {(24, 40), (40, 24), (32, 32)} for s in shapes), shapes


def test_sdxl_time_ids_carry_each_images_true_size_and_crop(photos, tmp_path, monkeypatch):
    seen = []
    draw = StepInputs.draw

    def spy(self, prefix=""):
        noised = draw(self, prefix)
        seen.append((self.batch["index"].tolist(), noised.kwargs["added_cond_kwargs"]["time_ids"].clone()))
        return noised

    monkeypatch.setattr(StepInputs, "draw", spy)
    main(_cfg(photos, tmp_path / "out", "sdxl", "train.max_steps=5"))
    buckets = make_buckets(32, 16, 64, 8)
    checked = set()
    for indices, time_ids in seen:
        for index, ids in zip(indices, time_ids.tolist()):
            w, h = SIZES[index]
            ratio = math.log(w / h)
            bw, bh = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))
            scale = max(bw / w, bh / h)
            cw, ch = max(bw, round(w * scale)), max(bh, round(h * scale))
            assert ids == [h, w, (ch - bh) // 2, (cw - bw) // 2, bh, bw], (index, ids)
            checked.add(index)
    assert len(checked) >= 6 and any(ids[2] or ids[3] for _, t in seen for ids in t.tolist())  # real crops


def test_resume_is_bit_exact_with_buckets(photos, stop_and_resume):
    # 5 batches per epoch; checkpoint at step 3 (mid-epoch), random crops and flips
    sets = ["train.max_steps=7", "checkpointing.checkpointing_steps=3", "data.center_crop=false",
            "data.random_flip=true"]
    stop_and_resume(lambda out, *more: _cfg(photos, out, "sd", *sets, *more), 3)


def test_resume_is_bit_exact_with_buckets_and_cached_latents(photos, stop_and_resume):
    sets = ["train.max_steps=4", "checkpointing.checkpointing_steps=2", "data.cache_latents=true"]
    stop_and_resume(lambda out, *more: _cfg(photos, out, "sd", *sets, *more), 2)


def test_an_image_that_fits_no_bucket_is_refused(photos, tmp_path):
    folder = _photos(tmp_path / "panorama", [(40, 40), (200, 20)])
    with pytest.raises(dt.DifftuneError, match=r"`data.buckets`.*1\.png is 200x20.*crop.*bucket_max_crop"):
        main(_cfg(photos, tmp_path / "out", "sd", f"data.path={folder}"))


@pytest.mark.parametrize(("sets", "key"), [
    (["data.resolution=128"], "data.resolution"),
    (["data.bucket_step=12"], "data.bucket_step"),
    (["data.bucket_min_size=80"], "data.bucket_min_size"),
    (["data.kind=dreambooth", "data.instance_prompt=sks"], "data.buckets"),
])
def test_bad_bucket_settings_name_the_key(photos, tmp_path, sets, key):
    with pytest.raises(dt.DifftuneError, match=re.escape(f"`{key}`")):
        _cfg(photos, tmp_path / "out", "sd", *sets)


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is None,
                    reason="prodigyopt not installed (difftune[optimizers])")
def test_the_photos_recipe_trains_through_difftune_train(photos, tmp_path, capsys):
    """configs/lora/sd15-photos.yaml as shipped (buckets, caption tags, Prodigy, validation loss) on the tiny SD."""
    from difftune.cli import main as cli_main

    sets = [f"model.path={photos['sd']}", f"data.path={photos['photos']}", f"validation.loss.path={photos['photos']}",
            f"output_dir={tmp_path / 'out'}", "data.resolution=32", "data.bucket_min_size=16",
            "data.bucket_max_size=64", "data.bucket_step=8", "train.max_steps=2", "train.mixed_precision=no",
            "validation.num_inference_steps=2", "validation.seeds=[0]", "logging.report_to=none", "data.repeats=1"]
    assert cli_main(["train", str(REPO / "configs" / "lora" / "sd15-photos.yaml"),
                     *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "[difftune] buckets: 8 image(s) in 3 of" in out and "validation loss (step 2)" in out
    saved = load_config(TrainConfig, tmp_path / "out" / "config.yaml")
    assert saved.optimizer.name == "prodigy" and saved.data.shuffle_caption and saved.data.buckets
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
