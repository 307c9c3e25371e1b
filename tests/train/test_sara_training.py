"""SaRA through the trainer: progressive adjustment at T_p, auto learning rate, exact resume after PPA."""

from __future__ import annotations

import subprocess

import torch
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.counting import inspect_adapter
from difftune.methods.sara import auto_lr
from difftune.train import TrainConfig, main


def test_trainer_runs_progressive_adjustment_and_resumes_exactly_after_it(tiny, tmp_path, capsys):
    def cfg(root, *extra):
        return load_config(TrainConfig, "configs/debug/tiny_sd.yaml", [
            f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={root / 'out'}",
            "method={name: sara, threshold: 0.02, progressive_fraction: 0.5, rank_min_dim: 16}",
            "train.max_steps=6", "checkpointing.checkpointing_steps=2", "validation.prompts=[]",
            "train.max_grad_norm=1.0", *extra])

    full = main(cfg(tmp_path / "a"))
    # no lr in the config: the paper's formula is used
    assert f"learning rate {auto_lr(0.02):.3e} (sara's default)" in capsys.readouterr().out
    assert load_config(TrainConfig, tmp_path / "a" / "out" / "config.yaml").optimizer.lr is None
    resumed_dir = tmp_path / "b" / "out" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "out" / "checkpoints" / "checkpoint-4"), str(resumed_dir)],
                   check=True)
    trainable = load_file(resumed_dir / "checkpoint-4" / "trainable.safetensors")
    assert any(k.split(".")[-1].startswith("train_") and not v.all() for k, v in trainable.items())  # PPA at 3
    torch.manual_seed(99)
    resumed = main(cfg(tmp_path / "b", "checkpointing.resume_from_checkpoint=latest"))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = inspect_adapter(full)
    assert info["method"] == "sara" and 0 < info["density"] < 1
