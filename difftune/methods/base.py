"""What a method is made of: the config base class, the registry, and the per-layer `Adapter` base class.

A method file defines three things: a config dataclass registered with one line (``@register_method("lora")``),
one `Adapter` subclass per supported base-layer type, and the config's ``make_adapter`` that picks it. The rest is
written once: the host that wraps a layer (`host.py`), the model-level verbs (`verbs.py`: inject, weights,
enable/disable, merge/unmerge, remove, state dicts), per-call inputs (`context.py`), saving (`serialization.py`)
and training (`plugin.py`: a method's training behaviour lives in its trainer plugin, not its config).

Layout of an adapted module (peft-style module replacement, never a patched ``forward``)::

    parent.to_q = AdapterHost(base_layer=<the original nn.Linear>)
    parent.to_q.adapters["style"]   = LoRAAdapter(...)   # parameters lora_A, lora_B
    parent.to_q.adapters["subject"] = KronAAdapter(...)
    model.difftune_parts["hint"]    = <a module owned by adapter "hint" as a whole, e.g. SCEdit's hint encoder>

The host's output is ``base(x) + Σ_i w_i · δ_i(x)`` over the enabled adapters i with weights w_i. Weight-space
methods (those that define ΔW through `Adapter.delta_weight` or `Adapter.delta_params`) merge as
``W = W0 + Σ w_i ΔW_i``; the others act on activations and may rewrite the input (`Adapter.pre_forward`) or the
output (`Adapter.forward`) freely.

**W0 is supplied.** ΔW may depend on the base weights (DoRA normalises W0 + BA, (IA)³ scales W0, KIND replaces it).
The host hands every adapter the *true* base values, never the live parameter when something is fused into it:
`delta_weight(w0)`, `delta_params(base)`, `delta(x, base_layer, base)` and `forward(x, out, weight, base_layer,
base)` receive them (``base`` maps a parameter name such as ``"weight"`` to W0; see `host.BaseParams`). So an
adapter's ΔW and output do not change when another adapter is fused into the same layer, and no method keeps a
private copy of W0. Methods whose ΔW does not depend on W0 (LoRA, KronA, SaRA) take the argument and ignore it.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
import types
import typing
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..registry import Registry
from ..targeting import check_pattern
from .context import current_inputs

#: The registered methods; out-of-tree ones join through the ``difftune.methods`` entry-point group
#: (`difftune.registry`), loaded the first time the registry is read.
METHODS: Registry[type[MethodConfig]] = Registry(
    "method", hint="Was the adapter written by a newer difftune, or is the method name misspelled?",
    entry_points="difftune.methods")

# Bounds every method config obeys, checked before anything is allocated (a config from YAML, `--set` or a file's
# header is user input; ``pre_hint_channels: 1000000000`` asked for 3.4 TB): no rank, channel count, dimension, count
# or class id of a supported model reaches MAX_SIZE, no list (patterns, classes, concepts) MAX_ITEMS items, and no
# factor scaling an adapter's output (LoRA α, KronA s, SPM α) MAX_SCALE: no trained adapter means more, and a 1e30
# scale loaded cleanly and gave NaN outputs (issue 29).
MAX_SIZE = 1 << 16
MAX_ITEMS = 4096
MAX_SCALE = 1e6


def register_method(name: str):
    """Class decorator registering a `MethodConfig` subclass under ``name`` (the registry key and file name)."""

    def wrap(cls: type[MethodConfig]) -> type[MethodConfig]:
        METHODS.register(name, cls)
        cls.method = name
        return cls

    return wrap


def get_method(name: str) -> type[MethodConfig]:
    """The config class registered as ``name``; a `DifftuneError` listing the registered names otherwise."""
    return METHODS.lookup(name)


def check_weight(weight: object, field_name: str = "weight") -> float:
    """``weight`` as a float; strings, bools and non-finite numbers are refused rather than coerced."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not -1e300 < weight < 1e300:
        raise bad_value(field_name, weight, "a finite number (e.g. 0.8)",
                        "Adapter weights scale the adapter's contribution; pass a float, not a string.")
    return float(weight)


def check_adapter_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name or name.startswith("_"):
        raise bad_value("name", name, "a non-empty string without '.' that does not start with '_'",
                        "Adapter names key a ModuleDict, e.g. 'default' or 'style_v2'.")
    return name


@dataclass(frozen=True)
class Site:
    """Where an adapter is being made: what `MethodConfig.make_adapter` receives besides the base layer.

    Attributes:
        name: the module's canonical name in ``model`` (e.g. ``"up_blocks.1.resnets.0"``).
        model: the model being adapted (the root passed to ``inject``); navigate it, do not keep it.
        part: this adapter's model-level module (`MethodConfig.make_model_part`), or None.
    """

    name: str
    model: nn.Module
    part: nn.Module | None = None

    @property
    def parent(self) -> nn.Module:
        """The module holding this one (the model itself for a top-level module)."""
        parent = self.name.rpartition(".")[0]
        return self.model.get_submodule(parent) if parent else self.model

    def index(self, container: str) -> int | None:
        """The position after ``container`` in the name: ``index("up_blocks")`` of ``up_blocks.2.resnets.1`` is 2."""
        parts = self.name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == container and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None


@dataclass
class MethodConfig(abc.ABC):
    """Fields every method shares; each method subclasses this and adds its hyperparameters. Data only: what a
    method does while training lives in its trainer plugin (`difftune.methods.plugin`).

    Attributes:
        target_modules: module-name patterns to adapt (equal name, dotted suffix such as ``"to_q"``, or a regex).
        exclude_modules: patterns removed from the selection.
    """

    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)

    method: ClassVar[str] = ""
    #: False for training-only methods (``full``) that add no adapter and save a whole model instead.
    is_adapter: ClassVar[bool] = True
    #: Name prefixes of saved tensors that are statistics the method checks itself in `Adapter.adopt` (e.g. SaRA's
    #: base fingerprints), not values any output is computed from: the loader does not require them to be finite
    #: or small (a count overflows to inf in a file whose tensors were converted to float16).
    saved_statistics: ClassVar[tuple[str, ...]] = ()

    @property
    def trains_whole_model(self) -> bool:
        """Whether training updates every weight outside the adapter too (so ``model.from_scratch`` makes sense);
        KIND's pretraining with ``train_base`` does."""
        return not self.is_adapter

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):  # one pattern given bare: accept it as a one-item list
                value = [value]
                setattr(self, name, value)
            if isinstance(value, list) and len(value) > MAX_ITEMS:  # before each pattern is parsed
                raise bad_value(name, f"a list of {len(value):,} patterns", f"at most {MAX_ITEMS:,} patterns",
                                "A regex selects many modules at once, e.g. r'.*attn2\\.to_[kv]'.")
            if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
                raise bad_value(name, value, "a list of non-empty module-name patterns", "e.g. ['to_q', 'to_v'].")
            for p in value:  # refuse regexes whose matching could hang (targeting.check_pattern) before any use
                check_pattern(p, name)
        if not self.target_modules:
            raise bad_value("target_modules", self.target_modules, "at least one pattern",
                            "e.g. ['to_q', 'to_k', 'to_v', 'to_out.0'] for the attention projections.")

    @abc.abstractmethod
    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        """The adapter for ``base_layer`` at ``site``, or None when this method does not support that layer type."""

    def accepts(self, module: nn.Module) -> bool:
        """Whether a module matched by ``target_modules`` is adapted at all (False: silently passed over).

        Methods whose patterns select broadly (SaRA's default is every module) skip modules with nothing to adapt
        here; `make_adapter` returning None is for modules that should be adapted but cannot be (an error).
        """
        return True

    def check_model(self, model: nn.Module) -> None:
        """Called by `inject` first: raise `DifftuneError` when the method does not apply to ``model`` as a whole
        (saying why and what to use instead), before any pattern is matched. Default: every model."""
        return None

    def make_model_part(self, model: nn.Module) -> nn.Module | None:
        """A module owned by the adapter as a whole rather than by one layer (a hint encoder, a gate table), or None.

        It lives at ``model.difftune_parts[<adapter name>]``, is made before the per-layer adapters (which find it as
        ``site.part``), and is saved, loaded, counted, trained and deleted with the adapter. Its parameters and
        persistent buffers must start with the method's prefix, like the per-layer adapters' tensors. `inject` sets
        its ``adapter_name`` attribute (the key above), so it can pick its own entry of a per-adapter input.
        """
        return None

    @classmethod
    def describe(cls, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        """Facts about a saved adapter for ``difftune inspect``; ``parameters`` counts the trained values."""
        return {"parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point())}

    def check_saved(self, tensors: Mapping[str, Tensor]) -> None:
        """Called by the loader before `inject` allocates anything: raise `DifftuneError` when a size in this config
        disagrees with the saved ``tensors`` (keys ``<module>.<prefixed name>``), so a header claiming a huge size
        over small tensors is refused instead of allocated. Default: nothing to check (a method whose adapter sizes
        follow from the base layer alone, which `make_adapter` checks)."""
        return None

    def probe_inputs(self, name: str) -> tuple[int, dict[str, Any]]:
        """(batch size, per-call inputs) under which the loader probes adapter ``name``'s layers after loading it
        (`difftune.adapter_checks.check_loaded`): what its layers read from `Adapter.inputs` (class labels, a control
        image), so that every value that can reach an output is probed. Default: four items, no inputs."""
        return 4, {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        """Build from a mapping; unknown keys are an error naming the key and the known fields."""
        if not isinstance(data, Mapping):
            raise bad_value(f"{cls.method} config", data, "a mapping of field names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise bad_value(f"{cls.method} config", odd[:5], "string field names")
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
            if hint is float and not (-1e300 < value < 1e300):  # also NaN, which slips through every `x <= 0`
                raise bad_value(f.name, value, "a finite number")
            if hint is int and not isinstance(value, int):
                raise bad_value(f.name, value, "an integer")
            if hint is int and not -MAX_SIZE <= value <= MAX_SIZE:
                raise bad_value(f.name, value, f"an integer of magnitude at most {MAX_SIZE:,}",
                                "No rank, channel count, dimension or count of a supported model is larger.")
            if typing.get_origin(hint) is list or typing.get_origin(hint) in (Union, types.UnionType) and any(
                    typing.get_origin(a) is list for a in typing.get_args(hint)):
                self._check_list(f.name, value, hint)
            if hint is bool and not isinstance(value, bool):
                raise bad_value(f.name, value, "true or false")
            if hint is str and not isinstance(value, str):
                raise bad_value(f.name, value, "a string")

    def _check_list(self, name: str, value: Any, hint: Any) -> None:
        """A list field: at most MAX_ITEMS items, and integer items (class ids, skip indices) within MAX_SIZE."""
        if not isinstance(value, list):
            return  # None where allowed; a non-list is the method's own check (it names the expected form)
        if len(value) > MAX_ITEMS:
            raise bad_value(name, f"a list of {len(value):,} items", f"at most {MAX_ITEMS:,} items")
        if "int" in str(hint):
            big = [v for v in value if isinstance(v, int) and not -MAX_SIZE <= v <= MAX_SIZE]
            if big:
                raise bad_value(name, big[:3], f"integers of magnitude at most {MAX_SIZE:,}",
                                "No class id, index or size of a supported model is larger.")


class Adapter(nn.Module):
    """One method's state on one base layer.

    Subclasses keep everything that must be saved in parameters or persistent buffers whose names start with
    ``prefix`` (checked at injection), so saving is filtering the state dict. Weight-space methods implement
    `delta_weight` (or `delta_params` for parameters other than ``weight``); the default `delta` then computes ΔW·x
    with the base layer's own operator (stride, padding, ...), and the adapter can be merged. Override `delta` when
    there is a cheaper route that never materializes ΔW. Activation-space methods implement neither and override
    `pre_forward` (rewrite the input) and/or `forward` (rewrite the output); they are never merged. The ``weight``
    an adapter receives is a float, or with per-item weights for the call (`difftune.adapter_inputs`) a tensor of
    shape (B, 1, ..., 1) that broadcasts against the batch.

    W0, the true base values, comes as an argument (module docstring): ``w0`` is the base weight, ``base`` maps each
    of the base layer's parameter names to its base value and computes it only when read (a compressed layer decodes
    its weight then). Read W0 from there, never from ``base_layer.weight``, which holds W0 + Σ w_i ΔW_i while other
    adapters are fused. The tensors are the host's own (the live parameter, or its kept original): do not modify them.
    """

    prefix: ClassVar[str] = ""
    #: Merges by writing its selected entries and restores them exactly itself (no dense copy of W0 is kept).
    sparse: ClassVar[bool] = False
    #: Acts through the base layer's parameters (see `param_overrides`) rather than by adding to its output.
    param_space: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        self._part_ref: weakref.ref[nn.Module] | None = None

    @property
    def mergeable(self) -> bool:
        """True for weight-space adapters: the class defines ΔW (`delta_weight` or `delta_params`)."""
        cls = type(self)
        return cls.delta_weight is not Adapter.delta_weight or cls.delta_params is not Adapter.delta_params

    @property
    def model_part(self) -> nn.Module | None:
        """The adapter's model-level module (`MethodConfig.make_model_part`), shared by all its layers."""
        return self._part_ref() if self._part_ref is not None else None

    @staticmethod
    def inputs() -> Mapping[str, Any]:
        """The per-call inputs of the running forward (`difftune.adapter_inputs` and what the denoiser was called
        with: ``class_labels``, ``encoder_hidden_states``, ``timestep``, ...)."""
        return current_inputs()

    def delta_weight(self, w0: Tensor) -> Tensor:
        """ΔW with the shape of ``base_layer.weight``, given the base weight ``w0`` (the true W0: see the class)."""
        raise DifftuneError(f"method {self.config.method!r} is not weight-space: it has no ΔW and cannot be merged")

    def merge_params(self) -> tuple[str, ...]:
        """Names of the base layer's parameters a merge changes."""
        return ("weight",)

    def delta_params(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Dense Δ (fp32) for each name in `merge_params`, given ``base``: {parameter name: its true base value}."""
        return {"weight": self.delta_weight(base["weight"])}

    # -- Sparse adapters (``sparse = True``) write and restore their own entries; they override these five.
    def restore(self, pname: str, param: Tensor) -> None:
        """Write the base values back into this adapter's entries of ``param``: the live parameter, or a copy of it
        from which the host builds W0 for other adapters (so this must not change the adapter's own state)."""
        raise DifftuneError(f"{type(self).__name__} is not a sparse adapter")

    def add_into(self, pname: str, param: Tensor, weight: float) -> None:
        """``param += weight · Δ`` on this adapter's entries."""
        raise DifftuneError(f"{type(self).__name__} is not a sparse adapter")

    def rewrite(self, pname: str, param: Tensor, weight: float | None) -> None:
        """`restore`, then `add_into` unless ``weight`` is None, in one pass (``pname`` has no other adapter)."""
        raise DifftuneError(f"{type(self).__name__} is not a sparse adapter")

    def recapture(self, base_layer: nn.Module) -> None:
        """Take the base layer's current values as the new base (after other adapters were baked into it)."""
        raise DifftuneError(f"{type(self).__name__} is not a sparse adapter")

    def is_stale(self, weight: float) -> bool:
        """Whether the merged values in the base layer lag behind the adapter's own (it trained since)."""
        return False

    def clear_cache(self) -> None:
        """Drop what the adapter keeps between calls (`difftune.methods.verbs.refresh` calls it); none by default."""

    def param_overrides(self, params: dict[str, Tensor], base_layer: nn.Module, weight: float,
                        merged: bool) -> dict[str, Tensor]:
        """The parameters the base layer runs with (``param_space`` adapters); ``params`` holds earlier overrides."""
        return params

    def layer_output(self, x: Tensor, base_layer: nn.Module, weight: float) -> Tensor | None:
        """The layer's output with this unfused param-space adapter, its only active one (SaRA trains so); None: the
        host runs the layer with `param_overrides`."""

    def before_base_change(self, base_layer: nn.Module, fn: Any = None) -> None:
        """Called before the base layer's tensors are written (``fn`` None) or reached by ``fn`` (`Module._apply`)."""

    def merged_output(self, x: Tensor, out: Tensor, weight: float, base_layer: nn.Module) -> Tensor:
        """The base layer's output on ``x`` while this param-space adapter is fused (SaRA forms its gradient here)."""
        return out

    def adopt(self, tensors: Mapping[str, Tensor], base_layer: nn.Module) -> None:
        """Reshape to saved ``tensors`` (local names) before they are loaded, e.g. a stored selection mask."""

    def pre_forward(self, x: Tensor, weight: float) -> Tensor:
        """Rewrite the base layer's input (activation-space methods); identity by default."""
        return x

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor | None:
        """δ(x), the adapter's additive contribution to the base layer's output: ΔW·x for weight-space adapters,
        None for activation-space ones. ``base`` holds the true base values (W0 is ``base["weight"]``)."""
        if not self.mergeable:
            return None
        dw = self.delta_weight(base["weight"])
        return apply_weight(base_layer, x.to(dw.dtype), dw)

    def replace_output(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor | None:
        """The host's output ``base_layer(x) + δ(x)`` without running the base layer, for an adapter whose own parts
        fully determine the layer (KIND's learngenes + tailors replace W0). The host asks only the first active
        adapter, at weight exactly 1 (no per-item weights), while nothing is fused and no adapter overrides parameters,
        so both routes are the same function up to rounding. None (default): the base layer runs, then `forward`."""
        return None

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        """The host's output after this adapter: ``out + weight · δ(x)`` (``out`` when δ is None)."""
        d = self.delta(x, base_layer, base)
        return out if d is None else out + weight * d.to(out.dtype)


def apply_weight(base_layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``base_layer``'s operator with another weight and no bias (used to compute ΔW·x)."""
    if isinstance(base_layer, nn.Linear) or getattr(base_layer, "_difftune_linear_like", False):
        return F.linear(x, weight)
    if isinstance(base_layer, nn.Conv2d):
        return base_layer._conv_forward(x, weight, None)  # honours padding_mode, stride, dilation, groups
    raise DifftuneError(f"no ΔW·x rule for {type(base_layer).__name__}; the method must override `delta`")
