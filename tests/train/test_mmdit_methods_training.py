"""KronA, SaRA and full fine-tuning on the tiny SD3 and Flux pipelines through the trainer (flow matching): the loss
falls on a fixed batch, what the trainer saves gives the trained transformer's output when loaded into a fresh
pipeline (`dt.load_adapter`, or the saved pipeline for full), and resume is bit-exact."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from mmdit_runs import setup_run, tiny_mmdit_cfg

import difftune as dt
from difftune.architectures import mmdit_default_targets
from difftune.train import TrainConfig, main
from difftune.train.trainer import step_loss

KINDS = ("sd3", "flux")
#: method fields and learning rate on the tiny pipelines (KronA 4 × 4 factors divide the 32/128-wide layers; SaRA's
#: threshold selects about a tenth of the entries)
METHODS = {"krona": ({"a1": 4, "a2": 4}, 1e-1), "sara": ({"threshold": 0.02}, 1e-2), "full": ({}, 1e-3)}


def _cfg(paths, root: Path, kind: str, method: str, *sets: str) -> TrainConfig:
    fields, lr = METHODS[method]
    cfg = tiny_mmdit_cfg(paths, root, kind, f"optimizer.lr={lr}", *sets)
    cfg.method = {"name": method, **fields}
    if method == "krona":  # the MMDiT defaults, as configs/krona/flux.yaml lists them
        from diffusers import DiffusionPipeline

        model = DiffusionPipeline.from_pretrained(paths[kind]).transformer
        cfg.method["target_modules"] = mmdit_default_targets(model)
    return cfg


def _probe(model: torch.nn.Module, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "flux":
        inputs = {"hidden_states": torch.randn(1, 16, 64, generator=g), "img_ids": torch.zeros(16, 3),
                  "txt_ids": torch.zeros(4, 3), "guidance": torch.tensor([3.5]), "timestep": torch.tensor([0.5]),
                  "encoder_hidden_states": torch.randn(1, 4, 32, generator=g),
                  "pooled_projections": torch.randn(1, 32, generator=g)}
    else:
        inputs = {"hidden_states": torch.randn(1, 16, 4, 4, generator=g), "timestep": torch.tensor([500.0]),
                  "encoder_hidden_states": torch.randn(1, 4, 64, generator=g),
                  "pooled_projections": torch.randn(1, 64, generator=g)}
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_loss_falls_and_the_saved_result_gives_the_trained_output(mmdit, tmp_path, kind, method):
    from diffusers import DiffusionPipeline

    with setup_run(_cfg(mmdit, tmp_path, kind, method, "data.label_dropout=0")) as run:
        batch = next(iter(run.loader))
        losses = []
        for _ in range(6):
            torch.manual_seed(0)  # the same x0, ε and σ every step: only the trained weights change
            loss = step_loss(run, batch)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
            losses.append(loss.item())
        trained = _probe(run.denoiser, kind)
        saved = run.plugin.save_trained(run.pipe, run.denoiser, tmp_path / "result", str(mmdit[kind]), run.component)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.97 * losses[0], losses
    fresh = DiffusionPipeline.from_pretrained(mmdit[kind])
    before = _probe(fresh.transformer, kind)
    if method == "full":
        loaded = DiffusionPipeline.from_pretrained(saved)  # a whole pipeline in diffusers format
    else:
        assert dt.serialization.read_header(saved)["component"] == "transformer"
        dt.load_adapter(fresh, saved)
        loaded = fresh
    assert (trained - before).abs().max() > 1e-4  # it trained: the comparison below can fail
    torch.testing.assert_close(_probe(loaded.transformer, kind), trained, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind, method", [("sd3", "krona"), ("flux", "sara"), ("flux", "full")])
def test_resume_is_bit_exact(mmdit, tmp_path, capsys, kind, method):
    sets = ["train.max_steps=4", "checkpointing.checkpointing_steps=2"]
    main(_cfg(mmdit, tmp_path / "a", kind, method, *sets))
    (tmp_path / "b" / "out" / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "out" / "checkpoints" / "checkpoint-2"),
                    str(tmp_path / "b" / "out" / "checkpoints")], check=True)
    torch.manual_seed(1234)
    main(_cfg(mmdit, tmp_path / "b", kind, method, *sets, "checkpointing.resume_from_checkpoint=latest"))
    digests = re.findall(r"final trainable-weights digest (\w+)", capsys.readouterr().out)
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_without_target_modules_trains_the_mmdit_defaults(mmdit, tmp_path, kind):
    """LoRA's own default (the attention projections) would leave the context stream, the feed-forwards and Flux's
    single-block MLPs untouched; the trainer applies `mmdit_default_targets` as `difftune inspect` does."""
    from difftune.methods.verbs import hosts

    cfg = _cfg(mmdit, tmp_path, kind, "full")
    cfg.method = {"name": "lora", "rank": 2}
    with setup_run(cfg) as run:
        adapted = {n for n, h in hosts(run.denoiser) if h.adapters}
        assert list(run.plugin.config.target_modules) == mmdit_default_targets(run.denoiser)
    assert any(n.endswith("ff_context.net.2") for n in adapted), sorted(adapted)[:8]
    if kind == "flux":
        assert any(re.search(r"single_transformer_blocks\.\d+\.proj_mlp$", n) for n in adapted)
