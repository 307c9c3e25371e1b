"""DreamBooth class images generated with the base model when the class folder holds fewer than
``data.num_class_images`` (issue 25), as diffusers' train_dreambooth_lora does."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import difftune as dt
from difftune.config import load_config
from difftune.generation import generate, load_pipeline
from difftune.train import TrainConfig, classimages, main

REPO = Path(__file__).resolve().parents[2]


def _cfg(tiny, out: Path, class_path: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", "data.kind=dreambooth", f"data.path={tiny['instance']}",
        "data.instance_prompt=a photo of sks dog", f"data.class_path={class_path}",
        "data.class_prompt=a photo of a dog", f"output_dir={out}", "validation.prompts=[]", "train.max_steps=1",
        *sets])


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_missing_class_images_are_sampled_by_the_base_model_before_training(tiny, tmp_path, capsys):
    cls = tmp_path / "class"  # does not exist yet: created, as the diffusers script does
    main(_cfg(tiny, tmp_path / "a", cls, "data.num_class_images=3"))
    assert re.search(r"generating 3 class image\(s\) into .*data.num_class_images=3, 0 there", capsys.readouterr().out)
    assert _pngs(cls) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    pipe = load_pipeline(tiny["sd"], device="cpu")  # the base model, sampled as the validation settings say
    for i in range(3):
        want = generate(pipe, prompt="a photo of a dog", seed=i, steps=2, guidance=4.0, height=32, width=32)[0]
        assert np.array_equal(np.asarray(Image.open(cls / f"class-{i:05d}.png")), np.asarray(want))
    assert not list(cls.glob(".difftune-tmp-*"))  # written atomically, no leftovers

    # enough there: nothing generated; one more asked: only that one, the others untouched
    before = {p: p.stat().st_mtime_ns for p in cls.glob("*.png")}
    main(_cfg(tiny, tmp_path / "b", cls, "data.num_class_images=3"))
    assert "generating" not in capsys.readouterr().out
    main(_cfg(tiny, tmp_path / "c", cls, "data.num_class_images=4"))
    assert "generating 1 class image(s)" in capsys.readouterr().out
    assert _pngs(cls)[-1] == "class-00003.png" and all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_a_users_own_file_name_is_never_overwritten(tiny, tmp_path):
    cls = tmp_path / "class"
    cls.mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(cls / "class-00001.png")  # one image there, named as ours would be
    cfg = _cfg(tiny, tmp_path / "a", cls, "data.num_class_images=3")
    pipe = load_pipeline(tiny["sd"], device="cpu")
    (entry, have), = classimages.missing_class_images(cfg)
    written = classimages.write_class_images(cfg, pipe, entry, have)
    assert [p.name for p in written] == ["class-00001-1.png", "class-00002.png"]
    assert np.asarray(Image.open(cls / "class-00001.png"))[0, 0].tolist() == [255, 0, 0]


def test_under_ddp_only_the_main_process_generates_and_the_others_wait(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(classimages, "write_class_images", lambda cfg, pipe, entry, have: calls.append(have))
    cfg = _cfg(tiny, tmp_path / "a", tmp_path / "class", "data.num_class_images=2")
    waited = []
    for main_process in (False, True):
        acc = SimpleNamespace(is_main_process=main_process, device="cpu",
                              wait_for_everyone=lambda p=main_process: waited.append(p))
        classimages.ensure_class_images(cfg, acc)
    assert waited == [False, True]  # every process waits for the main one
    assert calls == [0]  # the main process only generates


@pytest.mark.parametrize(("sets", "key"), [
    (["data.num_class_images=3", "data.class_prompt=null"], "data.class_prompt"),
    (["data.num_class_images=-1"], "data.num_class_images"),
    (["data.num_class_images=3", "data.class_path=null"], "data.class_path"),
])
def test_bad_class_image_settings_name_the_key(tiny, tmp_path, sets, key):
    with pytest.raises(dt.DifftuneError, match=re.escape(f"`{key}`")):
        _cfg(tiny, tmp_path / "a", tmp_path / "class", *sets)
