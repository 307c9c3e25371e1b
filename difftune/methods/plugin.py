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
  a `difftune.train.loss.StepInputs` with the batch, the pipeline, the conditioning family, the trained and teacher
  modules and helpers that draw the standard (x0, ε, t, x_t, conditioning) from images, noise given latents, encode
  prompts, run a denoiser and compute the default loss. Only such a method can train on ``data.kind: prompts`` or
  ``none`` (no images).
* **Student** (distillation): ``prepare`` returns a module other than the denoiser it received. The trainer trains
  that module, registers it in the pipeline under the denoiser's component name (validation and ``save_trained``
  see it), and keeps the original as ``plugin.teacher``: frozen, in eval mode, on the device, in the weight dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError
from ..methods.base import MethodConfig
from ..methods.model import adapter_parameters, adapter_tensors, inject

if TYPE_CHECKING:  # loss.py pulls in the training stack; method files import this module at registration
    from .loss import StepInputs

PLUGINS: dict[str, type[TrainerPlugin]] = {}


def register_plugin(method: str):
    """Class decorator: ``cls`` is the trainer plugin of the method registered as ``method``."""

    def wrap(cls: type[TrainerPlugin]) -> type[TrainerPlugin]:
        if method in PLUGINS and PLUGINS[method] is not cls:
            raise DifftuneError(f"trainer plugin for {method!r} is registered twice ({PLUGINS[method].__name__}, "
                                f"{cls.__name__})")
        PLUGINS[method] = cls
        return cls

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

    def objective(self, step: StepInputs) -> Tensor | None:
        """The loss of one micro-batch, or None for the trainer's standard loss (``step.default_loss()``).

        Use ``step``'s helpers so that the pieces match the standard loss (a distillation loss sees the same x_t for
        teacher and student): ``step.draw()`` → `Noised` (x0, ε, t, x_t, target, conditioning kwargs) from the
        batch's images; ``step.noised(latents, kwargs)`` for latents of your own; ``step.prompt_kwargs(captions,
        latents)``; ``step.predict(module, x_t, t, kwargs)``; ``step.loss(pred, noised)``. Draw randomness from
        the global torch RNG only (see `StepInputs`), so a resumed run is bit-exact.
        """
        return None

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """A term added to the loss each step (e.g. a regularizer), or None.

        It joins the loss before the one backward pass, so under DDP its gradient is all-reduced with the rest."""
        return None

    def on_step(self, model: nn.Module, step: int, max_steps: int, optimizer: Any) -> None:
        """Called after each optimizer step (``step`` counts from 1), for progressive schedules."""
        return None  # optional hook: most methods have no schedule

    def save_trained(self, pipe: Any, model: nn.Module, path: Path, base_model: str, component: str) -> Path:
        """Write the training result to folder ``path`` (default: the adapter in difftune's format)."""
        from ..serialization import save_adapter_file

        return save_adapter_file(model, path, name=self.name, base_model=base_model, component=component)
