"""Published architectures on the meta device: exact parameter counts, and shape facts the methods rely on."""

from __future__ import annotations

import pytest
from torch import nn

import difftune as dt
from difftune import counting, testing
from difftune.architectures import ARCHITECTURES, build_architecture, pixart_alpha_config

# Counted here with diffusers 0.42. sd15, sd21, sdxl and the DiT sizes without per-block embedder copies (below) are
# also the figures of the research notes (methods.md §0.1). pixart-1024 with the released
# checkpoint's one extra unused tensor (caption_projection.y_embedding, 120 × 4096) is exactly the size of
# PixArt-alpha/PixArt-XL-2-1024-MS's transformer/diffusion_pytorch_model.safetensors (2,447,431,856 bytes, fp32).
PARAMETERS = {
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sdxl": 2_567_463_684,
    "dit-b2": 147_439_904,
    "dit-l2": 511_609_888,
    "dit-xl2": 749_826_464,
    "pixart-512": 610_856_096,
    "pixart-1024": 611_349_152,
    # The published totals: SD3 Medium "2B" (2,028,328,000 in stabilityai's model card tooling), SD3.5 Large "8.1B",
    # FLUX.1 "12B" (11,901,408,320 for [dev]); [schnell] lacks [dev]'s guidance embedder (2 linears 256→3072→3072).
    "sd3-medium": 2_028_328_000,
    "sd35-large": 8_056_627_520,
    "flux-dev": 11_901_408_320,
    "flux-schnell": 11_901_408_320 - (256 * 3072 + 3072) - (3072 * 3072 + 3072),
}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_architecture_has_a_verified_count():
    assert list(ARCHITECTURES) == list(PARAMETERS) == list(counting.ARCHITECTURES)


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_parameter_count(name):
    model = build_architecture(name)
    assert all(p.is_meta for p in model.parameters())
    assert _count(model) == PARAMETERS[name]


@pytest.mark.parametrize(
    ("name", "blocks", "width", "original", "pos_embed"),
    [("dit-b2", 12, 768, 130_315_808, 196_608), ("dit-l2", 24, 1024, 457_840_672, 262_144),
     ("dit-xl2", 28, 1152, 674_834_720, 294_912)],
)
def test_dit_sizes_are_the_papers_without_the_per_block_embedder_copies(name, blocks, width, original, pos_embed):
    """diffusers copies DiT's timestep and class embedders into every block; one copy gives the DiT paper's sizes
    (B/2 130M, L/2 458M, XL/2 675M, the last usually quoted with the fixed positional embedding: 675,129,632)."""
    model = build_architecture(name)
    assert len(model.transformer_blocks) == blocks and model.transformer_blocks[0].attn1.to_q.weight.shape == (
        width, width)
    copies = sum(_count(block.norm1.emb) for block in model.transformer_blocks[1:])
    assert _count(model) - copies == original
    assert model.pos_embed.pos_embed.numel() == pos_embed  # a buffer, not a parameter
    if name == "dit-xl2":
        assert original + pos_embed == 675_129_632


def test_sd21_differs_from_sd15_only_where_published():
    sd15, sd21 = build_architecture("sd15"), build_architecture("sd21")
    attn = "down_blocks.0.attentions.0"
    assert isinstance(sd15.get_submodule(f"{attn}.proj_in"), nn.Conv2d)
    assert isinstance(sd21.get_submodule(f"{attn}.proj_in"), nn.Linear)  # use_linear_projection
    assert sd21.get_submodule(f"{attn}.transformer_blocks.0.attn2.to_k").in_features == 1024  # OpenCLIP-H text
    assert sd21.get_submodule(f"{attn}.transformer_blocks.0.attn1").heads == 5  # 64-wide heads: 320 / 5


def test_pixart_micro_conditions_only_at_1024():
    small, large = build_architecture("pixart-512"), build_architecture("pixart-1024")
    assert not small.adaln_single.emb.use_additional_conditions and large.adaln_single.emb.use_additional_conditions
    assert _count(large) - _count(small) == 2 * (256 * 384 + 384 + 384 * 384 + 384)  # resolution + aspect ratio
    with pytest.raises(dt.DifftuneError, match="`resolution` must be 512 or 1024"):
        pixart_alpha_config(768)


def test_kind_one_component_over_the_dit_l2_block_linears():
    """KIND stores each linear as W = U diag(σ) Vᵀ: one component index of a (d_out, d_in) linear is a column of U,
    a row of Vᵀ and one σ, d_out + d_in + 1 parameters. Over q, k, v, out, MLP-in and MLP-out of all 24 DiT-L/2
    blocks that is 442,512; with q/k/v fused into one 1024 → 3072 linear (the original DiT's qkv) plus adaLN's
    1024 → 6144 linear it is the research notes' 565,368."""
    model = build_architecture("dit-l2")
    leaves = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}

    def cost(linear: nn.Linear) -> int:
        return linear.out_features + linear.in_features + 1

    linears = [m for n, m in model.transformer_blocks.named_modules() if n.partition(".")[2] in leaves]
    assert len(linears) == 6 * 24 and all(isinstance(m, nn.Linear) for m in linears)
    assert sum(cost(m) for m in linears) == 442_512
    fused = 0
    for block in model.transformer_blocks:
        attn, ff = block.attn1, block.ff.net
        qkv = attn.to_q.out_features + attn.to_k.out_features + attn.to_v.out_features + attn.to_q.in_features + 1
        fused += qkv + cost(attn.to_out[0]) + cost(ff[0].proj) + cost(ff[2]) + cost(block.norm1.linear)
    assert fused == 565_368


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(dt.DifftuneError, match="`architecture` must be one of") as err:
        build_architecture("sd3")
    assert all(name in str(err.value) for name in ARCHITECTURES)


def test_old_imports_from_testing_still_work():
    from difftune.architectures import build_on_meta, sd15_unet_config

    assert testing.build_on_meta is build_on_meta and testing.sd15_unet_config is sd15_unet_config
