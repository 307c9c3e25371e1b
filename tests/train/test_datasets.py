"""Several image folders in one run (``data.datasets``, issue 25): per-folder repeats, caption suffix and masks;
buckets, DDP sharding and exact resume across the folders; every bad entry named by its key."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import difftune as dt
from difftune.config import load_config
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, main
from difftune.train.buckets import BucketBatchSampler
from difftune.train.build import build_dataset
from difftune.train.folders import ConcatFolders
from difftune.train.loss import StepInputs

REPO = Path(__file__).resolve().parents[2]
BUCKETS = ["data.buckets=true", "data.bucket_min_size=16", "data.bucket_max_size=64", "data.bucket_step=8"]
TEXT_FAMILY = SimpleNamespace(conditioning="text", pipe=SimpleNamespace(vae_scale_factor=4))


@pytest.fixture(scope="module")
def two(tmp_path_factory, write_photos):
    """Two caption folders: wide and square photos with .txt captions, tall ones with .cap captions."""
    root = tmp_path_factory.mktemp("datasets")
    a = write_photos(root / "a", [(64, 32), (70, 36), (40, 40)], ["a photo of a cat", "a red car"])
    b = write_photos(root / "b", [(32, 64), (36, 70)], ["sks dog, park, sunny"], seed=1, ext=".cap")
    masks = root / "b-masks"
    masks.mkdir()
    for i, (w, h) in enumerate([(32, 64), (36, 70)]):
        m = np.zeros((h, w), dtype=np.uint8)
        m[:, : w // 2] = 255  # the left half trains
        Image.fromarray(m).save(masks / f"{i}.png")
    return {"a": a, "b": b, "b_masks": masks, "sd": save_tiny_pipeline("sd", root / "sd")}


def _datasets(two, b_repeats: int = 3, masks: bool = False) -> str:
    b = f"{{path: {two['b']}, repeats: {b_repeats}, caption_extension: .cap"
    b += f", masks: {two['b_masks']}}}" if masks else "}"
    return f"data.datasets=[{{path: {two['a']}}}, {b}]"


def _cfg(two, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={two['sd']}", "data.path=''", f"output_dir={out}", "validation.prompts=[]", *sets])


def test_folders_train_as_one_with_their_own_repeats_and_caption_suffix(two, tmp_path):
    cfg = _cfg(two, tmp_path / "out", _datasets(two), "data.center_crop=false", "data.random_flip=true")
    ds = build_dataset(cfg, TEXT_FAMILY)
    assert isinstance(ds, ConcatFolders) and len(ds) == 3 + 2 * 3
    items = [ds[i] for i in range(len(ds))]
    assert [it["index"] for it in items] == list(range(9))  # indices of the whole: the latent cache's keys
    assert [it["caption"] for it in items[:3]] == ["a photo of a cat", "a red car", "a photo of a cat"]
    assert {it["caption"] for it in items[3:]} == {"sks dog, park, sunny"}  # read from the .cap files
    assert [it["pixel_values"].shape for it in items[3:5]] == [(3, 32, 32)] * 2
    # each item draws from its own index's stream: the second folder's first item is not augmented as the first's
    assert ds.parts[1].rng(0).random() != ds.parts[0].rng(0).random()
    assert ds.parts[1].rng(0).random() == np.random.default_rng([cfg.seed, 0, 3]).random()
    # the per-folder keys left unset take the data section's values
    entries = cfg.data.entries()
    assert [(e.repeats, e.caption_extension) for e in entries] == [(1, ".txt"), (3, ".cap")]


def test_buckets_masks_and_ddp_shards_span_the_folders(two, tmp_path):
    cfg = _cfg(two, tmp_path / "out", _datasets(two, masks=True), *BUCKETS)
    ds = build_dataset(cfg, TEXT_FAMILY)
    sizes = {ds.buckets[b] for b in ds.bucket_of}
    assert sizes == {(40, 24), (32, 32), (24, 40)}  # wide and square from a, tall from b, in one set of buckets
    for i in range(len(ds)):
        item = ds[i]
        assert item["mask"].shape == (1, *item["pixel_values"].shape[1:])
        if i < 3:  # a has no masks: the whole image trains
            assert bool(item["mask"].eq(1).all())
        else:  # b's masks: the left half
            w = item["mask"].shape[-1]
            assert bool(item["mask"][..., : w // 2 - 1].gt(0.9).all()) and bool(item["mask"][..., -2:].eq(0).all())
    ranks = [BucketBatchSampler(ds.bucket_of, 2, 2, r, cfg.seed) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    dealt = [b for s in ranks for b in s]
    assert {i for b in dealt for i in b} == set(range(len(ds)))  # both folders, shared between the processes
    assert all(len({ds.bucket_of[i] for i in b}) == 1 for b in dealt)


def test_training_on_two_folders_with_buckets_and_masks(two, tmp_path, capsys, monkeypatch):
    seen = []
    draw = StepInputs.draw
    monkeypatch.setattr(StepInputs, "draw", lambda self, prefix="": seen.append(
        (self.batch["index"].tolist(), tuple(self.batch["mask"].shape))) or draw(self, prefix))
    main(_cfg(two, tmp_path / "out", _datasets(two, masks=True), *BUCKETS, "train.max_steps=4"))
    out = capsys.readouterr().out
    assert re.search(r"\[difftune\] buckets: 9 image\(s\) in 3 of \d+ bucket\(s\) .*24x40: 6, 32x32: 1, 40x24: 2",
                     out), out
    assert len(seen) == 4 and any(i >= 3 for idx, _ in seen for i in idx)
    saved = load_config(TrainConfig, tmp_path / "out" / "config.yaml")  # the effective config round-trips
    assert [e.path for e in saved.data.datasets] == [str(two["a"]), str(two["b"])]


def test_resume_is_bit_exact_across_folders(two, stop_and_resume):
    sets = [_datasets(two), *BUCKETS, "train.max_steps=5", "checkpointing.checkpointing_steps=3",
            "data.center_crop=false", "data.random_flip=true", "data.shuffle_caption=true"]
    stop_and_resume(lambda out, *more: _cfg(two, out, *sets, *more), 3)


@pytest.mark.parametrize(("sets", "key"), [
    (["data.datasets=[{path: a, repeat: 2}]"], "data.datasets[0].repeat"),
    (["data.datasets=[{path: a}, {repeats: 2}]"], "data.datasets[1].path"),
    (["data.datasets=[{path: a}, {path: b, repeats: 0}]"], "data.datasets[1].repeats"),
    (["data.datasets=[{path: a, caption_extension: /x}]"], "data.datasets[0].caption_extension"),
    (["data.datasets=[a]"], "data.datasets[0]"),
    (["data.path=a", "data.datasets=[{path: b}]"], "data.path"),
    (["data.datasets=[{path: a, class_path: c}]"], "data.datasets[0].class_path"),
    (["data.kind=dreambooth", "data.instance_prompt=sks", "data.class_prompt=dog",
      "data.datasets=[{path: a, class_path: c}, {path: b}]"], "data.datasets[1].class_path"),
    (["data.kind=dreambooth", "data.datasets=[{path: a, instance_prompt: sks}, {path: b}]"],
     "data.datasets[1].instance_prompt"),
    (["data.kind=dreambooth", "data.instance_prompt=sks", "data.datasets=[{path: a, masks: m}]"],
     "data.datasets[0].masks"),
    (["data.kind=control", "data.condition=canny", "data.datasets=[{path: a}]"], "data.datasets"),
])
def test_a_bad_entry_is_named_by_its_key(two, tmp_path, sets, key):
    with pytest.raises(dt.DifftuneError, match=re.escape(f"`{key}`")):
        _cfg(two, tmp_path / "out", *sets)


def test_a_missing_folder_or_mask_is_named_by_its_entry(two, tmp_path):
    with pytest.raises(dt.DifftuneError, match=re.escape("`data.datasets[1].path`")):
        build_dataset(_cfg(two, tmp_path / "o", f"data.datasets=[{{path: {two['a']}}}, {{path: {tmp_path}/no}}]"),
                      TEXT_FAMILY)
    bad = (f"data.datasets=[{{path: {two['b']}, caption_extension: .cap}}, "
           f"{{path: {two['a']}, masks: {two['b_masks']}}}]")
    with pytest.raises(dt.DifftuneError, match=re.escape("`data.datasets[1].masks`: no mask")):
        build_dataset(_cfg(two, tmp_path / "o", bad), TEXT_FAMILY)


def test_class_folders_of_several_datasets_must_agree_on_labels(tmp_path, write_photos):
    for root, names in (("x", ["cat", "dog"]), ("y", ["dog"])):
        for name in names:
            write_photos(tmp_path / root / name, [(32, 32)])
    cfg = load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_dit.yaml", [
        "data.path=''", f"output_dir={tmp_path / 'out'}",
        f"data.datasets=[{{path: {tmp_path / 'x'}}}, {{path: {tmp_path / 'y'}}}]"])
    family = SimpleNamespace(conditioning="class", pipe=SimpleNamespace(vae_scale_factor=4))
    with pytest.raises(dt.DifftuneError, match=r"`data.datasets\[1\].path`.*label 0 is 'cat'"):
        build_dataset(cfg, family)


def test_dreambooth_folders_keep_their_own_prompts_and_class_images(two, tmp_path, write_photos):
    inst_a = write_photos(tmp_path / "inst-a", [(32, 32)] * 2)
    inst_b = write_photos(tmp_path / "inst-b", [(32, 32)] * 3, seed=1)
    cls_a = write_photos(tmp_path / "cls-a", [(32, 32)] * 3, seed=2)
    cls_b = write_photos(tmp_path / "cls-b", [(32, 32)], seed=3)
    cfg = _cfg(two, tmp_path / "out", "data.kind=dreambooth", "data.class_prompt=a photo of a dog",
               f"data.datasets=[{{path: {inst_a}, instance_prompt: a photo of sks dog, class_path: {cls_a}}}, "
               f"{{path: {inst_b}, instance_prompt: a photo of zwx cat, class_path: {cls_b}, "
               "class_prompt: a photo of a cat}]")
    ds = build_dataset(cfg, TEXT_FAMILY)
    assert len(ds) == 3 + 3  # each folder: max(instances, class images)
    items = [ds[i] for i in range(len(ds))]
    assert [it["index"] for it in items] == list(range(6))
    assert [it["caption"] for it in items] == ["a photo of sks dog"] * 3 + ["a photo of zwx cat"] * 3
    assert [it["class_caption"] for it in items] == ["a photo of a dog"] * 3 + ["a photo of a cat"] * 3
    assert all(it["class_pixel_values"].shape == (3, 32, 32) for it in items)
    assert ds.captions() == ["a photo of a cat", "a photo of a dog", "a photo of sks dog", "a photo of zwx cat"]
