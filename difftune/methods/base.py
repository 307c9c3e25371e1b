"""The adapter core shared by every method: config base, registry, the host wrapper and the model-level verbs.

A method file defines three things: a config dataclass registered with one line (``@register_method("lora")``),
one `Adapter` subclass per supported base-layer type, and the config's ``make_adapter`` that picks it. Everything
else (inject, weights, enable/disable, merge/unmerge, remove, state dicts) is written once here.

Layout of an adapted module (peft-style module replacement, never a patched ``forward``)::

    parent.to_q = AdapterHost(base_layer=<the original nn.Linear>)
    parent.to_q.adapters["style"]   = LoRAAdapter(...)   # parameters lora_A, lora_B
    parent.to_q.adapters["subject"] = KronAAdapter(...)

The host's output is ``base(x) + Σ_i w_i · δ_i(x)`` over the enabled adapters i with weights w_i. For weight-space
methods δ_i(x) = ΔW_i x, so merging writes ``W = W0 + Σ w_i ΔW_i`` (computed in fp32, original kept for an exact
unmerge). Activation-space methods set ``mergeable = False`` and may rewrite the output (or input) freely.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..targeting import canonical_name, find_targets

METHODS: dict[str, type[MethodConfig]] = {}


def register_method(name: str):
    """Class decorator registering a `MethodConfig` subclass under ``name`` (the registry key and file name)."""

    def wrap(cls: type[MethodConfig]) -> type[MethodConfig]:
        if name in METHODS and METHODS[name] is not cls:
            raise DifftuneError(f"method name {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
        cls.method = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type[MethodConfig]:
    """The config class registered as ``name``; a `DifftuneError` listing the registered names otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise bad_value("method", name, f"one of the registered methods {sorted(METHODS)}",
                        "Was the adapter written by a newer difftune, or is the method name misspelled?")
    return METHODS[name]


def check_weight(weight: object, field_name: str = "weight") -> float:
    """``weight`` as a float; strings, bools and non-finite numbers are refused rather than coerced."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise bad_value(field_name, weight, "a finite number (e.g. 0.8)",
                        "Adapter weights scale the adapter's contribution; pass a float, not a string.")
    return float(weight)


def check_adapter_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name or name.startswith("_"):
        raise bad_value("name", name, "a non-empty string without '.' that does not start with '_'",
                        "Adapter names key a ModuleDict, e.g. 'default' or 'style_v2'.")
    return name


@dataclass
class MethodConfig(abc.ABC):
    """Fields every method shares; each method subclasses this and adds its hyperparameters.

    Attributes:
        target_modules: module-name patterns to adapt (equal name, dotted suffix such as ``"to_q"``, or a regex).
        exclude_modules: patterns removed from the selection.
    """

    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)

    method: ClassVar[str] = ""
    #: Whether ΔW exists (weight-space) so the adapter can be merged into the base weights.
    mergeable: ClassVar[bool] = True
    #: False for training-only methods (``full``) that add no adapter and save a whole model instead.
    is_adapter: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):  # one pattern given bare: accept it as a one-item list
                value = [value]
                setattr(self, name, value)
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise bad_value(name, value, "a list of non-empty module-name patterns", "e.g. ['to_q', 'to_v'].")
        if not self.target_modules:
            raise bad_value("target_modules", self.target_modules, "at least one pattern",
                            "e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'] for the attention projections.")

    @abc.abstractmethod
    def make_adapter(self, base_layer: nn.Module) -> Adapter | None:
        """The adapter for ``base_layer``, or None when this method does not support that layer type."""

    def accepts(self, module: nn.Module) -> bool:
        """Whether a module matched by ``target_modules`` is adapted at all (False: silently passed over).

        Methods whose patterns select broadly (SaRA's default is every module) skip modules with nothing to adapt
        here; `make_adapter` returning None is for modules that should be adapted but cannot be (an error).
        """
        return True

    def default_lr(self) -> float:
        """The learning rate used when the training config gives none."""
        return 1e-4

    @classmethod
    def describe(cls, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        """Facts about a saved adapter for ``difftune inspect``; ``parameters`` counts the trained values."""
        return {"parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point())}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- The trainer's interface. The trainer calls only these and knows no method by name; a method overrides
    # -- what it needs (its own optimizer, an extra loss term, a progressive schedule, its own save).

    def prepare(self, model: nn.Module, name: str) -> None:
        """Make ``model`` trainable by this method (default: inject the adapter, freezing everything else)."""
        inject(model, self, name=name, freeze_base=True)

    def trainable_parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        """What the optimizer updates (default: the adapter's parameters)."""
        return adapter_parameters(model, name)

    def checkpoint_tensors(self, model: nn.Module, name: str) -> dict[str, Tensor]:
        """Live tensors a resumable checkpoint must hold (default: the adapter's parameters and buffers)."""
        return adapter_tensors(model, name)

    def make_optimizer(self, params: list[nn.Parameter], optimizer_config: Any,
                       lr: float) -> torch.optim.Optimizer | None:
        """A method-specific optimizer at learning rate ``lr``, or None for the trainer's default."""
        return None

    def extra_loss(self, model: nn.Module, name: str) -> Tensor | None:
        """A term added to the diffusion loss each step (e.g. a regularizer), or None."""
        return None

    def on_step(self, model: nn.Module, name: str, step: int, max_steps: int, optimizer: Any) -> None:
        """Called after each optimizer step (``step`` counts from 1), for progressive schedules."""
        return None  # optional hook: most methods have no schedule

    def save_trained(self, pipe: Any, model: nn.Module, path: Any, name: str, base_model: str, component: str) -> Any:
        """Write the training result to folder ``path`` (default: the adapter in difftune's format)."""
        from ..serialization import save_adapter_file

        return save_adapter_file(model, path, name=name, base_model=base_model, component=component)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        """Build from a mapping; unknown keys are an error naming the key and the known fields."""
        if not isinstance(data, Mapping):
            raise bad_value(f"{cls.method} config", data, "a mapping of field names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DifftuneError(f"unknown key(s) {unknown} for method {cls.method!r}; known fields: {sorted(known)}")
        return cls(**dict(data))

    def check_types(self) -> None:
        """Check field values against their annotations (catches YAML/JSON strings where numbers belong)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints.get(f.name)
            if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise bad_value(f.name, value, f"a number ({hint.__name__})")
            if hint is int and not isinstance(value, int):
                raise bad_value(f.name, value, "an integer")
            if hint is bool and not isinstance(value, bool):
                raise bad_value(f.name, value, "true or false")
            if hint is str and not isinstance(value, str):
                raise bad_value(f.name, value, "a string")


class Adapter(nn.Module):
    """One method's state on one base layer.

    Subclasses keep everything that must be saved in parameters or persistent buffers whose names start with
    ``prefix``, so saving is filtering the state dict. Weight-space methods implement `delta_weight`; the default
    `delta` then computes ΔW·x with the base layer's own operator (stride, padding, ...). Override `delta` when
    there is a cheaper route that never materializes ΔW.
    """

    prefix: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    #: Merges by writing its selected entries and restores them exactly itself (no dense copy of W0 is kept).
    sparse: ClassVar[bool] = False
    #: Acts through the base layer's parameters (see `param_overrides`) rather than by adding to its output.
    param_space: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    def delta_weight(self) -> Tensor:
        """ΔW with the shape of ``base_layer.weight``."""
        raise DifftuneError(f"method {self.config.method!r} is not weight-space: it has no ΔW and cannot be merged")

    def merge_params(self) -> tuple[str, ...]:
        """Names of the base layer's parameters a merge changes."""
        return ("weight",)

    def delta_params(self) -> dict[str, Tensor]:
        """Dense Δ (fp32) for each name in `merge_params`."""
        return {"weight": self.delta_weight()}

    # -- Sparse adapters (``sparse = True``) write and restore their own entries; they override these four.
    def restore(self, pname: str, param: Tensor) -> None:
        """Write the base values back into this adapter's entries of ``param``."""
        raise DifftuneError(f"{type(self).__name__} is not a sparse adapter")

    def add_into(self, pname: str, param: Tensor, weight: float) -> None:
        """``param += weight · Δ`` on this adapter's entries."""
        raise DifftuneError(f"{type(self).__name__} is not a sparse adapter")

    def recapture(self, base_layer: nn.Module) -> None:
        """Take the base layer's current values as the new base (after other adapters were baked into it)."""
        raise DifftuneError(f"{type(self).__name__} is not a sparse adapter")

    def is_stale(self, weight: float) -> bool:
        """Whether the merged values in the base layer lag behind the adapter's own (it trained since)."""
        return False

    def param_overrides(self, params: dict[str, Tensor], base_layer: nn.Module, weight: float,
                        merged: bool) -> dict[str, Tensor]:
        """The parameters the base layer runs with (``param_space`` adapters); ``params`` holds earlier overrides."""
        return params

    def adopt(self, tensors: Mapping[str, Tensor], base_layer: nn.Module) -> None:
        """Reshape to saved ``tensors`` (local names) before they are loaded, e.g. a stored selection mask."""
        return None  # most adapters' shapes follow from the config alone

    def pre_forward(self, x: Tensor, weight: float) -> Tensor:
        """Rewrite the base layer's input (activation-space methods); identity by default."""
        return x

    def delta(self, x: Tensor, base_layer: nn.Module) -> Tensor:
        """δ(x), the adapter's additive contribution to the base layer's output: ΔW·x by default."""
        dw = self.delta_weight()
        return apply_weight(base_layer, x.to(dw.dtype), dw)

    def forward(self, x: Tensor, out: Tensor, weight: float, base_layer: nn.Module) -> Tensor:
        """The host's output after this adapter: ``out + weight · δ(x)``."""
        return out + weight * self.delta(x, base_layer).to(out.dtype)


def apply_weight(base_layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``base_layer``'s operator with another weight and no bias (used to compute ΔW·x)."""
    if isinstance(base_layer, nn.Linear):
        return F.linear(x, weight)
    if isinstance(base_layer, nn.Conv2d):
        return base_layer._conv_forward(x, weight, None)  # honours padding_mode, stride, dilation, groups
    raise DifftuneError(f"no ΔW·x rule for {type(base_layer).__name__}; the method must override `delta`")


class AdapterHost(nn.Module):
    """Wraps one base layer and holds every adapter injected into it, by name."""

    _difftune_host = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.adapter_weights: dict[str, float] = {}
        self.disabled: set[str] = set()
        self.merged: list[str] = []

    def __getattr__(self, name: str) -> Any:
        # Code that reads e.g. `attn.to_q.weight.dtype` or `conv.in_channels` must keep working on the host.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def active(self) -> list[tuple[Adapter, float]]:
        return [(a, self.adapter_weights[n]) for n, a in self.adapters.items()
                if n not in self.disabled and n not in self.merged]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        active = self.active()
        for adapter, w in active:
            x = adapter.pre_forward(x, w)
        params: dict[str, Tensor] = {}
        if any(a.param_space for a in self.adapters.values()):
            if any(self.adapters[n].is_stale(self.adapter_weights[n]) for n in self.merged):
                self._write_merged()  # merged values follow an adapter that trains (in place, no copy)
            for n, adapter in self.adapters.items():
                if adapter.param_space and n not in self.disabled:
                    w, merged = self.adapter_weights[n], n in self.merged
                    params = adapter.param_overrides(params, self.base_layer, w, merged)
        if params:
            out = torch.func.functional_call(self.base_layer, params, (x, *args), kwargs)
        else:
            out = self.base_layer(x, *args, **kwargs)
        for adapter, w in active:
            out = adapter(x, out, w, self.base_layer)
        return out

    # -- merging: W = W0 + Σ_merged w_i ΔW_i in fp32, with W0 kept so unmerge is exact (no drift over cycles).
    def check_mergeable(self, names: Iterable[str]) -> None:
        for n in names:
            if not self.adapters[n].mergeable:
                raise DifftuneError(
                    f"adapter {n!r} ({self.adapters[n].config.method}) acts on activations and cannot be merged into "
                    "weights; keep it unmerged (it runs as a module at inference)"
                )
            if n in self.disabled:
                raise DifftuneError(f"adapter {n!r} is disabled; enable it before merging")

    def merge(self, names: Iterable[str]) -> None:
        names = [n for n in names if n not in self.merged]
        if not names:
            return
        self.check_mergeable(names)  # before any state changes: a refused merge leaves the host as it was
        self.merged.extend(names)
        self._write_merged()

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        drop = set(self.merged if names is None else names) & set(self.merged)
        if drop:
            self.merged = [n for n in self.merged if n not in drop]
            self._write_merged()

    def _write_merged(self) -> None:
        """Set each parameter to ``W0 + Σ_merged w_i Δ_i`` (sums in fp32).

        W0 comes back first: from a dense copy kept only while a dense (e.g. LoRA) adapter is merged into that
        parameter, and from the base values sparse adapters keep for their own entries.
        """
        with torch.no_grad():
            for pname, param in list(self.base_layer.named_parameters(recurse=False)):
                self._write_param(pname, param)

    def _write_param(self, pname: str, param: Tensor) -> None:
        key = f"original_{pname}"
        touching = {n: a for n, a in self.adapters.items() if pname in a.merge_params()}
        merged = [n for n in self.merged if n in touching]
        dense = [n for n in merged if not touching[n].sparse]
        original = self._buffers.get(key)
        if original is not None:
            param.copy_(original)
        for adapter in touching.values():
            if adapter.sparse:
                adapter.restore(pname, param)
        if dense:
            if original is None:
                original = param.detach().clone()
                self.register_buffer(key, original, persistent=False)
            total = original.float()
            for n in dense:
                total = total + self.adapter_weights[n] * touching[n].delta_params()[pname].float()
            param.copy_(total.to(param.dtype))
        elif original is not None:
            del self._buffers[key]
        for n in merged:
            if touching[n].sparse:
                touching[n].add_into(pname, param, self.adapter_weights[n])

    def bake(self, names: Sequence[str]) -> None:
        """Make merged adapters ``names`` part of the base, W0 ← W0 + Σ w_i Δ_i, so they can be deleted."""
        keep = [n for n in self.merged if n not in names]
        self.merged = [n for n in self.merged if n in names]
        self._write_merged()
        with torch.no_grad():
            for key in [k for k in self._buffers if k.startswith("original_")]:
                del self._buffers[key]  # the current values are the new base
            for adapter in self.adapters.values():
                if adapter.sparse:
                    adapter.recapture(self.base_layer)
        self.merged = []
        self.merge(keep)

    def extra_repr(self) -> str:
        return f"weights={self.adapter_weights}, disabled={sorted(self.disabled)}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------------------------
# Model-level verbs. Each takes the model (an nn.Module) the adapters live in.


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """(name, host) for every adapter host in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterHost):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in injection order."""
    seen: dict[str, None] = {}
    for _, host in hosts(model):
        seen.update(dict.fromkeys(host.adapters))
    return list(seen)


def get_config(model: nn.Module, name: str) -> MethodConfig:
    """The config adapter ``name`` was injected with."""
    for _, host in hosts(model):
        if name in host.adapters:
            return host.adapters[name].config
    raise _unknown_adapter(model, name)


def _unknown_adapter(model: nn.Module, name: object) -> DifftuneError:
    return bad_value("name", name, f"one of the adapters in the model {adapter_names(model)}")


def _names(model: nn.Module, names: str | Sequence[str] | None) -> list[str]:
    existing = adapter_names(model)
    if names is None:
        return existing
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in existing:
            raise _unknown_adapter(model, n)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(
    model: nn.Module, config: MethodConfig, name: str = "default", weight: float = 1.0, freeze_base: bool = True
) -> list[str]:
    """Add adapter ``name`` of ``config``'s method to every module of ``model`` that ``config`` targets.

    Works on models built on the meta device (adapter tensors are created where the base weights live).

    Args:
        model: the module to adapt (a UNet, a transformer, a text encoder, or any nn.Module).
        config: a registered method's config (e.g. ``LoRAConfig(rank=4, alpha=4, target_modules=["to_q"])``).
        name: the adapter's name; several adapters can live in one model.
        weight: its weight w in ``base + Σ w_i δ_i``.
        freeze_base: make only this adapter's parameters trainable (everything else ``requires_grad=False``).

    Returns:
        The names of the adapted modules.

    Raises:
        DifftuneError: unregistered config type, bad name or weight, a name already in use, nothing matched, or
            matched modules of a type the method does not support.
    """
    if not isinstance(config, MethodConfig) or type(config).method not in METHODS:
        raise bad_value("config", config, f"a registered method config ({sorted(METHODS)})")
    if not config.is_adapter:
        raise DifftuneError(f"method {config.method!r} trains the model itself and adds no adapter; use it through "
                            "the trainer (difftune train), not inject()")
    name, weight = check_adapter_name(name), check_weight(weight)
    if not isinstance(freeze_base, bool):
        raise bad_value("freeze_base", freeze_base, "true or false")
    if name in adapter_names(model):
        raise DifftuneError(f"an adapter named {name!r} is already in the model; pick another name or remove it first")
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    planned: list[tuple[str, nn.Module, Adapter]] = []
    unsupported: dict[str, str] = {}
    for target in targets:
        module = model.get_submodule(target)
        base = module.base_layer if isinstance(module, AdapterHost) else module
        if not config.accepts(base):
            continue
        merged = module.merged[:] if isinstance(module, AdapterHost) else []
        if merged:  # a new adapter sees (and may record) the true base values, not merged ones
            module.unmerge()
        try:
            adapter = config.make_adapter(base)
        except DifftuneError as e:  # a per-layer refusal (e.g. shapes a method cannot split): name the layer
            raise DifftuneError(f"cannot adapt {canonical_name(target)!r}: {e}") from e
        finally:
            if merged:
                module.merge(merged)
        if adapter is None:
            unsupported[canonical_name(target)] = type(base).__name__
        else:
            planned.append((target, module, adapter))
    if not planned and not unsupported:
        raise DifftuneError(f"method {config.method!r}: none of the {len(targets)} module(s) matched by "
                            f"`target_modules`={config.target_modules} has anything it can adapt")
    if unsupported:
        examples = dict(list(unsupported.items())[:5])
        raise DifftuneError(
            f"method {config.method!r} cannot adapt {len(unsupported)} matched module(s) of unsupported type, e.g. "
            f"{examples}. Narrow `target_modules` or add `exclude_modules` for them."
        )
    for target, module, adapter in planned:
        host = module if isinstance(module, AdapterHost) else AdapterHost(module)
        host.adapters[name] = adapter
        host.adapter_weights[name] = weight
        if host is not module:
            _set_module(model, target, host)
    if freeze_base:
        marker = f"adapters.{name}."
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.startswith(marker) or f".{marker}" in pname)
    return [canonical_name(t) for t, _, _ in planned]


def remove(model: nn.Module, names: str | Sequence[str] | None = None, merge: bool = False) -> None:
    """Delete adapters (all when ``names`` is None); hosts left empty are replaced by their original module.

    With ``merge=True`` the adapters' weighted ΔW is baked into the base weights first (peft's ``merge_and_unload``);
    otherwise merged adapters are unmerged, so the base weights are restored exactly. Parameters are freed.
    """
    names = _names(model, names)
    if merge:
        _merge(model, names)
    # Innermost hosts first: putting back an outer host's base_layer renames the hosts nested inside it.
    for host_name, host in sorted(hosts(model), key=lambda item: -item[0].count(".")):
        gone = [n for n in names if n in host.adapters]
        if not gone:
            continue
        baked = [n for n in gone if n in host.merged]
        if merge and baked:
            # The baked adapters become part of the original, so that adapters that stay merged can still be
            # unmerged exactly down to the new base.
            host.bake(baked)
        host.unmerge(gone)
        for n in gone:
            del host.adapters[n]
            host.adapter_weights.pop(n, None)
            host.disabled.discard(n)
        if not len(host.adapters):
            _set_module(model, host_name, host.base_layer)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Write ``W0 + Σ w_i ΔW_i`` into the base weights.

    ``names=None`` merges every enabled weight-space adapter (activation-space ones keep running as modules);
    named adapters must all be mergeable and enabled. Nothing changes when the merge is refused.
    """
    _merge(model, names)


def _merge(model: nn.Module, names: str | Sequence[str] | None) -> None:  # `remove(merge=...)` shadows `merge`
    explicit = names is not None
    names = _names(model, names)
    plan = []
    for _, host in hosts(model):
        here = [n for n in names if n in host.adapters]
        if not explicit:
            here = [n for n in here if host.adapters[n].mergeable and n not in host.disabled]
        host.check_mergeable(here)
        plan.append((host, here))
    for host, here in plan:
        host.merge(here)


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Restore the exact original weights for the named (default: all) merged adapters."""
    names = _names(model, names)
    for _, host in hosts(model):
        host.unmerge([n for n in names if n in host.adapters])


def set_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Set each named adapter's weight w; merged adapters are re-merged with the new weight."""
    if not isinstance(weights, Mapping):
        raise bad_value("weights", weights, "a mapping {adapter name: weight}")
    checked = {n: check_weight(w, f"weights[{n!r}]") for n, w in weights.items()}
    _names(model, list(checked))
    for _, host in hosts(model):
        touched = False
        for n, w in checked.items():
            if n in host.adapters:
                host.adapter_weights[n] = w
                touched = touched or n in host.merged
        if touched:
            host._write_merged()


def refresh(model: nn.Module) -> None:
    """Rewrite every merged adapter's values into the base weights (after its tensors were changed via ``.data``)."""
    for _, host in hosts(model):
        if host.merged:
            host._write_merged()


def get_weights(model: nn.Module) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, host in hosts(model):
        out.update(host.adapter_weights)
    return out


def enable(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Re-enable adapters turned off by `disable`."""
    names = _names(model, names)
    for _, host in hosts(model):
        host.disabled.difference_update(names)


def disable(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Turn adapters off without deleting them (the model then computes the base output for them)."""
    names = _names(model, names)
    for _, host in hosts(model):
        merged = [n for n in names if n in host.merged]
        if merged:
            raise DifftuneError(f"adapter(s) {merged} are merged into the weights; unmerge before disabling")
        host.disabled.update(n for n in names if n in host.adapters)


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors keyed ``<canonical module name>.<prefixed tensor name>``."""
    out: dict[str, Tensor] = {}
    for host_name, host in hosts(model):
        if name in host.adapters:
            path = canonical_name(host_name)
            for key, tensor in host.adapters[name].state_dict().items():
                out[f"{path}.{key}"] = tensor
    if not out and name not in adapter_names(model):
        raise _unknown_adapter(model, name)
    return out


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Like `adapter_state_dict` but the live tensors (parameters and persistent buffers), for loading in place."""
    out: dict[str, Tensor] = {}
    for host_name, host in hosts(model):
        if name in host.adapters:
            path = canonical_name(host_name)
            # persistent state only (not caches such as indices); entries an adapter computes at save time
            # (SaRA's packed mask) come as fresh tensors, so copying into them is harmless
            for key, tensor in host.adapters[name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = tensor
    return out


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Parameters of the named adapter (all adapters when None)."""
    names = _names(model, name)
    params = []
    for _, host in hosts(model):
        for n in names:
            if n in host.adapters:
                params.extend(host.adapters[n].parameters())
    return params


def target_fingerprint(model: nn.Module, name: str) -> dict[str, Any]:
    """Names, types and parameter shapes of the base layers adapter ``name`` sits on, hashed.

    Recorded at save time and compared at load time to tell "this adapter was made for another base model".
    """
    import hashlib

    lines = []
    for host_name, host in hosts(model):
        if name in host.adapters:
            shapes = [f"{canonical_name(k)}:{tuple(v.shape)}" for k, v in host.base_layer.named_parameters()
                      if ".adapters." not in k and not k.startswith("adapters.")]
            lines.append(f"{canonical_name(host_name)}|{type(host.base_layer).__name__}|{','.join(shapes)}")
    lines.sort()
    return {"modules": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
