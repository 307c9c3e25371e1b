"""LyCORIS/kohya layouts beyond plain LoRA/LoHa/LoKr, written by hand: Tucker LoHa/LoKr/LoCon, full with ``diff_b``,
LoCon with trained norms; diffusers ≤ 0.20 attention-processor LoRAs. Each import's ΔW is compared with what
lycoris-lora (or diffusers, for its own old format) computes from the same file; what stays unsupported is refused by
name, with nothing loaded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import difftune as dt
from difftune.interop.krona import load_lokr
from difftune.methods.verbs import hosts
from difftune.testing import tiny_sd_pipeline, tiny_unet

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 32 → 32, 3×3, with bias
CONV2 = "lora_unet_up_blocks_1_resnets_0_conv2"  # Conv2d 32 → 32, 3×3
Q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 64 → 64, no bias
FF = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 256 → 64, with bias
NORM = "lora_unet_down_blocks_0_resnets_0_norm1"  # GroupNorm(32)
LN = "lora_unet_mid_block_attentions_0_transformer_blocks_0_norm1"  # LayerNorm(64)


def _randn(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


@torch.no_grad()
def _deltas(model, name):
    return {n: h.adapters[name].delta_params(h.base_params()) for n, h in hosts(model) if name in h.adapters}


def _load(tmp_path, tensors, file="f.safetensors"):
    save_file(tensors, tmp_path / file)
    unet = tiny_unet(0)
    name = dt.load_adapter(unet, tmp_path / file, name="x")
    return unet, dt.list_adapters(unet)[name]["method"], _deltas(unet, name)


def test_tucker_loha_is_a_plain_loha(tmp_path, lycoris_loader, lycoris_error):
    g = torch.Generator().manual_seed(0)
    r = 3
    sd = {f"{CONV}.hada_t1": _randn(g, r, r, 3, 3), f"{CONV}.hada_w1_a": _randn(g, r, 32), f"{CONV}.hada_w1_b":
          _randn(g, r, 32), f"{CONV}.hada_t2": _randn(g, r, r, 3, 3), f"{CONV}.hada_w2_a": _randn(g, r, 32),
          f"{CONV}.hada_w2_b": _randn(g, r, 32), f"{CONV}.alpha": torch.tensor(2.0),
          f"{Q}.hada_w1_a": _randn(g, 64, r), f"{Q}.hada_w1_b": _randn(g, r, 64), f"{Q}.hada_w2_a": _randn(g, 64, r),
          f"{Q}.hada_w2_b": _randn(g, r, 64), f"{Q}.alpha": torch.tensor(2.0)}
    unet, method, ours = _load(tmp_path, sd)
    assert method == "loha" and len(ours) == 2
    modules = lycoris_loader(tmp_path / "f.safetensors", tiny_unet(0))
    assert modules[CONV].tucker
    assert lycoris_error(modules, ours) <= 1e-6


def test_tucker_lokr_rebuilds_its_w2(tmp_path, lycoris_error):
    """Compared with lycoris-lora's own LokrModule (Tucker w2, rank 2, its split of 32 = 4·8) holding the file's
    tensors; its file loader cannot rebuild such a module (it takes the rank from lokr_w2_a's second side)."""
    from lycoris.modules.lokr import LokrModule

    g = torch.Generator().manual_seed(1)
    sd = {f"{CONV}.lokr_w1": _randn(g, 4, 4, std=1.0), f"{CONV}.lokr_t2": _randn(g, 2, 2, 3, 3),
          f"{CONV}.lokr_w2_a": _randn(g, 2, 8), f"{CONV}.lokr_w2_b": _randn(g, 2, 8),
          f"{CONV}.alpha": torch.tensor(3.0)}
    unet, method, ours = _load(tmp_path, sd)
    assert method == "krona" and len(ours) == 1
    conv = tiny_unet(0).get_submodule("down_blocks.0.resnets.0.conv1")
    module = LokrModule(CONV, conv, 1.0, 2, 3.0, use_tucker=True, factor=4)
    assert module.tucker
    with torch.no_grad():
        for part in ("lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"):
            getattr(module, part).copy_(sd[f"{CONV}.{part}"])
    assert lycoris_error({CONV: module}, ours) <= 1e-6
    lokr = tiny_unet(0)  # `difftune import-krona`'s reader too
    load_lokr(lokr, tmp_path / "f.safetensors", name="y")
    assert lycoris_error({CONV: module}, _deltas(lokr, "y")) <= 1e-6


def test_tucker_locon_is_a_lora(tmp_path, lycoris_loader, lycoris_error):
    g = torch.Generator().manual_seed(2)
    sd = {f"{CONV}.lora_down.weight": _randn(g, 4, 32, 1, 1), f"{CONV}.lora_mid.weight": _randn(g, 4, 4, 3, 3),
          f"{CONV}.lora_up.weight": _randn(g, 32, 4, 1, 1), f"{CONV}.alpha": torch.tensor(2.0),
          f"{Q}.lora_down.weight": _randn(g, 4, 64), f"{Q}.lora_up.weight": _randn(g, 64, 4),
          f"{Q}.alpha": torch.tensor(2.0)}
    unet, method, ours = _load(tmp_path, sd)
    assert method == "lora" and len(ours) == 2
    modules = lycoris_loader(tmp_path / "f.safetensors", tiny_unet(0))
    assert modules[CONV].tucker
    assert lycoris_error(modules, ours) <= 1e-6


def test_full_with_bias_and_norms(tmp_path, lycoris_loader, lycoris_error):
    """LyCORIS full modules with ``diff_b`` and norm modules (``w_norm``/``b_norm``) import as one ``diff``
    adapter with every one of those changes, exactly."""
    g = torch.Generator().manual_seed(3)
    sd = {f"{CONV}.diff": _randn(g, 32, 32, 3, 3), f"{CONV}.diff_b": _randn(g, 32), f"{Q}.diff": _randn(g, 64, 64),
          f"{FF}.diff": _randn(g, 64, 256), f"{FF}.diff_b": _randn(g, 64),
          f"{NORM}.w_norm": _randn(g, 32), f"{NORM}.b_norm": _randn(g, 32), f"{LN}.w_norm": _randn(g, 64),
          f"{LN}.b_norm": _randn(g, 64)}
    unet, method, ours = _load(tmp_path, sd)
    assert method == "diff" and len(ours) == 5
    assert torch.equal(ours["down_blocks.0.resnets.0.conv1"]["bias"], sd[f"{CONV}.diff_b"])
    assert torch.equal(ours["down_blocks.0.resnets.0.norm1"]["weight"], sd[f"{NORM}.w_norm"])
    modules = lycoris_loader(tmp_path / "f.safetensors", tiny_unet(0))
    assert {type(m).__name__ for m in modules.values()} == {"FullModule", "NormModule"}
    assert lycoris_error(modules, ours) == 0.0


def test_locon_with_trained_norms(tmp_path, lycoris_loader, lycoris_error):
    """LoCon modules beside trained norms: one ``diff`` adapter (a component gets one method, and the norms have no
    low-rank form), each LoRA module multiplied out."""
    g = torch.Generator().manual_seed(4)
    sd = {f"{CONV2}.lora_down.weight": _randn(g, 4, 32, 3, 3), f"{CONV2}.lora_up.weight": _randn(g, 32, 4, 1, 1),
          f"{CONV2}.alpha": torch.tensor(1.0), f"{Q}.lora_down.weight": _randn(g, 2, 64),
          f"{Q}.lora_up.weight": _randn(g, 64, 2), f"{Q}.alpha": torch.tensor(2.0),
          f"{NORM}.w_norm": _randn(g, 32), f"{NORM}.b_norm": _randn(g, 32)}
    unet, method, ours = _load(tmp_path, sd)
    assert method == "diff" and len(ours) == 3
    modules = lycoris_loader(tmp_path / "f.safetensors", tiny_unet(0))
    assert {type(m).__name__ for m in modules.values()} == {"LoConModule", "NormModule"}
    # LoCon modules without bias changes: the diff adapter holds an exactly zero Δb for a layer that has a bias
    conv_bias = ours["up_blocks.1.resnets.0.conv2"].pop("bias")
    assert torch.equal(conv_bias, torch.zeros(32))
    assert lycoris_error(modules, ours) <= 1e-6


ATTENTIONS = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1",
              "up_blocks.0.attentions.1.transformer_blocks.0.attn2")


def _attn_procs_file(pipe, g, prefix="unet."):
    sd = {}
    for m in ATTENTIONS:
        for p in ("to_q", "to_k", "to_v", "to_out"):
            o, i = pipe.unet.get_submodule(f"{m}.{'to_out.0' if p == 'to_out' else p}").weight.shape
            sd[f"{prefix}{m}.processor.{p}_lora.down.weight"] = _randn(g, 4, i)
            sd[f"{prefix}{m}.processor.{p}_lora.up.weight"] = _randn(g, o, 4)
    return sd


def test_old_diffusers_attention_processor_loras(tmp_path):
    """diffusers ≤ 0.20's ``...processor.to_q_lora.down.weight`` (with or without the ``unet.`` lead) and the text
    encoder's ``to_q_lora``/``lora_linear_layer`` keys: ΔW as diffusers' own `load_lora_weights` builds it."""
    pipe = tiny_sd_pipeline()
    sd = _attn_procs_file(pipe, torch.Generator().manual_seed(5))
    save_file(sd, tmp_path / "procs.safetensors")
    save_file({k.removeprefix("unet."): v for k, v in sd.items()}, tmp_path / "bare.safetensors")
    ref = tiny_sd_pipeline()
    ref.load_lora_weights(str(tmp_path / "procs.safetensors"))
    theirs = {}
    with torch.no_grad():
        for n, m in ref.unet.named_modules():
            if hasattr(m, "lora_A") and "default_0" in m.lora_A:
                theirs[n] = m.lora_B["default_0"].weight @ m.lora_A["default_0"].weight * m.scaling["default_0"]
    assert len(theirs) == 8
    for file in ("procs", "bare"):
        unet = tiny_unet(0)
        name = dt.load_adapter(unet, tmp_path / f"{file}.safetensors", name=file)
        ours = {m: d["weight"] for m, d in _deltas(unet, name).items()}
        assert ours.keys() == theirs.keys()
        assert max(float((ours[m] - theirs[m]).abs().max()) for m in ours) <= 1e-6
    te = pipe.text_encoder
    g = torch.Generator().manual_seed(6)
    old = {}
    for path, key in (("encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.to_q_lora"),
                      ("encoder.layers.1.self_attn.out_proj", "text_model.encoder.layers.1.self_attn.to_out_lora"),
                      ("encoder.layers.0.mlp.fc1", "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer")):
        o, i = te.get_submodule(path).weight.shape
        old[f"text_encoder.{key}.down.weight"] = _randn(g, 2, i)
        old[f"text_encoder.{key}.up.weight"] = _randn(g, o, 2)
    save_file(old, tmp_path / "te.safetensors")
    dt.load_adapter(pipe, tmp_path / "te.safetensors", name="te")
    got = _deltas(pipe.text_encoder, "te")
    assert set(got) == {"encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj",
                        "encoder.layers.0.mlp.fc1"}
    q = got["encoder.layers.0.self_attn.q_proj"]["weight"]
    key = "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora"
    assert torch.allclose(q, old[f"{key}.up.weight"] @ old[f"{key}.down.weight"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("parts", "match"), [
    ({"oft_blocks": torch.zeros(4, 8, 8)}, f"{CONV}: OFT has no difftune representation"),
    ({"lokr_w1": torch.zeros(4, 4), "lokr_t1": torch.zeros(2, 2, 3, 3), "lokr_w2": torch.zeros(8, 8, 3, 3)},
     f"{CONV}: a Tucker core on LoKr's w1"),
    ({"lora_down.weight": torch.zeros(2, 32, 3, 3), "lora_up.weight": torch.zeros(32, 2, 1, 1),
      "scalar": torch.ones(1)}, f"{CONV}: LyCORIS use_scalar"),
    ({"weight": torch.zeros(32, 32, 3, 3)}, f"{CONV}: a whole replaced weight"),
    ({"hada_w1_a": torch.zeros(32, 2), "hada_w1_b": torch.zeros(2, 288), "hada_w2_a": torch.zeros(32, 2),
      "hada_w2_b": torch.zeros(2, 288), "dora_scale": torch.ones(32, 1, 1, 1)}, f"{CONV}: a DoRA magnitude"),
    ({"lora_down.weight": torch.zeros(2, 32, 3, 3), "lora_up.weight": torch.zeros(32, 2, 1, 1),
      "dora_scale": torch.ones(1, 32, 1, 1) * 2}, "wd_on_out=False"),
    ({"hada_w1_a": torch.zeros(2, 32), "hada_w1_b": torch.zeros(2, 32), "hada_t1": torch.zeros(2, 2, 3, 3)},
     f"{CONV}: a Tucker LoHa needs"),
])
def test_unsupported_layouts_are_refused_by_name(tmp_path, parts, match):
    good = {f"{Q}.lora_down.weight": torch.zeros(2, 64), f"{Q}.lora_up.weight": torch.zeros(64, 2)}
    save_file({**good, **{f"{CONV}.{p}": v for p, v in parts.items()}}, tmp_path / "bad.safetensors")
    unet = tiny_unet(0)
    with pytest.raises(dt.DifftuneError, match=match):
        dt.load_adapter(unet, tmp_path / "bad.safetensors")
    assert not list(hosts(unet))  # nothing loaded in part
