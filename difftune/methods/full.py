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
from .base import Adapter, MethodConfig, register_method


@register_method("full")
@dataclass
class FullConfig(MethodConfig):
    """Train the parameters of every module matched by ``target_modules`` (default: all of them)."""

    target_modules: list[str] = field(default_factory=lambda: [".*"])
    is_adapter = False

    def make_adapter(self, base_layer: nn.Module) -> Adapter | None:
        return None

    def _selected(self, model: nn.Module) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for module_name in find_targets(model, self.target_modules, self.exclude_modules):
            for pname, p in model.get_submodule(module_name).named_parameters(recurse=False):
                out[f"{module_name}.{pname}"] = p
        return out

    def prepare(self, model: nn.Module, name: str) -> None:
        selected = {id(p) for p in self._selected(model).values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in selected)

    def trainable_parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def checkpoint_tensors(self, model: nn.Module, name: str) -> dict[str, Tensor]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save_trained(self, pipe: Any, model: nn.Module, path: Any, name: str, base_model: str, component: str) -> Any:
        """The whole pipeline, with the trained denoiser, in diffusers format (``from_pretrained`` loads it)."""
        pipe.save_pretrained(str(path))
        return Path(path)
