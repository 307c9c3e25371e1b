"""Validation loss on a held-out folder at fixed timesteps (issue 25): deterministic, logged, resume-neutral."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import difftune as dt
import difftune.train.trainer as trainer
from difftune.config import load_config
from difftune.train import TrainConfig, main

REPO = Path(__file__).resolve().parents[2]


def _cfg(tiny, out: Path, kind: str = "sd", *sets: str) -> TrainConfig:
    data = tiny["classes"] if kind == "dit" else tiny["captions"]
    return load_config(TrainConfig, REPO / "configs" / "debug" / f"tiny_{kind}.yaml", [
        f"model.path={tiny[kind]}", f"data.path={data}", f"output_dir={out}", "validation.prompts=[]",
        "validation.class_labels=[]", f"validation.loss.path={data}", "validation.every_steps=2", *sets])


@pytest.fixture
def losses(monkeypatch):
    seen: list[tuple[int, float]] = []
    report = trainer.report_validation_loss
    monkeypatch.setattr(trainer, "report_validation_loss", lambda cfg, acc, frozen, den, step: seen.append(
        (step, report(cfg, acc, frozen, den, step))) or seen[-1][1])
    return seen


def test_validation_loss_is_identical_across_runs_with_the_same_seed(tiny, tmp_path, losses, capsys):
    main(_cfg(tiny, tmp_path / "a", "sd", "train.max_steps=4", "method.dropout=0.5"))
    first = list(losses)
    assert [s for s, _ in first] == [0, 2, 4] and all(math.isfinite(v) for _, v in first)
    assert len({v for _, v in first}) == 3  # it follows the weights as they train
    assert "[difftune] validation loss (step 2): " in capsys.readouterr().out
    losses.clear()
    torch.manual_seed(77)  # another global RNG state before the run: the loss draws nothing from it
    main(_cfg(tiny, tmp_path / "b", "sd", "train.max_steps=4", "method.dropout=0.5"))
    assert losses == first
    losses.clear()
    main(_cfg(tiny, tmp_path / "c", "sd", "train.max_steps=4", "method.dropout=0.5", "seed=1"))
    assert [v for _, v in losses] != [v for _, v in first]  # another seed: other noise, other numbers


def test_validation_loss_leaves_exact_resume_alone(tiny, losses, stop_and_resume):
    sets = ["train.max_steps=4", "checkpointing.checkpointing_steps=2", "validation.every_steps=1"]
    stop_and_resume(lambda out, *more: _cfg(tiny, out, "sd", *sets, *more), 2)
    full, resumed = losses[:5], losses[5:]
    assert [s for s, _ in full] == [0, 1, 2, 3, 4] and resumed == full[3:]  # the resumed run measures the same


def test_validation_loss_on_class_conditional_dit(tiny, tmp_path, losses):
    main(_cfg(tiny, tmp_path / "out", "dit", "train.max_steps=1"))
    assert len(losses) == 2 and all(math.isfinite(v) for _, v in losses)


def test_bad_validation_loss_settings_name_the_key(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=re.escape("`validation.loss.timesteps`")):
        _cfg(tiny, tmp_path / "out", "sd", "validation.loss.timesteps=[]")
    with pytest.raises(dt.DifftuneError, match=re.escape("`validation.loss.timesteps`")):
        main(_cfg(tiny, tmp_path / "out", "sd", "validation.loss.timesteps=[5000]", "train.max_steps=1"))
    with pytest.raises(dt.DifftuneError, match=re.escape("`validation.loss.path`")):
        main(_cfg(tiny, tmp_path / "out2", "sd", f"validation.loss.path={tmp_path / 'nowhere'}", "train.max_steps=1"))
