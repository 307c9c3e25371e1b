"""The compressed-model format: a 2-bit RTN tiny DiT saved and loaded into a DiTPipeline with identical output and
without its FP weights; adapters on top; every bad file a DifftuneError that names the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import difftune as dt
from difftune import DifftuneError
from difftune.compress import (
    RTNLinear,
    load_compressed,
    load_compressed_pipeline,
    quantize_rtn_,
    read_compressed_header,
    save_compressed,
    tensor_bytes,
)
from difftune.compress.format import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from difftune.generation import load_pipeline
from difftune.testing import randomize_adapter, save_tiny_pipeline, tiny_dit

BLOCK_LINEARS = [r"transformer_blocks\.\d+\.(attn1\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)|norm1\.linear)"]
FP_WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


def _sample(pipe) -> torch.Tensor:
    out = pipe(class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    return torch.from_numpy(out.images)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_pipeline("dit", tmp_path_factory.mktemp("dit") / "base")


@pytest.fixture(scope="module")
def compressed(base, tmp_path_factory):
    """(folder, the in-memory 2-bit pipeline's images, its transformer)."""
    pipe = load_pipeline(base, device="cpu")
    quantize_rtn_(pipe.transformer, 2, BLOCK_LINEARS)
    folder = save_compressed(pipe.transformer, tmp_path_factory.mktemp("c") / "dit-rtn2", base_model=str(base))
    return folder, _sample(pipe), pipe.transformer


@pytest.fixture
def base_without_fp(base, tmp_path) -> Path:
    """A copy of the base pipeline folder with the FP transformer weights deleted."""
    copy = Path(shutil.copytree(base, tmp_path / "base"))
    (copy / FP_WEIGHTS).unlink()
    return copy


def test_layout_and_header(compressed, base):
    folder, _, _ = compressed
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    header = json.loads((folder / CONFIG_NAME).read_text())
    assert header["format"] == "difftune-compressed" and header["format_version"] == FORMAT_VERSION
    assert header["quant_method"] == "rtn" and header["difftune_version"] == dt.__version__
    assert header["model_class"] == "DiTTransformer2DModel" and header["model_config"]["num_layers"] == 2
    assert header["base_model"] == str(base) and header["dtype"] == "float32"
    assert len(header["modules"]) == 14
    assert header["modules"]["transformer_blocks.0.norm1.linear"] == {
        "class": "rtn_linear", "args": {"in_features": 32, "out_features": 192, "bits": 2, "bias": True,
                                        "dtype": "float32"}}
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        assert json.loads(f.metadata()["difftune"]) == header
        keys = set(f.keys())
    assert "transformer_blocks.0.attn1.to_q.qweight" in keys and "transformer_blocks.0.attn1.to_q.weight" not in keys
    assert "pos_embed.proj.weight" in keys  # FP tensors of the modules that were kept
    assert read_compressed_header(folder / WEIGHTS_NAME) == header  # the .safetensors file alone is complete


def test_pipeline_identical_output_without_fp_weights(compressed, base_without_fp):
    folder, images, quantized = compressed
    with pytest.raises(OSError, match="diffusion_pytorch_model"):  # control: the FP weights are really gone
        DiffusionPipeline.from_pretrained(str(base_without_fp))
    pipe = load_compressed_pipeline(base_without_fp, folder)
    assert type(pipe).__name__ == "DiTPipeline"
    assert isinstance(pipe.transformer.transformer_blocks[1].ff.net[2], RTNLinear)
    loaded, state = pipe.transformer.state_dict(), quantized.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not pipe.transformer.training and pipe.transformer.pos_embed.pos_embed.device.type == "cpu"
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.tensor([3, 1000])
    with torch.no_grad():  # bit-identical, also outside the pipeline's rounding to images
        assert torch.equal(pipe.transformer(x, timestep=t, class_labels=y).sample,
                           quantized(x, timestep=t, class_labels=y).sample)
    assert torch.equal(_sample(pipe), images)


def test_load_options(compressed):
    folder, _, _ = compressed
    model = load_compressed(folder / WEIGHTS_NAME, dtype=torch.float16)
    assert model.pos_embed.proj.weight.dtype == torch.float16
    assert model.transformer_blocks[0].attn1.to_q.scale.dtype == torch.float16
    assert model.transformer_blocks[0].attn1.to_q.qweight.dtype == torch.uint8  # codes are never cast
    with pytest.raises(DifftuneError, match="`dtype` must be a floating torch.dtype"):
        load_compressed(folder, dtype="float16")


def test_file_size_2bit_vs_fp32(compressed, base):
    folder, _, _ = compressed
    fp_file, q_file = (base / FP_WEIGHTS).stat().st_size, (folder / WEIGHTS_NAME).stat().st_size
    names = read_compressed_header(folder)["modules"]
    fp = tiny_dit()
    fp_layers = sum(tensor_bytes(fp.get_submodule(n)) for n in names)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    q_layers = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[0] in names)
    # the 14 block linears: 37,824 FP32 values = 151,296 bytes; at 2 bits 9,216 code bytes + 960 rows × (fp32 scale,
    # uint8 zero point, fp32 bias) = 17,856 bytes (8.47x). The whole file shrinks less (501,304 -> 375,304 bytes):
    # most of the tiny DiT is FP tables RTN does not touch (each block's Embedding(1001, 32) and timestep MLP).
    # DiT-XL/2's block linears: see test_rtn.py (15.6x at 2 bits).
    assert (fp_layers, q_layers) == (151_296, 17_856)
    assert fp_layers / q_layers > 8 and q_file < 0.8 * fp_file, (fp_layers, q_layers, fp_file, q_file)


def test_lora_on_rtn_layers_saves_and_loads(compressed, base_without_fp, tmp_path):
    folder, images, _ = compressed
    pipe = load_compressed_pipeline(base_without_fp, folder)
    targets = dt.inject(pipe, dt.LoRAConfig(rank=2, target_modules=["to_q", "to_v", "ff.net.2"]), name="style")
    assert len(targets) == 6
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q.base_layer, RTNLinear)
    randomize_adapter(pipe.transformer, "style", std=0.3)
    with_lora = _sample(pipe)
    assert not torch.equal(with_lora, images)
    dt.save_adapter(pipe, tmp_path / "style")
    dt.set_adapter_weights(pipe, {"style": 0.0})
    assert torch.equal(_sample(pipe), images)  # weight 0: exactly the compressed model

    other = load_compressed_pipeline(base_without_fp, folder)
    dt.load_adapter(other, tmp_path / "style")
    assert torch.equal(_sample(other), with_lora)
    dt.delete_adapter(other, "style")
    assert isinstance(other.transformer.transformer_blocks[0].attn1.to_q, RTNLinear)


def test_krona_accepts_rtn_layers(compressed):
    model = load_compressed(compressed[0])
    assert len(dt.inject(model, dt.KronAConfig(a1=4, a2=4, target_modules=["to_k"]))) == 2


def test_fuse_skips_rtn_layers_and_a_named_fuse_is_a_clear_error(compressed):
    model = load_compressed(compressed[0])
    x = torch.randn(2, 4, 16, 16)
    kw = {"timestep": torch.tensor([3, 30]), "class_labels": torch.tensor([1, 2])}
    dt.inject(model, dt.LoRAConfig(rank=2, target_modules=["to_q"]))
    randomize_adapter(model, "default")
    with torch.no_grad():
        before = model(x, **kw).sample
        dt.fuse(model)  # nothing to write into: the adapter keeps running on top of the codes, same output
        assert dt.list_adapters(model)["default"]["fused"] is False
        assert torch.equal(model(x, **kw).sample, before)
    with pytest.raises(DifftuneError, match=r"'transformer_blocks\.0\.attn1\.to_q'.*RTNLinear.*no parameter"):
        dt.fuse(model, "default")
    with pytest.raises(DifftuneError, match="RTNLinear"):
        dt.merge(model, "default")
    assert dt.list_adapters(model)["default"]["fused"] is False  # a refused fuse changes nothing


def test_an_adapter_trained_on_the_fp_model_loads_onto_its_compressed_copy(compressed, tmp_path):
    from difftune.testing import tiny_dit

    fp = tiny_dit()
    dt.inject(fp, dt.LoRAConfig(rank=2, target_modules=["to_q", "ff.net.2"]), name="l")
    randomize_adapter(fp, "l", seed=4)
    dt.save_adapter(fp, tmp_path / "l", name="l")
    model = load_compressed(compressed[0])
    assert len(dt.list_adapters(model)) == 0
    dt.load_adapter(model, tmp_path / "l")  # the fingerprint sees an RTNLinear as the Linear it replaced
    assert dt.list_adapters(model)["l"]["modules"] == 4
