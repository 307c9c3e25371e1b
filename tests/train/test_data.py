from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.errors import DifftuneError
from difftune.train.data import (
    CaptionFolder,
    ClassFolder,
    DreamBoothDataset,
    ImageDataset,
    collate,
    preprocess,
)

RES = 16


def _png(path, size=(40, 30), mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a.png", seed=1)
    _png(root / "b.png", mode="L", seed=2)
    _png(root / "sub" / "c.png", size=(30, 40), mode="RGBA", seed=3)
    for stem in ("a", "b", "sub/c"):
        (root / f"{stem}.txt").write_text(f"caption {stem}\n")
    return root


def test_preprocess_shape_range_and_center_crop_is_deterministic():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    a = preprocess(img, RES, True, False, np.random.default_rng(1))
    b = preprocess(img, RES, True, False, np.random.default_rng(2))
    assert a.shape == (3, RES, RES) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert preprocess(Image.new("L", (8, 8), 255), 8, True, False, np.random.default_rng(0)).eq(1).all()


def test_caption_folder_items_and_modes(folder):
    ds = CaptionFolder(folder, RES)
    assert len(ds) == 3
    for i in range(len(ds)):
        item = ds[i]
        assert item["pixel_values"].shape == (3, RES, RES)
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
        assert item["index"] == i
    assert [ds[i]["caption"] for i in range(3)] == ["caption a", "caption b", "caption sub/c"]
    assert len(CaptionFolder(folder, RES, repeats=3)) == 9


def test_random_crop_flip_is_a_function_of_seed_epoch_index(folder):
    ds1 = CaptionFolder(folder, RES, center_crop=False, random_flip=True, seed=7)
    ds2 = CaptionFolder(folder, RES, center_crop=False, random_flip=True, seed=7)
    for i in range(3):
        assert torch.equal(ds1[i]["pixel_values"], ds2[i]["pixel_values"])
    epochs = []
    for epoch in range(4):
        ds1.set_epoch(epoch)
        epochs.append(ds1[0]["pixel_values"])
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    ds2.set_epoch(3)
    ds2[1]  # reading other items first must not change item 0
    assert torch.equal(ds2[0]["pixel_values"], epochs[3])
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(ds2[0]["pixel_values"], epochs[3])


def test_caption_sources(folder):
    rows = [{"file_name": "a.png", "text": "meta a"}, {"file_name": "sub/c.png", "caption": "meta c"}]
    (folder / "metadata.jsonl").write_text("\n\n".join(json.dumps(r) for r in rows))
    ds = CaptionFolder(folder, RES)
    assert [ds[i]["caption"] for i in range(3)] == ["meta a", "caption b", "meta c"]

    (folder / "b.txt").unlink()
    with pytest.raises(DifftuneError, match=r"b\.png.*default_caption"):
        CaptionFolder(folder, RES)
    assert CaptionFolder(folder, RES, default_caption="fallback")[1]["caption"] == "fallback"

    (folder / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(DifftuneError, match="line 1"):
        CaptionFolder(folder, RES, default_caption="x")


def test_class_folder_labels(tmp_path):
    ints = tmp_path / "ints"
    _png(ints / "0" / "x.png")
    _png(ints / "3" / "y.png")
    _png(ints / "3" / "z.png")
    ds = ClassFolder(ints, RES)
    assert ds.class_names == {0: "0", 3: "3"}
    assert [ds[i]["class_label"] for i in range(len(ds))] == [0, 3, 3]

    named = tmp_path / "named"
    _png(named / "dog" / "x.png")
    _png(named / "cat" / "y.png")
    ds = ClassFolder(named, RES)
    assert ds.class_names == {0: "cat", 1: "dog"}
    assert [ds[i]["class_label"] for i in range(len(ds))] == [0, 1]
    assert ds[0]["pixel_values"].shape == (3, RES, RES)


def test_dreambooth_lengths_and_keys(tmp_path):
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    for i in range(2):
        _png(inst / f"{i}.png", seed=i)
    for i in range(5):
        _png(cls / f"{i}.png", seed=10 + i)

    ds = DreamBoothDataset(inst, "a sks dog", RES, repeats=2)
    assert len(ds) == 4 and set(ds[0]) == {"pixel_values", "caption", "index", "original_size", "crop_top_left",
                                           "flipped"}
    assert ds[3]["caption"] == "a sks dog"

    ds = DreamBoothDataset(inst, "a sks dog", RES, class_root=cls, class_prompt="a dog")
    assert len(ds) == 5
    item = ds[4]
    assert set(item) == {"pixel_values", "caption", "index", "class_pixel_values", "class_caption", "original_size",
                         "crop_top_left", "class_original_size", "class_crop_top_left", "flipped", "class_flipped"}
    assert item["class_caption"] == "a dog" and item["class_pixel_values"].shape == (3, RES, RES)
    assert len(DreamBoothDataset(inst, "p", RES, class_root=cls, class_prompt="c", repeats=3)) == 6

    with pytest.raises(DifftuneError, match="class_prompt"):
        DreamBoothDataset(inst, "a sks dog", RES, class_root=cls)
    with pytest.raises(DifftuneError, match="data.class_path"):
        DreamBoothDataset(inst, "a sks dog", RES, class_root=tmp_path / "nope", class_prompt="a dog")


def test_corrupt_images_are_skipped_with_one_warning(folder):
    (folder / "bad1.png").write_bytes(b"not an image at all")
    (folder / "bad2.jpg").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.md").write_text("ignored: not an image extension")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated: only a decode finds it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CaptionFolder(folder, RES, default_caption="x")
    assert len(ds) == 3
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "skipped 3 unreadable" in msg and "bad1.png" in msg and "bad2.jpg" in msg
    for i in range(len(ds)):
        ds[i]


def test_missing_empty_and_bad_arguments(tmp_path):
    with pytest.raises(DifftuneError, match=r"`data\.path`.*nope"):
        CaptionFolder(tmp_path / "nope", RES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DifftuneError, match=r"no usable images.*data\.path"):
        CaptionFolder(tmp_path / "empty", RES)
    with pytest.raises(DifftuneError, match=r"no usable images.*train\.dir"):
        ClassFolder(tmp_path / "empty", RES, field="train.dir")
    (tmp_path / "empty" / "broken.png").write_bytes(b"xx")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(DifftuneError, match="no usable images"):
        CaptionFolder(tmp_path / "empty", RES, default_caption="x")
    _png(tmp_path / "ok" / "a.png")
    for bad in (0, 12, -8, 16.0, True):
        with pytest.raises(DifftuneError, match="resolution"):
            CaptionFolder(tmp_path / "ok", bad, default_caption="x")
    with pytest.raises(DifftuneError, match="repeats"):
        CaptionFolder(tmp_path / "ok", RES, default_caption="x", repeats=0)


def test_collate(tmp_path, folder):
    batch = collate([CaptionFolder(folder, RES)[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, RES, RES) and batch["pixel_values"].dtype == torch.float32
    assert batch["caption"] == ["caption a", "caption b", "caption sub/c"]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2]

    _png(tmp_path / "cls" / "0" / "a.png")
    _png(tmp_path / "cls" / "5" / "b.png")
    batch = collate([ClassFolder(tmp_path / "cls", RES)[i] for i in range(2)])
    assert batch["class_label"].dtype == torch.long and batch["class_label"].tolist() == [0, 5]

    db = DreamBoothDataset(folder, "p", RES, class_root=tmp_path / "cls", class_prompt="c")
    batch = collate([db[0], db[1]])
    assert batch["class_pixel_values"].shape == (2, 3, RES, RES) and batch["class_caption"] == ["c", "c"]

    single = ImageDataset([{"path": folder / "a.png"}], RES)
    loader = torch.utils.data.DataLoader(single, batch_size=1, collate_fn=collate)
    assert next(iter(loader))["pixel_values"].shape == (1, 3, RES, RES)
