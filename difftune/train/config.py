"""The training config: one YAML file, one typed dataclass tree (see ``configs/`` for examples).

Names follow the diffusers training scripts where one exists (``max_grad_norm``, ``snr_gamma``, ``noise_offset``,
``checkpoints_total_limit``, ``resume_from_checkpoint``) so users find what they know.

Every field is checked when the config is read, with an error naming its key: types (`difftune.config`), and here
ranges (``data.resolution=1000000`` ran out of memory in the first batch, ``validation.num_inference_steps=2147483648``
failed in the scheduler) and shapes (``model.variant`` becomes part of a file name, so ``../../etc/passwd`` is refused;
``data.caption_ext`` is a suffix such as ``.txt``, not ``/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..architectures import with_mmdit_targets
from ..errors import DifftuneError, bad_value
from ..methods.base import MethodConfig, check_adapter_name, get_method
from .checks import (  # noqa: F401 (re-exported: the bounds are part of this module's API)
    COMPONENT,
    MAX_BATCH,
    MAX_INFERENCE_STEPS,
    MAX_RESOLUTION,
    MAX_STEPS,
    SCHEDULES,
    SUFFIX,
    VARIANT,
    check_finite,
    check_name,
    check_range,
)
from .dataconfig import DATA_FREE_KINDS, IMAGE_KINDS, DataConfig  # noqa: F401
from .tracking import tracker_names
from .valconfig import ValidationLossConfig, ValidationPrompt, read_prompts

#: a Hub revision: a branch, tag or commit (``main``, ``v1.0``, ``refs/pr/3``); it names a file under the cache's
#: refs/ folder, so no ``..`` and no leading ``/``
REVISION = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._/-]*")


@dataclass
class ModelConfig:
    #: the base model, named as users name it (`difftune.basemodel`): a local diffusers pipeline folder, a shipped
    #: reference model (``sd-mini``, ``dit-mini``), a Hugging Face Hub repo id (``org/name``; the cache is used
    #: when ``HF_HUB_OFFLINE=1``) or a single-file checkpoint (original LDM layout, ``.safetensors``)
    path: str = ""
    revision: str | None = None  #: with a Hub repo id: the branch, tag or commit to load (default: main)
    #: with a single-file checkpoint: the pipeline folder or Hub repo id whose configs describe it (default: the
    #: reference repo of the architecture diffusers recognises in the file)
    config: str | None = None
    architecture: str | None = None  #: build an untrained reference pipeline instead (difftune.zoo: sd-mini, dit-mini)
    vae_from: str | None = None  #: with ``architecture``: take the trained VAE from this pipeline folder
    variant: str | None = None  #: weight variant to load, e.g. "fp16"
    component: str | None = None  #: the denoiser to train: "unet" or "transformer" (default: whichever exists)
    #: also train the method's adapter in the text encoders: true (all) or a list such as [text_encoder] (textenc.py)
    train_text_encoder: bool | list[str] = False
    from_scratch: bool = False  #: re-initialize the denoiser from its config (the ``full`` method only)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  #: override the scheduler's target

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.architecture):
            raise bad_value("model.path", self.path, "a pipeline folder, a shipped model, a Hub repo id or a "
                            ".safetensors checkpoint (or, instead, model.architecture for an untrained reference "
                            "architecture)", "e.g. model.path=sd-mini (a shipped reference model) or "
                            "stabilityai/stable-diffusion-xl-base-1.0")
        check_name("model.variant", self.variant, VARIANT, "a weight variant name such as 'fp16'",
                   "The variant names files (diffusion_pytorch_model.<variant>.safetensors); it is not a path.")
        check_name("model.revision", self.revision, REVISION, "a branch, tag or commit of the Hub repo",
                   "e.g. main or a 40-character commit hash")
        check_name("model.component", self.component, COMPONENT, "a pipeline component name such as 'unet'")


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
        check_range("schedule.warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        check_range("schedule.num_cycles", self.num_cycles, 1, MAX_STEPS)


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
    #: rescale the betas to zero terminal SNR (Lin et al. 2024) and sample from the last timestep (trailing);
    #: needs v-prediction (model.prediction_type: v_prediction); `difftune.train.objectives`
    zero_terminal_snr: bool = False
    #: kohya's debiased-estimation loss weight 1/√SNR (v-prediction: 1/(SNR+1)); times Min-SNR's when both are set
    debiased_estimation: bool = False
    text_encoder_lr: float | None = None  #: with model.train_text_encoder: the encoders' lr (null: optimizer.lr)
    text_encoder_targets: list[str] | None = None  #: modules adapted in the encoders (null: textenc.DEFAULT_TARGETS)
    ema: bool = False  #: keep an EMA of the trainable parameters (diffusers EMAModel); saved instead of raw weights
    ema_decay: float = 0.9999
    attention: Literal["sdpa", "xformers"] = "sdpa"
    find_unused_parameters: bool = False  #: DDP option for multi-GPU runs with partially used adapters
    # Flow matching (SD3, Flux; difftune.train.flow). Defaults are those of diffusers' DreamBooth LoRA scripts.
    timestep_density: Literal["logit_normal", "mode", "uniform"] | None = None  #: null: SD3 logit_normal, Flux uniform
    logit_mean: float = 0.0  #: logit_normal density: mean of the normal before the sigmoid
    logit_std: float = 1.0  #: logit_normal density: its std
    mode_scale: float = 1.29  #: mode density: its scale
    loss_weighting: Literal["sigma_sqrt", "cosmap", "none"] = "none"  #: per-sample weight of the flow loss
    guidance_scale: float = 3.5  #: the guidance value Flux [dev]'s guidance embedding is fed while training
    max_sequence_length: int | None = None  #: T5 tokens per prompt; null: SD3 77, Flux 512
    #: static shift s of σ (σ' = s σ / (1 + (s − 1) σ), as SD3's scheduler); null: the scheduler's own table
    flow_shift: float | None = None
    #: shift σ by each batch's image tokens as the scheduler does at inference with use_dynamic_shifting (Flux's
    #: μ = calculate_shift); null or false: off, as diffusers' scripts
    dynamic_shift: bool | None = None

    def __post_init__(self) -> None:
        check_finite(self, "train")
        if self.logit_std <= 0:
            raise bad_value("train.logit_std", self.logit_std, "a positive number")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 4096:
            raise bad_value("train.max_sequence_length", self.max_sequence_length, "an integer in [1, 4096] or null",
                            "SD3 was trained with 77 (256 in its pipeline), Flux with 512")
        self._check_shift()
        for name, most in (("max_steps", MAX_STEPS), ("batch_size", MAX_BATCH),
                           ("gradient_accumulation_steps", MAX_BATCH)):
            check_range(f"train.{name}", getattr(self, name), 1, most)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise bad_value("train.max_grad_norm", self.max_grad_norm, "a positive number or null")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise bad_value("train.text_encoder_lr", self.text_encoder_lr, "a positive number or null")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise bad_value("train.snr_gamma", self.snr_gamma, "a positive number or null")
        if not 0 < self.ema_decay < 1:
            raise bad_value("train.ema_decay", self.ema_decay, "in (0, 1)")
        if self.kl_weight < 0:
            raise bad_value("train.kl_weight", self.kl_weight, "a number >= 0")

    def _check_shift(self) -> None:
        if self.flow_shift is not None and not 0 < self.flow_shift <= 100:
            raise bad_value("train.flow_shift", self.flow_shift, "a number in (0, 100] or null",
                            "1.0 is no shift, SD3's scheduler uses 3.0; null keeps the scheduler's own")
        if self.dynamic_shift and self.flow_shift is not None:
            raise bad_value("train.flow_shift", self.flow_shift, "null with train.dynamic_shift: true",
                            "the scheduler shifts either statically (shift) or by resolution (use_dynamic_shifting),"
                            " not both: set one of them")


@dataclass
class LoggingConfig:
    #: any tracker accelerate supports (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab,
    #: trackio), several separated by commas, "all" (every installed one) or "none"; the validation grid goes to
    #: each tracker that takes images (train/tracking.py)
    report_to: str = "tensorboard"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        tracker_names(self.report_to)  # names only: whether the packages are installed is checked when a run starts


@dataclass
class HubConfig:
    """Upload the finished run's folder (adapter or pipeline, model card, config, grids; not the checkpoints) to a
    Hugging Face Hub repo (train/hub.py). The token is read from HF_TOKEN or ``hf auth login``, never from here."""

    push: bool = False
    repo_id: str | None = None  #: "user/name" or "org/name"; created when it does not exist
    private: bool = False  #: create the repo private
    token: str | None = None  #: refused when set: config.yaml is written into the result and uploaded with it

    def __post_init__(self) -> None:
        if self.token is not None:
            raise bad_value("hub.token", "<hidden>", "left out", "the token is read from the HF_TOKEN environment "
                            "variable or `hf auth login`; config.yaml is saved with the result and uploaded")
        if self.repo_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.repo_id)
            except HFValidationError as e:
                raise bad_value("hub.repo_id", self.repo_id, "a Hub repo id 'user/name'", str(e)) from None
        if self.push and not self.repo_id:
            raise bad_value("hub.repo_id", self.repo_id, "set with hub.push: true", "e.g. hub.repo_id: me/my-lora")


@dataclass
class ValidationConfig:
    every_steps: int = 0  #: 0: only at the end (when prompts or class labels are given)
    #: a prompt string, or a mapping {prompt, negative_prompt, width, height, steps, guidance_scale, seed}
    #: (`valconfig.ValidationPrompt`: its null settings take this section's)
    prompts: list[str | dict[str, Any] | ValidationPrompt] = field(default_factory=list)
    negative_prompt: str | None = None  #: for every prompt that names none
    class_labels: list[int] = field(default_factory=list)  #: class-conditional models
    seeds: list[int] = field(default_factory=lambda: [0])  #: one image per (prompt, seed)
    num_inference_steps: int = 25
    guidance_scale: float | None = 4.0  #: the evaluation's default (difftune.eval); null: the pipeline's own
    at_start: bool = True  #: also write a step-0 grid before training (the baseline; not on resume)
    loss: ValidationLossConfig = field(default_factory=ValidationLossConfig)  #: held-out loss (train/valloss.py)

    def __post_init__(self) -> None:
        check_finite(self, "validation")
        self.prompts = read_prompts(self.prompts)  # type: ignore[assignment]
        if self.every_steps < 0:
            raise bad_value("validation.every_steps", self.every_steps, "an integer >= 0 (0: only at the end)")
        if self.num_inference_steps < 1 or not self.seeds:
            raise bad_value("validation.num_inference_steps" if self.seeds else "validation.seeds",
                            self.num_inference_steps if self.seeds else self.seeds,
                            "an integer >= 1" if self.seeds else "at least one seed")
        check_range("validation.num_inference_steps", self.num_inference_steps, 1, MAX_INFERENCE_STEPS,
                    "Samplers take 20-50 steps; the schedulers have 1000 timesteps.")
        check_range("validation.every_steps", self.every_steps, 0, MAX_STEPS)
        if self.guidance_scale is not None:
            check_range("validation.guidance_scale", self.guidance_scale, 0.0, 1000.0, "CFG scales are 1-15.")
        for name, values in (("seeds", self.seeds), ("class_labels", self.class_labels)):
            bad = [v for v in values if not 0 <= v < 2**32]
            if bad:
                raise bad_value(f"validation.{name}", values, "integers in [0, 2**32)", f"{bad[:3]} are not")


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
        check_range("checkpointing.checkpointing_steps", self.checkpointing_steps, 0, MAX_STEPS)
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
    hub: HubConfig = field(default_factory=HubConfig)
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
        try:
            check_adapter_name(self.adapter_name)
        except DifftuneError as e:
            raise DifftuneError(str(e).replace("`name`", "`adapter_name`", 1)) from None
        method = self.method_config()  # validate now, with keys named method.<field>
        if self.model.from_scratch and not method.trains_whole_model:
            raise bad_value("model.from_scratch", True, f"false with the adapter method {method.method!r}",
                            "training from scratch needs every weight trainable: method.name: full (or kind with "
                            "train_base: true)")
        te = self.model.train_text_encoder
        for key in ("text_encoder_lr", "text_encoder_targets"):
            if not te and getattr(self.train, key) is not None:
                raise bad_value(f"train.{key}", getattr(self.train, key), "null unless model.train_text_encoder is "
                                "set", "it applies to the text encoders' adapters")
        if te and (self.model.component or "").startswith("text_encoder"):
            raise bad_value("model.train_text_encoder", te, f"false with model.component {self.model.component!r}",
                            "model.component: text_encoder trains that encoder alone")
        if self.train.objective == "autoencode" and self.data.kind in DATA_FREE_KINDS:
            raise bad_value("train.objective", "autoencode", f"'denoise' with data.kind {self.data.kind!r}",
                            "the VAE trains on images: data.kind captions or classes with data.path")
        if self.train.objective == "autoencode" and method.is_adapter:
            raise bad_value("train.objective", "autoencode", "'denoise' with an adapter method",
                            "the VAE is trained with method.name: full and model.component: vae")

    def method_config(self, model: Any = None) -> MethodConfig:
        """The method's config; given the denoiser ``model``, an SD3/Flux transformer gets the MMDiT default
        targets where the config names none (`difftune.architectures.with_mmdit_targets`)."""
        data = dict(self.method)
        name = data.pop("name", None)
        if name is None:
            raise bad_value("method.name", None, "a registered method name, e.g. lora")
        cls = get_method(name)
        try:
            return cls.from_dict(with_mmdit_targets(cls, data, model))
        except DifftuneError as e:
            raise DifftuneError(f"in `method` ({name}): {e}") from e
