"""Diff: a dense Δ for each parameter of the target modules, W = W0 + w·Δ (LyCORIS's "full" algorithm).

The plainest weight-space adapter: it stores the update itself, so it holds exactly what any other method's ΔW is,
on any layer, norms and biases included (LyCORIS ``diff``/``diff_b`` and ``w_norm``/``b_norm`` keys). Full-ΔW files
import as ``diff`` adapters, so every weight-space method's ``--format diff`` export imports back with the same ΔW,
bit for bit. It also trains (Δ starts at 0), at the size of the adapted layers.

* Linear and Conv2d layers add δ(x) = ΔW·x + Δb with the layer's own operator (per-item weights work); at weight 1,
  the first adapter of an unfused fp32 layer, the layer's operator runs once with W0 + Δ (`DiffAdapter.replace_output`)
  instead of twice (W0 x, then ΔW·x: a second full-size product);
* any other layer (GroupNorm, LayerNorm, Embedding, ...) runs with its parameters replaced by W0 + w·Δ
  (``functional_call``), which is exact for every layer type.

``params`` says which of a target's own parameters get a Δ (default ``weight`` and ``bias``, each where the layer has
one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import bad_value
from .base import Adapter, MethodConfig, Site, apply_weight, register_method


@register_method("diff")
@dataclass
class DiffConfig(MethodConfig):
    """Diff hyperparameters.

    Attributes:
        target_modules: modules whose parameters get a dense Δ (any layer type: Linear, Conv2d, norms, ...).
        params: which of each target's own parameters get one (those it has).
    """

    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    params: list[str] = field(default_factory=lambda: ["weight", "bias"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.params, str):
            self.params = [self.params]
        if not isinstance(self.params, list) or not self.params or not all(
                isinstance(p, str) and p and "." not in p for p in self.params):
            raise bad_value("params", self.params, "a non-empty list of parameter names of the target modules",
                            "e.g. ['weight', 'bias'] (norm layers: their scale and shift).")

    def _pnames(self, module: nn.Module) -> list[str]:
        own = dict(module.named_parameters(recurse=False))
        return [p for p in self.params if p in own and own[p].is_floating_point()]

    def accepts(self, module: nn.Module) -> bool:
        return not isinstance(module, Adapter) and bool(self._pnames(module))

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        pnames = self._pnames(base_layer)
        if not pnames:
            return None
        additive = isinstance(base_layer, (nn.Linear, nn.Conv2d))
        return (DiffAdapter if additive else DiffParamAdapter)(base_layer, self, pnames)


class DiffAdapter(Adapter):
    """``diff_<param>``: Δ with the parameter's shape (e.g. ``diff_weight``, ``diff_bias``), zero at the start."""

    prefix = "diff_"

    def __init__(self, base_layer: nn.Module, config: DiffConfig, pnames: list[str]) -> None:
        super().__init__(config)
        self.pnames = list(pnames)
        for p in self.pnames:
            param = getattr(base_layer, p)
            setattr(self, f"diff_{p}", nn.Parameter(torch.zeros(param.shape, device=param.device, dtype=param.dtype)))

    def diff(self, pname: str) -> nn.Parameter:
        return getattr(self, f"diff_{pname}")

    def merge_params(self) -> tuple[str, ...]:
        return tuple(self.pnames)

    def delta_params(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {p: self.diff(p).float() for p in self.pnames}  # Δ itself: W0 plays no part

    def delta_weight(self, w0: Tensor) -> Tensor:
        if "weight" not in self.pnames:
            return super().delta_weight(w0)
        return self.diff("weight").float()

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        """``out + weight · (ΔW·x + Δb)`` with the layer's own operator (stride, padding, groups)."""
        if "weight" in self.pnames:
            dw = self.diff("weight")
            out = out + weight * apply_weight(base_layer, x.to(dw.dtype), dw).to(out.dtype)
        if "bias" in self.pnames:  # (d_out,) on the channel axis: last for a Linear, -3 for a conv's (C, H, W)
            db = self.diff("bias").to(out.dtype)
            out = out + weight * (db.view(-1, 1, 1) if isinstance(base_layer, nn.Conv2d) else db)
        return out

    def replace_output(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor | None:
        """(W0 + Δ) x + b0 + Δb with one run of the layer's operator; the same function as the host's ``base(x) +
        δ(x)``, rounded differently (tested against it). Only for an fp32 weight: in fp16/bf16, W0 + Δ would round
        away the low bits of a small Δ that the host's route keeps (None: the host's route)."""
        stock = type(base_layer).forward in (nn.Linear.forward, nn.Conv2d.forward)  # what F.linear/conv compute
        if not stock or "weight" not in self.pnames or base["weight"].dtype != torch.float32:
            return None
        weight = base["weight"] + self.diff("weight").to(torch.float32)
        bias = base.get("bias")
        if "bias" in self.pnames:
            bias = bias + self.diff("bias").to(bias.dtype)
        if isinstance(base_layer, nn.Conv2d):
            return base_layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)


class DiffParamAdapter(DiffAdapter):
    """The same Δ on a layer without an additive rule (norms, embeddings): the layer runs with W0 + w·Δ."""

    param_space = True

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        return out  # acts through the parameters (`param_overrides`)

    def param_overrides(self, params: dict[str, Tensor], base_layer: nn.Module, weight: float,
                        merged: bool) -> dict[str, Tensor]:
        if merged:  # W0 + w·Δ is already in the layer's parameters
            return params
        for p in self.pnames:
            current = params.get(p, getattr(base_layer, p))
            params[p] = current + (weight * self.diff(p)).to(current.dtype)
        return params
