"""Every registered weight-space method: export → `difftune import` → the same ΔW, bit for bit, norms included.

``--format diff`` holds any method's ΔW (norm scales and biases too) and imports as a ``diff`` adapter; the methods'
own formats (kohya/diffusers LoRA, LoHa, LoKr) import back as the same method. Each adapter is trained-looking
(random, non-zero), on the tiny SD pipeline saved to disk, so the exporter and importer read the same base.
"""

from __future__ import annotations

import pytest
import torch
from contract import CASES, build, config, kinds, method_of, weight_space
from safetensors.torch import load_file, save_file
from torch import nn

import difftune as dt
from difftune.generation import load_pipeline
from difftune.interop.export import export_adapter
from difftune.interop.importer import import_file
from difftune.methods import METHODS, Site
from difftune.methods.verbs import hosts
from difftune.testing import randomize_adapter

TARGETS = ["to_q", "to_out.0", "conv1", "proj_in"]
NORMS = ["norm1", "norm2"]  # the resnets' GroupNorms and the transformer blocks' LayerNorms
#: The formats a method's own adapter comes back from bit for bit (``--format diff``: every method), and as what: an
#: SPM's kohya file is a plain rank-1 LoRA to `difftune import` (``difftune import-spm`` makes it an SPM again,
#: test_interop_spm.py).
NATIVE = {"lora": [("kohya", "lora"), ("diffusers", "lora")], "dora": [("kohya", "lora")], "loha": [("loha", "loha")],
          "spm": [("kohya", "lora")]}


def _weight_space_cases() -> list[str]:
    """The contract cases of adapter methods that run on the UNet and have a ΔW there (merge)."""
    cases = []
    for case in sorted(CASES):
        if not METHODS[method_of(case)].is_adapter or "unet" not in kinds(case):
            continue
        model = build(case, "unet")
        dt.inject(model.module, config(case, model), name="a")
        if weight_space(model.module, "a"):
            cases.append(case)
    return cases


CASES_WS = _weight_space_cases()


def test_the_registry_has_these_weight_space_methods():
    # a new weight-space method joins this test by its contract case; one that cannot be listed here fails
    assert set(CASES_WS) >= {"lora", "dora", "loha", "krona", "ia3", "sara", "spm", "diff"}


def _config(case: str):
    cls = METHODS[method_of(case)]
    fields = CASES[case].config
    norm = nn.GroupNorm(4, 32)
    probe = cls(target_modules=["x"], **fields)
    takes_norms = probe.accepts(norm) and probe.make_adapter(norm, Site("x", norm)) is not None
    return cls(target_modules=TARGETS + (NORMS if takes_norms else []), **fields)


@torch.no_grad()
def _deltas(model, name):
    return {n: {p: v.clone() for p, v in h.adapters[name].delta_params(h.base_params()).items()}
            for n, h in hosts(model) if name in h.adapters}


@pytest.fixture(scope="module")
def saved(sd_dir, tmp_path_factory):
    """{case: (adapter folder, its ΔW per module and parameter)}."""
    tmp = tmp_path_factory.mktemp("round_trip")
    out = {}
    for i, case in enumerate(CASES_WS):
        pipe = load_pipeline(sd_dir, device="cpu")
        dt.inject(pipe, _config(case), name=case)
        randomize_adapter(pipe.unet, case, seed=i, std=0.02)
        out[case] = dt.save_adapter(pipe, tmp / case, name=case, base_model=str(sd_dir)), _deltas(pipe.unet, case)
    return out


def _imported(file, sd_dir, folder):
    (written,) = import_file(file, sd_dir, folder)
    pipe = load_pipeline(sd_dir, device="cpu")
    name = dt.load_adapter(pipe, written, name="back")
    return dt.list_adapters(pipe)[name]["method"], _deltas(pipe.unet, name)


def _assert_identical(ours, back):
    """The same modules and the same Δ of each parameter, bit for bit (a parameter the file does not change for
    this module but does for others is held at exactly zero by the diff adapter)."""
    assert back.keys() == ours.keys()
    for module, params in ours.items():
        assert params.keys() <= back[module].keys(), module
        for p, value in back[module].items():
            assert torch.equal(value, params.get(p, torch.zeros_like(value))), (module, p)


@pytest.mark.parametrize("case", CASES_WS)
def test_diff_export_imports_back_bit_identically(case, saved, sd_dir, tmp_path):
    folder, ours = saved[case]
    report = export_adapter(folder, tmp_path / "diff.safetensors", "diff")
    assert report.max_error == 0.0 and report.modules == len(ours)
    method, back = _imported(report.path, sd_dir, tmp_path / "back")
    assert method == "diff"
    _assert_identical(ours, back)
    if case in ("sara", "diff"):  # norms included: GroupNorm and LayerNorm scales and shifts came back
        norms = [m for m in back if m.rsplit(".", 1)[-1] in NORMS]
        assert norms and all({"weight", "bias"} <= back[m].keys() for m in norms)
        assert any(k.endswith(".w_norm") for k in load_file(report.path))


@pytest.mark.parametrize("case", sorted(NATIVE))
def test_own_formats_import_back_bit_identically(case, saved, sd_dir, tmp_path):
    folder, ours = saved[case]
    for fmt, expected in NATIVE[case]:
        report = export_adapter(folder, tmp_path / f"{fmt}.safetensors", fmt)
        method, back = _imported(report.path, sd_dir, tmp_path / fmt)
        assert method == expected, fmt
        _assert_identical(ours, back)


def test_krona_lokr_export_imports_back_within_rounding(saved, sd_dir, tmp_path):
    """LoKr folds KronA's scale into w1 (every client applies scale 1 to full factors): kron(s·A, B) is kron(A, B)·s
    up to rounding, so this round trip is close, not bit-identical (``--format diff`` is)."""
    folder, ours = saved["krona"]
    report = export_adapter(folder, tmp_path / "lokr.safetensors", "lokr")
    method, back = _imported(report.path, sd_dir, tmp_path / "back")
    assert method == "krona" and back.keys() == ours.keys()
    assert max(float((back[m]["weight"] - ours[m]["weight"]).abs().max()) for m in ours) <= 1e-7


def test_sara_diff_with_norms_loads_directly_and_fuses(saved, sd_dir, tmp_path):
    """The file itself (no import step) loads with `load_adapter`; fused, the UNet equals the unfused one."""
    folder, ours = saved["sara"]
    report = export_adapter(folder, tmp_path / "diff.safetensors", "diff")
    pipe = load_pipeline(sd_dir, device="cpu")
    name = dt.load_adapter(pipe, report.path, name="sara_file")
    _assert_identical(ours, _deltas(pipe.unet, name))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10]))
    kw = {"encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    with torch.no_grad():
        base = pipe.unet(*args, **kw).sample
        dt.disable_adapters(pipe.unet)
        plain = pipe.unet(*args, **kw).sample
        dt.enable_adapters(pipe.unet)
        dt.fuse(pipe)
        fused = pipe.unet(*args, **kw).sample
    assert (base - plain).abs().max() > 1e-3  # the adapter (norms included) changes the output
    torch.testing.assert_close(fused, base, atol=1e-5, rtol=0)


def test_mixed_low_rank_and_norm_file_is_one_diff_adapter(tmp_path, sd_dir):
    """LoCon with trained norms (lora_down/up + w_norm/b_norm) is one `diff` adapter; with DoRA it is refused."""
    pipe = load_pipeline(sd_dir, device="cpu")
    g = torch.Generator().manual_seed(1)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    norm = "lora_unet_down_blocks_0_resnets_0_norm1"
    sd = {f"{conv}.lora_down.weight": torch.randn(2, 32, 3, 3, generator=g),
          f"{conv}.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g), f"{conv}.alpha": torch.tensor(1.0),
          f"{norm}.w_norm": torch.randn(32, generator=g), f"{norm}.b_norm": torch.randn(32, generator=g)}
    save_file(sd, tmp_path / "locon_norms.safetensors")
    name = dt.load_adapter(pipe, tmp_path / "locon_norms.safetensors")
    assert dt.list_adapters(pipe)[name]["method"] == "diff"
    back = _deltas(pipe.unet, name)
    dw = (sd[f"{conv}.lora_up.weight"].flatten(1) @ sd[f"{conv}.lora_down.weight"].flatten(1)).view(32, 32, 3, 3)
    assert torch.allclose(back["down_blocks.0.resnets.0.conv1"]["weight"], dw * 0.5, atol=1e-6, rtol=0)
    assert torch.equal(back["down_blocks.0.resnets.0.conv1"]["bias"], torch.zeros(32))
    assert torch.equal(back["down_blocks.0.resnets.0.norm1"]["weight"], sd[f"{norm}.w_norm"])
    assert torch.equal(back["down_blocks.0.resnets.0.norm1"]["bias"], sd[f"{norm}.b_norm"])
    sd[f"{conv}.dora_scale"] = torch.ones(32, 1, 1, 1)
    save_file(sd, tmp_path / "dora_norms.safetensors")
    fresh = load_pipeline(sd_dir, device="cpu")
    with pytest.raises(dt.DifftuneError, match="DoRA modules .* beside full/norm diffs"):
        dt.load_adapter(fresh, tmp_path / "dora_norms.safetensors")
    assert not list(hosts(fresh.unet))
