"""DiffuseKronA: Kronecker-product adapters for personalization (Marjit et al., WACV 2025, arXiv 2402.17412).

For an adapted layer with weight W ∈ R^{d_out × d_in}::

    ΔW = s · A ⊗ B,    A ∈ R^{a1 × a2},  B ∈ R^{b1 × b2},  b1 = d_out / a1,  b2 = d_in / a2

so a1 splits the output dimension and a2 the input dimension (both must divide). A layer costs a1·a2 + b1·b2
parameters while rank(A ⊗ B) = rank(A)·rank(B) can be far above a LoRA of the same size: the paper's default
(a1, a2) = (64, 8) on q/k/v/out of the SD1.5 UNet is 248,176 parameters against LoRA r=4's 797,184.

The forward never builds ΔW (d_out × d_in): with the input x reshaped to X ∈ R^{a2 × b2} (x = vec of its rows),
(A ⊗ B) x = vec(A (X Bᵀ)), two small matmuls. For a Conv2d (any kernel, groups = 1) A mixes channel groups and
B ∈ R^{b1 × b2 × k × k} is a convolution applied to each of the a2 input groups: ΔW = kron(A[:, :, None, None], B),
LyCORIS's LoKr convention for convolutions (the kernel belongs to the second factor), so exports keep their shapes.

Deliberate choices:

* **Canonical Kronecker product.** Output row q·b1 + p of ΔW is A[q, :] ⊗ B[p, :] (``torch.kron``, LyCORIS and peft
  LoKr, and what A1111/ComfyUI rebuild). The official code (IBM/DiffuseKronA ``KronALinearLayer``) computes a
  row-permuted P (A ⊗ B): its output p·a1 + q carries Kronecker row q·b1 + p. P (A ⊗ B) = (B ⊗ A) Q for a column
  permutation Q, which in general is no Kronecker product of any factor pair, so official checkpoints cannot be
  rewritten as canonical factors; ``layout="official"`` reproduces that row order exactly (set by
  `difftune.interop.diffusekrona.load_official_krona`; such adapters export only as a full ΔW).
* **Init as in the paper and the official code:** A ~ N(0, 1/a1²) (std 1/a1), B = 0, so ΔW = 0 at the start.
  LyCORIS initializes w1 (= A) Kaiming-uniform and w2 (= B) = 0; peft LoKr does the opposite (w1 = 0, w2 Kaiming).
* **No α/r.** The scale s multiplies ΔW directly (the official ``scale``, 1 by default). LoKr files with two full
  factors ignore alpha in every client, so an export folds s into the first factor.
* **Two ways to pick the split.** ``factor_mode="fixed"`` uses (a1, a2) on every layer (the paper). With
  ``factor_mode="lycoris"`` each layer gets LyCORIS's own split, a1 × a2 = ``factorization(d_out, factor)[0]`` ×
  ``factorization(d_in, factor)[0]``, the only split the ``lycoris-lora`` package accepts when it loads a LoKr file
  (A1111 and ComfyUI accept any split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from .base import MAX_SCALE, Adapter, MethodConfig, Site, register_method
from .plugin import TrainerPlugin, register_plugin

FACTOR_MODES = ("fixed", "lycoris")
LAYOUTS = ("canonical", "official")


@register_method("krona")
@dataclass
class KronAConfig(MethodConfig):
    """DiffuseKronA hyperparameters: ΔW = s · A ⊗ B, A ∈ R^{a1×a2}, B ∈ R^{(d_out/a1)×(d_in/a2)} on each target.

    Attributes:
        a1: rows of A, the split of the output dimension (d_out % a1 == 0); b1 = d_out / a1. ``factor_mode="fixed"``.
        a2: columns of A, the split of the input dimension (d_in % a2 == 0); b2 = d_in / a2. ``factor_mode="fixed"``.
        scale: s in ΔW = s · A ⊗ B.
        factor_mode: "fixed" (a1, a2 on every layer, as in the paper) or "lycoris" (per layer, LyCORIS's
            ``factorization(dim, factor)`` split, so LoKr exports load in the lycoris-lora package too).
        factor: LyCORIS's ``factor`` for ``factor_mode="lycoris"``: -1 for the most balanced split; f > 0 splits a
            dimension it divides into {f, dim/f} (the smaller one goes to A), others as balanced as f allows.
        layout: "canonical" (ΔW = kron(A, B)) or "official" (rows permuted as IBM/DiffuseKronA's code computes them;
            set when importing its checkpoints).
    """

    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    a1: int = 64
    a2: int = 8
    scale: float = 1.0
    factor_mode: str = "fixed"
    factor: int = -1
    layout: str = "canonical"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_types()
        for name in ("a1", "a2"):
            if getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "an integer >= 1",
                                "The paper's default is a1=64, a2=8; each must divide the layers' dimensions.")
        if not math.isfinite(self.scale) or self.scale == 0 or abs(self.scale) > MAX_SCALE:
            raise bad_value("scale", self.scale, f"a non-zero number of magnitude at most {MAX_SCALE:g}",
                            "s in ΔW = s·A⊗B; 1.0 by default.")
        if self.factor_mode not in FACTOR_MODES:
            raise bad_value("factor_mode", self.factor_mode, f"one of {FACTOR_MODES}",
                            "'fixed' uses a1/a2 everywhere; 'lycoris' picks LyCORIS's split per layer.")
        if self.factor == 0 or self.factor < -1:
            raise bad_value("factor", self.factor, "-1 or an integer >= 1", "LyCORIS's factor; -1 = balanced split.")
        if self.factor_mode == "fixed" and self.factor != -1:
            raise bad_value("factor", self.factor, "-1 (unset) with factor_mode 'fixed'",
                            "`factor` only applies with factor_mode: lycoris; with 'fixed' set a1 and a2.")
        if self.factor_mode == "lycoris" and (self.a1, self.a2) != (64, 8):
            raise bad_value("a1/a2", (self.a1, self.a2), "left at their defaults with factor_mode 'lycoris'",
                            "LyCORIS derives each layer's split from `factor`; set `factor` instead, or use "
                            "factor_mode: fixed to choose a1 and a2.")
        if self.layout not in LAYOUTS:
            raise bad_value("layout", self.layout, f"one of {LAYOUTS}",
                            "'official' exists only to run checkpoints of the official DiffuseKronA code exactly.")

    def split(self, d_out: int, d_in: int) -> tuple[int, int]:
        """(a1, a2) for a layer with these dimensions (the config's, or LyCORIS's per-layer split)."""
        if self.factor_mode == "lycoris":
            return lycoris_factorization(d_out, self.factor)[0], lycoris_factorization(d_in, self.factor)[0]
        return self.a1, self.a2

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        # `_difftune_linear_like`: a compressed layer (difftune.compress.ReplacedLinear) computing F.linear with a
        # decoded weight; ΔW·x below needs only the input and the layer's shapes, so the adapter runs on top of it.
        linear = isinstance(base_layer, nn.Linear) or getattr(base_layer, "_difftune_linear_like", False)
        if linear or (isinstance(base_layer, nn.Conv2d) and base_layer.groups == 1):
            return KronAAdapter(base_layer, self)
        return None


@register_plugin("krona")
class KronAPlugin(TrainerPlugin):
    def default_lr(self) -> float:
        return 1e-3  # the paper's (and the official scripts') constant learning rate


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n, exactly as LyCORIS's (and peft's) ``factorization``.

    A positive ``factor`` that divides ``dimension`` is used as is (m = min(factor, dimension/factor)); otherwise m
    grows through the divisors while m + n shrinks and m stays <= factor (-1: no bound), giving the most balanced
    split. Re-implemented, not imported, because the exported files must match what that package computes even
    where it is not installed; tests compare the two.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def nearest_divisors(n: int, target: int) -> list[int]:
    """The divisors of ``n`` just below and just above ``target`` (one when they coincide), for error hints."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = max((d for d in divisors if d <= target), default=None)
    above = min((d for d in divisors if d >= target), default=None)
    return sorted({d for d in (below, above) if d is not None})


def layer_dims(base_layer: nn.Linear | nn.Conv2d) -> tuple[int, int, tuple[int, ...]]:
    """(d_out, d_in, kernel): the dimensions the Kronecker split acts on; the kernel stays whole in B."""
    if isinstance(base_layer, nn.Conv2d):
        return base_layer.out_channels, base_layer.in_channels, tuple(base_layer.kernel_size)
    return base_layer.out_features, base_layer.in_features, ()


class KronAAdapter(Adapter):
    """ΔW = s · A ⊗ B on one Linear or Conv2d (parameters ``krona_A`` (a1, a2) and ``krona_B`` (b1, b2[, k, k]))."""

    prefix = "krona_"

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: KronAConfig) -> None:
        super().__init__(config)
        d_out, d_in, kernel = layer_dims(base_layer)
        a1, a2 = config.split(d_out, d_in)
        if d_out % a1 or d_in % a2:
            raise DifftuneError(_split_error(type(base_layer).__name__, d_out, d_in, kernel, a1, a2))
        self.a1, self.a2, self.b1, self.b2 = a1, a2, d_out // a1, d_in // a2
        self.scale = config.scale
        self.official = config.layout == "official"
        w = base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.krona_A = nn.Parameter(torch.empty(a1, a2, device=w.device, dtype=dtype))
        self.krona_B = nn.Parameter(torch.zeros(self.b1, self.b2, *kernel, device=w.device, dtype=dtype))
        nn.init.normal_(self.krona_A, std=1 / a1)  # the paper's init: A ~ N(0, 1/a1²), B = 0 → ΔW = 0

    def delta_weight(self, w0: Tensor) -> Tensor:
        """s · kron(A, B) (rows permuted for ``layout="official"``) in fp32, the shape of the base weight; W0 plays
        no part."""
        return kron_delta(self.krona_A, self.krona_B, self.scale, self.official)

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        a, b = self.krona_A, self.krona_B
        x = x.to(a.dtype)
        if isinstance(base_layer, nn.Conv2d):
            return self._conv_delta(x, base_layer)
        lead = x.shape[:-1]
        # vec trick: x = vec(X) with X (a2, b2) row-major; (A ⊗ B) x = vec(A X Bᵀ), never the (d_out, d_in) ΔW
        z = x.reshape(*lead, self.a2, self.b2) @ b.T  # (..., a2, b1)
        y = a @ z  # (..., a1, b1): y[q, p] is output row q·b1 + p
        if self.official:
            y = y.transpose(-1, -2)  # (..., b1, a1): the official code's row order p·a1 + q
        return y.reshape(*lead, self.a1 * self.b1) * self.scale

    def _conv_delta(self, x: Tensor, base_layer: nn.Conv2d) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        # B convolves each of the a2 input channel groups (b2 channels each) with the base layer's stride/padding
        z = base_layer._conv_forward(x.reshape(n * self.a2, self.b2, h, w), self.krona_B, None)  # (n·a2, b1, H', W')
        z = z.view(n, self.a2, self.b1, *z.shape[-2:])
        y = torch.einsum("qr,nrphw->nqphw", self.krona_A, z)  # (n, a1, b1, H', W'), channel q·b1 + p
        if self.official:
            y = y.transpose(1, 2)
        y = y.reshape(n, self.a1 * self.b1, *y.shape[-2:]) * self.scale
        return y.squeeze(0) if unbatched else y


def kron_delta(a: Tensor, b: Tensor, scale: float = 1.0, official: bool = False) -> Tensor:
    """ΔW = s · kron(A, B) in fp32 for A (a1, a2) and B (b1, b2[, k, k]); rows permuted when ``official``."""
    a, b = a.float(), b.float()
    kernel = b.shape[2:]
    dw = torch.kron(a.view(*a.shape, *[1] * len(kernel)), b) * scale  # (a1·b1, a2·b2, *kernel)
    if official:
        dw = dw.view(a.shape[0], b.shape[0], -1).transpose(0, 1).reshape(dw.shape)  # row q·b1+p → p·a1+q
    return dw


def _split_error(kind: str, d_out: int, d_in: int, kernel: tuple[int, ...], a1: int, a2: int) -> str:
    problems = [f"{f}={a} does not divide {d}={n} (nearest divisors: {' or '.join(map(str, nearest_divisors(n, a)))})"
                for f, a, d, n in (("a1", a1, "d_out", d_out), ("a2", a2, "d_in", d_in)) if n % a]
    return (f"a {kind} of weight shape {(d_out, d_in, *kernel)} cannot be split as A ({a1}×{a2}) ⊗ B: "
            f"{'; '.join(problems)}. Pick a1/a2 that divide every targeted layer, leave this layer out with "
            "`exclude_modules`, or use factor_mode: lycoris (a split chosen per layer)")
