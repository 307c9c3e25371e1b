"""kohya Flux LoRA files in the BFL layout (`difftune.interop.bfl`): import gives the ΔW diffusers' own converter
gives, export → import is exact, fused layers are written as BFL fuses them."""

from __future__ import annotations

import re

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


def _converted(state_dict):
    """{diffusers module: ΔW} as diffusers' own Flux kohya converter reads ``state_dict``."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    theirs = _convert_kohya_flux_lora_to_diffusers(dict(state_dict))
    return {k.removeprefix("transformer.").removesuffix(".lora_A.weight"):
            theirs[k.replace(".lora_A.", ".lora_B.")] @ theirs[k] for k in theirs if k.endswith(".lora_A.weight")}


def _assert_imports_as(path, expected, tol):
    """``dt.load_adapter`` of the file at ``path`` gives exactly ``expected``'s modules with its ΔW (± tol)."""
    pipe = tiny_flux_pipeline()
    assert dt.load_adapter(pipe, path, name="f") == "f"
    ours = _deltas(pipe.transformer, "f")
    assert sorted(ours) == sorted(expected)
    for module, delta in expected.items():
        torch.testing.assert_close(ours[module], delta, atol=tol, rtol=tol, msg=module)


def test_bfl_import_matches_diffusers_converter(tmp_path):
    expected = _converted(_bfl_file(tmp_path / "bfl.safetensors"))
    assert len(expected) == 25  # 3 + 3 split from the fused qkv layers, 8 more in the double block, 4 + 7
    _assert_imports_as(tmp_path / "bfl.safetensors", expected, 1e-5)


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


#: BFL's own (dotted) names of the layers `_bfl_file` has, as ComfyUI and ai-toolkit write them after
#: ``diffusion_model.``
DOTTED = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
          "txt_attn_proj": "txt_attn.proj", "img_mlp_0": "img_mlp.0", "img_mlp_2": "img_mlp.2",
          "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2", "img_mod_lin": "img_mod.lin",
          "txt_mod_lin": "txt_mod.lin",
          "linear2": "linear2", "modulation_lin": "modulation.lin", "img_in": "img_in", "txt_in": "txt_in",
          "time_in_in_layer": "time_in.in_layer", "guidance_in_out_layer": "guidance_in.out_layer",
          "vector_in_in_layer": "vector_in.in_layer", "final_layer_linear": "final_layer.linear",
          "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}
PEFT_PARTS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def _dotted(tensors, peft):
    """``_bfl_file``'s tensors under ``diffusion_model.<BFL path>``; ``peft``: parts lora_A/lora_B, no alpha."""
    out = {}
    for key, value in tensors.items():
        module, part = key.split(".", 1)
        m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(.+)", module)
        path = f"{m[1]}_blocks.{m[2]}.{DOTTED[m[3]]}" if m else DOTTED[module.removeprefix("lora_unet_")]
        if peft and part == "alpha":
            continue
        out[f"diffusion_model.{path}.{PEFT_PARTS.get(part, part) if peft else part}"] = value
    return out


@pytest.mark.parametrize("peft", [False, True], ids=["lora_down", "lora_A"])
def test_comfyui_dotted_flux_keys_match_diffusers_converter(tmp_path, peft):
    """``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` (+ alpha): diffusers' Flux converter reads
    these itself. The lora_A/lora_B spelling (no alpha) it does not read (its Flux loader takes them for peft keys
    and finds none under ``transformer.``); ComfyUI reads both spellings alike, so the reference for it is the
    converter on the same tensors with the parts spelled lora_down/lora_up (α = rank: scale 1)."""
    dotted = _dotted(_bfl_file(tmp_path / "bfl.safetensors"), peft)
    save_file(dotted, str(tmp_path / "dotted.safetensors"))
    expected = _converted({k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
                           for k, v in dotted.items()})
    assert len(expected) == 25
    _assert_imports_as(tmp_path / "dotted.safetensors", expected, 1e-6)


def test_peft_flux_keys_match_diffusers_load_lora_weights(tmp_path):
    """``transformer.<diffusers module>.lora_A.weight`` / ``lora_B`` with per-module ranks and ``.alpha`` keys (as
    ai-toolkit and diffusers' scripts write them): the ΔW diffusers' own loader builds with peft."""
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for j, (module, d_out, d_in) in enumerate((
            ("transformer_blocks.0.attn.to_q", D, D), ("transformer_blocks.0.attn.add_v_proj", D, D),
            ("transformer_blocks.0.ff_context.net.2", D, 4 * D), ("transformer_blocks.0.norm1.linear", 6 * D, D),
            ("single_transformer_blocks.1.proj_mlp", 4 * D, D), ("single_transformer_blocks.0.proj_out", D, 5 * D),
            ("x_embedder", D, 64), ("norm_out.linear", 2 * D, D))):
        rank = 2 + 2 * (j % 2)
        tensors |= {f"transformer.{module}.lora_A.weight": torch.randn(rank, d_in, generator=g) * 0.3,
                    f"transformer.{module}.lora_B.weight": torch.randn(d_out, rank, generator=g) * 0.3,
                    f"transformer.{module}.alpha": torch.tensor(float(1 + j))}
    save_file(tensors, str(tmp_path / "peft.safetensors"))
    theirs = tiny_flux_pipeline()
    theirs.load_lora_weights(str(tmp_path / "peft.safetensors"))
    expected = {}
    with torch.no_grad():
        for name, layer in theirs.transformer.named_modules():
            if hasattr(layer, "lora_A") and "default_0" in layer.lora_A:
                a, b = layer.lora_A["default_0"].weight, layer.lora_B["default_0"].weight
                expected[name] = b @ a * layer.scaling["default_0"]
    assert len(expected) == 8
    _assert_imports_as(tmp_path / "peft.safetensors", expected, 1e-6)


def _zero_lora(key, peft=False):
    down, up = ("lora_A", "lora_B") if peft else ("lora_down", "lora_up")
    return {f"{key}.{down}.weight": torch.zeros(2, D), f"{key}.{up}.weight": torch.zeros(D, 2)}


@pytest.mark.parametrize(("tensors", "match"), [
    (_zero_lora("diffusion_model.double_blocks.0.img_attn.proj")
     | _zero_lora("lora_unet_double_blocks_0_txt_attn_proj"),
     r"2 layouts: (?=.*kohya's [^;]*'lora_unet_double_blocks_0_txt)(?=.*ComfyUI's [^;]*'diffusion_model\.double)"),
    (_zero_lora("diffusion_model.double_blocks.0.img_attn.proj", peft=True)
     | _zero_lora("transformer.transformer_blocks.0.attn.to_add_out", peft=True),
     r"2 layouts: (?=.*diffusers/peft's [^;]*'transformer\.transformer_blocks)(?=.*ComfyUI's [^;]*'diffusion_model)"),
    (_zero_lora("lora_unet_double_blocks_0_img_attn_proj") | _zero_lora("lora_unet_transformer_blocks_0_attn_to_q"),
     r"more than one layout: (?=.*BFL Flux \(e.g. 'lora_unet_double)(?=.*other module names \(e.g. 'lora_unet_trans)"),
])
def test_mixed_flux_layouts_are_refused(tmp_path, tensors, match):
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    pipe = tiny_flux_pipeline()
    with pytest.raises(DifftuneError, match=match):
        dt.load_adapter(pipe, tmp_path / "mixed.safetensors")
    assert not list(hosts(pipe.transformer))


def test_lora_transformer_keys_match_diffusers_converter(tmp_path):
    """kohya keys of diffusers' module names under ``lora_transformer_`` (what ComfyUI maps for Flux and SD3, and
    diffusers' Flux converter reads as its "mixture" format): the ΔW diffusers' converter gives."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for module, d_out, d_in in (("transformer_blocks_0_attn_to_q", D, D),
                                ("transformer_blocks_0_attn_add_k_proj", D, D),
                                ("transformer_blocks_0_attn_to_add_out", D, D),
                                ("single_transformer_blocks_1_attn_to_v", D, D), ("proj_out", 64, D),
                                ("time_text_embed_timestep_embedder_linear_1", D, 256)):
        key = f"lora_transformer_{module}"
        tensors |= {f"{key}.lora_down.weight": torch.randn(2, d_in, generator=g),
                    f"{key}.lora_up.weight": torch.randn(d_out, 2, generator=g), f"{key}.alpha": torch.tensor(3.0)}
    save_file(tensors, str(tmp_path / "mixture.safetensors"))
    expected = _converted(tensors)
    assert len(expected) == 6
    _assert_imports_as(tmp_path / "mixture.safetensors", expected, 1e-6)
    # beside BFL keys: refused (diffusers' converter drops the lora_unet_* keys of such a file)
    save_file(tensors | _zero_lora("lora_unet_double_blocks_0_img_attn_proj"), str(tmp_path / "both.safetensors"))
    with pytest.raises(DifftuneError, match=r"BFL Flux's layout \(e.g. 'lora_unet_double.*diffusers' \(e.g. 'lora_"):
        dt.load_adapter(tiny_flux_pipeline(), tmp_path / "both.safetensors")


@pytest.mark.parametrize("keys", [["final_layer_linear"], ["final_layer_linear", "final_layer_adaLN_modulation_1"]])
def test_final_layer_alone_adapts_only_the_top_level_proj_out(tmp_path, keys):
    """BFL's (and SAI's) ``final_layer_*`` names need no other key to be read; the top-level ``proj_out`` must not
    take the single blocks' ``…proj_out`` along (peft's suffix rule for a plain target name). α = rank: diffusers'
    converter drops the final layer's alphas (its "TODO: alphas"), where kohya and ComfyUI apply α / r."""
    g = torch.Generator().manual_seed(4)
    shapes = {"final_layer_linear": (64, D), "final_layer_adaLN_modulation_1": (2 * D, D)}
    tensors = {}
    for k in keys:
        tensors |= _lora(f"lora_unet_{k}", *shapes[k], 2, 2.0, g)
    save_file(tensors, str(tmp_path / "final.safetensors"))
    _assert_imports_as(tmp_path / "final.safetensors", _converted(tensors), 1e-6)
