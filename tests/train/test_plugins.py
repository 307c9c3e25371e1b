"""Trainer plugins beyond the plain adapter: an own objective on data-free batches (exact resume included), and a
distillation student that `prepare` returns, trained against the frozen teacher and saved instead of it."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difftune as dt
from difftune.config import load_config
from difftune.methods.base import METHODS, Adapter, MethodConfig, register_method
from difftune.methods.plugin import PLUGINS, TrainerPlugin, register_plugin
from difftune.train import TrainConfig, main
from difftune.train.checkpoints import weights_digest

REPO = Path(__file__).resolve().parents[2]
TARGET = 2.0  # what the toy objective wants every output entry of the denoiser to be
SEEN: dict[str, list] = {"captions": [], "steps": [], "teacher": [], "saved_student": []}

# ----------------------------------------------------------------------------------- a method with its own objective


@dataclass
class ShiftConfig(MethodConfig):
    """A learned per-channel shift of the denoiser's output (registered by the fixture only)."""

    target_modules: list[str] = field(default_factory=lambda: ["conv_out"])

    def make_adapter(self, base_layer: nn.Module, site) -> Adapter | None:
        return ShiftAdapter(self, base_layer.out_channels)


class ShiftAdapter(Adapter):
    prefix = "shift_"

    def __init__(self, config: ShiftConfig, channels: int) -> None:
        super().__init__(config)
        self.shift_value = nn.Parameter(torch.zeros(channels))

    def forward(self, x, out, weight, base_layer, base):
        return out + weight * self.shift_value.view(1, -1, 1, 1).to(out.dtype)


class ShiftPlugin(TrainerPlugin):
    """Data-free: pushes the denoiser's output on its own random x_t toward TARGET; defers to the standard loss
    when the batch has images (the control)."""

    def objective(self, step):
        if "pixel_values" in step.batch:
            return None
        n = len(step.batch["index"])
        captions = step.batch.get("caption", [""] * n)
        SEEN["captions"] += list(captions)
        SEEN["steps"].append(step.global_step)
        x0 = torch.randn(step.latent_shape(n), device=step.device)  # the global RNG: checkpointed
        d = step.noised(x0, step.prompt_kwargs(captions, x0))
        pred = step.predict(step.model, d.noisy, d.timesteps, d.kwargs)
        return F.mse_loss(pred, torch.full_like(pred, TARGET))


# ------------------------------------------------------------------------------------ a distillation student


STUDENT_WIDTHS = [32, 32]  # the teacher's blocks are (32, 64)


def _student(teacher: nn.Module) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return type(teacher).from_config({**teacher.config, "block_out_channels": STUDENT_WIDTHS})


@dataclass
class KDConfig(MethodConfig):
    """Distil the denoiser into a narrower copy of its architecture (registered by the fixture only)."""

    target_modules: list[str] = field(default_factory=lambda: [".*"])
    is_adapter = False

    def make_adapter(self, base_layer: nn.Module, site) -> Adapter | None:
        return None


class KDPlugin(TrainerPlugin):
    def default_lr(self) -> float:
        return 3e-3

    def prepare(self, pipe, model):
        return _student(model).to(next(model.parameters()).device)

    def trainable_parameters(self, model):
        return list(model.parameters())

    def checkpoint_tensors(self, model):
        return dict(model.named_parameters())

    def objective(self, step):
        d = step.draw()  # one x_t for both
        student = step.predict(step.model, d.noisy, d.timesteps, d.kwargs)
        with torch.no_grad():
            teacher = step.predict(step.teacher, d.noisy, d.timesteps, d.kwargs)
        t = step.teacher
        SEEN["teacher"].append((t is self.teacher, t.training, any(p.requires_grad for p in t.parameters()),
                                {p.dtype for p in t.parameters()}, step.pipe.unet is step.denoiser))
        return F.mse_loss(student, teacher)

    def saved_tensors(self, model):
        return list(model.parameters())  # the student pipeline is saved whole

    def save_trained(self, pipe, model, path, base_model, component):
        SEEN["saved_student"].append(getattr(pipe, component) is model)
        pipe.save_pretrained(str(path))
        return Path(path)


@pytest.fixture
def toys():
    """Register the toy methods for one test only (the smoke matrix covers every *shipped* method)."""
    for key in SEEN:
        SEEN[key].clear()
    register_method("toy_shift")(ShiftConfig)
    register_plugin("toy_shift")(ShiftPlugin)
    register_method("toy_kd")(KDConfig)
    register_plugin("toy_kd")(KDPlugin)
    yield
    for name in ("toy_shift", "toy_kd"):
        METHODS.pop(name)
        PLUGINS.pop(name)


def _cfg(tiny, root: Path, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"output_dir={root / 'out'}", "validation.prompts=[]", *sets])


DATA_FREE = ["method={name: toy_shift}", "data.path=''", "data.label_dropout=0", "optimizer.name=sgd",
             "optimizer.lr=1.0", "optimizer.weight_decay=0"]


def _shift(adapter: Path) -> torch.Tensor:
    (value,) = [v for k, v in dt.serialization.read_tensors(adapter).items() if k.endswith("shift_value")]
    return value


# ------------------------------------------------------------------------------------------------------ tests


def test_data_free_objective_trains_and_resumes_bit_exactly(tiny, tmp_path, toys):
    sets = [*DATA_FREE, "data.kind=none", "data.num_samples=3", "train.max_steps=4",
            "checkpointing.checkpointing_steps=2"]
    full = main(_cfg(tiny, tmp_path / "a", *sets))
    # the objective was used: the output shift heads for TARGET (the diffusion loss regresses zero-mean noise)
    assert (_shift(full) > 0.75 * TARGET).all()
    assert SEEN["steps"] == [0, 1, 2, 3] and SEEN["captions"] == [""] * 8
    control = main(_cfg(tiny, tmp_path / "c", *DATA_FREE[:2], "train.max_steps=2", f"data.path={tiny['captions']}",
                        "optimizer.name=sgd", "optimizer.lr=1.0"))
    assert (_shift(control).abs() < 0.25 * TARGET).all()
    assert len(SEEN["steps"]) == 4  # the image batches went to the standard loss, not the objective

    # resume from the mid-run checkpoint in a fresh folder: bit-identical weights
    SEEN["steps"].clear()
    resumed_dir = tmp_path / "b" / "out" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "out" / "checkpoints" / "checkpoint-2"), str(resumed_dir)],
                   check=True)
    torch.manual_seed(4321)  # the resumed process starts from another RNG state
    resumed = main(_cfg(tiny, tmp_path / "b", *sets, "checkpointing.resume_from_checkpoint=latest"))
    assert SEEN["steps"] == [2, 3]  # it continued from step 2 (and x_t depends on the restored RNG)
    assert torch.equal(_shift(full), _shift(resumed))


def test_prompt_source_reads_the_list_and_the_file(tiny, tmp_path, toys):
    (tmp_path / "prompts.txt").write_text("a red car\n\n  a blue boat  \n")
    result = main(_cfg(tiny, tmp_path, *DATA_FREE, "data.kind=prompts", "data.prompts=[a photo of a cat]",
                       f"data.prompts_file={tmp_path / 'prompts.txt'}", "train.max_steps=3",
                       "data.cache_text_embeddings=true"))
    # 3 prompts, batch 2: an epoch is 2 batches (the last one wraps around); 3 steps = 6 captions
    assert len(SEEN["captions"]) == 6
    assert set(SEEN["captions"]) == {"a photo of a cat", "a red car", "a blue boat"}
    assert (_shift(result) > 0.5 * TARGET).all()


def test_student_from_prepare_is_distilled_from_the_frozen_teacher_and_saved(tiny, tmp_path, capsys, toys):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    result = main(_cfg(tiny, tmp_path, "method={name: toy_kd}", f"data.path={tiny['captions']}",
                       "train.max_steps=4", "optimizer.lr=1e-2", "train.mixed_precision=bf16",
                       "validation.prompts=[a photo of a cat]", "validation.num_inference_steps=1"))
    # the teacher: the plugin's, in eval mode, frozen, in the weight dtype; the pipeline's unet is the student
    assert SEEN["teacher"] and all(seen == (True, False, False, {torch.bfloat16}, True) for seen in SEEN["teacher"])
    assert SEEN["saved_student"] == [True]
    grids = sorted(p.name for p in (tmp_path / "out" / "validation").iterdir())
    assert grids == ["step-000000.png", "step-000004.png"]
    # what was saved is the trained student, not the teacher
    saved = UNet2DConditionModel.from_pretrained(result / "unet")
    assert list(saved.config.block_out_channels) == STUDENT_WIDTHS
    digest = re.search(r"final trainable-weights digest (\w+)", capsys.readouterr().out).group(1)
    assert weights_digest(dict(saved.named_parameters())) == digest
    # and it moved toward the teacher on inputs it never saw
    teacher = DiffusionPipeline.from_pretrained(tiny["sd"]).unet
    g = torch.Generator().manual_seed(7)
    x, states = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 7, 32, generator=g)
    t = torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        want = teacher(x, t, encoder_hidden_states=states).sample
        before = F.mse_loss(_student(teacher)(x, t, encoder_hidden_states=states).sample, want)
        after = F.mse_loss(saved(x, t, encoder_hidden_states=states).sample, want)
    assert after < 0.8 * before


# -------------------------------------------------------------------------------------------------- bad input


def test_data_free_kind_with_a_method_that_needs_images(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`data.kind`.*image data set.*'lora', got 'none'.*needs images"):
        main(_cfg(tiny, tmp_path, "method={name: lora, rank: 2}", "data.kind=none", "data.num_samples=2",
                  "data.path=''", "data.label_dropout=0"))


@pytest.mark.parametrize(("sets", "pattern"), [
    (["data.kind=none"], r"`data.num_samples`.*integer >= 1.*got None"),
    (["data.kind=none", "data.num_samples=2", "data.path=images"], r"`data.path`.*unset with data.kind 'none'"),
    (["data.kind=none", "data.num_samples=2", "data.label_dropout=0.1"], r"`data.label_dropout`"),
    (["data.kind=none", "data.num_samples=2", "data.prompts=[a]"], r"`data.prompts`.*unset with data.kind 'none'"),
    (["data.kind=prompts"], r"`data.prompts`.*at least one prompt"),
    (["data.kind=prompts", "data.prompts=[a]", "data.num_samples=3"], r"`data.num_samples`.*unset"),
    (["data.kind=prompts", "data.prompts=[a]", "data.cache_latents=true"], r"`data.cache_latents`"),
    (["data.kind=captions", "data.path=images", "data.prompts=[a]"], r"`data.prompts`.*'prompts' or 'none'"),
    (["data.kind=captions", "data.path=''"], r"`data.path`.*an image folder"),
    (["data.kind=none", "data.num_samples=2", "train.objective=autoencode", "method={name: full}",
      "model.component=vae"], r"`train.objective`.*data.kind 'none'"),
])
def test_data_free_config_errors_name_the_key(tiny, tmp_path, sets, pattern):
    free = [] if "data.kind=captions" in sets else ["data.path=''", "data.label_dropout=0"]
    with pytest.raises(dt.DifftuneError, match=pattern):
        _cfg(tiny, tmp_path, *free, *sets)


def test_prompts_file_that_does_not_exist(tiny, tmp_path, toys):
    with pytest.raises(dt.DifftuneError, match=r"`data.prompts_file`.*nowhere.txt.*does not exist"):
        main(_cfg(tiny, tmp_path, *DATA_FREE, "data.kind=prompts", f"data.prompts_file={tmp_path / 'nowhere.txt'}"))


def test_the_trainer_refuses_a_plugin_that_trains_what_it_never_saves(tiny, tmp_path, monkeypatch):
    from difftune.methods.verbs import hosts

    trainable = TrainerPlugin.trainable_parameters

    def with_biases(self, model):
        biases = [h.base_layer.bias for _, h in hosts(model) if getattr(h.base_layer, "bias", None) is not None]
        return trainable(self, model) + [b.requires_grad_(True) for b in biases]

    monkeypatch.setattr(TrainerPlugin, "trainable_parameters", with_biases)
    cfg = _cfg(tiny, tmp_path, f"data.path={tiny['captions']}", "method={name: lora, rank: 2}")
    with pytest.raises(dt.DifftuneError, match=r"method 'lora': its trainer plugin trains \d+ tensor\(s\) that its "
                                               r"saved result would not hold, e\.g\. \['[^']*base_layer\.bias'"):
        main(cfg)
    assert not (tmp_path / "out" / "adapter").exists()
