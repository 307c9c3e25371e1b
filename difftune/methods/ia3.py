"""(IA)³: infused adapters by inhibiting and amplifying inner activations (Liu et al., NeurIPS 2022,
arXiv 2205.05638), as peft implements it: one learned vector l per adapted layer, initialised to ones.

    output (keys, values):          y = l ⊙ (W0 x + b0)    ΔW = (diag(l) − I) W0,   Δb = (l − 1) ⊙ b0
    input (``feedforward_modules``): y = W0 (l ⊙ x) + b0    ΔW = W0 (diag(l) − I)     (columns scaled)

l ∈ R^{d_out} scales the output of the layer (the paper's l_k, l_v on the attention keys and values; the bias is
scaled with it, as peft merges it), or l ∈ R^{d_in} its input (the paper's l_ff on the feed-forward intermediate
activation, i.e. the input of the down projection ``ff.net.2``). A Conv2d scales its output or input channels.

The smallest method whose ΔW depends on W0: it is computed from the true base weights the host supplies
(`difftune.methods.base`), so (IA)³ merges, unmerges and stacks with other fused adapters exactly like the rest,
and keeps no copy of W0. Unfused at weight 1, the first adapter of an unfused layer, it runs the layer once on its
own terms (`IA3Adapter.replace_output`): l ⊙ base(x), or base(l ⊙ x). Otherwise (another weight, or other adapters
before it or fused into the layer, whose changes the base output holds) δ(x) needs W0 x once more: fuse (IA)³ for
inference there. ``ia3_l`` has peft's shapes ((d_out, 1) or (1, d_in) for a Linear, (1, C, 1, 1) for a
conv), so files map 1:1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import bad_value
from ..targeting import check_pattern, matches_any
from .base import Adapter, MethodConfig, Site, apply_weight, register_method


@register_method("ia3")
@dataclass
class IA3Config(MethodConfig):
    """(IA)³ hyperparameters.

    Attributes:
        target_modules: the layers whose output is scaled (keys, values) or, when also matched by
            ``feedforward_modules``, whose input is scaled.
        feedforward_modules: patterns of the targeted layers that scale their input (peft's field; the paper's FF
            down projection). Patterns matching no targeted layer select nothing.
    """

    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_v", "ff.net.2"])
    feedforward_modules: list[str] = field(default_factory=lambda: ["ff.net.2"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, str):  # one pattern given bare, as target_modules accepts it
            self.feedforward_modules = [self.feedforward_modules]
        value = self.feedforward_modules
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise bad_value("feedforward_modules", value, "a list of non-empty module-name patterns (may be empty)",
                            "e.g. ['ff.net.2'] for the feed-forward down projections.")
        for p in value:
            check_pattern(p, "feedforward_modules")

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        linear = isinstance(base_layer, nn.Linear) or getattr(base_layer, "_difftune_linear_like", False)
        if linear or (isinstance(base_layer, nn.Conv2d) and base_layer.groups == 1):
            return IA3Adapter(base_layer, self, matches_any(site.name, self.feedforward_modules))
        return None


class IA3Adapter(Adapter):
    """``ia3_l``: the scale of each output channel, or of each input channel for a feed-forward layer."""

    prefix = "ia3_"

    def __init__(self, base_layer: nn.Module, config: IA3Config, feedforward: bool) -> None:
        super().__init__(config)
        w = base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.feedforward = feedforward
        self.conv = isinstance(base_layer, nn.Conv2d)
        n = w.shape[1] if feedforward else w.shape[0]
        if self.conv:
            shape: tuple[int, ...] = (1, n, 1, 1)
        else:
            shape = (1, n) if feedforward else (n, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=dtype))
        # peft scales the bias with the output (and merges it so); an input scale leaves the bias alone
        self.scales_bias = not feedforward and getattr(base_layer, "bias", None) is not None

    def merge_params(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.scales_bias else ("weight",)

    def _shift(self, dims: int, channel_dim: int, minus_one: bool = True) -> Tensor:
        """l − 1 (or l itself; the adapter's dtype) shaped to broadcast over ``channel_dim`` of a ``dims``-D tensor."""
        shift = self.ia3_l.flatten() - 1 if minus_one else self.ia3_l.flatten()
        shape = [1] * dims
        shape[channel_dim] = -1
        return shift.view(shape)

    def _channel(self) -> int:
        return -3 if self.conv else -1  # (..., C, H, W) convs (batched or not), (..., d) linears

    def delta_weight(self, w0: Tensor) -> Tensor:
        """(diag(l) − I) W0 (rows: output channels) or W0 (diag(l) − I) (columns: input channels), fp32."""
        w0 = w0.float()
        return w0 * self._shift(w0.dim(), 1 if self.feedforward else 0).float()

    def delta_params(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {"weight": self.delta_weight(base["weight"])}
        if self.scales_bias:
            out["bias"] = base["bias"].float() * (self.ia3_l.flatten().float() - 1)
        return out

    def replace_output(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        """l ⊙ (W0 x + b0), or W0 (l ⊙ x) + b0, with one run of the base layer: the host's ``base(x) + δ(x)`` runs
        the layer's product twice (once in the layer, once more in δ for W0 x). The same function, rounded
        differently (tested against the host's route). l is not rounded to a lower activation dtype (bf16 under
        autocast would move l = 1.003 to 1): the product is, once."""
        if self.feedforward:
            return base_layer((x * self._shift(x.dim(), self._channel(), minus_one=False)).to(x.dtype))
        y = base_layer(x)
        return (y * self._shift(y.dim(), self._channel(), minus_one=False)).to(y.dtype)

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        x = x.to(self.ia3_l.dtype)
        w0 = base["weight"].to(x.dtype)
        channel = self._channel()
        if self.feedforward:
            return apply_weight(base_layer, x * self._shift(x.dim(), channel).to(x.dtype), w0)
        y = apply_weight(base_layer, x, w0)  # W0 x + b0: the true base output
        if self.scales_bias:
            y = y + base["bias"].to(y.dtype).view(-1, *[1] * (-channel - 1))
        return y * self._shift(y.dim(), channel).to(y.dtype)
