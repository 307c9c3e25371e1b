"""LDM-named files (kohya's SDXL LoRAs, ComfyUI's ``diffusion_model.`` keys) on the SD1.5, SD2.1 and SDXL UNets.

The UNets are built on the meta device from difftune.architectures (shapes only); the files are written by hand with
random factors. The mapping is checked against diffusers' own LDM checkpoint converter, and each import's ΔW against
what diffusers' kohya-LoRA converter (`lora_state_dict`) reads from the same file.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import difftune as dt
from difftune.architectures import build_architecture
from difftune.interop.importer import import_file
from difftune.interop.ldm import ldm_names
from difftune.methods.verbs import hosts
from difftune.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

ARCHS = ["sd15", "sd21", "sdxl"]


@pytest.fixture(scope="module")
def unets():
    return {}


def _unet(unets, arch):
    if arch not in unets:
        unets[arch] = build_architecture(arch)
    return unets[arch]


@torch.no_grad()
def _dw(model, name):
    return {n: h.adapters[name].delta_params(h.base_params())["weight"] for n, h in hosts(model)
            if name in h.adapters}


@pytest.mark.parametrize("arch", ARCHS)
def test_ldm_names_invert_diffusers_checkpoint_converter(unets, arch):
    """diffusers' `convert_ldm_unet_checkpoint` maps each of our LDM parameter names back onto its own parameter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _unet(unets, arch)
    to_ldm = {d: ldm for ldm, d in ldm_names(unet, [n for n, _ in unet.named_modules() if n]).items()}
    params = [n for n, _ in unet.named_parameters()]
    checkpoint = {}
    for i, p in enumerate(params):
        module, _, pname = p.rpartition(".")
        checkpoint[f"model.diffusion_model.{to_ldm[module]}.{pname}"] = i  # every parameter has an LDM name
    assert convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)) == {p: i for i, p in enumerate(params)}


def _picked(unet):
    """{LDM name: diffusers name}: the first Linear/Conv2d of every LDM block, and every kind of layer once."""
    leaves = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    picked, blocks, kinds = {}, set(), set()
    for ldm, name in ldm_names(unet, leaves).items():
        depth = 3 if ldm.startswith(("input_blocks", "output_blocks")) else 2
        block = ".".join(ldm.split(".")[:depth])
        kind = re.sub(r"\d+", "#", ldm.split(".", depth)[-1]) if ldm.count(".") >= depth else ldm
        if block not in blocks or kind not in kinds:
            picked[ldm] = name
        blocks.add(block)
        kinds.add(kind)
    return picked


def _lora_file(unet, modules, path, prefix="lora_unet_", generic=False, seed=0):
    """A kohya LoRA over ``modules`` ({file module name: diffusers name}), ranks 2 and 4, α per module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (key, name) in enumerate(modules.items()):
        layer = unet.get_submodule(name)
        r = 2 + 2 * (i % 2)
        d_out, d_in, *k = layer.weight.shape
        down = torch.randn(r, d_in, *k, generator=g) * 0.05
        up = torch.randn(d_out, r, *[1] * len(k), generator=g) * 0.05
        stem = f"diffusion_model.{key}" if generic else prefix + key.replace(".", "_")
        down_key, up_key = ("lora_A.weight", "lora_B.weight") if generic and i % 2 else ("lora_down.weight",
                                                                                           "lora_up.weight")
        tensors.update({f"{stem}.{down_key}": down, f"{stem}.{up_key}": up,
                        f"{stem}.alpha": torch.tensor(float(1 + i % 3))})
    save_file(tensors, path)
    return tensors


def _diffusers_dw(path, unet_config=None):
    """{(component, peft module name): ΔW} as diffusers reads a kohya file: `lora_state_dict` (with the UNet config,
    its SGM block mapping) and its peft key conversion, scaled by each module's alpha / r as its loader does."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), unet_config=unet_config)
    out = {}
    for key, down in state.items():
        if not key.endswith("down.weight"):
            continue
        comp, _, k = key.partition(".")
        convert = convert_unet_state_dict_to_peft if comp == "unet" else \
            (lambda sd: convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd, StateDictType.DIFFUSERS_OLD)))
        module = next(iter(convert({k: down}))).removesuffix(".lora_A.weight")
        up = state[key.replace("down.weight", "up.weight")]
        alpha = alphas.get(f"{key}.alpha", alphas.get(f"{key.split('.lora.')[0]}.alpha"))
        dw = (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
        out[comp, module] = dw * (alpha / down.shape[0])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_kohya_ldm_lora_imports_as_diffusers_reads_it(unets, arch, tmp_path):
    unet = _unet(unets, arch)
    modules = _picked(unet)
    assert len(modules) > 30
    tensors = _lora_file(unet, modules, tmp_path / "ldm.safetensors")
    # diffusers' kohya converter finds a block's keys by substring, so input_blocks_1 also takes input_blocks_10/11's
    # (and pops them twice: KeyError): it reads SD1.x/2.x files only without blocks 10/11 or without block 1.
    # It is given the file in two such parts.
    late = re.compile(r"^lora_unet_(input|output)_blocks_1[01]_")
    parts = [{k: v for k, v in tensors.items() if bool(late.match(k)) == b} for b in (False, True)]
    theirs = {}
    for i, part in enumerate(p for p in parts if p):
        save_file(part, tmp_path / f"part{i}.safetensors")
        theirs.update(_diffusers_dw(tmp_path / f"part{i}.safetensors", unet.config))
    name = dt.load_adapter(unet, tmp_path / "ldm.safetensors", name="ldm")
    try:
        ours = _dw(unet, name)
        assert set(ours) == set(modules.values())
        # diffusers' kohya converter sends SD1.x/2.x's first upsampler (output_blocks.2.1.conv, an UpBlock2D without
        # attentions) to up_blocks.0.attentions.2.conv, which does not exist; its checkpoint converter (checked
        # above) and we put it on up_blocks.0.upsamplers.0.conv
        misplaced = {m for c, m in theirs if m not in ours}
        assert misplaced == ({"up_blocks.0.attentions.2.conv"} if arch != "sdxl" else set())
        compared = 0
        for (_, module), dw in theirs.items():
            if module in ours:
                assert (ours[module] - dw.view(ours[module].shape)).abs().max() <= 1e-6, module
                compared += 1
        assert compared == len(modules) - len(misplaced)
    finally:
        dt.delete_adapter(unet, name)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_comfyui_generic_keys_load_as_the_kohya_ldm_file(unets, arch, tmp_path):
    """``diffusion_model.<LDM path>.<part>`` with kohya's and peft's part names: the same ΔW as the kohya file."""
    unet = _unet(unets, arch)
    modules = dict(list(_picked(unet).items())[:12])
    _lora_file(unet, modules, tmp_path / "kohya.safetensors", seed=3)
    _lora_file(unet, modules, tmp_path / "comfy.safetensors", generic=True, seed=3)
    for file, name in (("kohya", "k"), ("comfy", "c")):
        dt.load_adapter(unet, tmp_path / f"{file}.safetensors", name=name)
    try:
        k, c = _dw(unet, "k"), _dw(unet, "c")
        assert k.keys() == c.keys() == set(modules.values()) and all(torch.equal(k[m], c[m]) for m in k)
    finally:
        dt.delete_adapter(unet, "k")
        dt.delete_adapter(unet, "c")


def test_unknown_ldm_keys_are_named_and_nothing_loads(unets, tmp_path):
    unet = _unet(unets, "sd15")
    good = "lora_unet_input_blocks_1_1_proj_in"
    bad = "lora_unet_input_blocks_12_1_proj_in"  # SD1.5 has input blocks 0-11
    save_file({f"{k}.{p}": torch.zeros(s) for k in (good, bad) for p, s in
               (("lora_down.weight", (2, 320, 1, 1)), ("lora_up.weight", (320, 2, 1, 1)))},
              tmp_path / "bad.safetensors")
    with pytest.raises(dt.DifftuneError, match=bad):
        dt.load_adapter(unet, tmp_path / "bad.safetensors")
    save_file({"diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
               "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1),
               "diffusion_model.input_blocks.1.1.proj_in.oft_weird": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(dt.DifftuneError, match=r"diffusion_model\.input_blocks\.1\.1\.proj_in\.oft_weird"):
        dt.load_adapter(unet, tmp_path / "odd.safetensors")
    assert not list(hosts(unet))


TE_LEAVES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.0.mlp.fc1"]


def _te_tensors(te, prefix, paths, g):
    tensors = {}
    for path in paths:
        mods = dict(te.named_modules())
        layer = mods.get(path) or mods.get(f"text_model.{path}") or mods[path.removeprefix("text_model.")]
        d_out, d_in = layer.weight.shape
        key = prefix + path.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": torch.randn(2, d_in, generator=g) * 0.05,
                        f"{key}.lora_up.weight": torch.randn(d_out, 2, generator=g) * 0.05,
                        f"{key}.alpha": torch.tensor(3.0)})
    return tensors


def test_sdxl_kohya_file_with_both_text_encoders(tmp_path):
    """kohya's SDXL layout: LDM UNet names with ``lora_te1_``/``lora_te2_``; each text encoder's modules in
    transformers 4's spelling (``text_model.encoder...``, what diffusers reads) or without ``text_model``."""
    pipe = tiny_sdxl_pipeline()
    unet_modules = dict(list(_picked(pipe.unet).items())[:8])
    tensors = _lora_file(pipe.unet, unet_modules, tmp_path / "unet.safetensors", seed=1)
    legacy = [f"text_model.{p}" for p in TE_LEAVES]
    for spelling, paths in (("tf4", legacy), ("tf5", TE_LEAVES)):
        file = tmp_path / f"{spelling}.safetensors"
        tensors_g = torch.Generator().manual_seed(5)
        te = {**_te_tensors(pipe.text_encoder, "lora_te1_", paths, tensors_g),
              **_te_tensors(pipe.text_encoder_2, "lora_te2_", paths, tensors_g)}
        save_file({**tensors, **te}, file)
    names = {}
    for spelling in ("tf4", "tf5"):
        dt.load_adapter(pipe, tmp_path / f"{spelling}.safetensors", name=spelling)
        names[spelling] = {c: _dw(getattr(pipe, c), spelling if c == "unet" else f"{spelling}_{c}")
                           for c in ("unet", "text_encoder", "text_encoder_2")}
    ours, other = names["tf4"], names["tf5"]
    for comp in ours:  # the two spellings are the same modules with the same ΔW
        assert ours[comp].keys() == other[comp].keys() and all(torch.equal(ours[comp][m], other[comp][m])
                                                               for m in ours[comp])
    assert len(ours["text_encoder"]) == len(ours["text_encoder_2"]) == len(TE_LEAVES)
    theirs = _diffusers_dw(tmp_path / "tf4.safetensors", pipe.unet.config)
    assert len(theirs) == len(unet_modules) + 2 * len(TE_LEAVES)
    for (comp, module), dw in theirs.items():
        mine = ours[comp][module.removeprefix("text_model.") if comp == "text_encoder" else module]
        assert (mine - dw).abs().max() <= 1e-6, (comp, module)


def test_sd1_text_encoder_in_both_spellings_and_import_file(tmp_path, sd_dir):
    pipe = tiny_sd_pipeline()
    g = torch.Generator().manual_seed(2)
    legacy = _te_tensors(pipe.text_encoder, "lora_te_", [f"text_model.{p}" for p in TE_LEAVES], g)
    save_file(legacy, tmp_path / "legacy.safetensors")
    save_file({k.replace("lora_te_text_model_", "lora_te_"): v for k, v in legacy.items()},
              tmp_path / "tf5.safetensors")
    for folder in ("legacy", "tf5"):
        written = import_file(tmp_path / f"{folder}.safetensors", sd_dir, tmp_path / folder)
        assert written == [tmp_path / folder]
        dt.load_adapter(pipe, written[0], name=folder)
    a, b = _dw(pipe.text_encoder, "legacy"), _dw(pipe.text_encoder, "tf5")
    assert a.keys() == b.keys() and len(a) == len(TE_LEAVES) and all(torch.equal(a[m], b[m]) for m in a)
    theirs = _diffusers_dw(tmp_path / "legacy.safetensors")
    assert {m.removeprefix("text_model.") for _, m in theirs} == set(a)
    assert all((a[m.removeprefix("text_model.")] - dw).abs().max() <= 1e-6 for (_, m), dw in theirs.items())
