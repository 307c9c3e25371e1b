"""One accelerate trainer for every method: ``main(cfg)`` builds, loops, checkpoints, validates and saves.

The trainer knows no method by name: it calls the hooks of the method's trainer plugin (`plugin.TrainerPlugin`:
``prepare``, ``trainable_parameters``, ``make_optimizer``, ``extra_loss``, ``on_step``, ``checkpoint_tensors``,
``save_trained``). Conditioning comes from the pipeline family (`families.py`), data from `data.py`.

Exact resume: the data order is a pure function of (seed, epoch) and augmentation of (seed, epoch, index); noise
and timesteps come from the global RNG, which accelerate's ``save_state``/``load_state`` restore; the trainable
tensors, the optimizer, the LR schedule and the EMA are checkpointed. Checkpoints hold only what trains (a
safetensors file), never the frozen base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import DENOISERS
from ..config import dump_yaml, to_dict
from ..errors import DifftuneError, bad_value
from ..fileio import atomic_write
from ..methods.model import refresh
from .config import TrainConfig
from .data import CaptionFolder, ClassFolder, DreamBoothDataset, collate
from .families import Family, family_for
from .plugin import TrainerPlugin, plugin_for

logger = logging.getLogger("difftune.train")

CHECKPOINT_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------------------
# Building


def build_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, ProjectConfiguration

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise bad_value("train.mixed_precision", "fp16", "'bf16' or 'no' on a machine without CUDA",
                        "fp16 autocast needs a GPU; bf16 works on CPUs")
    # accelerate keeps a process-wide singleton; a second main() in the same process (notebooks, tests) with
    # another precision would be refused. Reset the per-run part; the distributed setup (PartialState) stays.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # accelerate spawns several local processes only through its torchrun (multi-GPU) launcher; on a machine
        # without CUDA, run them on the CPU with gloo instead of failing (configs/accelerate/cpu_2proc.yaml).
        os.environ["ACCELERATE_USE_CPU"] = "true"
    out = Path(cfg.output_dir)
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.gradient_accumulation_steps, sync_with_dataloader=False),
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)],
    )


def load_training_pipeline(cfg: TrainConfig) -> tuple[Any, str, nn.Module]:
    """The pipeline (fp32, CPU), the denoiser's component name and the denoiser."""
    from diffusers import DiffusionPipeline

    if cfg.model.architecture:
        from ..zoo.architectures import build

        pipe = build(cfg.model.architecture, seed=cfg.seed, vae_from=cfg.model.vae_from)
    else:
        folder = Path(cfg.model.path)
        if not (folder / "model_index.json").is_file():
            raise bad_value("model.path", cfg.model.path, "a local diffusers pipeline folder with model_index.json",
                            "save one with pipe.save_pretrained(folder)")
        pipe = DiffusionPipeline.from_pretrained(str(folder), variant=cfg.model.variant, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    default = ["vae"] if cfg.train.objective == "autoencode" else list(DENOISERS)
    names = [cfg.model.component] if cfg.model.component else default
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            if cfg.model.from_scratch:
                module = _reinitialized(pipe, name, module, cfg.seed)
            return pipe, name, module
    raise bad_value("model.component", cfg.model.component, "a torch component of the pipeline (unet/transformer)")


def _reinitialized(pipe: Any, name: str, module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    fresh = type(module).from_config(module.config)
    pipe.register_modules(**{name: fresh})
    return fresh


def build_dataset(cfg: TrainConfig, family: Family) -> Any:
    d = cfg.data
    common = {"resolution": d.resolution, "center_crop": d.center_crop, "random_flip": d.random_flip,
              "repeats": d.repeats, "seed": cfg.seed}
    if cfg.train.objective == "denoise" and (d.kind == "classes") != (family.conditioning == "class"):
        want = "'classes'" if family.conditioning == "class" else "'captions' or 'dreambooth'"
        raise bad_value("data.kind", d.kind, f"{want} for {type(family.pipe).__name__}")
    if d.kind == "classes":
        return ClassFolder(d.path, **common)
    if d.kind == "dreambooth":
        return DreamBoothDataset(d.path, d.instance_prompt, class_root=d.class_path, class_prompt=d.class_prompt,
                                 **common)
    return CaptionFolder(d.path, caption_ext=d.caption_ext, default_caption=d.default_caption, **common)


def build_optimizer(cfg: TrainConfig, plugin: TrainerPlugin, params: list[nn.Parameter], lr: float) -> Any:
    own = plugin.make_optimizer(params, cfg.optimizer, lr)
    if own is not None:
        return own
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        if not torch.cuda.is_available():
            raise bad_value("optimizer.name", "adamw8bit", "'adamw' on a machine without CUDA",
                            "8-bit Adam (bitsandbytes) runs on CUDA GPUs only")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise bad_value("optimizer.name", "adamw8bit", "usable only with bitsandbytes installed",
                            "pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)


def set_attention(cfg: TrainConfig, denoiser: nn.Module) -> None:
    if cfg.train.attention == "xformers":
        if not torch.cuda.is_available():
            raise bad_value("train.attention", "xformers", "'sdpa' on a machine without CUDA",
                            "xformers kernels run on CUDA only; PyTorch SDPA is the default")
        denoiser.enable_xformers_memory_efficient_attention()


# ---------------------------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), sharded across processes


class EpochBatchSampler:
    """Batches of dataset indices for one process: epoch e shuffles with seed + e; ``start`` skips batches."""

    def __init__(self, n: int, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        self.n, self.batch_size, self.num_replicas, self.rank, self.seed = n, batch_size, num_replicas, rank, seed
        self.epoch, self.start = 0, 0
        self.per_epoch = max(1, math.ceil(n / (batch_size * num_replicas)))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_epoch - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = self.per_epoch * self.batch_size * self.num_replicas
        perm = (perm * math.ceil(total / self.n))[:total]  # wrap around so every process gets full batches
        for b in range(self.start, self.per_epoch):
            first = (b * self.num_replicas + self.rank) * self.batch_size
            yield perm[first:first + self.batch_size]


# ---------------------------------------------------------------------------------------------------------------
# The loss


@dataclass
class Frozen:
    """The parts that do not train, and what they cache."""

    pipe: Any
    family: Family
    noise_scheduler: Any
    weight_dtype: torch.dtype
    text_cache: dict[str, dict[str, Tensor]]
    latent_cache: dict[tuple[str, int], tuple[Tensor, Tensor]]


def _latents(frozen: Frozen, pixels: Tensor, keys: list[tuple[str, int]] | None) -> Tensor:
    vae = frozen.pipe.vae
    if keys is not None and all(k in frozen.latent_cache for k in keys):
        mean = torch.stack([frozen.latent_cache[k][0] for k in keys]).to(pixels.device)
        std = torch.stack([frozen.latent_cache[k][1] for k in keys]).to(pixels.device)
    else:
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        if keys is not None:
            for k, m, s in zip(keys, mean.cpu(), std.cpu()):
                frozen.latent_cache[k] = (m, s)
    latents = mean + std * torch.randn_like(mean)  # a fresh sample of the posterior every step, as diffusers does
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _condition(frozen: Frozen, batch: dict[str, Any], prefix: str, drop: Tensor, device: torch.device,
               cache: bool) -> dict[str, Tensor]:
    fam = frozen.family
    if fam.conditioning == "class":
        labels = batch["class_label"].to(device)
        return {"class_labels": torch.where(drop.to(device), fam.null_labels(labels), labels)}
    captions = ["" if d else c for c, d in zip(batch[f"{prefix}caption"], drop.tolist())]
    if not cache:
        return fam.encode(captions, device)
    missing = sorted({c for c in captions if c not in frozen.text_cache})
    if missing:
        enc = fam.encode(missing, device)
        for i, c in enumerate(missing):
            frozen.text_cache[c] = {k: v[i].cpu() for k, v in enc.items()}
    keys = frozen.text_cache[captions[0]]
    return {k: torch.stack([frozen.text_cache[c][k] for c in captions]).to(device) for k in keys}


def diffusion_loss(cfg: TrainConfig, frozen: Frozen, denoiser: nn.Module, batch: dict[str, Any],
                   device: torch.device) -> Tensor:
    """The denoising loss on one batch (instance + prior-preservation parts for DreamBooth)."""
    parts = [("", 1.0)] + ([("class_", cfg.data.prior_loss_weight)] if "class_pixel_values" in batch else [])
    total = torch.zeros((), device=device)
    for prefix, weight in parts:
        pixels = batch[f"{prefix}pixel_values"].to(device)
        keys = [(prefix, int(i)) for i in batch["index"]] if cfg.data.cache_latents else None
        latents = _latents(frozen, pixels, keys)
        drop = torch.rand(latents.shape[0]) < cfg.data.label_dropout
        cond = _condition(frozen, batch, prefix, drop, device, cfg.data.cache_text_embeddings)
        total = total + weight * _denoising_loss(cfg, frozen, denoiser, latents, cond)
    return total


def _denoising_loss(cfg: TrainConfig, frozen: Frozen, denoiser: nn.Module, latents: Tensor,
                    cond: dict[str, Tensor]) -> Tensor:
    from diffusers.training_utils import compute_snr

    sched = frozen.noise_scheduler
    noise = torch.randn_like(latents)
    if cfg.train.noise_offset:
        noise = noise + cfg.train.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                             device=latents.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = sched.add_noise(latents, noise, t)
    prediction_type = cfg.model.prediction_type or sched.config.prediction_type
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    kwargs = frozen.family.denoiser_kwargs(cond, latents)
    key = "timestep" if "timestep" in _forward_params(denoiser) else None
    pred = (denoiser(noisy, timestep=t, **kwargs) if key else denoiser(noisy, t, **kwargs)).sample
    if pred.shape[1] == 2 * latents.shape[1]:  # learned-variance models (DiT, PixArt): train the mean half
        pred = pred[:, : latents.shape[1]]
    if cfg.train.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(sched, t)
    weights = torch.clamp(snr, max=cfg.train.snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


class AutoencoderLoss(nn.Module):
    """L1 + MSE reconstruction + kl_weight · KL for training the VAE; a module so DDP sees one forward."""

    def __init__(self, vae: nn.Module, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: Tensor) -> Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(rec, pixels) + F.mse_loss(rec, pixels) + self.kl_weight * posterior.kl().mean()


@torch.no_grad()
def set_latent_scale(vae: nn.Module, dataset: Any, n: int = 512) -> float:
    """scaling_factor = 1 / std of the latents over (up to) ``n`` training images, as SD's 0.18215 was chosen."""
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(min(n, len(dataset)))])
    latents = torch.cat([vae.encode(pixels[i:i + 64].to(vae.device, vae.dtype)).latent_dist.sample()
                         for i in range(0, len(pixels), 64)])
    scale = float(1.0 / latents.float().std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def _forward_params(module: nn.Module) -> set[str]:
    import inspect

    base = getattr(module, "module", module)  # DDP-wrapped
    return set(inspect.signature(base.forward).parameters)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: only what trains (safetensors) + accelerate's optimizer/scheduler/RNG states


def checkpoint_hooks(accelerator: Any, plugin: TrainerPlugin, model: nn.Module, ema: Any,
                     progress: dict[str, Any]) -> Any:
    """Register accelerate save/load hooks; returns ``write_state(dir)``, called once a save_state has finished."""
    from safetensors.torch import load_file, save_file

    method, name = plugin.config, plugin.name

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # the frozen base is never written into a checkpoint
        if not accelerator.is_main_process:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in plugin.checkpoint_tensors(model).items()}
        if ema is not None:
            tensors.update({f"ema.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)})
        atomic_write(Path(output_dir) / CHECKPOINT_FILE, lambda tmp: save_file(tensors, tmp))

    def write_state(output_dir: Path) -> None:
        # Written after accelerate's files: a checkpoint folder without it is incomplete and is never resumed from.
        state = {"step": progress["step"], "method": method.method, "adapter_name": name,
                 "ema_step": ema.optimization_step if ema is not None else None}
        atomic_write(output_dir / STATE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        saved = load_file(str(Path(input_dir) / CHECKPOINT_FILE))
        state = json.loads((Path(input_dir) / STATE_FILE).read_text())
        live = plugin.checkpoint_tensors(model)
        problems = [f"missing {k!r}" for k in sorted(set(live) - set(saved))]
        problems += [f"{k!r}: checkpoint {tuple(saved[k].shape)}, now {tuple(v.shape)}" for k, v in live.items()
                     if k in saved and saved[k].shape != v.shape]
        if state.get("method") != method.method:
            problems.insert(0, f"method: checkpoint {state.get('method')!r}, now {method.method!r}")
        if (ema is not None) != (state.get("ema_step") is not None):
            problems.insert(0, f"train.ema: checkpoint {state.get('ema_step') is not None}, now {ema is not None}")
        if problems:
            raise DifftuneError(f"checkpoint {input_dir} does not fit this run's config ({len(problems)} "
                                f"difference(s), first: {problems[:3]}); resume with the config it was written with")
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(saved[k])
            if ema is not None:
                for i, p in enumerate(ema.shadow_params):
                    p.copy_(saved[f"ema.{i}"])
        progress["step"] = int(state["step"])
        if ema is not None and state.get("ema_step") is not None:
            ema.optimization_step = int(state["ema_step"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return write_state


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    value = cfg.checkpointing.resume_from_checkpoint
    if not value:
        return None
    if value == "latest":
        found = checkpoint_dirs(Path(cfg.output_dir))
        if not found:
            logger.warning("resume_from_checkpoint=latest: no checkpoint in %s yet; starting from step 0",
                           cfg.output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise bad_value("checkpointing.resume_from_checkpoint", value, "'latest' or an existing checkpoint folder",
                        f"checkpoints are written under {Path(cfg.output_dir) / 'checkpoints'}")
    return path


def save_checkpoint(accelerator: Any, cfg: TrainConfig, step: int, write_state: Any) -> None:
    out = Path(cfg.output_dir)
    if accelerator.is_main_process and cfg.checkpointing.checkpoints_total_limit:
        existing = checkpoint_dirs(out)
        for old in existing[: max(0, len(existing) - cfg.checkpointing.checkpoints_total_limit + 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    # Every process calls save_state: each writes its own RNG state, the main one the rest.
    folder = out / "checkpoints" / f"checkpoint-{step}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_state(folder)


def weights_digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Validation, model card, final save


@torch.no_grad()
def validate(cfg: TrainConfig, accelerator: Any, pipe: Any, family: Family, denoiser: nn.Module, step: int,
             weight_dtype: torch.dtype) -> Path | None:
    """Images for the validation prompts (or class labels) with fixed seeds, as one grid PNG; main process only."""
    from PIL import Image

    from ..generation import generate

    v = cfg.validation
    conds = v.class_labels if family.conditioning == "class" else v.prompts
    if not conds:
        return None
    was_training = denoiser.training
    denoiser.eval()
    rows = []
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    with autocast:
        for c in conds:
            kw = {"class_label": c} if family.conditioning == "class" else {"prompt": c}
            rows.append([generate(pipe, seed=s, steps=v.num_inference_steps, guidance=v.guidance_scale, **kw)[0]
                         for s in v.seeds])
    denoiser.train(was_training)
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(v.seeds), h * len(rows)))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB"), (c * w, r * h))
    path = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    if cfg.logging.report_to == "tensorboard":
        import numpy as np

        accelerator.get_tracker("tensorboard").log_images({"validation": np.asarray(grid)[None]}, step,
                                                          dataformats="NHWC")
    return path


def write_model_card(cfg: TrainConfig, result: Path, grid: Path | None, progress: dict[str, Any], digest: str) -> Path:
    import yaml

    m = cfg.method_config()
    lines = [
        "---", f"base_model: {cfg.model.path}", "library_name: difftune", f"tags: [difftune, {m.method}]", "---", "",
        f"# {m.method} trained with difftune", "",
        f"- base model: `{cfg.model.path}` (component: {cfg.model.component or 'auto'})",
        f"- method: `{m.method}`; optimizer steps: {progress['step']}; trainable-weights digest: `{digest}`",
        f"- result: `{result.name}/`",
    ]
    if progress.get("resumed"):
        lines.append(f"- resumed from {progress['resumed']}")
    if m.is_adapter:
        lines += ["", "Load it into a diffusers pipeline:", "", "```python", "import difftune as dt",
                  "from diffusers import DiffusionPipeline", "",
                  f"pipe = DiffusionPipeline.from_pretrained({cfg.model.path!r})",
                  f"dt.load_adapter(pipe, {str(result)!r}, weight=1.0)", "```"]
    if grid is not None:
        lines += ["", "## Validation samples", "", f"![samples]({grid.relative_to(Path(cfg.output_dir))})"]
    lines += ["", "## Training config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```"]
    return atomic_write(Path(cfg.output_dir) / "README.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


# ---------------------------------------------------------------------------------------------------------------
# main


def main(cfg: TrainConfig) -> Path:
    """Train ``cfg.method`` on ``cfg.model`` with ``cfg.data``; returns the saved result (adapter or pipeline)."""
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params
    from tqdm.auto import tqdm

    accelerator = build_accelerator(cfg)
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    method = cfg.method_config()
    pipe, component, denoiser = load_training_pipeline(cfg)
    family = family_for(pipe, denoiser)
    family.prepare_training()
    set_attention(cfg, denoiser)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if cfg.model.prediction_type:  # validation samples and a saved pipeline must use the trained parameterization
        pipe.scheduler.register_to_config(prediction_type=cfg.model.prediction_type)
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module):
            if name == "vae" and weight_dtype == torch.float16 and getattr(module.config, "force_upcast", False):
                module.requires_grad_(False).to(accelerator.device)  # e.g. SDXL's VAE gives NaNs in fp16
                continue
            module.requires_grad_(False)
            # (a dtype argument, even fp32, makes diffusers warn about modules to keep in fp32)
            if weight_dtype == torch.float32:
                module.to(accelerator.device)
            else:
                module.to(accelerator.device, weight_dtype)
    plugin = plugin_for(method, cfg.adapter_name)
    denoiser = plugin.prepare(pipe, denoiser)
    params = plugin.trainable_parameters(denoiser)
    if not params:
        raise DifftuneError(f"method {method.method!r} selected no trainable parameters; check its target_modules")
    cast_training_params(denoiser, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()

    dataset = build_dataset(cfg, family)
    sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, accelerator.num_processes,
                                accelerator.process_index, cfg.seed)
    # A generator of its own: otherwise each new iterator draws its worker seed from the global RNG, and a run
    # resumed mid-epoch would draw it once more than the uninterrupted run (noise and timesteps would shift).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    lr = cfg.optimizer.lr if cfg.optimizer.lr is not None else plugin.default_lr()
    if cfg.optimizer.scale_lr:
        lr *= cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(cfg, plugin, params, lr)
    if accelerator.is_main_process:
        source = "optimizer.lr" if cfg.optimizer.lr is not None else f"{method.method}'s default"
        print(f"[difftune] learning rate {lr:.3e} ({source}); {sum(p.numel() for p in params):,} trainable values",
              flush=True)
    # Accelerate steps a prepared scheduler once per process per optimizer step: scale as the diffusers scripts do.
    lr_scheduler = get_scheduler(
        cfg.schedule.name, optimizer, num_warmup_steps=cfg.schedule.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.train.max_steps * accelerator.num_processes, num_cycles=cfg.schedule.num_cycles,
        power=cfg.schedule.power)
    autoencode = cfg.train.objective == "autoencode"
    module = AutoencoderLoss(denoiser, cfg.train.kl_weight) if autoencode else denoiser
    model, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    # After prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts from the same values.
    ema = EMAModel(params, decay=cfg.train.ema_decay) if cfg.train.ema else None
    # Models were built from the same seed on every rank; from here on each rank draws its own noise and timesteps.
    set_seed(cfg.seed + accelerator.process_index)
    frozen = Frozen(pipe, family, DDPMScheduler.from_config(pipe.scheduler.config), weight_dtype, {}, {})

    progress: dict[str, Any] = {"step": 0}
    write_state = checkpoint_hooks(accelerator, plugin, denoiser, ema, progress)
    resume = resolve_resume(cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
        if cfg.logging.report_to != "none":
            accelerator.init_trackers("difftune", config=_flat(to_dict(cfg)))
    if resume is not None:
        accelerator.load_state(str(resume))
        progress["resumed"] = f"{resume.name} at step {progress['step']}"
        logger.info("resumed from %s", progress["resumed"])
    step = progress["step"]
    epoch, start = divmod(step * cfg.train.gradient_accumulation_steps, sampler.per_epoch)

    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="training",
               disable=not (accelerator.is_main_process and cfg.logging.progress_bar))
    model.train()
    while step < cfg.train.max_steps:
        sampler.set_epoch(epoch, start)
        dataset.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                if autoencode:
                    loss = model(batch["pixel_values"].to(accelerator.device))
                else:
                    loss = diffusion_loss(cfg, frozen, model, batch, accelerator.device)
                extra = plugin.extra_loss(denoiser)
                if extra is not None:
                    loss = loss + extra
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step = progress["step"] = step + 1
            if ema is not None:
                ema.step(params)
            plugin.on_step(denoiser, step, cfg.train.max_steps, optimizer)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=step)
            if cfg.checkpointing.checkpointing_steps and step % cfg.checkpointing.checkpointing_steps == 0:
                save_checkpoint(accelerator, cfg, step, write_state)
            if cfg.validation.every_steps and step % cfg.validation.every_steps == 0 and step < cfg.train.max_steps:
                if accelerator.is_main_process:
                    validate(cfg, accelerator, pipe, family, denoiser, step, weight_dtype)
                accelerator.wait_for_everyone()
            if step >= cfg.train.max_steps:
                break
        epoch, start = epoch + 1, 0
    bar.close()
    if autoencode and accelerator.is_main_process:
        logger.info("latent scaling_factor set to %.4f", set_latent_scale(denoiser, dataset))
    return _finish(cfg, accelerator, plugin, pipe, component, denoiser, family, ema, params, progress, weight_dtype)


def _finish(cfg: TrainConfig, accelerator: Any, plugin: TrainerPlugin, pipe: Any, component: str, denoiser: nn.Module,
            family: Family, ema: Any, params: list[nn.Parameter], progress: dict[str, Any],
            weight_dtype: torch.dtype) -> Path:
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # the EMA weights are the result
        refresh(denoiser)  # copy_to writes through .data, which adapters holding merged values cannot see
    method = plugin.config
    digest = weights_digest(plugin.checkpoint_tensors(denoiser))
    # Each rank reports its digest, so a distributed run can be checked for identical weights on every process.
    print(f"[difftune] rank {accelerator.process_index}: final trainable-weights digest {digest}", flush=True)
    out = Path(cfg.output_dir)
    result = out / ("adapter" if method.is_adapter else "pipeline")
    if not method.is_adapter:  # a saved pipeline keeps the precision it was loaded in, not the autocast dtype
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.to(torch.float32)
    if accelerator.is_main_process:
        result = plugin.save_trained(pipe, denoiser, result, cfg.model.path, component)
        grid = validate(cfg, accelerator, pipe, family, denoiser, progress["step"], weight_dtype)
        write_model_card(cfg, result, grid, progress, digest)
        print(f"[difftune] saved {result}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams take scalars only."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
