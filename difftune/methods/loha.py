"""LoHa: low-rank Hadamard product adapters (Hyeon-Woo et al., FedPara, ICLR 2022, arXiv 2108.06098; as LyCORIS and
peft implement it for diffusion models).

    ΔW = (α / r) · (W1a W1b) ⊙ (W2a W2b),    W1a, W2a ∈ R^{d_out × r},  W1b, W2b ∈ R^{r × d_in·k·k}

The element-wise product of two rank-r matrices has rank up to r², so a LoHa of rank r reaches what a LoRA of rank r²
reaches with 2r(d_out + d_in) parameters instead of r²(d_out + d_in). For a Conv2d of kernel k the product is
reshaped to (d_out, d_in, k, k) (LyCORIS's and peft's layout without Tucker factors, ``use_effective_conv2d=False``);
the parameters ``hada_w1_a`` ... ``hada_w2_b`` have exactly LyCORIS's and peft's names and shapes, so files map 1:1.

Deliberate choices:

* **Initialization as peft**: W1a, W1b, W2a Kaiming-uniform (a = √5), W2b = 0, so a fresh adapter changes nothing.
  LyCORIS draws W1 ~ N(0, 0.1²)/N(0, 1) and zeros W2a instead; either way one factor is zero.
* **Factored forward.** δ(x) = U (V x) with the exactly equal rank-r² form of the Hadamard product,
  (α/r)·(W1a W1b) ⊙ (W2a W2b) = U V, U = (α/r)·[w1a_i ⊙ w2a_j] (d_out × r²), V = [w1b_i ⊙ w2b_j] (r² × d_in·k·k), a
  Khatri–Rao product (`difftune.interop.updates.loha_as_low_rank` builds the same): r²(d_out + d_in·k·k) per token
  instead of d_out·d_in·k·k, and no dense ΔW on each forward (peft and LyCORIS build it, then run a second
  full-size product). A layer where the rank-r² form costs more (r² ≥ d_out·d_in/(d_out + d_in), i.e. r ≥ 24 on a
  1152-wide square layer) keeps that dense route.
* No Tucker (``hada_t1``/``hada_t2``), rank dropout or DoRA variant ("DoHa"): files with them are refused on import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import bad_value
from .base import Adapter, MethodConfig, Site, register_method

MAX_RANK = 1 << 12  #: r² is the reachable rank; a larger r is a typo, not a setting
MAX_ALPHA = 1e6


@register_method("loha")
@dataclass
class LoHaConfig(MethodConfig):
    """LoHa hyperparameters: ΔW = (α/r)·(W1a W1b) ⊙ (W2a W2b) on each target.

    Attributes:
        rank: r, the inner dimension of both products (the reachable rank is r²).
        alpha: α; the update is scaled by α / r (LyCORIS's convention; α = r gives scale 1).
    """

    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    rank: int = 4
    alpha: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_types()
        if not 1 <= self.rank <= MAX_RANK:
            raise bad_value("rank", self.rank, f"an integer in [1, {MAX_RANK}]", "Typical LoHa ranks are 2-16.")
        if not 0 < self.alpha <= MAX_ALPHA:
            raise bad_value("alpha", self.alpha, f"a positive number up to {MAX_ALPHA:g}",
                            "alpha = rank gives a scale of 1.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_saved(self, tensors: Mapping[str, Tensor]) -> None:
        """Every saved factor has rank ``rank`` (W1a/W2a (d_out, r), W1b/W2b (r, ·)), checked before allocating."""
        factors = {k: v for k, v in tensors.items() if k.rpartition(".")[2].startswith("hada_")}
        if not factors:
            raise bad_value("rank", self.rank, "backed by saved hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b tensors")
        for k, v in factors.items():
            if v.dim() != 2 or (v.shape[1] if k.endswith("_a") else v.shape[0]) != self.rank:
                raise bad_value("rank", self.rank, f"the rank of the saved tensors ({k!r} has shape {tuple(v.shape)})")

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        # a compressed Linear (difftune.compress) computes F.linear with a decoded weight: ΔW·x needs only shapes
        linear = isinstance(base_layer, nn.Linear) or getattr(base_layer, "_difftune_linear_like", False)
        if linear or (isinstance(base_layer, nn.Conv2d) and base_layer.groups == 1):
            if isinstance(base_layer, nn.Conv2d):
                d_out, d_in = base_layer.out_channels, base_layer.in_channels * math.prod(base_layer.kernel_size)
            else:
                d_out, d_in = base_layer.out_features, base_layer.in_features
            if self.rank > min(d_out, d_in):  # each product has rank <= min(d_out, d_in): more adds only parameters
                raise bad_value("rank", self.rank, f"at most min(d_out, d_in) = {min(d_out, d_in)} for this layer")
            return LoHaAdapter(base_layer, self, d_out, d_in)
        return None


class LoHaAdapter(Adapter):
    """``hada_w1_a`` (d_out, r), ``hada_w1_b`` (r, d_in·k·k), ``hada_w2_a`` (d_out, r), ``hada_w2_b`` (r, d_in·k·k)."""

    prefix = "hada_"

    def __init__(self, base_layer: nn.Module, config: LoHaConfig, d_out: int, d_in: int) -> None:
        super().__init__(config)
        w = base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        r = config.rank
        self.shape = tuple(w.shape)  # the base weight's, for the reshape of a conv's ΔW

        def factor(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, device=w.device, dtype=dtype))

        self.hada_w1_a, self.hada_w1_b = factor(d_out, r), factor(r, d_in)
        self.hada_w2_a, self.hada_w2_b = factor(d_out, r), factor(r, d_in)
        self.scale = config.scale
        # per token: r²(d_out + d_in·k·k) multiply-adds factored, d_out·d_in·k·k dense (`delta`)
        self.factored = r * r * (d_out + d_in) < d_out * d_in
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self, w0: Tensor) -> Tensor:
        """(α/r)·(W1a W1b) ⊙ (W2a W2b) in fp32, reshaped to the base weight; W0 plays no part."""
        w1 = self.hada_w1_a.float() @ self.hada_w1_b.float()  # (d_out, d_in·k·k)
        w2 = self.hada_w2_a.float() @ self.hada_w2_b.float()
        return (w1 * w2 * self.scale).view(self.shape)

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """(U, V) in fp32 with ΔW = U V: U (d_out, r²) = (α/r)·[w1a_i ⊙ w2a_j], V (r², d_in·k·k) = [w1b_i ⊙ w2b_j]."""
        w1a, w2a = self.hada_w1_a.float(), self.hada_w2_a.float()
        up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1) * self.scale  # the scale on the smaller factor
        down = (self.hada_w1_b.float()[:, None, :] * self.hada_w2_b.float()[None, :, :]).flatten(0, 1)
        return up, down

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        """ΔW·x as U (V x), two thin products (module docstring), or with the dense ΔW where that costs less."""
        if not self.factored:
            return super().delta(x, base_layer, base)
        up, down = self.low_rank_factors()
        x = x.to(up.dtype)  # fp32, as the dense route computes it
        if isinstance(base_layer, nn.Conv2d):  # V: a (r², d_in, k, k) conv with the layer's stride/padding; U: 1×1
            h = base_layer._conv_forward(x, down.view(down.shape[0], *self.shape[1:]), None)
            return F.conv2d(h, up[:, :, None, None])
        return F.linear(F.linear(x, down), up)
