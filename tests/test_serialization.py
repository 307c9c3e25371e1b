"""The adapter format, and bad input: each a clear DifftuneError that names the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import difftune as dt
from difftune import serialization
from difftune.counting import inspect_adapter
from difftune.testing import randomize_adapter, tiny_unet

QKVO = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def saved(tmp_path):
    unet = tiny_unet()
    dt.inject(unet, dt.LoRAConfig(rank=2, target_modules=QKVO), name="style")
    randomize_adapter(unet, "style")
    return dt.save_adapter(unet, tmp_path / "style", base_model="tiny-unet")


def test_folder_layout_and_metadata(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    header = json.loads((saved / "adapter_config.json").read_text())
    assert header["method"] == "lora" and header["config"]["rank"] == 2
    assert header["base_model"] == "tiny-unet" and header["difftune_version"] == dt.__version__
    n_attn = sum(1 for n, _ in tiny_unet().named_modules() if n.endswith(".to_q"))
    assert header["target_fingerprint"]["modules"] == 4 * n_attn
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["difftune"]) == header
        keys = list(f.keys())
    assert all(".lora_A" in k or ".lora_B" in k for k in keys)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A" in keys


def test_unknown_method(saved):
    cfg = saved / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"method": "lora"', '"method": "nope"'))
    with pytest.raises(dt.DifftuneError, match=r"`method` must be one of the registered methods.*'nope'"):
        dt.load_adapter(tiny_unet(), saved)


def test_adapter_for_a_different_base(saved):
    other = tiny_unet(cross_attention_dim=48)
    with pytest.raises(dt.DifftuneError, match=r"does not match this model in \d+ place.*attn2.to_k.lora_A.*saved"):
        dt.load_adapter(other, saved)
    assert dt.list_adapters(other) == {}  # nothing half-loaded
    assert not any("adapters" in k for k in other.state_dict())


def test_fingerprint_mismatch_is_rejected(saved):
    cfg = saved / "adapter_config.json"
    header = json.loads(cfg.read_text())
    header["target_fingerprint"]["sha256"] = "0" * 64
    cfg.write_text(json.dumps(header))
    unet = tiny_unet()
    with pytest.raises(dt.DifftuneError, match="fingerprint"):
        dt.load_adapter(unet, saved)
    assert dt.list_adapters(unet) == {}


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors(saved, damage):
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    for path in (saved, f):
        with pytest.raises(dt.DifftuneError, match="adapter_model.safetensors"):
            dt.load_adapter(tiny_unet(), path)


@pytest.mark.parametrize("header", ["[1, 2]", '{"format": "difftune-adapter", "method": "lora", '
                                    '"format_version": "1.1"}'])
def test_malformed_header(saved, header):
    (saved / "adapter_config.json").write_text(header)
    with pytest.raises(dt.DifftuneError, match="not a difftune adapter|format_version"):
        dt.load_adapter(tiny_unet(), saved)


def test_loading_into_a_meta_model_is_refused(saved):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(tiny_unet().config)
    with pytest.raises(dt.DifftuneError, match="meta device"):
        dt.load_adapter(unet, saved)


def test_missing_path(tmp_path):
    with pytest.raises(dt.DifftuneError, match="no adapter at"):
        dt.load_adapter(tiny_unet(), tmp_path / "nothing")


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "kohya.safetensors")
    with pytest.raises(dt.DifftuneError, match="not written by difftune"):
        dt.load_adapter(tiny_unet(), tmp_path / "kohya.safetensors")


def test_pattern_matching_nothing_lists_existing_names():
    with pytest.raises(dt.DifftuneError, match=r"no module of UNet2DConditionModel matched.*to_qq.*to_q"):
        dt.inject(tiny_unet(), dt.LoRAConfig(target_modules=["to_qq"]))


def test_weight_given_as_a_string(saved):
    unet = tiny_unet()
    with pytest.raises(dt.DifftuneError, match=r"`weight` must be a finite number.*'0.5'"):
        dt.load_adapter(unet, saved, weight="0.5")
    dt.load_adapter(unet, saved)
    with pytest.raises(dt.DifftuneError, match=r"weights\['style'\]"):
        dt.set_adapter_weights(unet, {"style": "high"})
    with pytest.raises(dt.DifftuneError, match="`weight`"):
        dt.inject(unet, dt.LoRAConfig(target_modules=QKVO), name="x", weight=True)


def test_unsupported_module_type_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(dt.DifftuneError, match="LayerNorm"):
        dt.inject(model, dt.LoRAConfig(target_modules=["0", "1"]))


def test_duplicate_and_unknown_names(saved):
    unet = tiny_unet()
    dt.load_adapter(unet, saved)
    with pytest.raises(dt.DifftuneError, match="already loaded"):
        dt.load_adapter(unet, saved)
    with pytest.raises(dt.DifftuneError, match="'missing'"):
        dt.delete_adapter(unet, "missing")
    with pytest.raises(dt.DifftuneError, match="`name`"):
        dt.inject(unet, dt.LoRAConfig(target_modules=QKVO), name="a.b")


def test_writes_are_atomic(saved, monkeypatch):
    """A failure while writing leaves the previous adapter intact and no temp files."""
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    unet = tiny_unet()
    dt.inject(unet, dt.LoRAConfig(rank=2, target_modules=QKVO), name="style")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        dt.save_adapter(unet, saved, name="style")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_inspect(saved):
    info = inspect_adapter(saved)
    assert info["method"] == "lora" and info["base_model"] == "tiny-unet"
    assert info["parameters"] == sum(t.numel() for t in serialization.read_tensors(saved).values()) > 0
