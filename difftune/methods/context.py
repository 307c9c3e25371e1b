"""Per-call inputs for adapters: what a layer deep inside the denoiser needs to know about the current call.

A class gate needs each batch item's class label, a concept membrane its prompt, a control tuner its control image.
None of these reach a ``Linear`` through its own ``forward``, so they travel in a context variable:

* ``with difftune.adapter_inputs(control=img, adapter_weights={"style": [1.0, 0.3]}): pipe(...)`` sets inputs for
  everything called inside the block (nested blocks add to and override the outer ones);
* every model with adapters captures the arguments of its own forward (``class_labels``, ``encoder_hidden_states``,
  ``timestep``, ... and ``batch_size``) with a forward pre-hook, so the denoiser's real per-call values, already
  expanded to the classifier-free-guidance batch by the pipeline, are always there;
* the difftune pipelines' ``__call__(..., adapter_inputs=...)`` expand per-prompt inputs to that batch themselves
  (`expand_inputs`) and add each item's ``prompt`` (the negative prompt for the unconditional half).

Adapters read them with `Adapter.inputs()`. Under gradient checkpointing a block runs again during the backward
pass, after the denoiser's forward has returned; there the inputs of the latest denoiser call are used.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import bad_value

_CURRENT: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("difftune_inputs", default=None)
_EMPTY: Mapping[str, Any] = MappingProxyType({})
# The inputs of the latest captured denoiser call, for recomputation inside the backward pass only.
_LAST: list[Mapping[str, Any]] = [_EMPTY]

#: The key for per-batch-item adapter weights: ``{adapter name: sequence or tensor of B weights}``.
WEIGHTS_KEY = "adapter_weights"


def _check(inputs: Mapping[str, Any]) -> None:
    weights = inputs.get(WEIGHTS_KEY)
    if weights is None:
        return
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) for k in weights):
        raise bad_value(WEIGHTS_KEY, weights, "a mapping {adapter name: one weight per batch item}",
                        "e.g. adapter_weights={'style': [1.0, 0.0]} applies 'style' to the first image only")
    for name, w in weights.items():
        ok = isinstance(w, Tensor) and w.dim() == 1 and w.is_floating_point() or (
            isinstance(w, Sequence) and not isinstance(w, str) and len(w) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w))
        if not ok:
            raise bad_value(f"{WEIGHTS_KEY}[{name!r}]", w,
                            "a non-empty list (or 1-D float tensor) of numbers, one per batch item")
        values = torch.as_tensor(w, dtype=torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise bad_value(f"{WEIGHTS_KEY}[{name!r}]", w, "finite numbers")


@contextlib.contextmanager
def adapter_inputs(**inputs: Any) -> Iterator[Mapping[str, Any]]:
    """Make ``inputs`` visible to every adapter called inside the block (merged over any outer block's).

    ``adapter_weights={name: [w_1, ..., w_B]}`` gives adapter ``name`` one weight per batch item instead of its
    global weight (it must not be fused). Values must already match the batch the denoiser sees; the difftune
    pipelines' ``adapter_inputs=`` argument does that expansion for you.
    """
    _check(inputs)
    outer = _CURRENT.get() or _EMPTY
    merged = dict(outer)
    if WEIGHTS_KEY in outer and WEIGHTS_KEY in inputs:
        merged[WEIGHTS_KEY] = {**outer[WEIGHTS_KEY], **inputs[WEIGHTS_KEY]}
        inputs = {k: v for k, v in inputs.items() if k != WEIGHTS_KEY}
    merged.update(inputs)
    view = MappingProxyType(merged)
    token = _CURRENT.set(view)
    try:
        yield view
    finally:
        _CURRENT.reset(token)


def current_inputs() -> Mapping[str, Any]:
    """The inputs of the running call (empty outside any call)."""
    value = _CURRENT.get()
    if value is not None:
        return value
    if torch._C._current_graph_task_id() != -1:  # a checkpointed block recomputed during backward
        return _LAST[0]
    return _EMPTY


def item_weight(name: str, like: Tensor) -> Tensor | None:
    """Adapter ``name``'s per-item weights for this call as a (B, 1, ..., 1) tensor broadcasting against ``like``."""
    weights = current_inputs().get(WEIGHTS_KEY)
    if not weights or name not in weights:
        return None
    w = torch.as_tensor(weights[name], dtype=like.dtype, device=like.device).reshape(-1)
    if like.dim() == 0 or w.numel() != like.shape[0]:
        raise bad_value(f"{WEIGHTS_KEY}[{name!r}]", f"{w.numel()} weights", f"one weight per batch item "
                        f"({like.shape[0] if like.dim() else 0} at this layer)",
                        "With guidance the denoiser's batch is doubled; pass adapter_inputs= to a difftune pipeline, "
                        "which expands per-prompt weights itself.")
    return w.view(-1, *([1] * (like.dim() - 1)))


class InputCapture:
    """Forward hooks on a model with adapters: its call's arguments become per-call inputs, and its model-level
    parts get ``begin_call(inputs)`` before the layers run (e.g. to encode a control image once per call)."""

    def __init__(self, model: nn.Module) -> None:
        self.signature = inspect.signature(model.forward)
        self.tokens: list[contextvars.Token] = []
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, always_call=True)]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:  # let the model's own forward report its bad arguments
            bound = dict(kwargs)
        for p in self.signature.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(bound.get(p.name), dict):
                bound.update(bound.pop(p.name))
        if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            bound["batch_size"] = args[0].shape[0]
        merged = {**(_CURRENT.get() or _EMPTY), **bound}
        view = MappingProxyType(merged)
        self.tokens.append(_CURRENT.set(view))
        _LAST[0] = view
        parts = module._modules.get("difftune_parts")
        if parts is not None:
            for part in parts.values():
                begin = getattr(part, "begin_call", None)
                if begin is not None:
                    begin(view)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.tokens:
            _CURRENT.reset(self.tokens.pop())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _per_item(value: Any, n: int) -> bool:
    if isinstance(value, Tensor):
        return value.dim() > 0 and value.shape[0] == n
    return isinstance(value, (list, tuple)) and len(value) == n


def _repeat(value: Any, times: int) -> Any:
    if isinstance(value, Tensor):
        return value.repeat_interleave(times, dim=0)
    return [v for v in value for _ in range(times)]


def _join(first: Any, second: Any) -> Any:
    if isinstance(first, Tensor):
        return torch.cat([first, second.to(first.device)])
    return list(first) + list(second)


def expand_inputs(inputs: Mapping[str, Any], n_prompts: int, per_prompt: int = 1, guided: bool = False,
                  uncond_first: bool = True, negative: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Expand per-prompt inputs to the batch the denoiser sees: each repeated ``per_prompt`` times, then, with
    guidance, the unconditional half added (``negative[key]`` if given, else the same values) before or after.

    A value is per-prompt when it is a list/tuple of ``n_prompts`` items or a tensor whose first dimension is
    ``n_prompts``; a list or tensor of ``n_prompts · per_prompt`` items is taken as already per image. Anything else
    (a scalar, a string, a tensor of another batch size) is passed on unchanged. ``adapter_weights`` is expanded
    per adapter.
    """
    negative = negative or {}

    def one(value: Any, neg: Any) -> Any:
        if _per_item(value, n_prompts):
            value = _repeat(value, per_prompt)
            neg = _repeat(neg, per_prompt) if neg is not None and _per_item(neg, n_prompts) else neg
        elif not _per_item(value, n_prompts * per_prompt):
            return value
        if not guided:
            return value
        uncond = neg if neg is not None and _per_item(neg, n_prompts * per_prompt) else value
        return _join(uncond, value) if uncond_first else _join(value, uncond)

    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == WEIGHTS_KEY and isinstance(value, Mapping):
            out[key] = {n: one(list(w) if not isinstance(w, Tensor) else w, None) for n, w in value.items()}
        else:
            out[key] = one(value, negative.get(key))
    return out
