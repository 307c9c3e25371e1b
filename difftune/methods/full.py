"""Full fine-tuning: every parameter of the denoiser (or those of the modules matched by ``target_modules``) trains.

The baseline that parameter-efficient methods are measured against, and the way to train a model from scratch
(``model.from_scratch: true``). Not an adapter: the trainer saves the whole pipeline with the trained denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..targeting import find_targets
from .base import Adapter, MethodConfig, Site, register_method
from .plugin import TrainerPlugin, register_plugin


@register_method("full")
@dataclass
class FullConfig(MethodConfig):
    """Train the parameters of every module matched by ``target_modules`` (default: all of them)."""

    target_modules: list[str] = field(default_factory=lambda: [".*"])
    is_adapter = False

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        return None


@register_plugin("full")
class FullPlugin(TrainerPlugin):
    """Trains the selected parameters in place and saves the whole pipeline."""

    config: FullConfig

    def prepare(self, pipe: Any, model: nn.Module) -> nn.Module:
        selected = set()
        for module_name in find_targets(model, self.config.target_modules, self.config.exclude_modules):
            selected.update(id(p) for p in model.get_submodule(module_name).parameters(recurse=False))
        for p in model.parameters():
            p.requires_grad_(id(p) in selected)
        return model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def saved_tensors(self, model: nn.Module) -> list[Tensor]:
        return list(model.parameters())  # the whole pipeline is saved

    def save_trained(self, pipe: Any, model: nn.Module, path: Path, base_model: str, component: str) -> Path:
        """The whole pipeline, with the trained denoiser, in diffusers format (``from_pretrained`` loads it)."""
        pipe.save_pretrained(str(path))
        return Path(path)
