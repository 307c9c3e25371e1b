"""kohya SD3 LoRA files in SAI's layout (`difftune.interop.sai`): import gives the ΔW diffusers' own converter of SAI
checkpoints gives, ``--format kohya`` writes that layout and loads back as the adapter, mixed layouts are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from safetensors.torch import save_file

import difftune as dt
from difftune.cli import main
from difftune.errors import DifftuneError
from difftune.interop.export import export_adapter
from difftune.methods.verbs import hosts, inject
from difftune.testing import randomize_adapter, save_tiny_pipeline, tiny_sd3_pipeline

D = 32  # the tiny SD3 transformer's width: 2 joint blocks, the last one's text stream "pre-only"


@torch.no_grad()
def _deltas(model, name):
    return {n: h.adapters[name].delta_params(h.base_params())["weight"] for n, h in hosts(model) if name in h.adapters}


def _sai_checkpoint(dual: bool) -> dict[str, tuple[int, ...]]:
    """Every weight of SAI's MMDiT at the tiny size (SD3's layer names, written out by hand), with its shape."""
    shapes = {"x_embedder.proj": (D, 16, 2, 2), "t_embedder.mlp.0": (D, 256), "t_embedder.mlp.2": (D, D),
              "y_embedder.mlp.0": (D, 64), "y_embedder.mlp.2": (D, D), "context_embedder": (D, 64),
              "final_layer.linear": (64, D), "final_layer.adaLN_modulation.1": (2 * D, D)}
    for i in range(2):
        last = i == 1
        b = f"joint_blocks.{i}."
        shapes |= {b + "x_block.attn.qkv": (3 * D, D), b + "x_block.attn.proj": (D, D),
                   b + "x_block.mlp.fc1": (4 * D, D), b + "x_block.mlp.fc2": (D, 4 * D),
                   b + "x_block.adaLN_modulation.1": ((9 if dual and i == 0 else 6) * D, D),
                   b + "context_block.attn.qkv": (3 * D, D),
                   b + "context_block.adaLN_modulation.1": ((2 if last else 6) * D, D)}
        if not last:
            shapes |= {b + "context_block.attn.proj": (D, D), b + "context_block.mlp.fc1": (4 * D, D),
                       b + "context_block.mlp.fc2": (D, 4 * D)}
        if dual and i == 0:  # SD3.5's second attention of the image stream
            shapes |= {b + "x_block.attn2.qkv": (3 * D, D), b + "x_block.attn2.proj": (D, D)}
    return shapes


def _sai_file(path, dual=False):
    """A SAI-named LoRA on every layer (kohya keys), and its ΔW per SAI layer; fused qkv layers dense or
    block-diagonal, α ≠ rank, one conv (the patch embedding)."""
    g = torch.Generator().manual_seed(0)
    tensors, deltas = {}, {}
    for layer, shape in _sai_checkpoint(dual).items():
        rank, alpha = (6, 9.0) if layer.endswith("qkv") else (2, 3.0)
        key = "lora_unet_" + layer.replace(".", "_")
        down = torch.randn(rank, *shape[1:], generator=g) * 0.2
        up = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=g) * 0.2
        if layer.endswith("context_block.attn.qkv"):  # as kohya's split_qkv writes it: each member its rank block
            up = torch.block_diag(*[torch.randn(shape[0] // 3, rank // 3, generator=g) * 0.2 for _ in range(3)])
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
        deltas[layer] = alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(shape)
    save_file(tensors, str(path))
    return tensors, deltas


def _dual_transformer():
    """A tiny SD3.5-style transformer: dual attention in block 0 (MMDiT-X), RMS-normed q/k."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                 caption_projection_dim=D, pooled_projection_dim=64, pos_embed_max_size=16,
                                 dual_attention_layers=(0,), qk_norm="rms_norm")


@pytest.mark.parametrize("dual", [False, True], ids=["sd3", "sd35-dual-attention"])
def test_sai_import_matches_diffusers_checkpoint_converter(tmp_path, dual):
    """diffusers has no converter for SAI-named SD3 LoRAs, but its converter of SAI checkpoints is linear in the
    weights: run on a checkpoint holding each layer's ΔW (zeros elsewhere) it gives each diffusers module's ΔW."""
    _, sai = _sai_file(tmp_path / "sai.safetensors", dual)
    checkpoint = {f"{k}.weight": sai.get(k, torch.zeros(s)) for k, s in _sai_checkpoint(dual).items()}
    checkpoint |= {f"{k}.bias": torch.zeros(s[0]) for k, s in _sai_checkpoint(dual).items()}
    checkpoint["pos_embed"] = torch.zeros(1, 64, D)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    expected = {k.removesuffix(".weight"): v for k, v in theirs.items() if k.endswith(".weight") and v.any()}
    # 8 top-level layers, 14 modules in block 0 (+ 4 of attn2), 11 in the last (its text stream: q, k, v, modulation)
    assert len(expected) == (37 if dual else 33)

    model = _dual_transformer() if dual else tiny_sd3_pipeline().transformer
    dt.load_adapter(model, tmp_path / "sai.safetensors", name="s")
    ours = _deltas(model, "s")
    assert sorted(ours) == sorted(expected)
    for module, delta in expected.items():
        torch.testing.assert_close(ours[module].reshape(delta.shape), delta, atol=1e-6, rtol=1e-6, msg=module)


def _image(pipe) -> np.ndarray:
    return pipe("a photo of a cat", height=32, width=32, num_inference_steps=2, output_type="np",
                max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images[0]


EVERY_LAYER = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               r".*ff(_context)?\.net\.(0\.proj|2)", r".*norm1(_context)?\.linear", "norm_out.linear", "proj_out",
               "context_embedder", "pos_embed.proj", r".*embedder\.linear_[12]"]


@pytest.mark.parametrize("targets", [EVERY_LAYER, ["to_q", "to_v", "add_k_proj"]], ids=["every-layer", "partial-qkv"])
def test_kohya_export_is_sai_and_loads_as_the_adapter(tmp_path, targets, capsys):
    folder = save_tiny_pipeline("sd3", tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    base = _image(pipe)
    inject(pipe.transformer, dt.LoRAConfig(rank=3, alpha=5.0, target_modules=targets), name="t")
    randomize_adapter(pipe.transformer, "t", seed=0, std=0.3)
    ours = _image(pipe)
    assert np.abs(ours - base).max() > 0.05
    dt.save_adapter(pipe, tmp_path / "adapter", "t")  # records the folder as its base: SD3, so SAI's names

    out = tmp_path / "sai.safetensors"
    assert main(["export", str(tmp_path / "adapter"), "--out", str(out), "--format", "kohya"]) == 0
    assert "StableDiffusion3Pipeline.load_lora_weights reads only diffusers' names" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
        alpha = float(f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"))
        up = f.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight")
    assert all(k.startswith(("lora_unet_joint_blocks_", "lora_unet_x_embedder", "lora_unet_context_embedder",
                             "lora_unet_t_embedder", "lora_unet_y_embedder", "lora_unet_final_layer")) for k in keys)
    # q, k, v fused: 3 members of rank 3 stacked, block-diagonal up, α = 3 × 5
    assert keys["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"] == [9, D]
    assert alpha == 15.0 and not up[:D, 3:].any() and not up[D:2 * D, :3].any()
    if targets is EVERY_LAYER:
        assert keys["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"] == [2 * D, 3]
        assert keys["lora_unet_x_embedder_proj.lora_down.weight"] == [3, 16, 2, 2]
    with pytest.warns(UserWarning, match="--format diffusers"):  # read back and split: exact
        assert export_adapter(tmp_path / "adapter", tmp_path / "again.safetensors").max_error == 0.0

    loaded = StableDiffusion3Pipeline.from_pretrained(str(folder))
    dt.load_adapter(loaded, out, name="t")
    before, after = _deltas(pipe.transformer, "t"), _deltas(loaded.transformer, "t")
    assert sorted(after) == sorted(before)  # unadapted members' zero blocks come back as nothing
    assert all(torch.equal(after[m], before[m]) for m in before)
    np.testing.assert_allclose(_image(loaded), ours, atol=1e-6, rtol=0)

    # diffusers 0.42's SD3 loader reads only diffusers/peft keys (transformer.<module>.lora_A): it loads nothing
    # from a SAI-named file (logging "No LoRA keys associated to SD3Transformer2DModel"); the same adapter as
    # --format diffusers gives the image the SAI file gives in difftune
    theirs = StableDiffusion3Pipeline.from_pretrained(str(folder))
    theirs.load_lora_weights(str(out))
    np.testing.assert_array_equal(_image(theirs), base)
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "d.safetensors"),
                 "--format", "diffusers"]) == 0
    theirs = StableDiffusion3Pipeline.from_pretrained(str(folder))
    theirs.load_lora_weights(str(tmp_path / "d.safetensors"))
    np.testing.assert_allclose(_image(theirs), _image(loaded), atol=1e-4, rtol=0)


def test_sd3_kohya_export_without_a_base_asks_for_it(tmp_path):
    pipe = tiny_sd3_pipeline()
    inject(pipe.transformer, dt.LoRAConfig(rank=2, target_modules=["add_q_proj"]), name="t")
    dt.save_adapter(pipe, tmp_path / "adapter", "t", base_model="")
    with pytest.raises(DifftuneError, match=r"--model DIR.*add_q_proj|add_q_proj.*--model DIR"):
        export_adapter(tmp_path / "adapter", tmp_path / "x.safetensors", format="kohya")
    # with a prefix: diffusers' module names under it, as before
    export_adapter(tmp_path / "adapter", tmp_path / "p.safetensors", format="kohya", prefix="lora_unet")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert "lora_unet_transformer_blocks_0_attn_add_q_proj.lora_down.weight" in f.keys()  # noqa: SIM118


def _lora(key, d_out=D, d_in=D, rank=2):
    return {f"{key}.lora_down.weight": torch.zeros(rank, d_in), f"{key}.lora_up.weight": torch.zeros(d_out, rank)}


@pytest.mark.parametrize(("tensors", "match"), [
    (_lora("lora_unet_joint_blocks_0_x_block_attn_qkvv", 3 * D), r"x_block_attn_qkvv: no such layer in SAI's SD3"),
    (_lora("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * D + 1), "97 output rows do not split"),
    (_lora("lora_unet_joint_blocks_0_x_block_attn_proj") | _lora("lora_unet_double_blocks_0_img_attn_proj"),
     r"more than one layout: (?=.*SAI SD3 \(e.g. 'lora_unet_joint_blocks_0_x_block_attn_proj'\))"
     r"(?=.*BFL Flux \(e.g. 'lora_unet_double_blocks_0_img_attn_proj'\))"),
    (_lora("lora_unet_joint_blocks_0_x_block_attn_proj") | _lora("lora_unet_transformer_blocks_0_attn_to_q"),
     r"(?=.*SAI SD3 \(e.g. 'lora_unet_joint_blocks_0)(?=.*other module names \(e.g. 'lora_unet_transformer_blocks_0)"),
    (_lora("lora_unet_joint_blocks_0_x_block_attn_proj") | _lora("diffusion_model.joint_blocks.1.x_block.attn.proj"),
     r"2 layouts: (?=.*kohya's [^;]*'lora_unet_joint_blocks_0)(?=.*ComfyUI's [^;]*'diffusion_model\.joint_blocks\.1)"),
])
def test_sai_refusals(tmp_path, tensors, match):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    pipe = tiny_sd3_pipeline()
    with pytest.raises(DifftuneError, match=match):
        dt.load_adapter(pipe, tmp_path / "bad.safetensors")
    assert not list(hosts(pipe.transformer))


def test_comfyui_dotted_sai_keys_read_as_the_kohya_ones(tmp_path):
    tensors, _ = _sai_file(tmp_path / "sai.safetensors")
    dotted = {}
    for key, value in tensors.items():
        module, part = key.split(".", 1)
        layer = next(k for k in _sai_checkpoint(False) if "lora_unet_" + k.replace(".", "_") == module)
        dotted[f"diffusion_model.{layer}.{part}"] = value
    save_file(dotted, str(tmp_path / "dotted.safetensors"))
    model = tiny_sd3_pipeline().transformer
    dt.load_adapter(model, tmp_path / "sai.safetensors", name="k")
    dt.load_adapter(model, tmp_path / "dotted.safetensors", name="c")
    k, c = _deltas(model, "k"), _deltas(model, "c")
    assert len(k) == 33 and sorted(k) == sorted(c) and all(torch.equal(k[m], c[m]) for m in k)


def test_sai_file_with_text_encoder_keys_loads_each_component(tmp_path):
    """kohya sd-scripts' SD3 files put CLIP-L, CLIP-G and T5 under lora_te1_, lora_te2_ and lora_te3_."""
    pipe = tiny_sd3_pipeline()
    g = torch.Generator().manual_seed(0)
    tensors, expected = {}, {}
    for prefix, component, leaf in (("lora_te1", "text_encoder", "layers.0.self_attn.q_proj"),
                                    ("lora_te2", "text_encoder_2", "layers.1.mlp.fc1"),
                                    ("lora_te3", "text_encoder_3", "block.0.layer.0.SelfAttention.q"),
                                    ("lora_unet", "transformer", "transformer_blocks.0.attn.to_out.0")):
        model = getattr(pipe, component)
        path = next(n for n, _ in model.named_modules() if n.endswith(leaf))
        d_out, d_in = model.get_submodule(path).weight.shape
        key = f"{prefix}_{path.replace('.', '_')}" if component != "transformer" else \
            "lora_unet_joint_blocks_0_x_block_attn_proj"
        down, up = torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(3.0)}
        expected[component] = (path, 1.5 * up @ down)
    save_file(tensors, str(tmp_path / "sd3.safetensors"))
    assert dt.load_adapter(pipe, tmp_path / "sd3.safetensors", name="s") == "s"
    for component, (path, delta) in expected.items():
        name = "s" if component == "transformer" else f"s_{component}"
        ours = _deltas(getattr(pipe, component), name)
        assert list(ours) == [path]
        torch.testing.assert_close(ours[path], delta, atol=1e-6, rtol=1e-6, msg=component)
