"""Bad compressed files and bad models to save: each a DifftuneError naming the key or field and what was expected.
Also the registry: a second replacement class registered by user code saves and loads through the same format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import difftune as dt
from difftune import DifftuneError
from difftune.compress import (
    ReplacedLinear,
    load_compressed,
    load_compressed_pipeline,
    quantize_rtn_,
    register_replacement,
    save_compressed,
)
from difftune.compress.format import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from difftune.registry import Registry
from difftune.testing import build_on_meta, dit_xl2_config, save_tiny_pipeline, tiny_dit

Q = "transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model = tiny_dit()
    quantize_rtn_(model, 4, ["to_q"])
    return save_compressed(model, tmp_path_factory.mktemp("good") / "model")


@pytest.fixture
def folder(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def _rewrite(folder: Path, tensors: dict[str, Tensor], header: Any) -> None:
    text = json.dumps(header, indent=2, sort_keys=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "difftune": text})
    (folder / CONFIG_NAME).write_text(text + "\n")


def _args(h: dict) -> dict:
    return h["modules"][Q]["args"]


# (edit of the tensors, edit of the header, the error expected)
CASES = {
    "missing key": (lambda t: t.pop(f"{Q}.scale"), None,
                    rf"missing key '{Q}\.scale' \(expected shape \(32,\), dtype float32\)"),
    "unexpected key": (lambda t: t.update({f"{Q}.weight": torch.zeros(32, 32)}), None,
                       rf"unexpected key '{Q}\.weight'"),
    "wrong shape": (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:-1].clone()}), None,
                    rf"'{Q}\.qweight': the file has shape \(511,\) dtype uint8, expected shape \(512,\) dtype uint8"),
    "wrong dtype": (lambda t: t.update({f"{Q}.scale": t[f"{Q}.scale"].half()}), None,
                    rf"'{Q}\.scale': the file has shape \(32,\) dtype float16, expected shape \(32,\) dtype float32"),
    "wrong FP dtype": (lambda t: t.update({"proj_out_2.weight": t["proj_out_2.weight"].double()}), None,
                       r"'proj_out_2\.weight': the file has shape \(32, 32\) dtype float64"),
    "args disagree with tensors": (None, lambda h: _args(h).update(out_features=64),
                                   rf"'{Q}\.qweight': the file has shape \(512,\).*expected shape \(1024,\)"),
    "unknown replacement class": (None, lambda h: h["modules"][Q].update({"class": "vq_linear_v9"}),
                                  r"`class` must be one of the registered replacement classes \[.*'rtn_linear'.*"
                                  r"got 'vq_linear_v9'"),
    "unknown model class": (None, lambda h: h.update(model_class="NoSuchTransformer"),
                            r"`model_class` must be the name of a diffusers model class.*got 'NoSuchTransformer'"),
    "model class that is a pipeline": (None, lambda h: h.update(model_class="DiTPipeline"),
                                       r"`model_class` must be the name of a diffusers model class"),
    "newer format version": (None, lambda h: h.update(format_version=FORMAT_VERSION + 1),
                             rf"format version {FORMAT_VERSION + 1}, newer than this difftune"),
    "another format": (None, lambda h: h.update(format="difftune-adapter"),
                       r"not a difftune compressed model \(format 'difftune-adapter'"),
    "bad constructor value": (None, lambda h: _args(h).update(bits=5),
                              rf"module '{Q}' \(rtn_linear\): `bits` must be one of \(2, 3, 4, 8\), got 5"),
    "unknown constructor argument": (None, lambda h: _args(h).update(group_size=128),
                                     r"do not fit RTNLinear\(in_features, out_features, bits, bias, dtype\): "
                                     r"unknown \['group_size'\]"),
    "missing constructor argument": (None, lambda h: _args(h).pop("bits"), r"missing \['bits'\]"),
    "module not in the model": (None, lambda h: h["modules"].update({"transformer_blocks.9.attn1.to_q":
                                                                     h["modules"].pop(Q)}),
                                r"replaced module 'transformer_blocks\.9\.attn1\.to_q' does not exist"),
    "malformed module entry": (None, lambda h: h["modules"].update({Q: "rtn_linear"}),
                               r"modules\['transformer_blocks\.0\.attn1\.to_q'\]` must be an object"),
    "bad dtype field": (None, lambda h: h.update(dtype="int8"), r"dtype` must be one of"),
    "bad model config": (None, lambda h: h["model_config"].update(num_layers="two"),
                         r"`model_config` does not build a DiTTransformer2DModel"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_file(folder, case):
    edit_tensors, edit_header, match = CASES[case]
    tensors = load_file(str(folder / WEIGHTS_NAME))
    header = json.loads((folder / CONFIG_NAME).read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    _rewrite(folder, tensors, header)
    with pytest.raises(DifftuneError, match=match):
        load_compressed(folder)


def test_corrupt_or_mismatched_files(folder, tmp_path):
    with pytest.raises(DifftuneError, match="no compressed model at"):
        load_compressed(tmp_path / "nowhere")
    config = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(config.replace('"quant_method": "rtn"', '"quant_method": "gptq"'))
    with pytest.raises(DifftuneError, match="compressed_config.json and the metadata of .* disagree"):
        load_compressed(folder)
    (folder / CONFIG_NAME).write_text(config[:-20])
    with pytest.raises(DifftuneError, match="compressed_config.json is not valid JSON"):
        load_compressed(folder)
    (folder / CONFIG_NAME).unlink()
    load_compressed(folder)  # the .safetensors file alone is complete
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(DifftuneError, match="truncated"):
        load_compressed(folder)
    save_file({"x": torch.zeros(1)}, str(folder / WEIGHTS_NAME))
    with pytest.raises(DifftuneError, match="has no difftune metadata"):
        load_compressed(folder)


def test_pipeline_component_must_match(good, tmp_path):
    base = save_tiny_pipeline("dit", tmp_path / "base")
    with pytest.raises(DifftuneError, match=r"the pipeline's 'vae' is a AutoencoderKL but .* holds a DiTTransformer"):
        load_compressed_pipeline(base, good, component="vae")
    with pytest.raises(DifftuneError, match=r"`component` must be one of the components"):
        load_compressed_pipeline(base, good, component="unet")
    with pytest.raises(DifftuneError, match="not a diffusers pipeline folder"):
        load_compressed_pipeline(tmp_path, good)


def test_save_refusals(tmp_path):
    with pytest.raises(DifftuneError, match=r"has no replaced \(compressed\) modules"):
        save_compressed(tiny_dit(), tmp_path / "a")
    with pytest.raises(DifftuneError, match="a diffusers model"):
        save_compressed(nn.Sequential(nn.Linear(2, 2)), tmp_path / "a")

    class MyDiT(DiTTransformer2DModel):
        pass

    with pytest.raises(DifftuneError, match="`model` must be an instance of a model class diffusers exports"):
        save_compressed(MyDiT(num_layers=1, num_attention_heads=2, attention_head_dim=8), tmp_path / "a")
    model = tiny_dit()
    quantize_rtn_(model, 4, ["to_q"])
    with pytest.raises(DifftuneError, match="drop '.safetensors'"):
        save_compressed(model, tmp_path / "model.safetensors")
    model.pos_embed.half()
    with pytest.raises(DifftuneError, match=r"several floating dtypes \['float16', 'float32'\]"):
        save_compressed(model, tmp_path / "a")
    model.float()
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_k"]))
    with pytest.raises(DifftuneError, match="carries difftune adapters"):
        save_compressed(model, tmp_path / "a")
    meta = build_on_meta(DiTTransformer2DModel, dit_xl2_config())
    quantize_rtn_(meta, 2, ["to_q"])
    with pytest.raises(DifftuneError, match="meta device"):
        save_compressed(meta, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # every refusal came before anything was written


def test_a_registered_class_round_trips_and_is_unknown_without_registration(monkeypatch, tmp_path):
    empty = Registry("replacement", plural="replacement classes", field="class")
    monkeypatch.setattr("difftune.compress.replaced.REPLACEMENTS", empty)  # the test's class does not leak

    @register_replacement("test_half_linear")
    class HalfLinear(ReplacedLinear):
        """A Linear stored in fp16: the smallest honest replaced module."""

        method = "half"

        def __init__(self, in_features: int, out_features: int, shrink: int = 0) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features - shrink  # `shrink`: a buggy class
            self.register_buffer("w16", torch.zeros(self.out_features, in_features, dtype=torch.float16))
            self.register_parameter("bias", None)

        def replacement_args(self) -> dict[str, Any]:
            return {"in_features": self.in_features, "out_features": self.out_features, "shrink": self.shrink}

        def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
            return self.w16.to(dtype or torch.float32)

    model = tiny_dit()
    layer = HalfLinear(32, 32)
    layer.shrink = 0
    layer.w16.copy_(model.transformer_blocks[0].attn1.to_v.weight.half())
    model.transformer_blocks[0].attn1.to_v = layer
    x = torch.randn(1, 4, 16, 16)
    expected = model(x, timestep=torch.tensor([10]), class_labels=torch.tensor([1])).sample
    header = json.loads((save_compressed(model, tmp_path / "half") / CONFIG_NAME).read_text())
    assert header["quant_method"] == "half"
    loaded = load_compressed(tmp_path / "half")
    assert torch.equal(loaded(x, timestep=torch.tensor([10]), class_labels=torch.tensor([1])).sample, expected)

    layer.shrink = 1  # its args now rebuild a (31, 32) layer: caught at save time, not at load time
    with pytest.raises(DifftuneError, match=r"cannot be rebuilt from its arguments.*\['w16'\]"):
        save_compressed(model, tmp_path / "buggy")
    empty = Registry("replacement", plural="replacement classes", field="class")
    monkeypatch.setattr("difftune.compress.replaced.REPLACEMENTS", empty)
    with pytest.raises(DifftuneError, match=r"`class` must be one of the registered replacement classes \[\], got "
                                            r"'test_half_linear'"):
        load_compressed(tmp_path / "half")
