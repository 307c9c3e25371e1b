"""Replaced modules: the layers of a compressed model, and the registry that rebuilds them from a file.

A compressed model is the original architecture with some modules swapped for registered classes that hold only
compact tensors (packed codes, codebooks, scales). The file records, for each swapped module, its registry key and
its constructor arguments (`ReplacedModule.replacement_args`); the loader builds it on the meta device from those
alone and fills its state dict from the file. So a class registered here must:

* take only JSON values (ints, floats, strings, bools, lists) as constructor arguments, and from them alone create
  every tensor its ``state_dict`` will hold, with the final shapes and dtypes;
* keep every tensor that must be saved in a parameter or a persistent buffer.

`ReplacedLinear` adds the Linear-like protocol (``in_features``, ``out_features``, ``weight`` decoded on read,
``forward = F.linear``) that lets difftune adapters (LoRA, KronA) sit on top of a quantized layer.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..registry import Registry

REPLACEMENTS: Registry[type[ReplacedModule]] = Registry(
    "replacement", plural="replacement classes", field="class",
    hint="Was the file written by a newer difftune, or by code that registered its own class (import it before "
         "loading)?")


def register_replacement(name: str):
    """Class decorator registering a `ReplacedModule` subclass under ``name``, the key stored in compressed files."""

    def wrap(cls: type[ReplacedModule]) -> type[ReplacedModule]:
        if not (isinstance(cls, type) and issubclass(cls, ReplacedModule)):
            raise DifftuneError(f"@register_replacement({name!r}) decorates {cls!r}, which is not a ReplacedModule")
        REPLACEMENTS.register(name, cls)
        cls.replacement = name
        return cls

    return wrap


def get_replacement(name: object) -> type[ReplacedModule]:
    """The class registered as ``name``; a `DifftuneError` listing the registered keys otherwise."""
    return REPLACEMENTS.lookup(name)


class ReplacedModule(nn.Module, abc.ABC):
    """Base class of the modules a compressed model swaps in (see the module docstring for the contract).

    Attributes:
        replacement: the registry key (set by `register_replacement`).
        method: the compression method that makes this class, recorded as ``quant_method`` (e.g. ``"rtn"``).
        module_name: where the module sits in its model, when known; used in error messages only (not saved).
    """

    replacement: ClassVar[str] = ""
    method: ClassVar[str] = ""

    module_name: str = ""

    @abc.abstractmethod
    def replacement_args(self) -> dict[str, Any]:
        """The constructor arguments (JSON values) that rebuild this module with its current shapes and dtypes."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any], where: str = "") -> ReplacedModule:
        """``cls(**args)``, with a `DifftuneError` naming the module and the accepted arguments when they do not fit.

        Build under ``torch.device("meta")`` to get a shell with no memory, as the loader does.
        """
        label = f"module {where!r} ({cls.replacement})" if where else f"replacement {cls.replacement!r}"
        if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
            raise bad_value(f"{label} args", args, "a mapping of constructor argument names to values")
        params = inspect.signature(cls.__init__).parameters
        known = [p for p in params if p != "self"]
        unknown = sorted(set(args) - set(known))
        missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty
                   and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p not in args]
        if unknown or missing:
            raise DifftuneError(f"{label}: constructor arguments {dict(args)} do not fit {cls.__name__}"
                                f"({', '.join(known)}): unknown {unknown}, missing {missing}")
        try:
            module = cls(**dict(args))
        except DifftuneError as e:
            raise DifftuneError(f"{label}: {e}") from e
        module.module_name = where
        return module

    def describe(self) -> str:
        """A short label for messages: the module's name (when known) and class."""
        return f"{self.module_name!r} ({type(self).__name__})" if self.module_name else type(self).__name__


class ReplacedLinear(ReplacedModule):
    """A replaced ``nn.Linear``: y = x Ŵᵀ + b with Ŵ decoded from compact storage on every call.

    Subclasses store their codes and implement `dequantized_weight`. The ``weight`` attribute reads the decoded
    weight (a new tensor each time, never a Parameter) so code that inspects ``layer.weight.shape``/``.dtype`` keeps
    working; assigning it raises, because writing dense weights into packed codes is not possible. Adapters whose
    ΔW·x needs only the input and the shapes (LoRA, KronA) accept these layers; merging into them is refused.

    Attributes:
        in_features: d_in.
        out_features: d_out.
        bias: the FP bias (a Parameter) or None.
    """

    #: Duck-typed marker read by methods' ``make_adapter`` (the method files do not import this package).
    _difftune_linear_like: ClassVar[bool] = True

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    @abc.abstractmethod
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Ŵ (out_features, in_features), decoded; in ``dtype`` (default: the module's floating dtype)."""

    @property
    def weight(self) -> Tensor:
        """The decoded weight Ŵ (a fresh tensor; writing to it does not change the module)."""
        return self.dequantized_weight()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":  # nn.Module.__setattr__ would register a Parameter and bypass the property
            raise DifftuneError(
                f"{self.describe()} holds packed codes, not a weight tensor: `weight` cannot be assigned (a merge or "
                "weight edit on a compressed layer). Keep adapters unmerged on compressed layers, or edit the FP "
                "model and compress it again"
            )
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def replaced_modules(model: nn.Module) -> dict[str, ReplacedModule]:
    """``{module name: module}`` for every `ReplacedModule` in ``model`` (outermost ones; none nest)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ReplacedModule)}
