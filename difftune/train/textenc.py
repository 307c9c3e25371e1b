"""Joint denoiser + text-encoder adapter training (``model.train_text_encoder``), as kohya's LoRA scripts and
diffusers' ``--train_text_encoder`` do it: one run trains the method's adapter in the denoiser and the same method,
with text-encoder targets, in each named text encoder; each gets its own learning rate (``train.text_encoder_lr``).

`JointPlugin` wraps the method's trainer plugin, so the trainer's loop, checkpoints and exact resume see one plugin:
its trainable parameters, checkpoint tensors (the encoders' under ``<component>.``) and saved tensors include the
encoders' adapters; its optimizer has one parameter group per learning rate; its save writes one adapter folder per
component, ``adapter`` (the denoiser) and ``adapter_<component>`` beside it, which ``difftune export`` puts
together into one kohya file (``lora_unet_*`` with ``lora_te_*``, SDXL's second encoder ``lora_te2_*``).

The text encoders' adapters are named ``<adapter_name>_<component>`` (adapter names are unique across a pipeline, as
`difftune.load_adapter` requires). The encoders stay in eval mode like the rest of the frozen pipeline, so an
adapter dropout applies in the denoiser only. Methods whose trainer plugin does more than inject an adapter (their own
``prepare``, objective, optimizer or saved tensors: SaRA, KIND, SPM, SCEdit, BK, full) train the denoiser only and are
refused, as are class-conditional pipelines (no text encoder).

Under DDP the encoders are not part of the DDP-wrapped denoiser, so DDP does not average their gradients: each
encoder adapter parameter gets a gradient hook that averages each backward pass's contribution over the processes
(an all-reduce on a process group of its own, so it never interleaves with DDP's). The accumulated gradient is then the
mean over processes, as DDP's is, and every replica applies the same update.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..methods.plugin import TrainerPlugin
from ..methods.verbs import adapter_parameters, adapter_tensors, inject

#: the text encoders' modules adapted by default, by encoder class: kohya's (every Linear of CLIP's attention and
#: MLP blocks); for T5 (PixArt, SD3, Flux) the attention projections
DEFAULT_TARGETS = {"CLIPTextModel": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                   "CLIPTextModelWithProjection": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                   "T5EncoderModel": ["q", "k", "v", "o"]}
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: hooks a plugin may not override for its method to train in a text encoder too (it would act on the denoiser only)
_DENOISER_ONLY = ("prepare", "objective", "trainable_parameters", "checkpoint_tensors", "saved_tensors",
                  "save_trained", "make_optimizer")


def text_encoders(cfg: Any, pipe: Any) -> dict[str, nn.Module]:
    """The text encoders ``model.train_text_encoder`` names (true: every one the pipeline has), by component."""
    want = cfg.model.train_text_encoder
    present = {n: getattr(pipe, n) for n in ENCODERS if isinstance(getattr(pipe, n, None), nn.Module)}
    if not present:
        raise bad_value("model.train_text_encoder", want, f"false for {type(pipe).__name__}",
                        "the pipeline has no text encoder (a class-conditional model)")
    if want is True:
        return present
    unknown = [n for n in want if n not in present]
    if unknown:
        raise bad_value("model.train_text_encoder", want, f"true or a list of the pipeline's text encoders "
                        f"{sorted(present)}", f"{unknown} are not among them")
    return {n: present[n] for n in want}


def joint_plugin(cfg: Any, plugin: TrainerPlugin, pipe: Any, num_processes: int) -> TrainerPlugin:
    """``plugin`` itself, or with ``model.train_text_encoder`` a `JointPlugin` around it."""
    if not cfg.model.train_text_encoder:
        return plugin
    method = plugin.config.method
    own = [h for h in _DENOISER_ONLY if getattr(type(plugin), h) is not getattr(TrainerPlugin, h)]
    if own or not plugin.config.is_adapter:
        raise bad_value("model.train_text_encoder", cfg.model.train_text_encoder, f"false with method {method!r}",
                        f"{method!r} trains the denoiser its own way ({', '.join(own) or 'no adapter'}); methods "
                        "that only inject an adapter (lora, loha, krona, ia3, diff) also train in text encoders")
    return JointPlugin(plugin, text_encoders(cfg, pipe), cfg, num_processes)


class JointPlugin(TrainerPlugin):
    """``inner``'s training of the denoiser, plus the same method's adapter in each of ``encoders``."""

    def __init__(self, inner: TrainerPlugin, encoders: dict[str, nn.Module], cfg: Any, num_processes: int = 1) -> None:
        super().__init__(inner.config, inner.name)
        self.inner, self.encoders, self.cfg, self.num_processes = inner, encoders, cfg, num_processes
        self.partially_used = inner.partially_used

    def names(self) -> dict[str, str]:
        """Each encoder's adapter name, by component."""
        return {c: f"{self.name}_{c}" for c in self.encoders}

    def default_lr(self) -> float:
        return self.inner.default_lr()

    def prepare(self, pipe: Any, model: nn.Module) -> nn.Module:
        trained = self.inner.prepare(pipe, model)
        targets = self.cfg.train.text_encoder_targets
        for component, encoder in self.encoders.items():
            found = targets or DEFAULT_TARGETS.get(type(encoder).__name__)
            if not found:
                raise bad_value("train.text_encoder_targets", targets, f"the module names to adapt in {component} "
                                f"({type(encoder).__name__})", "e.g. [q_proj, k_proj, v_proj, out_proj]")
            config = dataclasses.replace(self.config, target_modules=list(found))
            try:
                inject(encoder, config, name=self.names()[component], freeze_base=True)
            except DifftuneError as e:  # say which setting chose those targets
                raise DifftuneError(f"model.train_text_encoder: {component} with `train.text_encoder_targets` "
                                    f"{list(found)}{'' if targets else ' (the default)'}: {e}") from e
        for p in self.encoder_parameters():  # trainable values stay fp32 under mixed precision, as the denoiser's
            p.data = p.data.float()
        if self.num_processes > 1:
            average_gradients(self.encoder_parameters())
        return trained

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for c, enc in self.encoders.items() for p in adapter_parameters(enc, self.names()[c])]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.inner.trainable_parameters(model) + self.encoder_parameters()

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        tensors = dict(self.inner.checkpoint_tensors(model))
        for c, enc in self.encoders.items():
            tensors.update({f"{c}.{k}": v for k, v in adapter_tensors(enc, self.names()[c]).items()})
        return tensors

    def saved_tensors(self, model: nn.Module) -> list[Tensor]:
        return self.inner.saved_tensors(model) + [t for c, enc in self.encoders.items()
                                                  for t in adapter_tensors(enc, self.names()[c]).values()]

    def make_optimizer(self, params: list[nn.Parameter], optimizer_config: Any,
                       lr: float) -> torch.optim.Optimizer | None:
        """The run's optimizer with two parameter groups: the denoiser's at ``lr``, the encoders' at
        ``train.text_encoder_lr`` (scaled as ``lr`` was by ``optimizer.scale_lr``; null: ``lr``)."""
        from .optimizers import default_optimizer

        te_lr = self.cfg.train.text_encoder_lr
        if te_lr is not None and self.cfg.optimizer.scale_lr:
            te_lr *= lr / (self.cfg.optimizer.lr if self.cfg.optimizer.lr is not None else self.default_lr())
        encoder = {id(p) for p in self.encoder_parameters()}
        groups = [{"params": [p for p in params if id(p) not in encoder]},
                  {"params": [p for p in params if id(p) in encoder], "lr": lr if te_lr is None else te_lr}]
        return default_optimizer(self.cfg, groups, lr)

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        return self.inner.extra_loss(model)

    def on_step(self, model: nn.Module, step: int, max_steps: int, optimizer: Any) -> None:
        self.inner.on_step(model, step, max_steps, optimizer)

    def save_trained(self, pipe: Any, model: nn.Module, path: Path, base_model: str, component: str) -> Path:
        """The denoiser's adapter at ``path``, each encoder's at ``<path>_<component>`` beside it."""
        from ..serialization import save_adapter_file

        written = self.inner.save_trained(pipe, model, path, base_model, component)
        for c, enc in self.encoders.items():
            save_adapter_file(enc, Path(path).parent / f"{Path(path).name}_{c}", name=self.names()[c],
                              base_model=base_model, component=c)
        return written


def average_gradients(params: list[nn.Parameter]) -> None:
    """Have each backward pass's gradient of ``params`` averaged over the processes (parameters outside the
    DDP-wrapped module), on a gloo/NCCL group of their own. Called on every process, in the same order."""
    import torch.distributed as dist

    group = dist.new_group()  # a collective: every process creates it here, in the same order
    world = dist.get_world_size()

    def average(grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad / world

    for p in params:
        p.register_hook(average)
