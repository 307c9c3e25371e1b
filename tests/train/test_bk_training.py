"""BK-SDM distillation through the trainer: the student trains against the frozen teacher with task + output KD +
feature KD, resumes bit-exactly, survives DDP wrapping, and is saved as a stock diffusers pipeline."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import difftune as dt
from difftune.compress.block_removal import feature_pairs
from difftune.config import load_config
from difftune.methods.bk import BKPlugin, FeatureTap
from difftune.testing import tiny_unet
from difftune.train import TrainConfig, main

REPO = Path(__file__).resolve().parents[2]


def _cfg(tiny, root: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={root / 'out'}",
        "method={name: bk, plan: small}", "optimizer.lr=1e-3", *sets])


def test_distilled_student_is_a_stock_diffusers_pipeline(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    result = main(_cfg(tiny, tmp_path, "train.max_steps=3", "train.mixed_precision=bf16",
                       "validation.num_inference_steps=1"))
    unet = UNet2DConditionModel.from_pretrained(result / "unet")
    assert unet.config.mid_block_type is None and list(unet.config.layers_per_block) == [0, 1]
    teacher = UNet2DConditionModel.from_pretrained(Path(tiny["sd"]) / "unet")
    assert sum(p.numel() for p in unet.parameters()) < 0.8 * sum(p.numel() for p in teacher.parameters())
    # it trained: the kept blocks moved away from the teacher's weights they were copied from
    assert not torch.equal(unet.conv_out.weight, teacher.conv_out.weight)
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
    pipe = StableDiffusionPipeline.from_pretrained(result)
    image = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()


def test_resume_is_bit_exact_with_ema(tiny, tmp_path, capsys):
    sets = ["train.max_steps=4", "checkpointing.checkpointing_steps=2", "train.ema=true", "train.ema_decay=0.9",
            "validation.prompts=[]"]
    main(_cfg(tiny, tmp_path / "a", *sets))
    (tmp_path / "b" / "out" / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "out" / "checkpoints" / "checkpoint-2"),
                    str(tmp_path / "b" / "out" / "checkpoints")], check=True)
    torch.manual_seed(99)
    main(_cfg(tiny, tmp_path / "b", *sets, "checkpointing.resume_from_checkpoint=latest"))
    digests = re.findall(r"final trainable-weights digest (\w+)", capsys.readouterr().out)
    assert len(digests) == 2 and digests[0] == digests[1]
    other = main(_cfg(tiny, tmp_path / "c", *sets[:1], "train.max_steps=3", *sets[2:]))
    assert other.exists()
    assert re.findall(r"final trainable-weights digest (\w+)", capsys.readouterr().out)[0] != digests[0]


class _Step:
    """The parts of StepInputs the objective reads, with a fixed x_t."""

    def __init__(self, model: nn.Module, denoiser: nn.Module, teacher: nn.Module) -> None:
        self.model, self.denoiser, self.teacher = model, denoiser, teacher
        g = torch.Generator().manual_seed(0)
        self.x0, self.noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
        self.kwargs = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}

    def draw(self):
        from difftune.methods.plugin import Noised

        noisy = 0.6 * self.x0 + 0.8 * self.noise
        return Noised(self.x0, self.noise, torch.tensor([300, 700]), noisy, self.noise, self.kwargs)

    def predict(self, model, noisy, t, kwargs):
        return model(noisy, t, **kwargs).sample.float()

    def loss(self, pred, d):
        return torch.nn.functional.mse_loss(pred, d.target)


def _plugin(**fields) -> tuple[BKPlugin, nn.Module, nn.Module]:
    teacher = tiny_unet().eval().requires_grad_(False)
    plugin = BKPlugin(dt.BKConfig(plan="small", **fields), "default")
    student = plugin.prepare(None, teacher)
    plugin.teacher = teacher
    return plugin, teacher, student


def test_objective_is_task_plus_output_kd_plus_feature_kd():
    plugin, teacher, student = _plugin()
    with torch.no_grad():  # perturb the student so that every term is non-zero
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    step = _Step(student, student, teacher)
    total = plugin.objective(step)
    terms = plugin.last_terms
    assert all(v > 0 for v in terms.values()) and len(plugin.tap.pairs) == 4
    assert total.item() == pytest.approx(terms["task"] + terms["out_kd"] + terms["feat_kd"], rel=1e-5)
    # the feature term by hand: the outputs of the paper's blocks (down/up stage outputs), recomputed here
    feats = {}
    names = {name for pair in feature_pairs(teacher.config, "small") for name in pair}

    def keep(key):
        return lambda mod, i, o: feats.__setitem__(key, o[0] if isinstance(o, tuple) else o)

    hooks = [m.register_forward_hook(keep((who, name))) for who, net in (("t", teacher), ("s", student))
             for name, m in net.named_modules() if name in names]
    d = step.draw()
    student(d.noisy, d.timesteps, **d.kwargs)
    teacher(d.noisy, d.timesteps, **d.kwargs)
    for h in hooks:
        h.remove()
    by_hand = sum(torch.nn.functional.mse_loss(feats[("s", s)], feats[("t", t)]).item()
                  for t, s in feature_pairs(teacher.config, "small"))
    assert terms["feat_kd"] == pytest.approx(by_hand, rel=1e-5)
    # the weights are the config's
    weighted, _, _ = _plugin(lambda_out=0.0, lambda_feat=2.0, lambda_task=0.5)
    weighted.tap, weighted.teacher = plugin.tap, teacher
    assert weighted.objective(step).item() == pytest.approx(0.5 * terms["task"] + 2 * terms["feat_kd"], rel=1e-5)
    # nothing is recorded outside the objective (validation, checkpoint recomputation)
    student(d.noisy, d.timesteps, **d.kwargs)
    assert plugin.tap.outputs == {}


def test_feature_hooks_survive_ddp_wrapping(tmp_path):
    """BK-SDM issue #10: the official code found its hook modules by name in the wrapped model (`module.` prefix);
    here the hooks sit on the module objects, so the DDP-wrapped student gives the same loss and gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    plugin, teacher, student = _plugin()
    step = _Step(student, student, teacher)
    plain = plugin.objective(step)
    plain.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = DDP(student)
        assert all(not n.startswith("down_blocks") for n, _ in wrapped.named_modules() if n)  # names are prefixed
        loss = plugin.objective(_Step(wrapped, student, teacher))
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6) and plugin.last_terms["feat_kd"] > 0
    assert all(torch.allclose(p.grad, g, atol=1e-7) for p, g in zip(student.parameters(), grads))


def test_feature_tap_records_only_while_recording():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    tap = FeatureTap([(a, b)])
    a(torch.ones(1, 2))
    assert tap.outputs == {}
    tap.recording = True
    a(torch.ones(1, 2)), b(torch.ones(1, 2))
    assert set(tap.outputs) == {id(a), id(b)}
    tap.remove()


def test_config_errors():
    with pytest.raises(dt.DifftuneError, match="plan"):
        dt.BKConfig(plan="smal")
    with pytest.raises(dt.DifftuneError, match="lambda_out"):
        dt.BKConfig(lambda_out=-1.0)
    with pytest.raises(dt.DifftuneError, match="lambda_feat"):
        dt.BKConfig(lambda_feat="1")



def test_adapter_trained_on_the_teacher_transfers_where_the_layers_exist(tmp_path):
    from diffusers import UNet2DConditionModel

    from difftune.compress.block_removal import build_student
    from difftune.methods.bk import transfer_adapter
    from difftune.testing import randomize_adapter

    torch.manual_seed(0)  # SD1.x's layout (2 pairs per stage, 4 stages) at toy width
    teacher = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4).eval()
    student = build_student(teacher, "base")
    dt.inject(teacher, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v", "conv1"]), name="style")
    randomize_adapter(teacher, "style")
    dt.save_adapter(teacher, tmp_path / "style")
    with pytest.raises(dt.DifftuneError):  # by name alone it cannot load: the student's blocks were renumbered
        dt.load_adapter(student, tmp_path / "style")
    report = transfer_adapter(tmp_path / "style", student, teacher.config, "base")
    t, s = dict(teacher.named_parameters()), dict(student.named_parameters())
    q = "transformer_blocks.0.attn1.to_q.adapters.style.lora_B"
    assert torch.equal(s[f"up_blocks.1.attentions.1.{q}"], t[f"up_blocks.1.attentions.2.{q}"])
    assert torch.equal(s[f"down_blocks.2.attentions.0.{q}"], t[f"down_blocks.2.attentions.0.{q}"])
    assert torch.equal(s["up_blocks.0.resnets.1.conv1.adapters.style.lora_A"],
                       t["up_blocks.0.resnets.2.conv1.adapters.style.lora_A"])
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q" in report["modules_dropped"]
    assert "down_blocks.0.resnets.1.conv1" in report["modules_dropped"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" in report["modules_kept"]
    hosts = [n for n, _ in dt.methods.verbs.hosts(student)]
    assert len(report["modules_kept"]) == len(hosts)
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        out = student(x, 5, encoder_hidden_states=ctx).sample
        dt.set_adapter_weights(student, {"style": 0.0})
        plain = student(x, 5, encoder_hidden_states=ctx).sample
        dt.delete_adapter(student, "style")
        assert torch.equal(plain, student(x, 5, encoder_hidden_states=ctx).sample)  # weight 0 = no adapter
    assert (out - plain).abs().max() > 1e-4  # the transferred adapter acts
