"""Trainer plugins: what a method does while training, kept apart from its config (which holds data only).

The trainer knows no method by name. It asks `plugin_for(config, name)` for the method's plugin and calls only the
hooks below; a method that needs nothing special (LoRA, KronA) registers no plugin and gets `TrainerPlugin`, which
injects the adapter, trains its parameters with the standard diffusion loss and saves it in difftune's format. A
method with its own behaviour subclasses it in its method file and registers it with one line,
``@register_plugin("sara")``.

Order of the calls: ``prepare`` (once; the trainer then sets ``teacher``), ``trainable_parameters``,
``make_optimizer``; per micro-batch ``objective`` (None: the standard loss) plus ``extra_loss``; per optimizer step
``on_step``; ``checkpoint_tensors`` at every checkpoint and at the end; ``save_trained`` once, on the main process.

Two shapes of method beyond the plain adapter:

* **Own objective** (data-free erasing, block-wise calibration, distillation): override ``objective``. It receives
  a `TrainingStep` (the trainer's `difftune.train.loss.StepInputs`) with the batch, the pipeline, the conditioning
  family, the trained and teacher modules and helpers that draw the standard (x0, ε, t, x_t, conditioning) from
  images, noise given latents, encode prompts, run a denoiser and compute the default loss. Only such a method can
  train on ``data.kind: prompts`` or ``none`` (no images).
* **Student** (distillation): ``prepare`` returns a module other than the denoiser it received. The trainer trains
  that module, registers it in the pipeline under the denoiser's component name (validation and ``save_trained``
  see it), and keeps the original as ``plugin.teacher``: frozen, in eval mode, on the device, in the weight dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import DifftuneError
from ..families import Family
from ..registry import Registry
from .base import MethodConfig
from .verbs import adapter_parameters, adapter_tensors, inject


@dataclass
class Noised:
    """One draw of the standard training inputs, exactly as the default loss makes them."""

    latents: Tensor  #: x0, (B, C, h, w): scaled VAE latents
    noise: Tensor  #: ε, (B, C, h, w) (with ``train.noise_offset`` added, if set)
    timesteps: Tensor  #: t, (B,) long
    noisy: Tensor  #: x_t = add_noise(x0, ε, t)
    target: Tensor  #: what the default loss regresses: ε, or the velocity for v-prediction
    kwargs: dict[str, Any]  #: the denoiser's conditioning keyword arguments (text states, class labels, ...)
    mask: Tensor | None = None  #: (B, 1, h, w) loss weights in latent space (``data.masks``), else None


class TrainingStep(Protocol):
    """What ``objective`` receives for one micro-batch: the trainer's `difftune.train.loss.StepInputs` implements
    it (its docstring has the details, e.g. on drawing randomness). Methods see this interface only, so they never
    import the trainer."""

    batch: dict[str, Any]  #: the collated batch (``pixel_values``, ``caption``, ``class_label``, ``index``, ...)
    model: nn.Module  #: the trained module as accelerate prepared it: call it for the pass that needs gradients
    denoiser: nn.Module  #: the same module unwrapped, for passes without gradients and for hooks
    teacher: nn.Module | None  #: the original denoiser when ``prepare`` returned another module, else None
    config: Any  #: the run's `difftune.train.TrainConfig`
    device: torch.device
    global_step: int  #: optimizer steps finished before this micro-batch

    @property
    def pipe(self) -> Any: ...

    @property
    def family(self) -> Family: ...

    @property
    def noise_scheduler(self) -> Any: ...

    @property
    def weight_dtype(self) -> torch.dtype: ...

    @property
    def prediction_type(self) -> str: ...

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]: ...

    def draw(self, prefix: str = "") -> Noised: ...

    def noised(self, latents: Tensor, kwargs: dict[str, Any]) -> Noised: ...

    def prompt_kwargs(self, captions: list[str], latents: Tensor) -> dict[str, Any]: ...

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, kwargs: dict[str, Any]) -> Tensor: ...

    def loss(self, pred: Tensor, noised: Noised) -> Tensor: ...

    def default_loss(self) -> Tensor: ...

#: Trainer plugins by method name (a method without one trains as a plain adapter, with `TrainerPlugin`).
PLUGINS: Registry[type[TrainerPlugin]] = Registry("trainer plugin")


def register_plugin(method: str):
    """Class decorator: ``cls`` is the trainer plugin of the method registered as ``method``."""

    def wrap(cls: type[TrainerPlugin]) -> type[TrainerPlugin]:
        return PLUGINS.register(method, cls)

    return wrap


def plugin_for(config: MethodConfig, name: str) -> TrainerPlugin:
    """The trainer plugin for ``config``'s method, training adapter ``name``."""
    return PLUGINS.get(config.method, TrainerPlugin)(config, name)


class TrainerPlugin:
    """The training behaviour of one method; every hook has a default that suits a plain adapter.

    Attributes:
        config: the method's config.
        name: the adapter's name in the model.
        teacher: the original denoiser when ``prepare`` returned another module (set by the trainer right after
            ``prepare``: frozen, eval mode, on the device, in the weight dtype), else None.
    """

    #: Whether a micro-batch may leave some trainable parameters out of its loss (KIND's class-gated tailors, when
    #: none of their classes is in the batch). Under DDP the trainer then has DDP find the unused parameters each
    #: step (``find_unused_parameters``): without that DDP waits for their gradients and fails at the next step.
    partially_used: bool = False

    def __init__(self, config: MethodConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.teacher: nn.Module | None = None

    @property
    def needs_images(self) -> bool:
        """Whether training needs image data: true unless the plugin defines its own ``objective``."""
        return type(self).objective is TrainerPlugin.objective

    def default_lr(self) -> float:
        """The learning rate used when the training config gives none."""
        return 1e-4

    def prepare(self, pipe: Any, model: nn.Module) -> nn.Module:
        """Make ``model`` (the pipeline's denoiser) trainable; return the module to train (default: inject the
        adapter into ``model``, freezing everything else, and return it). A method may return another module (a
        distillation student) and keep ``model`` as its teacher."""
        inject(model, self.config, name=self.name, freeze_base=True)
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the optimizer updates (default: the adapter's parameters)."""
        return adapter_parameters(model, self.name)

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Live tensors a resumable checkpoint must hold (default: the adapter's parameters and buffers)."""
        return adapter_tensors(model, self.name)

    def make_optimizer(self, params: list[nn.Parameter], optimizer_config: Any,
                       lr: float) -> torch.optim.Optimizer | None:
        """A method-specific optimizer at learning rate ``lr``, or None for the trainer's default.

        Under DDP, what an optimizer adds to the gradients itself comes after the all-reduce, so it must be the same
        on every process. Called before the trainer seeds each process differently: ``torch.initial_seed()`` is the
        run's seed on every process, a seed for the optimizer's own generator (the global RNG differs per process
        from the first step on, so a random choice drawn from it would differ between the replicas)."""
        return None

    def objective(self, step: TrainingStep) -> Tensor | None:
        """The loss of one micro-batch, or None for the trainer's standard loss (``step.default_loss()``).

        Use ``step``'s helpers so that the pieces match the standard loss (a distillation loss sees the same x_t for
        teacher and student): ``step.draw()`` → `Noised` (x0, ε, t, x_t, target, conditioning kwargs) from the
        batch's images; ``step.noised(latents, kwargs)`` for latents of your own; ``step.prompt_kwargs(captions,
        latents)``; ``step.predict(module, x_t, t, kwargs)``; ``step.loss(pred, noised)``. Draw randomness from
        the global torch RNG only (see `difftune.train.loss.StepInputs`), so a resumed run is bit-exact.
        """
        return None

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """A term added to the loss each step (e.g. a regularizer), or None.

        It joins the loss before the one backward pass, so under DDP its gradient is all-reduced with the rest."""
        return None

    def on_step(self, model: nn.Module, step: int, max_steps: int, optimizer: Any) -> None:
        """Called after each optimizer step (``step`` counts from 1), for progressive schedules."""
        return None  # optional hook: most methods have no schedule

    def saved_tensors(self, model: nn.Module) -> list[Tensor]:
        """The live tensors `save_trained` writes (default: the adapter's parameters and buffers). The trainer refuses
        to train a tensor outside them, or outside `checkpoint_tensors` (`check_trained_tensors_are_kept`): its
        trained values would be lost at save or resume."""
        return list(adapter_tensors(model, self.name).values())

    def save_trained(self, pipe: Any, model: nn.Module, path: Path, base_model: str, component: str) -> Path:
        """Write the training result to folder ``path`` (default: the adapter in difftune's format)."""
        from ..serialization import save_adapter_file

        return save_adapter_file(model, path, name=self.name, base_model=base_model, component=component)


def check_trained_tensors_are_kept(plugin: TrainerPlugin, model: nn.Module, params: list[nn.Parameter]) -> None:
    """Refuse a plugin that trains tensors its saved result (`saved_tensors`) or its checkpoints
    (`checkpoint_tensors`) would not hold: the run would complete and silently lose the trained values.

    Raises:
        DifftuneError: naming the method, up to five such tensors and which of the two would lose them.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    for what, kept in (("saved result", plugin.saved_tensors(model)),
                       ("checkpoints", list(plugin.checkpoint_tensors(model).values()))):
        ids = {id(t) for t in kept}
        lost = [names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in params if id(p) not in ids]
        if lost:
            raise DifftuneError(
                f"method {plugin.config.method!r}: its trainer plugin trains {len(lost)} tensor(s) that its {what} "
                f"would not hold, e.g. {lost[:5]}; their trained values would be lost. This is a bug in the method's "
                "trainer plugin (`trainable_parameters` against `saved_tensors` / `checkpoint_tensors`), not in your "
                "config")
