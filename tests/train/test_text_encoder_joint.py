"""Joint denoiser + text-encoder adapter training in one run (issue 25, item 5: ``model.train_text_encoder``,
``train.text_encoder_lr``): one adapter per component, exported together, own learning rates, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import difftune as dt
from difftune.config import load_config
from difftune.generation import load_pipeline
from difftune.interop.export import export_adapter
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, main, trainer

REPO = Path(__file__).resolve().parents[2]
JOINT = ("model.train_text_encoder=true", "optimizer.lr=0.001", "train.text_encoder_lr=0.02", "validation.prompts=[]")


@pytest.fixture(scope="module")
def fams(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    return {**tiny, "sdxl": save_tiny_pipeline("sdxl", root / "sdxl"),
            "pixart": save_tiny_pipeline("pixart", root / "pixart")}


def _cfg(fams, kind: str, out: Path, *sets: str) -> TrainConfig:
    data = fams["classes"] if kind == "dit" else fams["captions"]
    config = REPO / "configs" / "debug" / ("tiny_dit.yaml" if kind == "dit" else "tiny_sd.yaml")
    return load_config(TrainConfig, config, [f"model.path={fams[kind]}", f"data.path={data}", f"output_dir={out}",
                                             *sets])


def _trained(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors
    return tensors


@pytest.mark.parametrize("kind,method,encoders", [
    ("sd", "{name: lora, rank: 2}", ["text_encoder"]),
    ("sdxl", "{name: lora, rank: 2}", ["text_encoder", "text_encoder_2"]),
    ("pixart", "{name: lora, rank: 2}", ["text_encoder"]),
    ("sd", "{name: loha, rank: 2}", ["text_encoder"]),
])
def test_one_run_trains_the_denoiser_and_each_text_encoder(fams, tmp_path, monkeypatch, kind, method, encoders):
    runs = []
    real = trainer.setup
    monkeypatch.setattr(trainer, "setup", lambda cfg: runs.append(real(cfg)) or runs[-1])
    out = tmp_path / "out"
    result = main(_cfg(fams, kind, out, f"method={method}", *JOINT))
    assert result == out / "adapter"
    denoiser = "transformer" if kind == "pixart" else "unet"
    assert dt.serialization.read_header(result)["component"] == denoiser
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter_")) == [f"adapter_{e}"
                                                                                      for e in encoders]
    for enc in encoders:
        header = dt.serialization.read_header(out / f"adapter_{enc}")
        assert header["component"] == enc and header["name"] == f"default_{enc}"
        base = dict(getattr(load_pipeline(fams[kind], "cpu"), enc).named_parameters())
        tensors = _trained(out / f"adapter_{enc}")
        if method.startswith("{name: lora"):  # B starts at zero: non-zero means it trained
            moved = [bool(v.abs().max() > 0) for k, v in tensors.items() if k.endswith("lora_B")]
            # (SDXL reads the penultimate layer of its encoders: their last layer gets no gradient but the pooled
            # output's, which the second encoder's projection takes from its last layer)
            assert all(moved) if kind != "sdxl" else any(moved), (enc, moved)
        assert not any(k in base for k in tensors)  # adapter tensors only, never the encoder's own weights
    assert f"adapter_{encoders[0]}" in (out / "README.md").read_text()
    # two parameter groups: the denoiser's at optimizer.lr, the encoders' at train.text_encoder_lr
    run = runs[0]
    groups = run.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [0.001, 0.02]
    encoder_params = {id(p) for e in encoders for p in getattr(run.pipe, e).parameters()}
    assert all(id(p) in encoder_params for p in groups[1]["params"]) and groups[1]["params"]
    assert not any(id(p) in encoder_params for p in groups[0]["params"])


@pytest.mark.parametrize("kind,encoders", [("sd3", ["text_encoder", "text_encoder_2", "text_encoder_3"]),
                                           ("flux", ["text_encoder", "text_encoder_2"])])
def test_flow_matching_families_train_their_clip_and_t5_encoders(tmp_path, kind, encoders):
    model = save_tiny_pipeline(kind, tmp_path / kind)
    _images(tmp_path / "images")
    main(load_config(TrainConfig, REPO / "configs" / "debug" / f"tiny_{kind}.yaml", [
        f"model.path={model}", f"data.path={tmp_path / 'images'}", f"output_dir={tmp_path / 'out'}", *JOINT]))
    for enc in encoders:  # every encoder's adapter trained: the loss reaches each (SD3: both pooled CLIPs and T5)
        tensors = _trained(tmp_path / "out" / f"adapter_{enc}")
        assert all(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_B")), enc


def _images(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a cat", "a red car"][i % 2])


def test_the_two_adapters_export_together_and_load_as_trained(fams, tmp_path):
    out = tmp_path / "out"
    main(_cfg(fams, "sd", out, *JOINT, "train.max_steps=3"))
    kohya = export_adapter([out / "adapter", out / "adapter_text_encoder"], tmp_path / "both.safetensors", "kohya")
    keys = load_file(kohya.path)
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_text_model_") for k in keys)
    assert kohya.max_error == 0
    prompt = dict(prompt="a photo of a cat", num_inference_steps=2, output_type="np", guidance_scale=3.0)
    plain, ours, theirs, unet_only = (load_pipeline(fams["sd"], "cpu") for _ in range(4))
    dt.load_adapter(ours, out / "adapter")
    dt.load_adapter(ours, out / "adapter_text_encoder")
    assert set(dt.list_adapters(ours)) == {"default", "default_text_encoder"}
    dt.load_adapter(theirs, kohya.path)
    dt.load_adapter(unet_only, out / "adapter")
    base, want, got, half = (p(generator=torch.Generator().manual_seed(0), **prompt).images
                             for p in (plain, ours, theirs, unet_only))
    assert np.abs(want - half).max() > 1e-4  # the text encoder's adapter changes the image
    assert np.abs(got - want).max() <= 1e-4


def test_resume_is_bit_exact_for_both_adapters(fams, tmp_path, stop_and_resume):
    # under bf16 autocast: the encoders' adapters train in fp32, as the denoiser's
    sets = (*JOINT, "train.max_steps=4", "checkpointing.checkpointing_steps=2", "method.dropout=0.1",
            "train.mixed_precision=bf16")
    stop_and_resume(lambda out, *more: _cfg(fams, "sd", out, *sets, *more), 2)
    a, b = (_trained(tmp_path / r / "out" / "adapter_text_encoder") for r in ("a", "b"))
    assert {v.dtype for v in a.values()} == {torch.float32}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = load_file(tmp_path / "b" / "out" / "checkpoints" / "checkpoint-2" / "trainable.safetensors")
    assert any(k.startswith("text_encoder.") for k in ckpt)


@pytest.mark.parametrize("kind,sets,error", [
    ("sd", ["method={name: sara}"], r"`model.train_text_encoder`.*'sara'"),
    ("dit", [], r"`model.train_text_encoder`.*no text encoder"),
    ("sd", ["model.train_text_encoder=[text_encoder_2]"], r"`model.train_text_encoder`.*\['text_encoder_2'\]"),
    ("pixart", ["train.text_encoder_targets=[q_proj]"], r"`train.text_encoder_targets` \['q_proj'\].*SelfAttention.q"),
])
def test_what_cannot_train_a_text_encoder_is_refused(fams, tmp_path, kind, sets, error):
    with pytest.raises(dt.DifftuneError, match=error):
        main(_cfg(fams, kind, tmp_path / "out", "model.train_text_encoder=true", "validation.prompts=[]", *sets))


def test_text_encoder_settings_without_the_switch_are_refused(fams, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`train.text_encoder_lr`.*model.train_text_encoder"):
        _cfg(fams, "sd", tmp_path, "train.text_encoder_lr=0.01")
    with pytest.raises(dt.DifftuneError, match=r"`model.train_text_encoder`.*model.component"):
        _cfg(fams, "sd", tmp_path, "model.train_text_encoder=true", "model.component=text_encoder")
    with pytest.raises(dt.DifftuneError, match=r"`train.text_encoder_lr`.*positive"):
        _cfg(fams, "sd", tmp_path, "model.train_text_encoder=true", "train.text_encoder_lr=0")
    with pytest.raises(dt.DifftuneError, match="data.cache_text_embeddings"):
        main(_cfg(fams, "sd", tmp_path / "out", *JOINT, "data.cache_text_embeddings=true"))
