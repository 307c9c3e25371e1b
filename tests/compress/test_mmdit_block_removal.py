"""Block removal on SD3 and Flux (joint and single blocks dropped by a plan, as Flux "lite" models are made): the
students are stock diffusers models that compute what the teacher computes with those blocks skipped, the counts of
`difftune distill plan --architecture flux-dev` follow from the block sizes, and the feature-KD pairs."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import nn

from difftune.architectures import build_architecture
from difftune.compress.block_removal import build_student, feature_output_index, feature_pairs, student_config
from difftune.compress.macs import count_parameters
from difftune.errors import DifftuneError


def _flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=4,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                  pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()


def _sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                 caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8).eval()


def _flux_inputs(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(b, 16, 16, generator=g),  # 4×4 packed patches
            "encoder_hidden_states": torch.randn(b, 5, 12, generator=g),
            "pooled_projections": torch.randn(b, 10, generator=g), "timestep": torch.tensor([0.3, 0.8])[:b],
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.),
                                                  indexing="ij"), -1).reshape(16, 3),
            "txt_ids": torch.zeros(5, 3), "guidance": torch.full((b,), 3.5)}


def _sd3_inputs(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(b, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(b, 5, 12, generator=g),
            "pooled_projections": torch.randn(b, 10, generator=g), "timestep": torch.tensor([300.0, 800.0])[:b]}


def _skipping(model: nn.Module, stacks: dict[str, list[int]], inputs: dict) -> torch.Tensor:
    """The teacher's output with only the listed blocks of each stack run (the same modules, in order)."""
    saved = {name: getattr(model, name) for name in stacks}
    try:
        for name, keep in stacks.items():
            setattr(model, name, nn.ModuleList([saved[name][i] for i in keep]))
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]
    finally:
        for name, blocks in saved.items():
            setattr(model, name, blocks)


@pytest.mark.parametrize("plan, joint, single", [
    ({"blocks": [0, 2], "single_blocks": [1, 3]}, [0, 2], [1, 3]),
    ("half", [0, 2], [0, 2]),
    ({"single_drop_every": 4}, [0, 1, 2], [0, 1, 2]),  # joint blocks all kept when the plan names none
])
def test_flux_student_is_the_teacher_without_the_dropped_blocks(plan, joint, single, tmp_path):
    teacher = _flux()
    student = build_student(teacher, plan)
    assert type(student) is FluxTransformer2DModel
    assert (student.config.num_layers, student.config.num_single_layers) == (len(joint), len(single))
    inputs = _flux_inputs()
    with torch.no_grad():
        out = student(**inputs, return_dict=False)[0]
    expect = _skipping(teacher, {"transformer_blocks": joint, "single_transformer_blocks": single}, inputs)
    assert torch.equal(out, expect)  # the same weights and kernels in the same order
    student.save_pretrained(tmp_path / "s")  # a stock diffusers model: diffusers alone loads it
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(again(**inputs, return_dict=False)[0], out)


@pytest.mark.parametrize("keep", [[0, 3], [1, 2]])
def test_sd3_student_is_the_teacher_without_the_dropped_blocks(keep):
    """SD3's last joint block has no context output; a student whose last block was not the teacher's last takes
    that block's context modulation rows (shift, scale of the attention input) and gives the same image stream."""
    teacher = _sd3()
    student = build_student(teacher, {"blocks": keep})
    assert type(student) is SD3Transformer2DModel and student.config.num_layers == 2
    assert student.transformer_blocks[-1].context_pre_only and student.transformer_blocks[-1].ff_context is None
    inputs = _sd3_inputs()
    with torch.no_grad():
        out = student(**inputs, return_dict=False)[0]
        # diffusers' own skip_layers runs the teacher without the dropped blocks
        expect = teacher(**inputs, skip_layers=[i for i in range(4) if i not in keep], return_dict=False)[0]
    # [1, 2]: the context modulation is a row subset of the teacher's linear (another GEMM shape), so not bit-exact;
    # rows in the wrong order (scale ↔ shift) differ by ~1e-1
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5), (out - expect).abs().max()


def test_sd35_dual_attention_layers_are_renumbered():
    torch.manual_seed(0)
    teacher = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                    caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8,
                                    qk_norm="rms_norm", dual_attention_layers=(0, 2))
    assert student_config(teacher.config, {"blocks": [1, 2, 3]})["dual_attention_layers"] == [1]
    student = build_student(teacher, {"blocks": [1, 2, 3]})
    assert [b.attn2 is not None for b in student.transformer_blocks] == [False, True, False]


def test_feature_pairs_end_each_span_and_read_the_image_stream():
    cfg = _flux().config
    assert feature_pairs(cfg, {"blocks": [0, 2], "single_blocks": [1]}) == [
        ("transformer_blocks.1", "transformer_blocks.0"), ("transformer_blocks.2", "transformer_blocks.1"),
        ("single_transformer_blocks.3", "single_transformer_blocks.0")]
    assert feature_output_index(cfg) == 1 and feature_output_index(_sd3().config) == 1  # (context, image)
    block_out = _flux().transformer_blocks[0](torch.randn(1, 16, 16), torch.randn(1, 5, 16), torch.randn(1, 16))
    assert block_out[1].shape == (1, 16, 16) and block_out[0].shape == (1, 5, 16)


@pytest.mark.parametrize("plan, match", [
    ({"single_blocks": [0]}, "single_blocks"), ({"blocks": [4]}, "blocks"), ({"blocks": [2, 1]}, "blocks"),
    ({"blocks": []}, "blocks"), ({"drop_every": 1}, "drop_every"), ({"name": "x"}, "at least one of")])
def test_bad_mmdit_plans_name_the_field(plan, match):
    with pytest.raises(DifftuneError, match=match):
        build_student(_sd3(), plan)


def test_flux_dev_plan_counts_follow_from_the_block_sizes():
    teacher = build_architecture("flux-dev")
    total = count_parameters(teacher)
    w, mlp, lin = 3072, 12288, (lambda i, o: i * o + o)  # Linear(i, o) with bias
    # per stream: q, k, v, out + the RMS norms of q and k (128 each) + the feed-forward + AdaLN-Zero (6 × width)
    joint = 2 * (4 * lin(w, w) + 256 + lin(w, mlp) + lin(mlp, w) + lin(w, 6 * w))
    single = lin(w, 3 * w) + 3 * lin(w, w) + 256 + lin(w, mlp) + lin(w + mlp, w)  # AdaLN, q/k/v, MLP in, fused out
    assert (joint, single) == (339_831_296, 141_591_808)
    assert count_parameters(teacher.transformer_blocks[0]) == joint
    assert count_parameters(teacher.single_transformer_blocks[0]) == single
    assert total == 11_901_408_320
    lite = build_student(teacher, {"blocks": [0, 1, 2, 3, 4, 5, 6, 18]})  # 8 of 19 joint blocks: a "lite" 8B
    assert count_parameters(lite) == total - 11 * joint == 8_163_264_064
    half = build_student(teacher, "half")  # joint 0, 2, ..., 18 (10) and single 0, 2, ..., 36 (19)
    assert count_parameters(half) == total - 9 * joint - 19 * single == 6_152_682_304


def test_cli_distill_plan_on_flux_dev(capsys):
    from difftune.cli import main

    assert main(["distill", "plan", "--architecture", "flux-dev", "--plan", "{blocks: [19]}"]) == 2
    assert "`plan.blocks`" in capsys.readouterr().err  # refused before anything is counted
    assert main(["distill", "plan", "--architecture", "flux-dev"]) == 0  # default for a transformer: half
    out = capsys.readouterr().out
    # MACs at 1024 px with 512 text tokens, thop's convention (each Linear: output elements × in_features); by
    # hand: (image 4096 + text 512 tokens) × the per-token Linear weights of 19 joint and 38 single blocks, each
    # 3072 · (4 · 3072 + 2 · 12288) = 3072 · (3 · 3072 + 12288 + 15360) = 113,246,208, is 29,744.8 G; the rest
    # (T5 context embedder 6.4 G, AdaLN modulations 3.2 G, layer norms 2.2 G, in/out projections 1.6 G) is 13.5 G
    for figure in ("11,901,408,320", "29758.3 G", "half", "6,152,682,304", "0.517", "15144.2 G"):
        assert figure in out
