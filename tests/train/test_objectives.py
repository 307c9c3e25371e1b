"""Objectives users expect (issue 25, item 5): zero-terminal SNR, debiased estimation, validation prompts with their
own negative prompt, size, steps, guidance and seed; each through `difftune train` on every tiny family (SD, SDXL,
PixArt, DiT)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

import difftune as dt
import difftune.generation
from difftune.cli import main as cli_main
from difftune.config import load_config
from difftune.families import Family
from difftune.methods.plugin import Noised
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, main, trainer
from difftune.train.loss import Frozen, StepInputs
from difftune.train.objectives import configure_scheduler
from difftune.train.reporting import labelled_grid

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["sd", "sdxl", "pixart", "dit"]
OBJECTIVE = ["model.prediction_type=v_prediction", "train.zero_terminal_snr=true", "train.debiased_estimation=true",
             "train.snr_gamma=5.0"]
PROMPTS = ("validation.prompts=[{prompt: a photo of a cat, negative_prompt: blurry, width: 48, height: 32, steps: 3, "
           "guidance_scale: 2.0, seed: 7}, a red car]")


@pytest.fixture(scope="module")
def fams(tiny, tmp_path_factory):
    """The tiny SD and DiT pipelines and data of the session, plus tiny SDXL and PixArt pipelines."""
    root = tmp_path_factory.mktemp("families")
    return {**tiny, "sdxl": save_tiny_pipeline("sdxl", root / "sdxl"),
            "pixart": save_tiny_pipeline("pixart", root / "pixart")}


def _sets(fams, kind: str, out: Path, *sets: str) -> list[str]:
    data = fams["classes"] if kind == "dit" else fams["captions"]
    return [f"model.path={fams[kind]}", f"data.path={data}", f"output_dir={out}", *sets]


def _config(kind: str) -> Path:
    return REPO / "configs" / "debug" / ("tiny_dit.yaml" if kind == "dit" else "tiny_sd.yaml")


def _cfg(fams, kind: str, out: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, _config(kind), _sets(fams, kind, out, *sets))


def _spy(monkeypatch, module, name: str) -> list:
    """Record the calls of ``module.name`` (arguments and result), calling through."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_objective_setting_through_difftune_train(fams, tmp_path, monkeypatch, kind):
    import difftune.train.loss as loss_module

    runs = _spy(monkeypatch, trainer, "setup")
    weights = _spy(monkeypatch, loss_module, "snr_weights")
    images = _spy(monkeypatch, difftune.generation, "generate")
    out = tmp_path / "out"
    validation = (["validation.class_labels=[3]"] if kind == "dit" else
                  [PROMPTS, "validation.negative_prompt=ugly"])
    args = _sets(fams, kind, out, *OBJECTIVE, *validation, "validation.at_start=false")
    assert cli_main(["train", str(_config(kind)), *[a for s in args for a in ("--set", s)]]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    run = runs[0][2]
    # zero terminal SNR: the last training timestep is pure noise, and sampling starts there (trailing spacing)
    train_sched, sampler = run.frozen.noise_scheduler, run.pipe.scheduler
    assert float(train_sched.alphas_cumprod[-1]) == 0.0 and float(train_sched.alphas_cumprod[0]) > 0.99
    assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"
    assert sampler.config.prediction_type == "v_prediction"
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == sampler.config.num_train_timesteps - 1
    # ... and the adapter's users get that scheduler: saved beside it, named in the model card
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["rescale_betas_zero_snr"] and saved["timestep_spacing"] == "trailing"
    assert saved["prediction_type"] == "v_prediction" and saved["_class_name"] == type(sampler).__name__
    assert f"from_pretrained({str(out)!r}, subfolder='scheduler')" in (out / "README.md").read_text()
    # the loss weighted every step by Min-SNR × debiased estimation, for v-prediction
    assert len(weights) == 2 and all(a[2:] == ("v_prediction", 5.0, True) for a, _, _ in weights)
    assert all(w is not None and torch.isfinite(w).all() for _, _, w in weights)

    if kind == "dit":
        assert [c[1]["class_label"] for c in images] == [3]
        return
    first, second = (c[1] for c in images)
    assert first == {
        "prompt": "a photo of a cat", "negative_prompt": "blurry", "width": 48, "height": 32, "steps": 3,
        "guidance": 2.0, "seed": 7}
    assert images[0][2][0].size == (48, 32)
    assert second["negative_prompt"] == "ugly" and second["steps"] == 2 and second["seed"] == 0
    assert second["width"] is None and second["guidance"] == 4.0
    grid = Image.open(out / "validation" / "step-000002.png")
    assert grid.size[0] > 2 * 48  # rows of different sizes: the wide row sets the width (enlarged 2x)


def test_a_saved_pipeline_carries_the_zero_terminal_snr_scheduler(fams, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    result = main(_cfg(fams, "sd", out, "method={name: full}", *OBJECTIVE[:3], "train.max_steps=1",
                       "validation.prompts=[]"))
    sched = DiffusionPipeline.from_pretrained(result).scheduler.config
    assert sched.rescale_betas_zero_snr and sched.timestep_spacing == "trailing"
    assert sched.prediction_type == "v_prediction"
    assert not (out / "scheduler").exists()  # the pipeline holds it; the folder is for adapters only


def test_zero_terminal_snr_needs_v_prediction_and_a_rescalable_scheduler(fams, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`train.zero_terminal_snr`.*'epsilon'.*v_prediction"):
        main(_cfg(fams, "sd", tmp_path / "out", "train.zero_terminal_snr=true"))
    from diffusers import PNDMScheduler

    cfg = _cfg(fams, "sd", tmp_path / "out", "train.zero_terminal_snr=true", "model.prediction_type=v_prediction")
    with pytest.raises(dt.DifftuneError, match=r"`train.zero_terminal_snr`.*PNDMScheduler"):
        configure_scheduler(cfg, SimpleNamespace(scheduler=PNDMScheduler()))


def _loss(prediction: str, *sets: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The default loss of a fixed prediction at timesteps 0, 10, 500, 999, and the per-sample MSE and SNR."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction)
    cfg = load_config(TrainConfig, None, ["model.path=sd-mini", "data.path=x", "method={name: lora}", *sets])
    frozen = Frozen(None, Family(None, None), sched, torch.float32, {}, {})
    step = StepInputs({}, None, None, None, frozen, cfg, torch.device("cpu"), 0)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    noised = Noised(target, target, t, target, target, {})
    a = sched.alphas_cumprod[t].double()
    return step.loss(pred, noised), ((pred - target) ** 2).mean(dim=(1, 2, 3)).double(), a / (1 - a)


def test_debiased_estimation_weights_each_sample_as_kohya_does():
    plain, per_sample, snr = _loss("epsilon")
    assert torch.allclose(plain.double(), per_sample.mean(), rtol=1e-6)
    eps, _, _ = _loss("epsilon", "train.debiased_estimation=true")
    # ε: 1/√SNR with SNR clamped to 1000 (SNR(0) ≈ 1175 for SD's schedule: the clamp matters at t = 0)
    assert snr[0] > 1000
    expected = (per_sample / snr.clamp(max=1000).sqrt()).mean()
    assert torch.allclose(eps.double(), expected, rtol=1e-5)
    v, _, _ = _loss("v_prediction", "train.debiased_estimation=true")
    assert torch.allclose(v.double(), (per_sample / (snr.clamp(max=1000) + 1)).mean(), rtol=1e-5)
    # with Min-SNR: the two weights multiply
    both, _, _ = _loss("v_prediction", "train.debiased_estimation=true", "train.snr_gamma=5")
    min_snr = snr.clamp(max=5) / (snr + 1)
    assert torch.allclose(both.double(), (per_sample * min_snr / (snr.clamp(max=1000) + 1)).mean(), rtol=1e-5)
    assert not torch.allclose(both, v) and not torch.allclose(eps, plain)


def test_zero_terminal_snr_and_debiased_resume_bit_exactly(fams, stop_and_resume):
    sets = (*OBJECTIVE, "train.max_steps=4", "checkpointing.checkpointing_steps=2", "validation.prompts=[]")
    tensors = stop_and_resume(lambda out, *more: _cfg(fams, "sd", out, *sets, *more), 2)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_B"))


BAD_PROMPTS = [  # (validation.prompts, what the error names)
    ("[a cat, {prompt: a dog, colour: red}]", r"`validation.prompts\[1\].colour`"),
    ("[{negative_prompt: blurry}]", r"validation.prompts\[0\].prompt"),
    ("[{prompt: a cat, width: 30}]", r"`validation.prompts\[0\].width` must be a multiple of 8, got 30"),
    ("[{prompt: a cat, steps: 0}]", r"`validation.prompts\[0\].steps`"),
    ("[{prompt: a cat, guidance_scale: .nan}]", r"`validation.prompts\[0\].guidance_scale`"),
    ("[3]", r"`validation.prompts\[0\]` must be"),
]


def test_validation_prompt_items_are_checked_by_key(fams, tmp_path):
    def cfg(prompts: str) -> TrainConfig:
        return _cfg(fams, "sd", tmp_path / "out", f"validation.prompts={prompts}")

    for prompts, error in BAD_PROMPTS:
        with pytest.raises(dt.DifftuneError, match=error):
            cfg(prompts)
    # the config a run writes reads back to the same prompts
    c = cfg("[a cat, {prompt: a dog, negative_prompt: blurry, seed: 3}]")
    from difftune.config import dump_yaml

    dump_yaml(c, tmp_path / "c.yaml")
    assert load_config(TrainConfig, tmp_path / "c.yaml").validation.prompts == c.validation.prompts
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["validation"]["prompts"][0] == "a cat"


def test_negative_prompt_changes_the_image(fams):
    from difftune.generation import generate, load_pipeline

    pipe = load_pipeline(fams["sd"], "cpu")
    plain = generate(pipe, prompt="a photo of a cat", seed=0, steps=2, guidance=4.0)[0]
    negative = generate(pipe, prompt="a photo of a cat", negative_prompt="a red car", seed=0, steps=2, guidance=4.0)
    again = generate(pipe, prompt="a photo of a cat", seed=0, steps=2, guidance=4.0)[0]
    assert plain.tobytes() == again.tobytes() and plain.tobytes() != negative[0].tobytes()
    dit = load_pipeline(fams["dit"], "cpu")
    with pytest.raises(dt.DifftuneError, match="`negative_prompt`"):
        generate(dit, class_label=0, negative_prompt="x", steps=1)


def test_grid_rows_of_different_sizes():
    small, wide = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "blue")
    grid = labelled_grid([[small, small], [wide]], ["a", "b"], scale=2)
    label_w = grid.size[0] - 2 * 64  # two enlarged 32-px tiles make the widest row
    assert grid.getpixel((label_w + 95, grid.size[1] - 1)) == (0, 0, 255)  # the wide tile, enlarged to 96 px
    assert grid.getpixel((label_w + 127, grid.size[1] - 1)) == (255, 255, 255)
