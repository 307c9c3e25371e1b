"""Trainer plugins: what a method does while training, kept apart from its config (which holds data only).

The trainer knows no method by name. It asks `plugin_for(config, name)` for the method's plugin and calls only the
hooks below; a method that needs nothing special (LoRA, KronA) registers no plugin and gets `TrainerPlugin`, which
injects the adapter, trains its parameters and saves it in difftune's format. A method with its own behaviour
subclasses it in its method file and registers it with one line, ``@register_plugin("sara")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError
from ..methods.base import MethodConfig
from ..methods.model import adapter_parameters, adapter_tensors, inject

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
    """

    def __init__(self, config: MethodConfig, name: str) -> None:
        self.config = config
        self.name = name

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
        """A method-specific optimizer at learning rate ``lr``, or None for the trainer's default."""
        return None

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """A term added to the loss each step (e.g. a regularizer), or None."""
        return None

    def on_step(self, model: nn.Module, step: int, max_steps: int, optimizer: Any) -> None:
        """Called after each optimizer step (``step`` counts from 1), for progressive schedules."""
        return None  # optional hook: most methods have no schedule

    def save_trained(self, pipe: Any, model: nn.Module, path: Path, base_model: str, component: str) -> Path:
        """Write the training result to folder ``path`` (default: the adapter in difftune's format)."""
        from ..serialization import save_adapter_file

        return save_adapter_file(model, path, name=self.name, base_model=base_model, component=component)
