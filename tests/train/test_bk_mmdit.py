"""BK-style block removal with distillation on the tiny SD3 and Flux pipelines, through the trainer's BK plugin:
the flow-matching task term, output KD on velocities and feature KD on the blocks' image streams; the loss falls on
a fixed batch, resume is bit-exact, and the result is a stock diffusers pipeline with fewer blocks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmdit_runs import setup_run, tiny_mmdit_cfg

from difftune.compress.block_removal import feature_pairs
from difftune.train import TrainConfig, main
from difftune.train.trainer import step_loss

# tiny SD3: 2 joint blocks, drop the last (the student's last block is built from block 0, context_pre_only);
# tiny Flux: 1 joint + 2 single blocks, drop single block 0
PLANS = {"sd3": "{blocks: [0]}", "flux": "{single_blocks: [1]}"}


def _cfg(paths, root: Path, kind: str, *sets: str) -> TrainConfig:
    return tiny_mmdit_cfg(paths, root, kind, f"method={{name: bk, plan: {PLANS[kind]}}}", "optimizer.lr=1e-3", *sets)


@pytest.mark.parametrize("kind", list(PLANS))
def test_distillation_terms_and_falling_loss(mmdit, tmp_path, kind):
    with setup_run(_cfg(mmdit, tmp_path, kind, "data.label_dropout=0")) as run:
        plugin, student, teacher = run.plugin, run.denoiser, run.plugin.teacher
        assert len(student.transformer_blocks) + len(getattr(student, "single_transformer_blocks", [])) == \
            len(teacher.transformer_blocks) + len(getattr(teacher, "single_transformer_blocks", [])) - 1
        batch = next(iter(run.loader))
        # the feature term by hand: each pair's image stream (the second output of an MMDiT block)
        pairs = feature_pairs(teacher.config, PLANS[kind])
        feats, hooks = {}, []
        for who, net, names in (("t", teacher, [t for t, _ in pairs]), ("s", student, [s for _, s in pairs])):
            for name in names:
                hooks.append(net.get_submodule(name).register_forward_hook(
                    lambda m, i, o, key=(who, name): feats.__setitem__(key, o[1].detach())))
        losses = []
        for step in range(6):
            torch.manual_seed(0)  # the same x0, ε and σ every step: only the student changes
            loss = step_loss(run, batch)
            if step == 0:
                for h in hooks:
                    h.remove()
                terms = plugin.last_terms
                assert all(v > 0 for v in terms.values()), terms  # the student lost a block: it differs
                assert loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)
                by_hand = sum(F.mse_loss(feats[("s", s)], feats[("t", t)]).item() for t, s in pairs)
                assert terms["feat_kd"] == pytest.approx(by_hand, rel=1e-5)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
            losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # measured (SD3): 4.15 → 3.97
    assert losses[-1] < 0.97 * losses[0], losses


def test_resume_is_bit_exact_and_the_student_is_a_stock_flux_pipeline(mmdit, tmp_path, capsys):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    sets = ["train.max_steps=4", "checkpointing.checkpointing_steps=2"]
    full = main(_cfg(mmdit, tmp_path / "a", "flux", *sets))
    (tmp_path / "b" / "out" / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "out" / "checkpoints" / "checkpoint-2"),
                    str(tmp_path / "b" / "out" / "checkpoints")], check=True)
    torch.manual_seed(99)
    main(_cfg(mmdit, tmp_path / "b", "flux", *sets, "checkpointing.resume_from_checkpoint=latest"))
    digests = re.findall(r"final trainable-weights digest (\w+)", capsys.readouterr().out)
    assert len(digests) == 2 and digests[0] == digests[1]
    student = FluxTransformer2DModel.from_pretrained(full / "transformer")
    teacher = FluxTransformer2DModel.from_pretrained(Path(mmdit["flux"]) / "transformer")
    assert (student.config.num_layers, student.config.num_single_layers) == (1, 1)
    # it trained: the kept single block moved away from teacher single block 1, which it was copied from
    assert not torch.equal(student.single_transformer_blocks[0].proj_out.weight,
                           teacher.single_transformer_blocks[1].proj_out.weight)
    pipe = FluxPipeline.from_pretrained(full)
    image = pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np",
                 max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()
