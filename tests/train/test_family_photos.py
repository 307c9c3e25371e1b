"""Photos of any shape in several folders through ``difftune train`` on every family's tiny pipeline (SD, SDXL,
PixArt, DiT; issue 25), and the shipped SDXL photos recipe."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from difftune.cli import main as cli_main
from difftune.config import load_config
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig
from difftune.train.loss import StepInputs

REPO = Path(__file__).resolve().parents[2]
BUCKETS = ["data.buckets=true", "data.bucket_min_size=16", "data.bucket_max_size=64", "data.bucket_step=8"]
WIDE, TALL, SQUARE = (64, 32), (32, 64), (40, 40)


CAPTIONS = ["sks woman, smiling, park", "woman, red coat, street"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_photos):
    root = tmp_path_factory.mktemp("families")
    paths = {"train": write_photos(root / "train", [WIDE, TALL, WIDE], CAPTIONS, 0),
             "regularization": write_photos(root / "regularization", [SQUARE, TALL], CAPTIONS, 1),
             "heldout": write_photos(root / "heldout", [WIDE, SQUARE], CAPTIONS, 2)}
    for label, sizes in (("0", [WIDE, TALL]), ("3", [SQUARE, WIDE])):
        write_photos(root / "classes-a" / label, sizes, seed=3 + int(label))
        write_photos(root / "classes-b" / label, sizes[::-1], seed=7 + int(label))
    paths["classes-a"], paths["classes-b"] = root / "classes-a", root / "classes-b"
    return paths


def _train(config: Path, sets: list[str]) -> None:
    assert cli_main(["train", str(config), *[a for s in sets for a in ("--set", s)]]) == 0


@pytest.mark.parametrize("kind", ["sd", "sdxl", "pixart", "dit"])
def test_every_family_trains_on_photos_of_any_shape_in_several_folders(kind, data, tmp_path, capsys, monkeypatch):
    shapes = []
    draw = StepInputs.draw
    monkeypatch.setattr(StepInputs, "draw", lambda self, prefix="": shapes.append(
        tuple(self.batch["pixel_values"].shape[2:])) or draw(self, prefix))
    model = save_tiny_pipeline(kind, tmp_path / kind)
    if kind == "dit":
        config = REPO / "configs" / "debug" / "tiny_dit.yaml"
        folders = f"data.datasets=[{{path: {data['classes-a']}}}, {{path: {data['classes-b']}, repeats: 2}}]"
        n = 4 + 2 * 4
    else:
        config = REPO / "configs" / "debug" / "tiny_sd.yaml"
        folders = f"data.datasets=[{{path: {data['train']}, repeats: 2}}, {{path: {data['regularization']}}}]"
        n = 2 * 3 + 2
    sets = [f"model.path={model}", "data.path=''", folders, f"output_dir={tmp_path / 'out'}", "train.max_steps=4",
            "validation.num_inference_steps=1", "data.random_flip=true", "data.cache_latents=true"]
    if kind == "dit":  # diffusers' DiT un-patchifies square latents only: buckets are refused, naming the key
        assert cli_main(["train", str(config), *[a for s in [*sets, *BUCKETS] for a in ("--set", s)]]) == 2
        assert "`data.buckets` must be false for a DiT transformer" in capsys.readouterr().err
        _train(config, sets)
        assert len(shapes) == 4 and set(shapes) == {(32, 32)}
        assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
        return
    _train(config, [*sets, *BUCKETS])
    out = capsys.readouterr().out
    assert re.search(rf"\[difftune\] buckets: {n} image\(s\) in 3 of", out), out
    assert len(shapes) == 4 and set(shapes) <= {(24, 40), (40, 24), (32, 32)} and len(set(shapes)) > 1, shapes
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is None,
                    reason="prodigyopt not installed (difftune[optimizers])")
def test_the_sdxl_photos_recipe_trains_through_difftune_train(data, tmp_path, capsys, monkeypatch):
    """configs/lora/sdxl-photos.yaml as shipped (two folders, buckets, disk-cached latents with flips, caption tags,
    Prodigy, validation loss) on the tiny SDXL, at the tiny model's sizes; SDXL's time_ids carry each photo's size."""
    time_ids = []
    draw = StepInputs.draw

    def spy(self, prefix=""):
        noised = draw(self, prefix)
        time_ids.append(noised.kwargs["added_cond_kwargs"]["time_ids"].clone())
        return noised

    monkeypatch.setattr(StepInputs, "draw", spy)
    sets = [f"model.path={save_tiny_pipeline('sdxl', tmp_path / 'sdxl')}",
            f"data.datasets=[{{path: {data['train']}, repeats: 2}}, {{path: {data['regularization']}}}]",
            f"validation.loss.path={data['heldout']}", f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}", "data.resolution=32", "data.bucket_min_size=16",
            "data.bucket_max_size=64", "data.bucket_step=8", "train.max_steps=2", "train.mixed_precision=no",
            "train.gradient_checkpointing=false", "validation.num_inference_steps=2", "validation.seeds=[0]",
            "logging.report_to=none"]
    _train(REPO / "configs" / "lora" / "sdxl-photos.yaml", sets)
    out = capsys.readouterr().out
    assert "[difftune] buckets: 8 image(s) in 3 of" in out and "validation loss (step 2)" in out
    saved = load_config(TrainConfig, tmp_path / "out" / "config.yaml")
    assert saved.optimizer.name == "prodigy" and saved.data.cache_latents == "disk" and len(saved.data.datasets) == 2
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2 * 5  # 5 photos, both orientations
    sizes = {tuple(t[:2].tolist()) for batch in time_ids for t in batch}  # (original height, width)
    assert sizes <= {(32, 64), (64, 32), (40, 40)} and len(sizes) > 1
    assert torch.is_tensor(time_ids[0]) and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
