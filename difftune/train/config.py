"""The training config: one YAML file, one typed dataclass tree (see ``configs/`` for examples).

Names follow the diffusers training scripts where one exists (``max_grad_norm``, ``snr_gamma``, ``noise_offset``,
``checkpoints_total_limit``, ``resume_from_checkpoint``) so users find what they know.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import DifftuneError, bad_value
from ..methods.base import MethodConfig, get_method
from .valconfig import ValidationLossConfig


def check_finite(obj: Any, section: str) -> None:
    """Refuse NaN/inf in every float field of config dataclass ``obj`` (a comparison such as ``lr <= 0`` lets NaN
    through; a NaN ``max_grad_norm`` or ``noise_offset`` trains a NaN adapter). Also covers ``list[float]`` fields."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if "float" not in str(hints.get(f.name)):
            continue
        value = getattr(obj, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise bad_value(f"{section}.{f.name}", value, "a finite number",
                                "no setting means NaN or infinity; null turns an optional setting off")


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class ModelConfig:
    #: a local diffusers pipeline folder (``model_index.json`` inside), or a shipped reference model's name
    #: (``sd-mini``, ``dit-mini``: difftune/assets, found from any working directory)
    path: str = ""
    architecture: str | None = None  #: build an untrained reference pipeline instead (difftune.zoo: sd-mini, dit-mini)
    vae_from: str | None = None  #: with ``architecture``: take the trained VAE from this pipeline folder
    variant: str | None = None  #: weight variant to load, e.g. "fp16"
    component: str | None = None  #: the denoiser to train: "unet" or "transformer" (default: whichever exists)
    from_scratch: bool = False  #: re-initialize the denoiser from its config (the ``full`` method only)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  #: override the scheduler's target

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.architecture):
            raise bad_value("model.path", self.path, "a local diffusers pipeline folder (or, instead, "
                            "model.architecture for an untrained reference architecture)",
                            "e.g. model.path=sd-mini (a shipped reference model) or a folder written by "
                            "save_pretrained")


IMAGE_KINDS = ("captions", "dreambooth", "classes", "control")
DATA_FREE_KINDS = ("prompts", "none")  #: for methods whose trainer plugin has its own objective (no images)


@dataclass
class DataConfig:
    #: captions / dreambooth / classes: image folders at ``path``. prompts: captions only (``prompts`` and/or
    #: ``prompts_file``); none: indices only (``num_samples`` per epoch). The data-free kinds serve methods whose
    #: trainer plugin defines its own objective (e.g. data-free concept erasing).
    kind: Literal["captions", "dreambooth", "classes", "prompts", "none", "control"] = "captions"
    path: str = ""  #: image folder (captions: .txt beside each image or metadata.jsonl; classes: one folder per class)
    prompts: list[str] = field(default_factory=list)  #: kind prompts: the captions, in order
    prompts_file: str | None = None  #: kind prompts: a UTF-8 text file, one caption per line (blank lines skipped)
    num_samples: int | None = None  #: kind none: items per epoch (each item is its index)
    instance_prompt: str | None = None  #: DreamBooth: the prompt for every instance image ("a photo of sks dog")
    class_path: str | None = None  #: DreamBooth prior preservation: folder of class images
    class_prompt: str | None = None  #: DreamBooth prior preservation: their prompt ("a photo of a dog")
    prior_loss_weight: float = 1.0  #: weight of the prior-preservation loss
    default_caption: str | None = None  #: caption for images that have none
    caption_ext: str = ".txt"
    resolution: int = 512  #: images are resized (shorter side) and cropped to this size (data-free: sampled at it)
    center_crop: bool = True  #: center crop (else random crop)
    random_flip: bool = False  #: random horizontal flip
    repeats: int = 1  #: repeat the dataset this many times per epoch
    label_dropout: float = 0.0  #: probability of replacing a caption by "" (class by the null class), for CFG
    cache_latents: bool = False  #: encode every image with the VAE once (needs center crop and no flip)
    cache_text_embeddings: bool = False  #: encode every caption once
    num_workers: int = 0  #: dataloader workers
    #: kind control (captioned images with a condition image each, for SCEdit's CSC-Tuner): an extractor applied to
    #: each augmented image (difftune.methods.scedit: canny, sobel, outline, skeleton), or ``condition_path``
    condition: str | None = None
    condition_path: str | None = None  #: kind control: folder of condition images named as the images in ``path``
    #: aspect-ratio buckets (kinds captions and classes): each image trains at the bucket nearest its aspect ratio,
    #: area about resolution², resized without stretching and the excess cropped; a batch holds one bucket
    buckets: bool = False
    bucket_min_size: int = 256  #: shortest bucket side (pixels)
    bucket_max_size: int = 1024  #: longest bucket side (pixels)
    bucket_step: int = 64  #: bucket sides are multiples of this (a multiple of 8 and of the VAE's scale factor)
    bucket_max_crop: float = 0.25  #: the most of a side an image's crop may cut; an image needing more is refused
    #: kohya-style tags (kinds captions and control; captions are comma-separated tags): shuffle the tags after the
    #: first ``keep_tokens`` each epoch, and drop each of those with probability ``caption_tag_dropout``
    shuffle_caption: bool = False
    keep_tokens: int = 0  #: the first N tags (e.g. the trigger word) stay in place and are never dropped
    caption_tag_dropout: float = 0.0  #: per-tag drop probability (whole captions: label_dropout)
    #: masked loss (kinds captions and classes): a folder of grayscale masks named as the images in ``path``, each of
    #: its image's size (white: train, black: ignored); the loss is weighted by it in latent space
    masks: str | None = None

    def __post_init__(self) -> None:
        check_finite(self, "data")
        self._check_buckets()
        self._check_captions()
        if self.masks and self.kind not in ("captions", "classes"):
            raise bad_value("data.masks", self.masks, f"unset with data.kind {self.kind!r}",
                            "masks weight the loss of data.kind captions and classes")
        if self.kind in DATA_FREE_KINDS:
            self._check_data_free()
        else:
            self._check_images()
        if (self.condition or self.condition_path) and self.kind != "control":
            raise bad_value("data.condition", self.condition or self.condition_path, "unset unless data.kind is "
                            "'control'", "data.kind: control pairs each image with a condition image")
        if self.kind == "control" and not (self.condition or self.condition_path):
            raise bad_value("data.condition", None, "an extractor name or data.condition_path with data.kind "
                            "'control'", "e.g. condition: canny")
        if self.class_path and self.kind != "dreambooth":
            raise bad_value("data.class_path", self.class_path, "unset unless data.kind is 'dreambooth'")
        if not 0 <= self.label_dropout < 1:
            raise bad_value("data.label_dropout", self.label_dropout, "in [0, 1)")
        if self.resolution < 8 or self.resolution % 8:
            raise bad_value("data.resolution", self.resolution, "a positive multiple of 8")
        if self.repeats < 1:
            raise bad_value("data.repeats", self.repeats, "an integer >= 1")
        if self.num_workers < 0:
            raise bad_value("data.num_workers", self.num_workers, "an integer >= 0")
        if self.prior_loss_weight < 0:
            raise bad_value("data.prior_loss_weight", self.prior_loss_weight, "a number >= 0")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise bad_value("data.cache_latents", True, "false when random_flip or random crops are on",
                            "cached latents cannot be re-augmented; turn off random_flip and set center_crop: true")

    def _check_buckets(self) -> None:
        for key in ("bucket_min_size", "bucket_max_size", "bucket_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
                raise bad_value(f"data.{key}", value, "a positive multiple of 8")
        if self.bucket_min_size > self.bucket_max_size:
            raise bad_value("data.bucket_min_size", self.bucket_min_size,
                            f"at most data.bucket_max_size ({self.bucket_max_size})")
        if not 0 <= self.bucket_max_crop < 1:
            raise bad_value("data.bucket_max_crop", self.bucket_max_crop, "in [0, 1)")
        if not self.buckets:
            return
        if self.kind not in ("captions", "classes"):
            raise bad_value("data.buckets", True, f"false with data.kind {self.kind!r}",
                            "buckets work with data.kind captions and classes")
        if not self.bucket_min_size <= self.resolution <= self.bucket_max_size:
            raise bad_value("data.resolution", self.resolution, f"within [data.bucket_min_size, "
                            f"data.bucket_max_size] = [{self.bucket_min_size}, {self.bucket_max_size}] with "
                            "data.buckets on", "the target area is resolution²; the square bucket has this side")

    def _check_captions(self) -> None:
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise bad_value("data.keep_tokens", self.keep_tokens, "an integer >= 0")
        if not 0 <= self.caption_tag_dropout < 1:
            raise bad_value("data.caption_tag_dropout", self.caption_tag_dropout, "in [0, 1)")
        if not (self.shuffle_caption or self.caption_tag_dropout):
            return
        key = "data.shuffle_caption" if self.shuffle_caption else "data.caption_tag_dropout"
        value = self.shuffle_caption or self.caption_tag_dropout
        if self.kind not in ("captions", "control"):
            raise bad_value(key, value, f"off with data.kind {self.kind!r}",
                            "tag handling applies to captions read from files (data.kind captions or control)")
        if self.cache_text_embeddings:
            raise bad_value(key, value, "off with data.cache_text_embeddings",
                            "every epoch makes new captions; cached embeddings would hold each variant (as kohya, "
                            "turn one of the two off)")

    def _check_images(self) -> None:
        if not self.path:
            raise bad_value("data.path", self.path, "an image folder",
                            "data-free training (data.kind: prompts or none) is for methods with their own objective")
        for key in ("prompts", "prompts_file", "num_samples"):
            if getattr(self, key):
                raise bad_value(f"data.{key}", getattr(self, key), "unset unless data.kind is 'prompts' or 'none'",
                                f"data.kind is {self.kind!r}, which reads images from data.path")
        if self.kind == "dreambooth" and not self.instance_prompt:
            raise bad_value("data.instance_prompt", self.instance_prompt, "a prompt for DreamBooth instance images",
                            "e.g. 'a photo of sks dog'")

    def _check_data_free(self) -> None:
        # Image options would be silently ignored: refuse them, naming the key.
        image_only = {"path": "", "instance_prompt": None, "class_prompt": None, "default_caption": None,
                      "random_flip": False, "cache_latents": False, "label_dropout": 0.0}
        for key, unset in image_only.items():
            if getattr(self, key) != unset:
                raise bad_value(f"data.{key}", getattr(self, key), f"unset with data.kind {self.kind!r} (no images)",
                                "the method's objective makes its own inputs; image options do not apply")
        if self.kind == "prompts":
            if self.num_samples is not None:
                raise bad_value("data.num_samples", self.num_samples, "unset with data.kind 'prompts'",
                                "an epoch is every prompt once (times data.repeats)")
            if not isinstance(self.prompts, list) or not all(isinstance(p, str) for p in self.prompts):
                raise bad_value("data.prompts", self.prompts, "a list of strings")
            if not self.prompts and not self.prompts_file:
                raise bad_value("data.prompts", self.prompts, "at least one prompt with data.kind 'prompts'",
                                "set data.prompts: [...] and/or data.prompts_file (one prompt per line)")
        else:
            for key in ("prompts", "prompts_file"):
                if getattr(self, key):
                    raise bad_value(f"data.{key}", getattr(self, key), "unset with data.kind 'none'",
                                    "use data.kind: prompts to iterate over prompts")
            if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
                raise bad_value("data.num_samples", self.num_samples, "an integer >= 1 with data.kind 'none'",
                                "the number of items (indices) per epoch, e.g. 64")
        if self.cache_text_embeddings and self.kind == "none":
            raise bad_value("data.cache_text_embeddings", True, "false with data.kind 'none' (no captions)")


@dataclass
class OptimizerConfig:
    #: prodigy / schedulefree_adamw: optional packages (``pip install difftune[optimizers]``)
    name: Literal["adamw", "adamw8bit", "sgd", "prodigy", "schedulefree_adamw"] = "adamw"
    lr: float | None = None  #: None: the method's default (1e-4; SaRA: 1e-3·exp(−350θ))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    scale_lr: bool = False  #: multiply lr by batch_size × gradient_accumulation_steps × processes
    #: YAML key ``class``: any ``torch.optim.Optimizer`` by import path ("torch.optim.RAdam"), built with ``lr`` and
    #: ``kwargs`` only (betas, eps, weight_decay go in ``kwargs``); replaces ``name``
    class_: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  #: extra constructor arguments (e.g. prodigy's d_coef)

    def __post_init__(self) -> None:
        check_finite(self, "optimizer")
        self._check_extra()
        if self.lr is not None and self.lr <= 0:
            raise bad_value("optimizer.lr", self.lr, "a positive number")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad_value("optimizer.betas", self.betas, "two numbers [beta1, beta2] in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0:
            raise bad_value("optimizer.eps" if self.eps <= 0 else "optimizer.weight_decay",
                            self.eps if self.eps <= 0 else self.weight_decay,
                            "a positive number" if self.eps <= 0 else "a number >= 0")


    def _check_extra(self) -> None:
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise bad_value("optimizer.kwargs", self.kwargs, "a mapping of argument names to values")
        if "params" in self.kwargs or "lr" in self.kwargs:
            raise bad_value("optimizer.kwargs", self.kwargs, "no 'params' or 'lr' (the trainer passes them)",
                            "set the learning rate with optimizer.lr")
        if self.class_ is not None:
            if not isinstance(self.class_, str) or "." not in self.class_.strip(".") or " " in self.class_:
                raise bad_value("optimizer.class", self.class_, "an import path 'package.module.Class'",
                                "e.g. torch.optim.RAdam")
            if self.name != "adamw":
                raise bad_value("optimizer.name", self.name, "left out when optimizer.class is set",
                                "optimizer.class replaces optimizer.name")
        if self.name == "prodigy" and self.lr is None:
            raise bad_value("optimizer.lr", None, "set with optimizer.name prodigy",
                            "Prodigy estimates the step size itself; its lr is a multiplier: use 1.0")


@dataclass
class ScheduleConfig:
    name: str = "constant"  #: a diffusers `get_scheduler` name
    warmup_steps: int = 0
    num_cycles: int = 1  #: cosine_with_restarts
    power: float = 1.0  #: polynomial

    def __post_init__(self) -> None:
        check_finite(self, "schedule")
        if self.name not in SCHEDULES:
            raise bad_value("schedule.name", self.name, f"one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.num_cycles < 1:
            raise bad_value("schedule.warmup_steps" if self.warmup_steps < 0 else "schedule.num_cycles",
                            self.warmup_steps if self.warmup_steps < 0 else self.num_cycles, "a non-negative integer"
                            if self.warmup_steps < 0 else "an integer >= 1")


@dataclass
class TrainLoopConfig:
    objective: Literal["denoise", "autoencode"] = "denoise"  #: autoencode trains the VAE (model.component: vae)
    kl_weight: float = 1e-6  #: autoencode: weight of the KL term (loss = L1 + MSE + kl_weight · KL)
    max_steps: int = 500  #: optimizer steps
    batch_size: int = 1  #: per process
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = 1.0  #: clip the trainable parameters' gradient norm (null: off)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  #: frozen weights in this dtype; trainable stay fp32
    snr_gamma: float | None = None  #: Min-SNR loss weighting γ (5.0 recommended), diffusers' compute_snr
    noise_offset: float = 0.0
    ema: bool = False  #: keep an EMA of the trainable parameters (diffusers EMAModel); saved instead of raw weights
    ema_decay: float = 0.9999
    attention: Literal["sdpa", "xformers"] = "sdpa"
    find_unused_parameters: bool = False  #: DDP option for multi-GPU runs with partially used adapters

    def __post_init__(self) -> None:
        check_finite(self, "train")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise bad_value(f"train.{name}", getattr(self, name), "an integer >= 1")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise bad_value("train.max_grad_norm", self.max_grad_norm, "a positive number or null")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise bad_value("train.snr_gamma", self.snr_gamma, "a positive number or null")
        if not 0 < self.ema_decay < 1:
            raise bad_value("train.ema_decay", self.ema_decay, "in (0, 1)")
        if self.kl_weight < 0:
            raise bad_value("train.kl_weight", self.kl_weight, "a number >= 0")


@dataclass
class LoggingConfig:
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    progress_bar: bool = True


@dataclass
class ValidationConfig:
    every_steps: int = 0  #: 0: only at the end (when prompts or class labels are given)
    prompts: list[str] = field(default_factory=list)
    class_labels: list[int] = field(default_factory=list)  #: class-conditional models
    seeds: list[int] = field(default_factory=lambda: [0])  #: one image per (prompt, seed)
    num_inference_steps: int = 25
    guidance_scale: float | None = 4.0  #: the evaluation's default (difftune.eval); null: the pipeline's own
    at_start: bool = True  #: also write a step-0 grid before training (the baseline; not on resume)
    loss: ValidationLossConfig = field(default_factory=ValidationLossConfig)  #: held-out loss (train/valloss.py)

    def __post_init__(self) -> None:
        check_finite(self, "validation")
        if self.every_steps < 0:
            raise bad_value("validation.every_steps", self.every_steps, "an integer >= 0 (0: only at the end)")
        if self.num_inference_steps < 1 or not self.seeds:
            raise bad_value("validation.num_inference_steps" if self.seeds else "validation.seeds",
                            self.num_inference_steps if self.seeds else self.seeds,
                            "an integer >= 1" if self.seeds else "at least one seed")


@dataclass
class CheckpointConfig:
    checkpointing_steps: int = 500  #: save a resumable checkpoint every N optimizer steps (0: never)
    checkpoints_total_limit: int | None = None  #: keep only the newest N checkpoints
    resume_from_checkpoint: str | None = None  #: "latest" or a checkpoint folder
    #: resume even when a checkpoint's RNG state cannot be restored (logged; the result is then not bit-exact)
    allow_inexact_resume: bool = False

    def __post_init__(self) -> None:
        if self.checkpointing_steps < 0:
            raise bad_value("checkpointing.checkpointing_steps", self.checkpointing_steps, "an integer >= 0 (0: off)")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise bad_value("checkpointing.checkpoints_total_limit", self.checkpoints_total_limit,
                            "an integer >= 1, or null to keep every checkpoint")


@dataclass
class TrainConfig:
    model: ModelConfig
    method: dict[str, Any]  #: ``name:`` plus the method's config fields, e.g. {name: lora, rank: 4}
    data: DataConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    adapter_name: str = "default"
    output_dir: str = "outputs/run"
    seed: int = 0
    #: train into an output_dir that holds a finished run (its checkpoints and grids are removed first);
    #: ``difftune train --overwrite``. Without it such a folder is refused (resuming is always allowed).
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise bad_value("output_dir", self.output_dir, "a folder path",
                            "an empty path would write into the working directory; e.g. outputs/my-run")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32 - 64:
            # numpy's seed is 32-bit; each process seeds seed + its index
            raise bad_value("seed", self.seed, "an integer in [0, 2**32 - 64)")
        method = self.method_config()  # validate now, with keys named method.<field>
        if self.model.from_scratch and not method.trains_whole_model:
            raise bad_value("model.from_scratch", True, f"false with the adapter method {method.method!r}",
                            "training from scratch needs every weight trainable: method.name: full (or kind with "
                            "train_base: true)")
        if self.train.objective == "autoencode" and self.data.kind in DATA_FREE_KINDS:
            raise bad_value("train.objective", "autoencode", f"'denoise' with data.kind {self.data.kind!r}",
                            "the VAE trains on images: data.kind captions or classes with data.path")
        if self.train.objective == "autoencode" and method.is_adapter:
            raise bad_value("train.objective", "autoencode", "'denoise' with an adapter method",
                            "the VAE is trained with method.name: full and model.component: vae")

    def method_config(self) -> MethodConfig:
        data = dict(self.method)
        name = data.pop("name", None)
        if name is None:
            raise bad_value("method.name", None, "a registered method name, e.g. lora")
        cls = get_method(name)
        try:
            return cls.from_dict(data)
        except DifftuneError as e:
            raise DifftuneError(f"in `method` ({name}): {e}") from e
