"""kohya Flux LoRA files in the BFL layout (`difftune.interop.bfl`): import gives the ΔW diffusers' own converter
gives, export → import is exact, fused layers are written as BFL fuses them."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import difftune as dt
from difftune.errors import DifftuneError
from difftune.interop.export import export_adapter
from difftune.methods.verbs import hosts, inject
from difftune.testing import randomize_adapter, tiny_flux_pipeline

D = 32  # the tiny Flux transformer's width (1 double block, 2 single blocks)


@torch.no_grad()
def _deltas(model, name):
    return {n: h.adapters[name].delta_params(h.base_params())["weight"] for n, h in hosts(model) if name in h.adapters}


def _lora(key, d_out, d_in, rank, alpha, g, sparse=0):
    """kohya tensors of one module; ``sparse`` n > 0: an up that is block-diagonal over n equal row blocks."""
    down = torch.randn(rank, d_in, generator=g)
    up = torch.randn(d_out, rank, generator=g)
    if sparse:
        up = torch.block_diag(*[torch.randn(d_out // sparse, rank // sparse, generator=g) for _ in range(sparse)])
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}


def _bfl_file(path):
    """Every BFL layer the tiny Flux has, except single blocks' linear1 (diffusers' converter hard-codes FLUX.1's
    width 3072 for that split): fused qkv dense (img) and block-diagonal (txt), α ≠ rank."""
    g = torch.Generator().manual_seed(0)
    t = {}
    b = "lora_unet_double_blocks_0_"
    t |= _lora(b + "img_attn_qkv", 3 * D, D, 4, 2.0, g)
    t |= _lora(b + "txt_attn_qkv", 3 * D, D, 6, 9.0, g, sparse=3)
    for name, d_out, d_in in (("img_attn_proj", D, D), ("img_mlp_0", 4 * D, D), ("img_mlp_2", D, 4 * D),
                              ("img_mod_lin", 6 * D, D), ("txt_attn_proj", D, D), ("txt_mlp_0", 4 * D, D),
                              ("txt_mlp_2", D, 4 * D), ("txt_mod_lin", 6 * D, D)):
        t |= _lora(b + name, d_out, d_in, 2, 3.0, g)
    for i in range(2):
        t |= _lora(f"lora_unet_single_blocks_{i}_linear2", D, 5 * D, 2, 1.0, g)
        t |= _lora(f"lora_unet_single_blocks_{i}_modulation_lin", 3 * D, D, 2, 1.0, g)
    for name, d_out, d_in in (("img_in", D, 64), ("txt_in", D, 32), ("time_in_in_layer", D, 256),
                              ("guidance_in_out_layer", D, D), ("vector_in_in_layer", D, 32),
                              ("final_layer_linear", 64, D), ("final_layer_adaLN_modulation_1", 2 * D, D)):
        t |= _lora("lora_unet_" + name, d_out, d_in, 2, 2.0, g)
    save_file(t, str(path))
    return t


def test_bfl_import_matches_diffusers_converter(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    tensors = _bfl_file(tmp_path / "bfl.safetensors")
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    expected = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"):
                theirs[k.replace(".lora_A.", ".lora_B.")] @ theirs[k] for k in theirs if k.endswith(".lora_A.weight")}
    assert len(expected) == 25  # 3 + 3 split from the fused qkv layers, 8 more in the double block, 4 + 7
    pipe = tiny_flux_pipeline()
    assert dt.load_adapter(pipe, tmp_path / "bfl.safetensors", name="f") == "f"
    ours = _deltas(pipe.transformer, "f")
    assert sorted(ours) == sorted(expected)
    for module, delta in expected.items():
        torch.testing.assert_close(ours[module], delta, atol=1e-5, rtol=1e-5, msg=module)


def test_single_block_linear1_splits_into_q_k_v_and_mlp(tmp_path):
    g = torch.Generator().manual_seed(1)
    t = _lora("lora_unet_single_blocks_1_linear1", 7 * D, D, 3, 6.0, g)  # q, k, v (D each) and the MLP (4 D)
    save_file(t, str(tmp_path / "l1.safetensors"))
    pipe = tiny_flux_pipeline()
    dt.load_adapter(pipe, tmp_path / "l1.safetensors", name="f")
    ours = _deltas(pipe.transformer, "f")
    rows = [ours[f"single_transformer_blocks.1.{m}"] for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    key = "lora_unet_single_blocks_1_linear1"
    fused = 2.0 * t[f"{key}.lora_up.weight"] @ t[f"{key}.lora_down.weight"]  # α / r = 6 / 3
    torch.testing.assert_close(torch.cat(rows), fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [None, ["to_q", "to_v", "proj_mlp"]])
def test_kohya_export_is_bfl_and_round_trips_exactly(tmp_path, targets):
    pipe = tiny_flux_pipeline()
    settings = {"rank": 3, "alpha": 5.0} | ({"target_modules": targets} if targets else {})
    inject(pipe.transformer, dt.LoRAConfig(**settings) if targets else _default_lora(pipe), name="t")
    randomize_adapter(pipe.transformer, "t", seed=0, std=0.3)
    dt.save_adapter(pipe, tmp_path / "adapter", "t")
    out = tmp_path / "flux.safetensors"
    report = export_adapter(tmp_path / "adapter", out, format="kohya")
    assert report.max_error == 0.0  # the file read back (split again) gives every module's ΔW bit for bit
    with safe_open(str(out), "pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys)
    # linear1 holds q, k, v and the MLP: 4 members of rank 3 stacked, 3 D + 4 D rows; α = 4 × 5
    assert keys["lora_unet_single_blocks_0_linear1.lora_down.weight"] == [12, D]
    assert keys["lora_unet_single_blocks_0_linear1.lora_up.weight"] == [7 * D, 12]
    with safe_open(str(out), "pt") as f:
        assert float(f.get_tensor("lora_unet_single_blocks_0_linear1.alpha")) == 20.0
        up = f.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight")
    assert not up[:D, 3:].any() and not up[D:2 * D, :3].any()  # block-diagonal: member j only in its own rows
    if targets is None:
        assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_double_blocks_0_img_mlp_2.lora_up.weight" in keys

    loaded = tiny_flux_pipeline()
    dt.load_adapter(loaded, out, name="t")
    before, after = _deltas(pipe.transformer, "t"), _deltas(loaded.transformer, "t")
    assert sorted(after) == sorted(before)  # the zero blocks of unadapted members (to_k) come back as nothing
    for module in before:
        assert torch.equal(after[module], before[module]), module
    config = next(h for _, h in hosts(loaded.transformer) if "t" in h.adapters).adapters["t"].config
    assert (config.rank, config.alpha) == (3, 5.0)


def _default_lora(pipe):
    from difftune.counting import method_config

    return method_config("lora", {"rank": 3, "alpha": 5.0}, pipe.transformer)


def test_bfl_refusals(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file(_lora("lora_unet_double_blocks_0_img_attn_qkvx", 3 * D, D, 2, 2.0, g), str(tmp_path / "bad.safetensors"))
    with pytest.raises(DifftuneError, match="img_attn_qkvx: no such layer in the BFL Flux layout"):
        dt.load_adapter(tiny_flux_pipeline(), tmp_path / "bad.safetensors")
    save_file(_lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * D + 1, D, 3, 2.0, g),
              str(tmp_path / "rows.safetensors"))
    with pytest.raises(DifftuneError, match="97 output rows do not split"):
        dt.load_adapter(tiny_flux_pipeline(), tmp_path / "rows.safetensors")
