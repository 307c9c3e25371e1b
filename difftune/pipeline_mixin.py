"""`DifftuneAdapterMixin`: difftune's adapter verbs as methods of a diffusers pipeline.

The files in ``pipelines/`` combine it with stock diffusers pipelines; they load as diffusers custom pipelines::

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("stable_diffusion"),
                                             trust_remote_code=True)
    pipe.load_adapter("out/style", weight=0.8)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import loading


class DifftuneAdapterMixin:
    """Adds ``load_adapter``, ``set_adapter_weights``, ``fuse_adapters``, ``unfuse_adapters``, ``delete_adapter``,
    ``list_adapters`` and ``save_adapter`` to a pipeline class."""

    def load_adapter(self, path: str | Path, name: str | None = None, weight: float = 1.0,
                     component: str | None = None) -> str:
        return loading.load_adapter(self, path, name=name, weight=weight, component=component)

    def save_adapter(self, path: str | Path, name: str | None = None) -> Path:
        return loading.save_adapter(self, path, name=name)

    def set_adapter_weights(self, weights: Mapping[str, float]) -> None:
        loading.set_adapter_weights(self, weights)

    def fuse_adapters(self, names: str | Sequence[str] | None = None) -> None:
        loading.fuse(self, names)

    def unfuse_adapters(self, names: str | Sequence[str] | None = None) -> None:
        loading.unfuse(self, names)

    def delete_adapter(self, name: str | Sequence[str]) -> None:
        loading.delete_adapter(self, name)

    def list_adapters(self) -> dict[str, dict[str, Any]]:
        return loading.list_adapters(self)
