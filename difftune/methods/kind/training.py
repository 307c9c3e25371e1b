"""KIND's trainer plugin: pretraining with KIND structure (the base trains too) and transfer to new classes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..plugin import TrainerPlugin, register_plugin
from ..verbs import hosts, inject
from .adapter import KINDAdapter, KINDConfig
from .parts import kind_adapters, load_parts


@register_plugin("kind")
class KINDPlugin(TrainerPlugin):
    """Pretraining with KIND structure (``train_base``: the whole model trains) and transfer (``source``: frozen
    learngenes and reused tailors, only fresh tailor groups train)."""

    partially_used = True  # a batch without some class leaves that class's tailors (and row) out of the loss

    def prepare(self, pipe: Any, model: nn.Module) -> nn.Module:
        from ...serialization import read_tensors

        config: KINDConfig = self.config  # type: ignore[assignment]
        inject(model, config, name=self.name, freeze_base=True)
        if config.source:
            tensors = read_tensors(config.source)
            load_parts(model, self.name, tensors, learngenes=True, classes=config.reuse_classes)
            for _, a in kind_adapters(model, self.name, rows=True):
                for c in a.groups():
                    if c not in config.reuse_classes:
                        a.drop_group(c)
                        a.add_group(c, fresh=True)
        return model

    def _base_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """``train_base``: the model's own parameters that train (all but the adapters and the S weights W0, which
        the KIND layers replace), by name."""
        adapter_ids = {id(p) for _, h in hosts(model) for p in h.adapters.parameters()}
        s_weights = {id(h.base_layer.weight) for _, h in hosts(model)
                     if self.name in h.adapters and isinstance(h.adapters[self.name], KINDAdapter)}
        return {n: p for n, p in model.named_parameters() if id(p) not in adapter_ids and id(p) not in s_weights}

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        tensors = super().checkpoint_tensors(model)
        if self.config.train_base:  # type: ignore[attr-defined]  # a resumed pretraining needs the trained base too
            tensors.update({f"base.{n}": p for n, p in self._base_parameters(model).items()})
        return tensors

    def saved_tensors(self, model: nn.Module) -> list[Tensor]:
        kept = super().saved_tensors(model)  # the adapter; with train_base also the whole base, saved as a pipeline
        return kept + list(model.parameters()) if self.config.train_base else kept  # type: ignore[attr-defined]

    def save_trained(self, pipe: Any, model: nn.Module, path: Path, base_model: str, component: str) -> Path:
        """The KIND adapter at ``path``; with ``train_base`` also the trained base (embedders, adaLN, final layer,
        biases; without the adapter) as a diffusers pipeline at ``path``'s sibling ``pipeline``, the model the
        adapter belongs on: ``load_adapter(DiffusionPipeline.from_pretrained(out / "pipeline"), out / "adapter")``."""
        from ...loading import delete_adapter
        from ...serialization import save_adapter_file

        saved = save_adapter_file(model, path, name=self.name, base_model=base_model, component=component)
        if self.config.train_base:  # type: ignore[attr-defined]
            base = copy.deepcopy(model)
            delete_adapter(base, self.name)
            pipe.register_modules(**{component: base})
            try:
                pipe.save_pretrained(str(Path(path).parent / "pipeline"))
            finally:
                pipe.register_modules(**{component: model})
            # no line here: the trainer writes into a temp folder and says where the pipeline lands when it moves it
        return saved

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        config: KINDConfig = self.config  # type: ignore[assignment]
        out: list[nn.Parameter] = []
        for _, a in kind_adapters(model, self.name, rows=True):
            if config.train_learngenes:
                out += a.learngene_parameters()
            for c in a.groups():
                if c not in config.reuse_classes:
                    out += a.tailor_parameters(c)
        chosen = {id(p) for p in out}
        for p in (q for q in model.parameters() if id(q) not in chosen):
            p.requires_grad_(False)
        if config.train_base:
            out += list(self._base_parameters(model).values())
        for p in out:
            p.requires_grad_(True)
        return out
