"""What the trainer builds before its loop: the accelerator, the pipeline and its denoiser, the data set and its
loader, the optimizer.

Data order is a pure function of (seed, epoch) (`EpochBatchSampler`), so a resumed run sees the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..basemodel import BaseModel, load_base_pipeline, resolve_model
from ..components import DENOISERS
from ..errors import bad_value
from ..families import Family
from .buckets import BucketBatchSampler, describe
from .captions import CaptionOptions
from .config import TrainConfig
from .control import ControlFolder
from .data import collate
from .folders import build_folders
from .sources import IndexDataset, PromptDataset, read_prompts
from .tracking import check_trackers


def build_accelerator(cfg: TrainConfig, partially_used: bool = False) -> Any:
    """An ``accelerate.Accelerator`` for ``cfg`` (precision, accumulation, trackers, DDP options); DDP finds unused
    parameters when ``train.find_unused_parameters`` or ``partially_used`` (the plugin's `TrainerPlugin` flag) says so.
    """
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
        log_with=check_trackers(cfg.logging.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=cfg.train.find_unused_parameters or partially_used)],
    )


def load_training_pipeline(cfg: TrainConfig) -> tuple[Any, str, nn.Module]:
    """The pipeline (fp32, CPU), the denoiser's component name and the denoiser."""
    if cfg.model.architecture:
        from ..zoo.architectures import build

        pipe = build(cfg.model.architecture, seed=cfg.seed, vae_from=cfg.model.vae_from)
    else:
        pipe = load_base_pipeline(resolve_base_model(cfg), variant=cfg.model.variant, dtype=torch.float32)
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


def resolve_base_model(cfg: TrainConfig) -> BaseModel:
    """``model.path`` (with ``model.revision``, ``model.config``, ``model.variant``) resolved: a pipeline folder, a
    single-file checkpoint, a shipped model or a Hub repo id (`difftune.basemodel.resolve_model`)."""
    m = cfg.model
    return resolve_model(m.path, revision=m.revision, config=m.config, variant=m.variant)


def _reinitialized(pipe: Any, name: str, module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    fresh = type(module).from_config(module.config)
    pipe.register_modules(**{name: fresh})
    return fresh


def build_dataset(cfg: TrainConfig, family: Family) -> Any:
    """The data set ``cfg.data`` describes; its items are batched by `collate`."""
    d = cfg.data
    if d.kind == "none":
        return IndexDataset(d.num_samples)
    if d.kind == "prompts":
        if family.conditioning == "class":
            raise bad_value("data.kind", "prompts", f"'none' or 'classes' for {type(family.pipe).__name__}",
                            "the pipeline is class-conditional: it has no text encoder for prompts")
        return PromptDataset(read_prompts(d.prompts, d.prompts_file), d.repeats)
    if cfg.train.objective == "denoise" and (d.kind == "classes") != (family.conditioning == "class"):
        want = "'classes'" if family.conditioning == "class" else "'captions' or 'dreambooth'"
        raise bad_value("data.kind", d.kind, f"{want} for {type(family.pipe).__name__}")
    if d.kind != "control":
        return build_folders(cfg, family)  # one folder (data.path) or several (data.datasets)
    dataset = ControlFolder(d.path, condition=d.condition, condition_path=d.condition_path, caption_ext=d.caption_ext,
                            default_caption=d.default_caption, resolution=d.resolution, center_crop=d.center_crop,
                            random_flip=d.random_flip, repeats=d.repeats, seed=cfg.seed)
    dataset.caption_options = CaptionOptions(d.shuffle_caption, d.keep_tokens, d.caption_tag_dropout)
    return dataset


def set_attention(cfg: TrainConfig, denoiser: nn.Module) -> None:
    """Switch the denoiser to xformers attention when ``train.attention`` asks for it (PyTorch SDPA otherwise)."""
    if cfg.train.attention == "xformers":
        if not torch.cuda.is_available():
            raise bad_value("train.attention", "xformers", "'sdpa' on a machine without CUDA",
                            "xformers kernels run on CUDA only; PyTorch SDPA is the default")
        denoiser.enable_xformers_memory_efficient_attention()



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

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = self.per_epoch * self.batch_size * self.num_replicas
        perm = (perm * math.ceil(total / self.n))[:total]  # wrap around so every process gets full batches
        for b in range(self.start, self.per_epoch):
            first = (b * self.num_replicas + self.rank) * self.batch_size
            yield perm[first:first + self.batch_size]



def build_loader(cfg: TrainConfig, dataset: Any, num_processes: int,
                 rank: int) -> tuple[Any, EpochBatchSampler | BucketBatchSampler]:
    """This process's data loader and its batch sampler (call ``sampler.set_epoch`` before each epoch); with
    buckets, each batch holds one bucket, and the main process prints the bucket statistics."""
    sampler: EpochBatchSampler | BucketBatchSampler
    if getattr(dataset, "bucket_of", None) is not None:
        sampler = BucketBatchSampler(dataset.bucket_of, cfg.train.batch_size, num_processes, rank, cfg.seed)
        if rank == 0:
            print(f"[difftune] buckets: {describe(dataset.buckets, dataset.bucket_of)}; "
                  f"{sampler.n_batches} batch(es) per epoch", flush=True)
    else:
        sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, num_processes, rank, cfg.seed)
    # A generator of its own: otherwise each new iterator draws its worker seed from the global RNG, and a run
    # resumed mid-epoch would draw it once more than the uninterrupted run (noise and timesteps would shift).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler
