"""Optimizers without closed lists (issue 25): optimizer.class + kwargs, Prodigy, schedule-free AdamW; exact resume
with each, schedule-free's train/eval switch, and errors naming the key."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difftune as dt
from difftune.config import load_config, to_dict
from difftune.train import TrainConfig, main
from difftune.train.optimizers import eval_weights, optimizer_class

REPO = Path(__file__).resolve().parents[2]


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


needs_prodigy = pytest.mark.skipif(_missing("prodigyopt"), reason="prodigyopt not installed (difftune[optimizers])")
needs_schedulefree = pytest.mark.skipif(_missing("schedulefree"),
                                        reason="schedulefree not installed (difftune[optimizers])")


def _cfg(tiny, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={out}", "validation.prompts=[]",
        *sets])


def _resume_is_exact(tiny, stop_and_resume, sets: list[str]) -> dict[str, torch.Tensor]:
    """Train 4 steps straight and 2 + 2 resumed from the step-2 checkpoint; the results must be equal."""
    sets = [*sets, "train.max_steps=4", "checkpointing.checkpointing_steps=2"]
    return stop_and_resume(lambda out, *more: _cfg(tiny, out, *sets, *more), 2)


def _plain(tiny, tmp_path) -> dict[str, torch.Tensor]:
    return load_file(main(_cfg(tiny, tmp_path / "plain" / "out", "train.max_steps=4")) / "adapter_model.safetensors")


def test_any_torch_optimizer_by_class_trains_and_resumes_exactly(tiny, tmp_path, stop_and_resume):
    sets = ["optimizer.class=torch.optim.RAdam", "optimizer.kwargs={betas: [0.8, 0.99], decoupled_weight_decay: true}"]
    result = _resume_is_exact(tiny, stop_and_resume, sets)
    plain = _plain(tiny, tmp_path)
    assert any(not torch.equal(result[k], plain[k]) for k in plain)  # RAdam really was used, not AdamW
    saved = load_config(TrainConfig, tmp_path / "a" / "out" / "config.yaml")  # written back under the key `class`
    assert saved.optimizer.class_ == "torch.optim.RAdam" and "class" in to_dict(saved)["optimizer"]


@needs_prodigy
def test_prodigy_trains_and_resumes_exactly(tiny, tmp_path, stop_and_resume):
    result = _resume_is_exact(tiny, stop_and_resume, ["optimizer.name=prodigy", "optimizer.lr=1.0",
                                                        "optimizer.kwargs={d_coef: 2.0}"])
    assert any(not torch.equal(result[k], v) for k, v in _plain(tiny, tmp_path).items())


@needs_schedulefree
def test_schedulefree_trains_resumes_exactly_and_saves_its_eval_weights(tiny, stop_and_resume, monkeypatch):
    import schedulefree

    modes = []
    step = schedulefree.AdamWScheduleFree.step
    monkeypatch.setattr(schedulefree.AdamWScheduleFree, "step", lambda self, *a: modes.append(
        self.param_groups[0]["train_mode"]) or step(self, *a))
    evals = []
    eval_ = schedulefree.AdamWScheduleFree.eval
    monkeypatch.setattr(schedulefree.AdamWScheduleFree, "eval", lambda self: evals.append(
        self.param_groups[0]["train_mode"]) or eval_(self))
    sets = ["optimizer.name=schedulefree_adamw", "optimizer.lr=1e-2", "validation.every_steps=1",
            "validation.prompts=[a photo of a cat]", "validation.at_start=false"]
    _resume_is_exact(tiny, stop_and_resume, sets)
    assert modes and all(modes)  # every step ran in train mode, also right after each validation
    assert evals.count(True) >= 4  # validations and the final save switched to the evaluation weights


def test_eval_weights_swaps_schedulefree_weights_and_back():
    if _missing("schedulefree"):
        pytest.skip("schedulefree not installed (difftune[optimizers])")
    import schedulefree

    p = torch.nn.Parameter(torch.ones(3))
    opt = schedulefree.AdamWScheduleFree([p], lr=0.1)
    opt.train()
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    y = p.detach().clone()
    with eval_weights(opt, torch.nn.Module()):
        assert not torch.allclose(p, y)  # the averaged sequence x is in place
    assert torch.equal(p, y) and opt.param_groups[0]["train_mode"]  # the training weights exactly
    q = torch.nn.Parameter(torch.ones(2))
    with eval_weights(torch.optim.AdamW([q]), torch.nn.Module()):  # other optimizers: nothing happens
        q.data.add_(1)
    assert torch.equal(q, torch.full((2,), 2.0))


@pytest.mark.parametrize(("value", "match"), [
    ("torch.optim.NoSuchOptim", r"`optimizer.class`.*torch.optim.NoSuchOptim.*optimizers include"),
    ("no_such_package.Opt", r"`optimizer.class`.*importable"),
    ("torch.nn.Linear", r"`optimizer.class`.*torch.optim.Optimizer subclass"),
])
def test_unknown_optimizer_class_names_the_key(tiny, tmp_path, value, match):
    with pytest.raises(dt.DifftuneError, match=match):
        main(_cfg(tiny, tmp_path / "out", f"optimizer.class={value}"))


def test_bad_optimizer_settings_name_the_key(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`optimizer.kwargs`.*RAdam said"):
        main(_cfg(tiny, tmp_path / "out", "optimizer.class=torch.optim.RAdam", "optimizer.kwargs={nope: 1}"))
    for sets, key in ((["optimizer.class=RAdam"], "optimizer.class"),
                      (["optimizer.class=torch.optim.SGD", "optimizer.name=sgd"], "optimizer.name"),
                      (["optimizer.kwargs={lr: 1}"], "optimizer.kwargs"),
                      (["optimizer.name=prodigy"], "optimizer.lr")):
        with pytest.raises(dt.DifftuneError, match=re.escape(f"`{key}`")):
            _cfg(tiny, tmp_path / "out", *sets)
    assert optimizer_class("torch.optim.Adagrad") is torch.optim.Adagrad
