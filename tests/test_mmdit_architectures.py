"""SD3 and Flux transformers on the meta device: default adapter targets and the exact counts `inspect` prints."""

from __future__ import annotations

import json

import pytest

from difftune.architectures import FLUX_SINGLE_TARGETS, JOINT_TARGETS, build_architecture, mmdit_default_targets
from difftune.cli import main
from difftune.counting import method_config
from difftune.methods.verbs import hosts, inject
from difftune.targeting import check_pattern


def _lora_r4(d_in: int, d_out: int) -> int:
    return 4 * (d_in + d_out)


def _joint_block(width: int, context: bool = True) -> int:
    """LoRA r=4 on one joint block: 4 (or 3 in SD3's last, context-pre-only block) square attention linears per
    stream and the 4×-wide feed-forward of each stream."""
    attention = (8 if context else 7) * _lora_r4(width, width)
    ff = (4 if context else 2) * _lora_r4(width, 4 * width)
    return attention + ff


# (modules, trainable parameters) of LoRA r=4 on the default targets, computed from the layer shapes:
# SD3: 24 blocks of width 1536, the last without the context stream's output and feed-forward (context_pre_only).
# Flux: 19 joint blocks of width 3072, 38 single blocks with q, k, v (3072²), proj_mlp (3072→12288) and
# proj_out (3072 + 12288 → 3072).
SINGLE = 3 * _lora_r4(3072, 3072) + _lora_r4(3072, 12288) + _lora_r4(15360, 3072)
EXPECTED = {
    "sd3-medium": (23 * 12 + 9, 23 * _joint_block(1536) + _joint_block(1536, context=False)),
    "sd35-large": (37 * 12 + 9, 37 * _joint_block(2432) + _joint_block(2432, context=False)),
    "flux-dev": (19 * 12 + 38 * 5, 19 * _joint_block(3072) + 38 * SINGLE),
}


def test_expected_counts_are_the_printed_figures():
    # the figures the docs quote (docs/sd3-flux.md), so a change in either is seen
    assert EXPECTED["sd3-medium"] == (285, 5_234_688)
    assert EXPECTED["flux-dev"] == (418, 16_343_040)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_inspect_prints_exact_lora_counts(name, capsys):
    assert main(["inspect", "--method", "lora", "--architecture", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["modules"], info["parameters"]) == EXPECTED[name]


def test_inspect_text_output_for_flux_dev(capsys):
    assert main(["inspect", "--method", "lora", "--architecture", "flux-dev"]) == 0
    out = capsys.readouterr().out
    assert "adapted modules:   418" in out and "trainable params:  16,343,040" in out
    assert "11,901,408,320" in out


def test_explicit_targets_win_over_the_mmdit_default(capsys):
    # only the image stream's q of 19 joint blocks and q of the 38 single blocks ("attn.to_q" is their suffix too)
    assert main(["inspect", "--method", "lora", "--architecture", "flux-dev", "--set", "target_modules=[to_q]",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["modules"], info["parameters"]) == (57, 57 * _lora_r4(3072, 3072))


def test_default_targets_per_model():
    flux, sd3 = build_architecture("flux-schnell"), build_architecture("sd3-medium")
    assert mmdit_default_targets(flux) == list(JOINT_TARGETS + FLUX_SINGLE_TARGETS)
    assert mmdit_default_targets(sd3) == list(JOINT_TARGETS)
    assert mmdit_default_targets(build_architecture("dit-b2")) is None
    assert all(check_pattern(p) for p in JOINT_TARGETS + FLUX_SINGLE_TARGETS)
    # methods with other defaults keep them (IA3: k, v, ff.net.2), and a UNet keeps LoRA's attention default
    assert method_config("ia3", {}, sd3).target_modules == ["to_k", "to_v", "ff.net.2"]
    assert method_config("lora", {}, build_architecture("sd15")).target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert method_config("krona", {}, flux).target_modules == list(JOINT_TARGETS + FLUX_SINGLE_TARGETS)


def test_flux_single_block_regex_spares_the_final_projection():
    model = build_architecture("flux-dev")
    inject(model, method_config("lora", {}, model), name="t")
    adapted = {n for n, h in hosts(model) if "t" in h.adapters}
    assert "proj_out" not in adapted and "single_transformer_blocks.37.proj_out" in adapted
    assert "transformer_blocks.18.ff_context.net.2" in adapted and "single_transformer_blocks.0.proj_mlp" in adapted
    assert not any(n.startswith(("x_embedder", "context_embedder", "time_text_embed")) for n in adapted)
