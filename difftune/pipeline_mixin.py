"""`DifftuneAdapterMixin`: difftune's adapter verbs as methods of a diffusers pipeline, and a ``__call__`` that takes
per-call adapter inputs.

The files in ``pipelines/`` combine it with stock diffusers pipelines; they load as diffusers custom pipelines::

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("stable_diffusion"),
                                             trust_remote_code=True)
    pipe.load_adapter("out/style", weight=0.8)
    pipe(["a cat", "a dog"], adapter_inputs={"adapter_weights": {"style": [1.0, 0.0]}})   # style on the cat only
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from . import loading
from .components import pipeline_kind
from .errors import bad_value
from .methods.context import adapter_inputs as _inputs
from .methods.context import expand_inputs


def _n_prompts(kind: str, args: Mapping[str, Any]) -> int | None:
    if kind == "dit":
        labels = args.get("class_labels")
        if isinstance(labels, Tensor):
            return labels.numel()
        return len(labels) if isinstance(labels, (list, tuple)) else 1
    prompt = args.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = args.get("prompt_embeds")
    return embeds.shape[0] if isinstance(embeds, Tensor) else None


def call_with_adapter_inputs(pipe: Any, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                             inputs: Mapping[str, Any] | None = None) -> Any:
    """Run ``call(*args, **kwargs)`` (a pipeline's stock ``__call__``) with per-call adapter inputs.

    Per-prompt values in ``inputs`` (a list of one item per prompt, or a tensor with one row per prompt) are expanded
    to the batch the denoiser sees: repeated for ``num_images_per_prompt`` and doubled for classifier-free guidance
    in the pipeline's own order (SD, SDXL, SD3, PixArt: unconditional half first; DiT: conditional half first; Flux:
    never, its guidance value is embedded). Text
    pipelines also pass each item's ``prompt`` (the negative prompt, or "", for the unconditional half).
    """
    if inputs is not None and not isinstance(inputs, Mapping):
        raise bad_value("adapter_inputs", inputs, "a mapping of input names to values",
                        "e.g. {'adapter_weights': {'style': [1.0, 0.5]}}")
    inputs = dict(inputs or {})
    signature = inspect.signature(call)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return call(*args, **kwargs)  # the pipeline reports its own argument errors
    params = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    values = {**params, **bound}
    kind = pipeline_kind(pipe)
    n = _n_prompts(kind, values)
    if n is None:  # no prompt to count (e.g. only latents given): pass the inputs as they are
        with _inputs(**inputs):
            return call(*args, **kwargs)
    guidance = values.get("guidance_scale")
    guided = isinstance(guidance, (int, float)) and guidance > 1
    unet = getattr(pipe, "unet", None)
    if guided and unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is not None:
        guided = False  # guidance-distilled UNets (LCM) take guidance as an embedding, not a doubled batch
    if kind == "flux":
        guided = False  # FLUX.1's guidance_scale is embedded too (guidance-distilled): the batch is never doubled
    negative: dict[str, Any] = {}
    prompt = values.get("prompt")
    if kind != "dit" and prompt is not None and "prompt" not in inputs:
        inputs["prompt"] = [prompt] * n if isinstance(prompt, str) else list(prompt)
        neg = values.get("negative_prompt") or ""
        negative["prompt"] = [neg] * n if isinstance(neg, str) else list(neg)
    per_prompt = int(values.get("num_images_per_prompt") or 1)
    expanded = expand_inputs(inputs, n, per_prompt, guided, uncond_first=kind != "dit", negative=negative)
    with _inputs(**expanded):
        return call(*args, **kwargs)


class DifftuneAdapterMixin:
    """Adds ``load_adapter``, ``set_adapter_weights``, ``fuse_adapters``, ``unfuse_adapters``, ``delete_adapter``,
    ``list_adapters`` and ``save_adapter`` to a pipeline class, and ``adapter_inputs=`` to its ``__call__``."""

    def __call__(self, *args: Any, adapter_inputs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return call_with_adapter_inputs(self, super().__call__, args, kwargs, adapter_inputs)

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
