"""LoRA: low-rank adaptation (Hu et al., 2021, arXiv 2106.09685), the baseline every other method is compared with.

    ΔW = (α / r) · B A,    A ∈ R^{r × d_in},  B ∈ R^{d_out × r}

For a Conv2d of kernel k, A is a (r, d_in, k, k) convolution with the base layer's stride and padding and B a 1×1
convolution, so ΔW = (α / r) · (B A) reshaped to (d_out, d_in, k, k) — peft's convention, which makes our weights
interchangeable with peft's (``lora_A`` ↔ ``lora_A.weight``). Initialization follows peft: A Kaiming-uniform
(a = √5), B = 0, so a fresh adapter leaves the model unchanged.

**DoRA** (Liu et al., 2024, arXiv 2402.09353; ``use_dora=True``, peft's name) splits the weight into a magnitude
per output channel and a direction, and lets LoRA move the direction::

    W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_c,    ΔW = W' − W0,    m ∈ R^{d_out}  (``lora_magnitude_vector``)

‖·‖_c is the norm of each output channel (a row of W0; (d_in, k, k) of a conv), treated as a constant in the
backward pass as the paper's §4.3 and peft do. m starts at ‖W0‖_c, so a fresh DoRA adapter leaves the model unchanged
too. W0 is the true base weight the host supplies (`Adapter.delta`): fusing another adapter into the same layer does
not change DoRA's ΔW, and no copy of W0 is kept. Unfused, δ(x) = (m/‖·‖ − 1) ⊙ W0 x + (m/‖·‖) ⊙ s B(A x), like
peft: the only dense (d_out, d_in) tensors are those of the norm, and W0 x is computed once more (the base output
may hold other adapters' changes). m has peft's shapes, (d_out,) and (1, d_out, 1, 1) for a conv, so files map 1:1.

**Adapter weight w.** The host scales DoRA's whole change, ``W0 + w ΔW`` (as for every method: w = 0 is off, and
weights combine linearly, fused or not). diffusers' ``set_adapters`` instead scales s inside the norm, so at w = 0 the
magnitude rescaling stays on; the two agree at w = 1 only (tested against peft).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import bad_value
from .base import MAX_SCALE, Adapter, MethodConfig, Site, apply_weight, register_method

INITS = ("default", "gaussian")
MAX_RANK = 1 << 16  #: wider than any layer of the supported models; a bigger rank is a typo, not a setting
MAX_ALPHA = MAX_SCALE  #: α/r scales ΔW; beyond this no trained adapter is meant and fp16/fp32 outputs overflow


@register_method("lora")
@dataclass
class LoRAConfig(MethodConfig):
    """LoRA hyperparameters.

    Attributes:
        rank: r, the inner dimension of B A.
        alpha: α; the update is scaled by α / r (α / √r with ``use_rslora``).
        dropout: dropout probability on the adapter's input during training.
        use_rslora: rank-stabilized scaling α / √r (Kalajdzievski, 2023).
        init: "default" (A Kaiming-uniform, B = 0, as peft) or "gaussian" (A ~ N(0, 1/r), B = 0).
        use_dora: DoRA, weight-decomposed LoRA: a trained magnitude per output channel (module docstring).
    """

    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_types()
        if not 1 <= self.rank <= MAX_RANK:
            raise bad_value("rank", self.rank, f"an integer in [1, {MAX_RANK}]", "Typical values are 4-64.")
        if not 0 < self.alpha <= MAX_ALPHA:  # NaN/inf are refused by check_types; 1e308 would overflow every output
            raise bad_value("alpha", self.alpha, f"a positive number up to {MAX_ALPHA:g}",
                            "alpha = rank gives a scale of 1.")
        if not 0 <= self.dropout < 1:
            raise bad_value("dropout", self.dropout, "in [0, 1)")
        if self.init not in INITS:
            raise bad_value("init", self.init, f"one of {INITS}")

    def check_saved(self, tensors: Mapping[str, Tensor]) -> None:
        """Every saved A is (r, ...) and every B (..., r, ...) with r = ``rank``; checked before injection, so a
        header's rank is never allocated when the tensors say otherwise."""
        a = {k: v for k, v in tensors.items() if k.endswith(".lora_A")}
        b = {k: v for k, v in tensors.items() if k.endswith(".lora_B")}
        if not a or len(a) != len(b):
            raise bad_value("rank", self.rank, "backed by saved lora_A/lora_B pairs",
                            f"the file holds {len(a)} lora_A and {len(b)} lora_B tensor(s)")
        for k, v in {**a, **b}.items():
            if v.dim() < 2 or (v.shape[0] if k.endswith("A") else v.shape[1]) != self.rank:
                raise bad_value("rank", self.rank, f"the rank of the saved tensors ({k!r} has shape {tuple(v.shape)})")
        magnitudes = sum(k.endswith(".lora_magnitude_vector") for k in tensors)
        if magnitudes != (len(a) if self.use_dora else 0):
            raise bad_value("use_dora", self.use_dora, f"matching the file's {magnitudes} lora_magnitude_vector "
                            f"tensor(s) for {len(a)} module(s)", "A DoRA adapter saves one magnitude per module.")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        # `_difftune_linear_like`: a compressed layer (difftune.compress.ReplacedLinear) computing F.linear with a
        # decoded weight; ΔW·x below needs only the input and the layer's shapes, so the adapter runs on top of it.
        linear = isinstance(base_layer, nn.Linear) or getattr(base_layer, "_difftune_linear_like", False)
        if linear or (isinstance(base_layer, nn.Conv2d) and base_layer.groups == 1):
            if isinstance(base_layer, nn.Conv2d):
                d_out, d_in = base_layer.out_channels, base_layer.in_channels * math.prod(base_layer.kernel_size)
            else:  # reads the shapes, not `weight` (a compressed layer would decode it)
                d_out, d_in = base_layer.out_features, base_layer.in_features
            if self.rank > max(d_out, d_in):  # B A would hold more values than a dense ΔW: refused before allocating
                raise bad_value("rank", self.rank, f"at most max(d_out, d_in) = {max(d_out, d_in)} for this layer",
                                "A rank above the layer's width adds parameters but no expressiveness.")
            return (DoRAAdapter if self.use_dora else LoRAAdapter)(base_layer, self)
        return None


class LoRAAdapter(Adapter):
    prefix = "lora_"

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: LoRAConfig) -> None:
        super().__init__(config)
        w = base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        r = config.rank
        if isinstance(base_layer, nn.Conv2d):
            a_shape: tuple[int, ...] = (r, base_layer.in_channels, *base_layer.kernel_size)
            b_shape: tuple[int, ...] = (base_layer.out_channels, r, 1, 1)
        else:
            a_shape, b_shape = (r, base_layer.in_features), (base_layer.out_features, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scale = config.scale
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def low_rank_weight(self) -> Tensor:
        """s · B A in fp32 whatever the adapter's dtype, the shape of the base weight."""
        a, b = self.lora_A.float(), self.lora_B.float()
        # (d_out, r) @ (r, d_in·k·k) -> (d_out, d_in, k, k) for convs, (d_out, d_in) for linears
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scale

    def delta_weight(self, w0: Tensor) -> Tensor:
        """ΔW = s · B A in fp32 (so fusing into fp16/bf16 weights rounds once, at the end); W0 plays no part."""
        return self.low_rank_weight()

    def low_rank_out(self, x: Tensor, base_layer: nn.Module) -> Tensor:
        """s · B (A x) for an input already in the adapter's dtype: two thin products, never the dense ΔW."""
        if isinstance(base_layer, nn.Conv2d):
            return F.conv2d(base_layer._conv_forward(x, self.lora_A, None), self.lora_B) * self.scale
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        return self.low_rank_out(self.lora_dropout(x.to(self.lora_A.dtype)), base_layer)

    def forward(self, x: Tensor, out: Tensor, weight: float | Tensor, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        """``out + w · s · B (A x)``. On a linear layer with one weight for the batch and the output in the adapter's
        dtype, w · s scales the rank-r activations and B's product accumulates into the output in one GEMM
        (``addmm``), so the output-sized tensor is written once instead of three times (scale, weight, sum): the
        unfused LoRA costs what peft's does. Equal to the general route up to float rounding (tested)."""
        if (type(self) is LoRAAdapter and isinstance(weight, (int, float)) and not isinstance(base_layer, nn.Conv2d)
                and out.dtype == self.lora_A.dtype and out.is_contiguous()):
            h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A) * (self.scale * weight)  # (..., r)
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t())
            return flat.view(out.shape)
        return super().forward(x, out, weight, base_layer, base)


class DoRAAdapter(LoRAAdapter):
    """LoRA plus ``lora_magnitude_vector`` m: ΔW = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_c − W0 (module docstring)."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        w = base_layer.weight  # W0: `inject` unfuses the layer's adapters before it makes a new one
        shape = (1, w.shape[0], 1, 1) if isinstance(base_layer, nn.Conv2d) else (w.shape[0],)  # peft's shapes
        magnitude = torch.empty(shape, device=w.device, dtype=self.lora_A.dtype)
        if not w.is_meta:  # m = ‖W0‖_c (B = 0), by the same computation as the forward's: ΔW = 0 exactly at first
            magnitude.copy_(self.weight_norm(w).view(shape))
        self.lora_magnitude_vector = nn.Parameter(magnitude)

    def weight_norm(self, w0: Tensor) -> Tensor:
        """‖W0 + s B A‖ per output channel, (d_out,) fp32, detached (a constant for the backward, paper §4.3)."""
        with torch.no_grad():
            v = self.low_rank_weight()
            v += w0  # in place (an fp16/bf16 W0 is promoted): one dense fp32 tensor (peft: two, in the weight dtype)
            return torch.linalg.vector_norm(v.flatten(1), dim=1)

    def delta_weight(self, w0: Tensor) -> Tensor:
        """ΔW = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_c − W0 in fp32, from the true base weight ``w0``."""
        w0 = w0.float()
        v = w0 + self.low_rank_weight()  # (d_out, d_in[, k, k])
        scale = self.lora_magnitude_vector.float().flatten() / self.weight_norm(w0)  # (d_out,)
        return scale.view(-1, *[1] * (v.dim() - 1)) * v - w0

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        w0 = base["weight"]
        x = self.lora_dropout(x.to(self.lora_A.dtype))  # as peft: one dropped-out input for both terms
        scale = (self.lora_magnitude_vector.flatten() / self.weight_norm(w0).to(x.dtype))  # (d_out,), grad to m
        if isinstance(base_layer, nn.Conv2d):
            scale = scale.view(-1, 1, 1)  # channels first: (C, H, W) and (N, C, H, W) outputs alike
        base_out = apply_weight(base_layer, x, w0.to(x.dtype))  # W0 x without the bias
        return (scale - 1) * base_out + scale * self.low_rank_out(x, base_layer)
