"""KronA interop: LoKr export that the lycoris-lora package loads, the diff format, LoKr and official imports."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import difftune as dt
from difftune.counting import inspect_adapter
from difftune.interop.krona import KronAExportWarning, export_krona, load_lokr, load_official_krona, lycoris_split
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter, tiny_unet

QKVO = ["to_q", "to_k", "to_v", "to_out.0"]


def _deltas(model, name="default"):
    return {n: h.adapters[name].delta_weight(h.base_value("weight")) for n, h in hosts(model) if name in h.adapters}


def _saved(tmp_path, config, seed=1):
    unet = tiny_unet(0)
    dt.inject(unet, config)
    randomize_adapter(unet, "default", seed=seed)
    return unet, dt.save_adapter(unet, tmp_path / "adapter")


@pytest.fixture
def lycoris_loader(monkeypatch):
    """lycoris-lora's loader over a diffusers UNet, reading our kohya ``lora_unet_*`` keys as they are written."""
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")  # its default names modules "lycoris_<path>"

    def load(path):
        network, _ = create_lycoris_from_weights(1.0, str(path), tiny_unet(0))
        return {m.lora_name: m for m in network.loras}

    return load


def test_lycoris_split_mirrors_the_package():
    from lycoris.modules.lokr import LokrModule

    checked = loadable = 0
    for d_out, d_in, kernel in [(64, 32, ()), (320, 768, ()), (24, 16, ()), (12, 18, (1, 1)), (8, 12, (3, 3))]:
        layer = nn.Conv2d(d_in, d_out, kernel) if kernel else nn.Linear(d_in, d_out)
        for a1 in [x for x in range(1, d_out + 1) if d_out % x == 0]:
            for a2 in [x for x in range(1, d_in + 1) if d_in % x == 0]:
                w1, w2 = torch.zeros(a1, a2), torch.zeros(d_out // a1, d_in // a2, *kernel)
                try:
                    with torch.no_grad():
                        LokrModule.make_module_from_state_dict("m", layer, w1, None, None, w2, None, None, None,
                                                               None, torch.tensor(1.0), None)
                    loads = True
                except RuntimeError:  # copy_ into the split it derived: size mismatch
                    loads = False
                assert loads == (lycoris_split(tuple(w1.shape), tuple(w2.shape)) == (a1, a2)), (layer, a1, a2)
                checked, loadable = checked + 1, loadable + loads
    assert checked > 300 and 10 < loadable < checked


def test_lycoris_compatible_export_loads_in_lycoris(tmp_path, lycoris_loader):
    # proj_in/proj_out of SD-style UNets are 1×1 convs: their w2 is written 4-D
    config = dt.KronAConfig(factor_mode="lycoris", scale=0.5, target_modules=[*QKVO, "proj_in", "proj_out"])
    unet, folder = _saved(tmp_path, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KronAExportWarning)
        out = export_krona(folder, tmp_path / "lokr.safetensors")
    sd = load_file(out)
    assert sd["lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w2"].dim() == 4
    assert sd["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2"].dim() == 2
    modules = lycoris_loader(out)
    ours = _deltas(unet)
    assert len(modules) == len(ours) == 40
    assert {type(m).__name__ for m in modules.values()} == {"LokrModule"}
    worst = 0.0
    for name, dw in ours.items():
        theirs, _ = modules["lora_unet_" + name.replace(".", "_")].get_diff_weight()
        worst = max(worst, (theirs.reshape(dw.shape) - dw).abs().max().item())
    assert worst <= 1e-5


def test_default_split_exports_with_a_warning_and_reimports_identically(tmp_path, lycoris_loader):
    config = dt.KronAConfig()  # (64, 8): legal on the tiny UNet's 64/32 widths, and not LyCORIS's split
    unet, folder = _saved(tmp_path, config)
    with pytest.warns(KronAExportWarning, match=r"32 of 32 modules .*lycoris-lora.*format='diff'"):
        out = export_krona(folder, tmp_path / "lokr.safetensors")
    with pytest.raises(RuntimeError, match="size"):  # the warning is true: lycoris-lora refuses the file
        lycoris_loader(out)
    fresh = tiny_unet(0)
    load_lokr(fresh, out, name="back")
    assert fresh.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").adapters["back"].config \
        .to_dict() == {**config.to_dict(), "target_modules": QKVO}
    ours, back = _deltas(unet), _deltas(fresh, "back")
    assert ours.keys() == back.keys()
    assert all(torch.equal(ours[n], back[n]) for n in ours)  # scale 1: identical ΔW, bit for bit
    x = (torch.randn(1, 4, 16, 16), torch.tensor([10]))
    kw = {"encoder_hidden_states": torch.randn(1, 7, 32)}
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x, **kw).sample, unet(*x, **kw).sample, atol=0, rtol=0)


def test_diff_export_is_exact_and_loads_in_lycoris(tmp_path, lycoris_loader):
    unet, folder = _saved(tmp_path, dt.KronAConfig(scale=1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KronAExportWarning)  # a diff file loads everywhere: no warning
        out = export_krona(folder, tmp_path / "diff.safetensors", format="diff", dtype="float32")
    modules = lycoris_loader(out)
    assert {type(m).__name__ for m in modules.values()} == {"FullModule"}
    for name, dw in _deltas(unet).items():
        theirs, _ = modules["lora_unet_" + name.replace(".", "_")].get_diff_weight()
        torch.testing.assert_close(theirs, dw, atol=1e-5, rtol=0)


def test_low_rank_lokr_imports_with_alpha_over_dim(tmp_path):
    """A LyCORIS file with a low-rank w2 (w2_a @ w2_b) and alpha ≠ dim: our ΔW equals the one lycoris applies."""
    from lycoris.modules.lokr import LokrModule

    layer = nn.Linear(64, 64)
    model = nn.Sequential()
    model.add_module("attn", nn.Module())
    model.attn.add_module("to_q", layer)
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_attn_to_q.lokr_w1": torch.randn(8, 8, generator=g),
          "lora_unet_attn_to_q.lokr_w2_a": torch.randn(8, 2, generator=g),
          "lora_unet_attn_to_q.lokr_w2_b": torch.randn(2, 8, generator=g),
          "lora_unet_attn_to_q.alpha": torch.tensor(1.0)}
    save_file(sd, tmp_path / "lowrank.safetensors")
    load_lokr(model, tmp_path / "lowrank.safetensors")
    with torch.no_grad():
        module = LokrModule.make_module_from_state_dict(
            "lora_unet_attn_to_q", layer, sd["lora_unet_attn_to_q.lokr_w1"], None, None, None,
            sd["lora_unet_attn_to_q.lokr_w2_a"], sd["lora_unet_attn_to_q.lokr_w2_b"], None, None,
            sd["lora_unet_attn_to_q.alpha"], None)
    # get_weight is what lycoris adds in its forward (get_diff_weight applies alpha/dim a second time)
    theirs = module.get_weight(module.shape)
    ours = model.attn.to_q.adapters["default"].delta_weight(model.attn.to_q.weight)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _official_forward(h, down, up):
    """IBM/DiffuseKronA ``KronALinearLayer.forward`` for 3-D inputs, re-implemented line by line."""
    a2, a1 = down.shape
    b1, b2 = up.shape
    batch, tokens, _ = h.size()
    h = h.view(-1, b2, a2).contiguous().view(-1, a2, b2).transpose(1, 2)
    out = up @ (h @ down)
    return out.view(batch, tokens, a1 * b1)


def _official_checkpoint(unet, a1, a2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj, layer in (("to_q", module.to_q), ("to_k", module.to_k), ("to_v", module.to_v),
                                ("to_out", module.to_out[0])):
                b1, b2 = layer.out_features // a1, layer.in_features // a2
                sd[f"unet.{name}.processor.{proj}_lora.down.weight"] = torch.randn(a2, a1, generator=g) / a1
                sd[f"unet.{name}.processor.{proj}_lora.up.weight"] = torch.randn(b1, b2, generator=g) * 0.1
    return sd


def test_official_checkpoint_imports_to_the_same_function(tmp_path):
    reference, ours = tiny_unet(0), tiny_unet(0)
    sd = _official_checkpoint(reference, a1=8, a2=4)
    save_file(sd, tmp_path / "pytorch_lora_weights.safetensors")
    for key in [k for k in sd if k.endswith("down.weight")]:  # the official processor: out = W x + scale·krona(x)
        path, proj = key.removeprefix("unet.").split(".processor.")
        proj = proj.split("_lora")[0]
        layer = reference.get_submodule(path + (".to_out.0" if proj == "to_out" else f".{proj}"))
        down, up = sd[key], sd[key.replace("down.weight", "up.weight")]
        layer.register_forward_hook(lambda m, inp, out, down=down, up=up: out + _official_forward(inp[0], down, up))
    load_official_krona(ours, tmp_path / "pytorch_lora_weights.safetensors")
    adapter = ours.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k").adapters["default"]
    assert adapter.config.layout == "official" and adapter.krona_A.shape == (8, 4)
    x = (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]))
    kw = {"encoder_hidden_states": torch.randn(2, 7, 32)}
    with torch.no_grad():
        base = tiny_unet(0)(*x, **kw).sample
        want, got = reference(*x, **kw).sample, ours(*x, **kw).sample
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    dt.fuse(ours)  # merging uses P(A⊗B) too
    with torch.no_grad():
        torch.testing.assert_close(ours(*x, **kw).sample, want, atol=1e-5, rtol=0)


def test_the_official_layout_is_no_canonical_kronecker_product(tmp_path):
    """P(A⊗B) = (B⊗A)·Q: its Van Loan rearrangement (a1·a2 × b1·b2 blocks) has rank > 1, so no pair (A', B') with
    kron(A', B') = P(A⊗B) exists, which is why imports keep ``layout="official"`` and export only as diff."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, generator=g), torch.randn(3, 5, generator=g)
    official = torch.kron(a, b).view(4, 3, 10).transpose(0, 1).reshape(12, 10)
    for a1, a2 in [(x, y) for x in (1, 2, 3, 4, 6, 12) for y in (1, 2, 5, 10)]:
        b1, b2 = 12 // a1, 10 // a2
        blocks = official.view(a1, b1, a2, b2).permute(0, 2, 1, 3).reshape(a1 * a2, b1 * b2)
        if (a1, a2) not in [(1, 1), (12, 10)]:  # trivial splits (one factor a scalar) always "work"
            assert torch.linalg.matrix_rank(blocks) > 1, (a1, a2)
    unet, folder = _saved(tmp_path, dt.KronAConfig(a1=8, a2=4, layout="official"))
    with pytest.raises(dt.DifftuneError, match="`format` must be 'diff'"):
        export_krona(folder, tmp_path / "x.safetensors", format="lokr")
    out = export_krona(folder, tmp_path / "diff.safetensors", format="diff")
    for name, dw in _deltas(unet).items():
        torch.testing.assert_close(load_file(out)["lora_unet_" + name.replace(".", "_") + ".diff"], dw)


def test_cli_export_and_import(tmp_path, sd_dir, capsys):
    from difftune.cli import main
    from difftune.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    unet_cfg = dt.KronAConfig(a1=16, a2=8)
    dt.inject(pipe, unet_cfg, name="subject")
    randomize_adapter(pipe.unet, "subject", seed=4)
    folder = dt.save_adapter(pipe, tmp_path / "subject")
    assert main(["export", str(folder), "--format", "lokr", "--out", str(tmp_path / "s.safetensors")]) == 0
    printed = capsys.readouterr()
    assert "wrote" in printed.out and "difftune: warning: 32 of 32 modules" in printed.err
    assert main(["import-krona", str(tmp_path / "s.safetensors"), "--model", str(sd_dir),
                 "--out", str(tmp_path / "back")]) == 0
    info = inspect_adapter(tmp_path / "back")
    assert info["method"] == "krona" and info["component"] == "unet" and info["base_model"] == str(sd_dir)
    fresh = tiny_sd_pipeline(seed=0)
    dt.load_adapter(fresh, tmp_path / "back", name="subject")
    ours, back = _deltas(pipe.unet, "subject"), _deltas(fresh.unet, "subject")
    assert ours.keys() == back.keys() and all(torch.equal(ours[n], back[n]) for n in ours)
    # official checkpoints: detected from their keys
    save_file(_official_checkpoint(fresh.unet, a1=8, a2=8), tmp_path / "official.safetensors")
    assert main(["import-krona", str(tmp_path / "official.safetensors"), "--model", str(sd_dir),
                 "--out", str(tmp_path / "official")]) == 0
    assert dt.serialization.read_header(tmp_path / "official")["config"]["layout"] == "official"
    assert main(["export", str(tmp_path / "official"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "'diff'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sd", "match"),
    [({"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1": torch.zeros(8, 8),
       "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lokr_t2": torch.zeros(2, 2)}, "Tucker"),
     ({"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_qq.lokr_w1": torch.zeros(8, 8)},
      "not in this model"),
     ({"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1": torch.zeros(8, 8),
       "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2": torch.zeros(4, 8)},
      r"does not make the Linear weight \(64, 64\)")],
)
def test_bad_lokr_files_are_refused_clearly(tmp_path, sd, match):
    save_file(sd, tmp_path / "bad.safetensors")
    unet = tiny_unet(0)
    with pytest.raises(dt.DifftuneError, match=match):
        load_lokr(unet, tmp_path / "bad.safetensors")
    assert not list(hosts(unet))


def test_official_lora_checkpoint_is_refused_with_a_hint(tmp_path):
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    save_file({f"{key}.down.weight": torch.zeros(4, 64), f"{key}.up.weight": torch.zeros(64, 4)},
              tmp_path / "lora.safetensors")
    with pytest.raises(dt.DifftuneError, match="load_lora_weights"):
        load_official_krona(tiny_unet(0), tmp_path / "lora.safetensors")


def test_export_refuses_other_methods(tmp_path):
    unet = tiny_unet(0)
    dt.inject(unet, dt.LoRAConfig(rank=2))
    folder = dt.save_adapter(unet, tmp_path / "lora")
    with pytest.raises(dt.DifftuneError, match="'krona' adapter"):
        export_krona(folder, tmp_path / "x.safetensors")
