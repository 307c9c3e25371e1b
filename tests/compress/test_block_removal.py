"""Block removal (BK-SDM): the paper's parameter and MAC counts on the real SD configs (meta device), the weight
remap, stock diffusers students, transformer block removal and user plans."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from torch import nn

from difftune.architectures import build_architecture
from difftune.compress.block_removal import RemovalPlan, build_student, feature_pairs, load_plan, student_config
from difftune.compress.macs import count_macs, count_parameters, unet_macs
from difftune.errors import DifftuneError
from difftune.testing import tiny_dit, tiny_unet


def test_sd1_parameters_and_macs_match_the_paper():
    teacher = build_architecture("sd15")
    assert count_parameters(teacher) == 859_520_964
    assert round(unet_macs(teacher) / 1e9, 1) == 338.7
    expect = {"base": (579_384_964, 223.8), "small": (482_346_884, 217.7), "tiny": (323_384_964, 205.0)}
    for plan, (params, macs) in expect.items():
        student = build_student(teacher, plan)
        assert type(student) is UNet2DConditionModel
        assert count_parameters(student) == params, plan
        assert round(unet_macs(student) / 1e9, 1) == macs, plan


def test_sd2_counts():
    teacher = build_architecture("sd21")
    assert round(unet_macs(teacher) / 1e9, 1) == 339.2  # BK-SDM's table for SD-2.1(-base)
    assert [count_parameters(build_student(teacher, p)) for p in ("base", "small", "tiny")] == [
        583_480_964, 485_787_524, 326_825_604]


def test_student_configs_are_the_papers():
    cfg = build_architecture("sd15").config
    base, small, tiny = (student_config(cfg, p) for p in ("base", "small", "tiny"))
    assert base["layers_per_block"] == 1 and base["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert small["mid_block_type"] is None
    assert tiny["block_out_channels"] == [320, 640, 1280]
    assert tiny["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert tiny["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert feature_pairs(cfg, "tiny")[2] == ("down_blocks.2.attentions.1.proj_out",
                                             "down_blocks.2.attentions.0.proj_out")
    assert feature_pairs(cfg, "tiny")[3:] == [("up_blocks.1", "up_blocks.0"), ("up_blocks.2", "up_blocks.1"),
                                              ("up_blocks.3", "up_blocks.2")]
    assert feature_pairs(cfg, "small") == [(f"{s}.{i}", f"{s}.{i}") for s in ("down_blocks", "up_blocks")
                                           for i in range(4)]


def _sd_like(seed: int = 0) -> UNet2DConditionModel:
    """SD1.x's layout (4 stages, 2 pairs per stage, last stage without attention) at toy width, random weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4).eval()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_remap_copies_the_papers_blocks(tmp_path):
    teacher = _sd_like()
    base = build_student(teacher, "base")
    # down stages keep their first pair; up stages keep pairs 0 and 2 (pair 1 is removed)
    assert _same(base.down_blocks[1].resnets[0], teacher.down_blocks[1].resnets[0])
    assert _same(base.down_blocks[1].downsamplers, teacher.down_blocks[1].downsamplers)
    for j in range(4):
        assert _same(base.up_blocks[j].resnets[0], teacher.up_blocks[j].resnets[0])
        assert _same(base.up_blocks[j].resnets[1], teacher.up_blocks[j].resnets[2])
    assert _same(base.up_blocks[2].attentions[1], teacher.up_blocks[2].attentions[2])
    assert _same(base.mid_block, teacher.mid_block) and _same(base.conv_out, teacher.conv_out)
    tiny = build_student(teacher, "tiny")
    assert len(tiny.down_blocks) == 3 and tiny.down_blocks[2].downsamplers is None
    for j in range(3):  # student up j <- teacher up j + 1, with resnets 0 <- 0 and 1 <- 2, and its upsampler
        assert _same(tiny.up_blocks[j].resnets[1], teacher.up_blocks[j + 1].resnets[2])
        assert _same(tiny.up_blocks[j].attentions[0], teacher.up_blocks[j + 1].attentions[0])
    assert _same(tiny.up_blocks[0].upsamplers, teacher.up_blocks[1].upsamplers)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 7, 16)
    for student in (base, build_student(teacher, "small"), tiny):
        out = student(x, t, encoder_hidden_states=ctx).sample
        assert out.shape == x.shape
        # a stock diffusers model: saved and loaded by diffusers alone
        student.save_pretrained(tmp_path / "s")
        again = UNet2DConditionModel.from_pretrained(tmp_path / "s")
        assert torch.allclose(again(x, t, encoder_hidden_states=ctx).sample, out, atol=1e-6)


def test_user_plan_from_yaml(tmp_path):
    (tmp_path / "plan.yaml").write_text("name: mine\nstages: 3\ndown_keep: [[1], [0, 1], [0]]\nmid_block: false\n")
    teacher = _sd_like()
    student = build_student(teacher, str(tmp_path / "plan.yaml"))
    assert student.config.layers_per_block == [1, 2, 1]
    assert _same(student.down_blocks[0].resnets[0], teacher.down_blocks[0].resnets[1])
    # up stage 0 mirrors down stage 2 (1 pair kept): its first pair and its last
    assert _same(student.up_blocks[0].resnets[1], teacher.up_blocks[1].resnets[2])
    assert student(torch.randn(1, 4, 16, 16), 3, encoder_hidden_states=torch.randn(1, 5, 16)).sample.shape[1] == 4


def test_transformer_depth_plan_on_sdxl_shapes():
    teacher = build_architecture("sdxl")
    plan = RemovalPlan(name="depth", pairs=1, mid_block=False, transformer_layers=[1, 2, 6])
    student = build_student(teacher, plan)
    assert len(student.down_blocks[2].attentions[0].transformer_blocks) == 6
    assert len(student.up_blocks[0].attentions[1].transformer_blocks) == 6


def test_two_stage_unets_base_empties_the_outer_stage_and_tiny_is_refused():
    teacher = tiny_unet()  # (32, 64), one pair per stage, like sd-mini
    base = build_student(teacher, "base")
    assert base.config.layers_per_block == [0, 1] and len(base.up_blocks[1].resnets) == 1
    assert _same(base.up_blocks[1].resnets[0], teacher.up_blocks[1].resnets[0])  # reads the previous width
    assert base(torch.randn(1, 4, 16, 16), 3, encoder_hidden_states=torch.randn(1, 5, 32)).sample.shape[1] == 4
    with pytest.raises(DifftuneError, match="cross-attention"):
        build_student(teacher, "tiny")


def test_transformer_block_removal():
    teacher = tiny_dit().eval()
    student = build_student(teacher, {"drop_every": 2})
    assert type(student) is DiTTransformer2DModel and student.config.num_layers == 1
    assert _same(student.transformer_blocks[0], teacher.transformer_blocks[0])
    assert feature_pairs(teacher.config, {"blocks": [1]}) == [("transformer_blocks.1", "transformer_blocks.0")]
    out = student(torch.randn(1, 4, 16, 16), timestep=torch.tensor([3]), class_labels=torch.tensor([1])).sample
    assert out.shape == (1, 8, 16, 16)


@pytest.mark.parametrize("plan, match", [
    ("smal", "plan"), ({"stagez": 2}, "unknown"), ({"stages": 9}, "stages"),
    ({"down_keep": [[5], [0], [0], [0]]}, "down_keep"), ({"up_keep": [[0]] * 4}, "up_keep")])
def test_bad_plans_name_the_field(plan, match):
    with pytest.raises(DifftuneError, match=match):
        student_config(_sd_like().config, plan)


def test_transformer_plan_needs_blocks():
    with pytest.raises(DifftuneError, match="drop_every"):
        student_config(tiny_dit().config, load_plan("small"))


def test_macs_follow_thops_convention():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
                          nn.LayerNorm(5), nn.GELU())
    macs = count_macs(model, torch.zeros(2, 3, 4, 4))
    assert macs == 2 * 8 * 16 * 3 * 9 + 2 * 5 * 128 + 4 * 2 * 5


def test_cli_distill_plan_prints_the_papers_figures(capsys, tmp_path):
    from difftune.cli import main

    assert main(["distill", "plan", "--architecture", "sd15"]) == 0
    out = capsys.readouterr().out
    for figure in ("859,520,964", "338.7 G", "579,384,964", "223.8 G", "482,346,884", "217.7 G", "323,384,964",
                   "205.0 G"):
        assert figure in out
    (tmp_path / "half.yaml").write_text("{name: half, drop_every: 2}\n")
    assert main(["distill", "plan", "--architecture", "dit-xl2", "--plan", str(tmp_path / "half.yaml"),
                 "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["model"] == "half" and rows[1]["macs_ratio"] == pytest.approx(0.5, abs=0.01)
    assert main(["distill", "plan", "--architecture", "sd15", "--plan", "smal"]) == 2
    assert "`plan` must be one of" in capsys.readouterr().err
