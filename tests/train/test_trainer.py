"""The trainer: smoke runs for every method, exact resume, distributed runs, options, and bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contract import CASES  # tests/methods, on sys.path by tests/conftest.py
from safetensors.torch import load_file, save_file

import difftune as dt
from difftune.cli import main as cli_main
from difftune.config import load_config
from difftune.counting import inspect_adapter
from difftune.methods import METHODS
from difftune.train import TrainConfig, main
from difftune.train.checkpoints import weights_digest

REPO = Path(__file__).resolve().parents[2]
# How the trainer runs each method lives in its contract case (`contract.Smoke`), so a new method touches one table:
# per method, config fields, the suffix of a saved tensor that starts at zero (None: a whole pipeline is saved), the
# tiny pipelines it trains on and extra settings.
_RUNS = {m: CASES[m].smoke for m in METHODS if m in CASES and CASES[m].smoke}
SMOKE: dict[str, tuple[dict, str | None]] = {m: (s.fields, s.trained) for m, s in _RUNS.items()}
SMOKE_KINDS: dict[str, tuple[str, ...]] = {m: s.kinds for m, s in _RUNS.items()}
SMOKE_SETS: dict[str, tuple[str, ...]] = {m: s.sets for m, s in _RUNS.items()}


def _cfg(tiny, tmp_path, kind="sd", *sets: str) -> TrainConfig:
    data = tiny["classes"] if kind == "dit" else tiny["captions"]
    return load_config(TrainConfig, REPO / "configs" / "debug" / f"tiny_{kind}.yaml", [
        f"model.path={tiny[kind]}", f"data.path={data}", f"output_dir={tmp_path / 'out'}", *sets])


def test_every_method_has_a_smoke_config():
    assert set(SMOKE) == set(METHODS), "add a contract.Smoke to each registered method's contract.Case"


@pytest.mark.parametrize("kind", ["sd", "dit"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_step_smoke_run(tiny, tmp_path, kind, method):
    if kind not in SMOKE_KINDS.get(method, ("sd", "dit")):
        pytest.skip(f"{method} adapts {SMOKE_KINDS[method]} models only")
    fields = ", ".join(f"{k}: {v}" for k, v in SMOKE[method][0].items())
    cfg = _cfg(tiny, tmp_path, kind, f"method={{name: {method}{', ' + fields if fields else ''}}}",
               *SMOKE_SETS.get(method, ()))
    result = main(cfg)
    out = tmp_path / "out"
    assert (out / "config.yaml").is_file() and (out / "README.md").is_file()
    if cfg.validation.prompts:
        assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000000.png", "step-000002.png"]
    assert load_config(TrainConfig, out / "config.yaml").method["name"] == method
    if METHODS[method].is_adapter:
        assert result == out / "adapter"
        info = inspect_adapter(result)
        assert info["method"] == method and info["component"] == ("unet" if kind == "sd" else "transformer")
        tensors = dt.serialization.read_tensors(result)
        zero_at_init = SMOKE[method][1]
        if zero_at_init:
            assert any(k.endswith(zero_at_init) and v.abs().max() > 0 for k, v in tensors.items())  # it trained
        else:  # initialised from the base weights: it trained if the saved tensors left a fresh injection's values
            from diffusers import DiffusionPipeline

            from difftune.methods.verbs import adapter_tensors

            fresh = getattr(DiffusionPipeline.from_pretrained(tiny[kind]), info["component"])
            dt.inject(fresh, METHODS[method](**SMOKE[method][0]), name=info["name"])
            init = adapter_tensors(fresh, info["name"])
            assert init.keys() == tensors.keys()
            assert any(not torch.equal(init[k], tensors[k]) for k in init)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(result)
        base = DiffusionPipeline.from_pretrained(tiny[kind])
        denoiser = "unet" if kind == "sd" else "transformer"
        changed = [not torch.equal(a, b) for a, b in zip(getattr(pipe, denoiser).parameters(),
                                                          getattr(base, denoiser).parameters())]
        assert sum(changed) > len(changed) // 2


def test_resume_is_bit_exact(tiny, tmp_path):
    # 6 images, batch 2, accumulation 2: the step-2 checkpoint falls in the middle of the second epoch
    sets = ["train.max_steps=6", "checkpointing.checkpointing_steps=2", "schedule.name=cosine",
            "schedule.warmup_steps=2", "train.ema=true", "train.ema_decay=0.9", "method.dropout=0.1",
            "data.random_flip=true", "data.center_crop=false", "train.gradient_accumulation_steps=2",
            "validation.prompts=[]"]
    full_run = main(_cfg(tiny, tmp_path / "a", "sd", *sets))
    # Stop after step 2: keep only the step-2 checkpoint, in a fresh output folder, and resume from it.
    resumed_dir = tmp_path / "b" / "out"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    src = tmp_path / "a" / "out" / "checkpoints" / "checkpoint-2"
    subprocess.run(["cp", "-r", str(src), str(resumed_dir / "checkpoints")], check=True)
    torch.manual_seed(1234)  # the resumed process starts from some other RNG state
    resumed = main(_cfg(tiny, tmp_path / "b", "sd", *sets, "checkpointing.resume_from_checkpoint=latest"))
    a, b = load_file(full_run / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed from checkpoint-2 at step 2" in (resumed_dir / "README.md").read_text()
    # the checkpoint's content is what the resumed run continues from: perturb it and the result changes
    ckpt = resumed_dir / "checkpoints" / "checkpoint-2"
    state = load_file(ckpt / "trainable.safetensors")
    save_file({k: v + 1e-3 for k, v in state.items()}, ckpt / "trainable.safetensors")
    for later in ("checkpoint-4", "checkpoint-6"):
        (resumed_dir / "checkpoints" / later).rename(resumed_dir / f"old-{later}")
    perturbed = main(_cfg(tiny, tmp_path / "b", "sd", *sets, "checkpointing.resume_from_checkpoint=latest"))
    assert not all(torch.equal(a[k], v) for k, v in load_file(perturbed / "adapter_model.safetensors").items())
    # and a different stop point would not match: the check can fail
    other = main(_cfg(tiny, tmp_path / "c", "sd", *sets[:-1], "train.max_steps=5"))
    assert not all(torch.equal(a[k], v) for k, v in load_file(other / "adapter_model.safetensors").items())


def _resume_from(src: Path, root: Path) -> None:
    """A fresh output folder holding only checkpoint ``src`` (the run "stopped" there)."""
    (root / "out" / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(src), str(root / "out" / "checkpoints")], check=True)


@pytest.mark.parametrize("cache", [True, False])
def test_resume_is_bit_exact_with_cached_latents_and_text(tiny, tmp_path, capsys, cache):
    # issue 19: 6 captioned images, batch 3 (2 batches per epoch), checkpoint at step 3 (mid second epoch)
    sets = ["train.max_steps=6", "train.batch_size=3", "checkpointing.checkpointing_steps=3",
            "validation.prompts=[]", f"data.cache_latents={str(cache).lower()}",
            f"data.cache_text_embeddings={str(cache).lower()}"]
    full_run = main(_cfg(tiny, tmp_path / "a", "sd", *sets))
    _resume_from(tmp_path / "a" / "out" / "checkpoints" / "checkpoint-3", tmp_path / "b")
    torch.manual_seed(1234)
    resumed = main(_cfg(tiny, tmp_path / "b", "sd", *sets, "checkpointing.resume_from_checkpoint=latest"))
    digests = re.findall(r"final trainable-weights digest (\w+)", capsys.readouterr().out)
    assert len(digests) == 2 and digests[0] == digests[1], digests
    a, b = load_file(full_run / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_config_is_refused(tiny, tmp_path):
    main(_cfg(tiny, tmp_path, "sd", "train.max_steps=2", "checkpointing.checkpointing_steps=2",
              "validation.prompts=[]"))
    with pytest.raises(dt.DifftuneError, match=r"does not fit this run's config.*lora_A.*checkpoint \(2,"):
        main(_cfg(tiny, tmp_path, "sd", "train.max_steps=4", "method.rank=4",
                  "checkpointing.resume_from_checkpoint=latest"))
    with pytest.raises(dt.DifftuneError, match=r"train.ema: checkpoint False, now True"):
        main(_cfg(tiny, tmp_path, "sd", "train.max_steps=4", "train.ema=true",
                  "checkpointing.resume_from_checkpoint=latest"))


def test_full_bf16_saves_fp32_and_prediction_type(tiny, tmp_path):
    from diffusers import DiffusionPipeline

    result = main(_cfg(tiny, tmp_path, "sd", "method={name: full}", "train.mixed_precision=bf16",
                       "model.prediction_type=v_prediction"))
    pipe = DiffusionPipeline.from_pretrained(result)
    for name in ("vae", "text_encoder", "unet"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float32}, name
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_checkpoint_retention(tiny, tmp_path):
    main(_cfg(tiny, tmp_path, "sd", "train.max_steps=6", "checkpointing.checkpointing_steps=2",
              "checkpointing.checkpoints_total_limit=2", "validation.prompts=[]"))
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]
    files = sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "checkpoint-6").iterdir())
    assert "trainable.safetensors" in files and not any(f.startswith("model") for f in files)  # no frozen base


def test_options_dreambooth_prior_caching_snr_vpred_bf16(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, "sd", "data.kind=dreambooth", f"data.path={tiny['instance']}",
               "data.instance_prompt=a photo of sks dog", f"data.class_path={tiny['class_images']}",
               "data.class_prompt=a photo of a dog", "data.prior_loss_weight=0.5", "data.cache_latents=true",
               "data.cache_text_embeddings=true", "train.snr_gamma=5.0", "model.prediction_type=v_prediction",
               "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "train.max_steps=3",
               "optimizer.name=sgd", "optimizer.lr=0.1")
    result = main(cfg)
    tensors = dt.serialization.read_tensors(result)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # trainable weights stayed fp32 under bf16
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_cli_and_module_entry_points(tiny, tmp_path):
    out = tmp_path / "cli"
    args = [str(REPO / "configs/debug/tiny_sd.yaml"), "--set", f"model.path={tiny['sd']}", "--set",
            f"data.path={tiny['captions']}", "--set", f"output_dir={out}", "--set", "train.max_steps=1"]
    assert cli_main(["train", *args]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    proc = subprocess.run([sys.executable, "-m", "difftune.train", args[0], "--set", "train.max_steps=oops",
                           *args[1:-2]], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "`train.max_steps` must be int, got 'oops'" in proc.stderr


def _launch(tiny, out: Path, accelerate_cfg: str, steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / accelerate_cfg), "-m", "difftune.train",
           str(REPO / "configs/debug/tiny_sd.yaml"), "--set", f"model.path={tiny['sd']}", "--set",
           f"data.path={tiny['captions']}", "--set", f"output_dir={out}", "--set", f"train.max_steps={steps}",
           "--set", "logging.report_to=tensorboard", "--set", f"checkpointing.checkpointing_steps={steps}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_accelerate_launch_two_processes(tiny, tmp_path):
    out = tmp_path / "ddp"
    proc = _launch(tiny, out, "cpu_2proc.yaml", 3)
    text = proc.stdout + proc.stderr
    digests = dict(re.findall(r"rank (\d+): final trainable-weights digest (\w+)", text))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]  # both ranks ended with identical weights
    assert text.count("[difftune] saved") == 1
    # only rank 0 wrote outputs: one adapter, the step-0 and final validation grids, one event log, one card
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter", "checkpoints", "config.yaml", "logs",
                                                     "validation"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000000.png", "step-000003.png"]
    ckpt = sorted(p.name for p in (out / "checkpoints" / "checkpoint-3").iterdir())
    assert "random_states_1.pkl" in ckpt and "trainable.safetensors" in ckpt  # rank 1 keeps its RNG for resume
    adapter = dt.serialization.read_tensors(out / "adapter")
    assert weights_digest(adapter) == digests["0"]  # what rank 0 saved is what both ranks hold


# ----------------------------------------------------------------------------------------------------- bad input


def test_unknown_key_and_wrong_type(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"unknown key\(s\) `train.max_step`.*max_steps"):
        _cfg(tiny, tmp_path, "sd", "train.max_step=3")
    with pytest.raises(dt.DifftuneError, match=r"`optimizer.lr` must be float \| null, got 'fast'"):
        _cfg(tiny, tmp_path, "sd", "optimizer.lr=fast")
    with pytest.raises(dt.DifftuneError, match=r"`method` .*'lorra'"):
        _cfg(tiny, tmp_path, "sd", "method.name=lorra")
    with pytest.raises(dt.DifftuneError, match=r"in `method` \(lora\).*`rank`"):
        _cfg(tiny, tmp_path, "sd", "method.rank=0")
    with pytest.raises(dt.DifftuneError, match=r"`--set validation.prompts`.*not valid YAML"):
        _cfg(tiny, tmp_path, "sd", "validation.prompts=[a")
    with pytest.raises(dt.DifftuneError, match=r"`checkpointing.checkpoints_total_limit`.*-1"):
        _cfg(tiny, tmp_path, "sd", "checkpointing.checkpoints_total_limit=-1")
    with pytest.raises(dt.DifftuneError, match=r"`model.from_scratch`.*full"):
        _cfg(tiny, tmp_path, "sd", "model.from_scratch=true")
    assert _cfg(tiny, tmp_path, "sd", "train.mixed_precision=no").train.mixed_precision == "no"  # YAML 1.1 `no`


def test_missing_data_folder(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"data.path.*does-not-exist"):
        main(_cfg(tiny, tmp_path, "sd", f"data.path={tmp_path / 'does-not-exist'}"))


def test_empty_dataset(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(dt.DifftuneError, match="no usable images"):
        main(_cfg(tiny, tmp_path, "sd", f"data.path={tmp_path / 'empty'}"))


def test_resume_path_that_does_not_exist(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`checkpointing.resume_from_checkpoint`.*nowhere"):
        main(_cfg(tiny, tmp_path, "sd", f"checkpointing.resume_from_checkpoint={tmp_path / 'nowhere'}"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_adamw8bit_without_cuda(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match=r"`optimizer.name`.*adamw8bit.*CUDA"):
        main(_cfg(tiny, tmp_path, "sd", "optimizer.name=adamw8bit"))


def test_model_path_and_family_mismatch(tiny, tmp_path):
    with pytest.raises(dt.DifftuneError, match="model_index.json"):
        main(_cfg(tiny, tmp_path, "sd", f"model.path={tmp_path}"))
    with pytest.raises(dt.DifftuneError, match=r"`data.kind`.*'classes'"):
        main(_cfg(tiny, tmp_path, "dit", "data.kind=captions", f"data.path={tiny['captions']}"))


def test_incomplete_checkpoints_are_not_resumed_from(tmp_path):
    from difftune.train.checkpoints import STATE_FILE, checkpoint_dirs

    for step, complete in ((2, True), (4, True), (6, False)):  # a save interrupted at step 6
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / STATE_FILE).write_text("{}")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
