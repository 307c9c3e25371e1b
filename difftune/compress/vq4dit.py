"""VQ4DiT: post-training vector quantization of DiT weights (Deng et al., AAAI 2025, arXiv 2408.17131).

Idea: every Linear W (d_out × d_in) inside the transformer blocks is cut, row by row, into N = d_out·d_in/d
contiguous sub-vectors of length d; each is replaced by the index of one codeword of a per-layer codebook
C (k, d). Storage: N indices of log2 k bits (packed), C in FP32, the FP32 bias. Presets (official code):
``2bit`` k = 256, d = 4 (8 bits per 4 weights); ``3bit`` k = 64, d = 2 (6 bits per 2 weights).

1. Codebook: k-means (k-means++ seeding, 100 Lloyd iterations) over the layer's sub-vectors (`kmeans.py`,
   chunked so memory stays bounded). Plain k-means with nearest assignment is the "k-means only" baseline.
2. Candidates (eq. 5): the n nearest codewords A = {a_1..a_n} of every sub-vector; ratios (eq. 6)
   r = softmax(z) (N, n); soft reconstruction ŵ = Σ_j r_j C[a_j].
3. Zero-data calibration (`vq4dit_calib.py`): along the FP model's own sampling trajectory (random classes, CFG),
   L = L_d + L_r with L_d = mean over blocks of ‖d_fp^l − d_q^l‖² (eq. 8) and the ratio regulariser L_r (eq. 9),
   ratios that pass a threshold frozen to one-hot, codebooks and biases calibrated; finally ŵ = C[argmax r].

Where paper and official code (dengjuncan/VQ4DiT 104c62c) differ, both are offered: ``VQ4DiTConfig.official()`` is
the code exactly, ``VQ4DiTConfig.paper()`` the paper's text. The default ``VQ4DiTConfig()`` is the code's choices
(n = 2, distance init, gated L_r) with one deliberate change: codebooks and biases are calibrated from the start
(the paper's ``"joint"``) at lr 1e-3 instead of after freezing at 1e-4. The code's rates are set for ~50,000 steps;
at a budget a user runs (hundreds of steps) its assignments freeze within a few trajectories and the codebooks then
barely move, so 2-bit calibration ends no better than k-means (dit-mini lab: official 28 %, default 77 %, RTN 35 %):

* ratio init: code r ∝ 1/‖w − C[a_j]‖ (``ratio_init="distance"``), paper uniform 1/n (``"uniform"``);
* L_r: code n·mean(r(1 − r)) over unfrozen rows, added only when it rose above its lowest value in the current
  trajectory (``regularizer="gated"``); paper eq. 9 Σ(1 − |2r − 1|)/(N) always on, times λ_r (``"eq9"``);
* codebooks: code trains a layer's codebook only once ≥ 99 % of its rows are frozen (``codebook="after_freeze"``,
  lr 1e-4 for codebooks and biases); paper calibrates codebooks and ratios together (``"joint"``; default, lr 1e-3);
* n: code 2; the paper's ablation is best at 3 (``paper()`` uses 3).

Deliberate deviations: layers are the diffusers layout (q, k, v separate: 7 Linears per DiT block, the per-block
timestep/class embedders ``norm1.emb`` excluded because the original DiT shares one FP embedder), which is also how
the paper's 162.08 MiB is counted; distances are chunked (the official code materialises 5–8 GB tensors);
``block_inputs="teacher"`` (each student block fed the FP block's input) is offered beside the code's
student-chained blocks, labelled as our variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..targeting import find_targets
from .kmeans import DEFAULT_CHUNK, kmeans
from .packing import pack, packed_size, unpack
from .replaced import ReplacedLinear, register_replacement

#: Official presets: (k codewords, d weights per sub-vector).
VQ_PRESETS: dict[str, tuple[int, int]] = {"2bit": (256, 4), "3bit": (64, 2)}
#: Every Linear inside the transformer blocks (DiT, PixArt, SD3's joint blocks; Flux's joint and single blocks)...
BLOCK_TARGETS = (r"transformer_blocks\.\d+\..*", r"single_transformer_blocks\.\d+\..*")
#: ...except DiT's per-block copies of the timestep/class embedder (FP and shared in the original DiT).
BLOCK_EXCLUDE = (r".*\.norm1\.emb\..*",)
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
MiB = 2**20


def _check_kd(k: object, d: object) -> tuple[int, int]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k > 256 or k & (k - 1):
        raise bad_value("k", k, "a power of two in 2..256 (codebook size)", "The 2bit preset uses 256, 3bit 64.")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise bad_value("d", d, "a positive integer (weights per sub-vector)", "The 2bit preset uses 4, 3bit 2.")
    return k, d


@register_replacement("vq_linear")
class VQLinear(ReplacedLinear):
    """A Linear whose weight is codebook[codes]: packed ``qweight`` (log2 k bits per sub-vector), ``codebook``
    (k, d), FP ``bias``.

    Inference decodes the weight once and keeps it (``decode_once = True``, the default: FP speed, FP memory for
    the decoded copy); with ``decode_once = False`` it decodes on every call and holds only the compact tensors
    (`set_decode_mode`). The cache follows the codebook and codes: editing either decodes again.

    Args:
        in_features: d_in (a multiple of d).
        out_features: d_out.
        k: codebook size (power of two, at most 256).
        d: sub-vector length.
        bias: whether the layer has a bias.
        dtype: floating dtype of the codebook and the bias.
    """

    method = "vq4dit"

    def __init__(self, in_features: int, out_features: int, k: int, d: int, bias: bool = True,
                 dtype: str = "float32") -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_value(name, value, "a positive integer")
        k, d = _check_kd(k, d)
        if in_features % d:
            raise bad_value("d", d, f"a divisor of in_features={in_features}", "Sub-vectors cut rows evenly.")
        if dtype not in _FLOAT_DTYPES:
            raise bad_value("dtype", dtype, f"one of {_FLOAT_DTYPES}")
        if not isinstance(bias, bool):
            raise bad_value("bias", bias, "true or false")
        self.in_features, self.out_features, self.k, self.d = in_features, out_features, k, d
        self.bits = int(math.log2(k))
        self.n_codes = in_features * out_features // d
        fdtype = getattr(torch, dtype)
        self.register_buffer("qweight", torch.zeros(packed_size(self.n_codes, self.bits), dtype=torch.uint8))
        self.codebook = nn.Parameter(torch.zeros(k, d, dtype=fdtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=fdtype))
        else:
            self.register_parameter("bias", None)
        self.decode_once = True
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None

    @classmethod
    def from_codes(cls, codebook: Tensor, codes: Tensor, bias: Tensor | None, in_features: int) -> VQLinear:
        """A layer from a codebook (k, d), codes (d_out·d_in/d,) and an optional bias, on the codebook's device."""
        k, d = codebook.shape
        out_features = codes.numel() * d // in_features
        with torch.device(codebook.device):
            module = cls(in_features, out_features, k, d, bias is not None, str(codebook.dtype).removeprefix("torch."))
        with torch.no_grad():
            module.qweight.copy_(pack(codes.reshape(-1), module.bits))
            module.codebook.copy_(codebook)
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def replacement_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "k": self.k, "d": self.d,
                "bias": self.bias is not None, "dtype": str(self.codebook.dtype).removeprefix("torch.")}

    def codes(self) -> Tensor:
        """The codeword index of every sub-vector, (d_out, d_in/d) int64."""
        return unpack(self.qweight, self.bits, self.n_codes).long().view(self.out_features, self.in_features // self.d)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Ŵ = C[codes] reshaped to (d_out, d_in), in ``dtype`` (default: the codebook's)."""
        w = self.codebook[self.codes()]  # (d_out, d_in/d, d)
        return w.reshape(self.out_features, self.in_features).to(dtype or self.codebook.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.decode_once or (torch.is_grad_enabled() and self.codebook.requires_grad):
            self._cache = None
            return super().forward(x)
        cb, q = self.codebook, self.qweight
        key = (cb.data_ptr(), cb._version, q.data_ptr(), q._version, x.dtype, x.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.dequantized_weight(x.dtype))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self._cache[1], bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, d={self.d}"


def set_decode_mode(model: nn.Module, decode_once: bool) -> int:
    """Switch every `VQLinear` of ``model`` between decode-once (FP speed) and on-the-fly (low memory) inference;
    drops the decoded caches. Returns the number of layers switched."""
    if not isinstance(decode_once, bool):
        raise bad_value("decode_once", decode_once, "true or false")
    layers = [m for m in model.modules() if isinstance(m, VQLinear)]
    for m in layers:
        m.decode_once, m._cache = decode_once, None
    return len(layers)


@dataclass
class VQ4DiTConfig:
    """VQ4DiT settings: the official code's choices, except codebooks and biases calibrated jointly at lr 1e-3
    (see the module docstring; ``official()`` is the code exactly, ``paper()`` the paper's text).

    Attributes:
        preset: ``"2bit"`` (k=256, d=4) or ``"3bit"`` (k=64, d=2); sets ``k`` and ``d`` unless given.
        k: codebook size k (per layer).
        d: sub-vector length d.
        candidates: n, candidate codewords per sub-vector (eq. 5); code 2, paper ablation best 3.
        kmeans_iters: Lloyd iterations of the codebook initialisation (100).
        ratio_init: ``"distance"`` (code: r_j ∝ 1/‖w − c(a_j)‖) or ``"uniform"`` (paper: 1/n).
        regularizer: ``"gated"`` (code) or ``"eq9"`` (paper's L_r, always on).
        lambda_r: λ_r, the weight of L_r (eq. 10); λ_d is 1.
        codebook: ``"joint"`` (paper; default) or ``"after_freeze"`` (code).
        block_inputs: ``"student"`` (code: blocks chained in the quantized model) or ``"teacher"`` (ours: each
            quantized block fed the FP block's input).
        iterations: outer calibration iterations (trajectories); 0 = k-means with candidates' argmax, uncalibrated.
        steps: sampling steps of each trajectory (one optimizer step per timestep; code 50).
        batch: classes (or prompts) per trajectory (code 4).
        guidance: CFG scale of the trajectory (code 4.0).
        class_labels: classes drawn for DiT trajectories (default: every class of the model).
        prompts: prompts drawn for PixArt, SD3 and Flux trajectories.
        resolution: image size in px of SD3/Flux trajectories (None: the pipeline's default size).
        freeze_threshold: a sub-vector whose largest ratio exceeds it is frozen to that codeword (0.99).
        layer_freeze: share of frozen sub-vectors at which a layer switches to hard codes (0.99).
        lr_ratio: learning rate of the ratio logits z (RMSprop α 0.9; code 5e-2).
        lr_codebook: learning rate of codebooks (default 1e-3; code 1e-4).
        lr_bias: learning rate of biases (default 1e-3; code 1e-4).
        seed: seeds k-means++, classes and noise.
        chunk: rows per distance chunk (bounded memory).
        target_modules / exclude_modules: the Linears quantized (default: all in the transformer blocks except
            DiT's per-block embedders).
    """

    preset: str = "2bit"
    k: int | None = None
    d: int | None = None
    candidates: int = 2
    kmeans_iters: int = 100
    ratio_init: str = "distance"
    regularizer: str = "gated"
    lambda_r: float = 1.0
    codebook: str = "joint"
    block_inputs: str = "student"
    iterations: int = 20
    steps: int = 50
    batch: int = 4
    guidance: float = 4.0
    class_labels: list[int] | None = None
    prompts: list[str] | None = None
    resolution: int | None = None
    freeze_threshold: float = 0.99
    layer_freeze: float = 0.99
    lr_ratio: float = 5e-2
    lr_codebook: float = 1e-3
    lr_bias: float = 1e-3
    seed: int = 0
    chunk: int = DEFAULT_CHUNK
    target_modules: list[str] = field(default_factory=lambda: list(BLOCK_TARGETS))
    exclude_modules: list[str] = field(default_factory=lambda: list(BLOCK_EXCLUDE))

    def __post_init__(self) -> None:
        if self.preset not in VQ_PRESETS:
            raise bad_value("preset", self.preset, f"one of {sorted(VQ_PRESETS)}")
        pk, pd = VQ_PRESETS[self.preset]
        self.k, self.d = _check_kd(pk if self.k is None else self.k, pd if self.d is None else self.d)
        choices = {"ratio_init": ("distance", "uniform"), "regularizer": ("gated", "eq9"),
                   "codebook": ("after_freeze", "joint"), "block_inputs": ("student", "teacher")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad_value(name, getattr(self, name), f"one of {allowed}")
        for name, low in (("candidates", 1), ("kmeans_iters", 0), ("iterations", 0), ("steps", 1), ("batch", 1),
                          ("chunk", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad_value(name, value, f"an integer >= {low}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or not 16 <= self.resolution <= 4096):
            raise bad_value("resolution", self.resolution, "null (the pipeline's size) or an integer in [16, 4096]")
        if self.candidates > self.k:
            raise bad_value("candidates", self.candidates, f"at most k={self.k}")
        for name in ("freeze_threshold", "layer_freeze"):
            if not 0 < getattr(self, name) <= 1:
                raise bad_value(name, getattr(self, name), "a number in (0, 1]")
        for name in ("lambda_r", "lr_ratio", "lr_codebook", "lr_bias", "guidance"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int | float) \
                    or getattr(self, name) < 0:
                raise bad_value(name, getattr(self, name), "a non-negative number")

    @classmethod
    def official(cls, **overrides: Any) -> VQ4DiTConfig:
        """The official code's schedule exactly: codebooks trained only after a layer freezes, lr 1e-4."""
        values = {"codebook": "after_freeze", "lr_codebook": 1e-4, "lr_bias": 1e-4}
        return cls(**{**values, **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> VQ4DiTConfig:
        """The paper's text where it differs from the code: n = 3, uniform ratios, eq. 9 always on, joint codebooks."""
        values = {"candidates": 3, "ratio_init": "uniform", "regularizer": "eq9", "codebook": "joint"}
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_linears(model: nn.Module, target_modules: Sequence[str] = BLOCK_TARGETS,
                  exclude_modules: Sequence[str] = BLOCK_EXCLUDE) -> list[str]:
    """Names of the ``nn.Linear`` modules VQ4DiT quantizes (7 per DiT block; q/k/v/out of both attentions and the
    MLP in PixArt blocks; in SD3/Flux joint blocks 14: both streams' AdaLN modulation, q/k/v/out and feed-forward
    (SD3's last block 11: no context output or feed-forward); in Flux single blocks 6: AdaLN, q/k/v, MLP in, fused
    out). Embedders and the final projection stay FP, as in the paper."""
    names = [n for n in find_targets(model, list(target_modules), list(exclude_modules))
             if type(model.get_submodule(n)) is nn.Linear]
    if not names:
        raise DifftuneError(f"`target_modules`={list(target_modules)!r} selects no nn.Linear of "
                            f"{type(model).__name__}; is it a DiT, PixArt, SD3 or Flux transformer?")
    return names


def subvectors(weight: Tensor, d: int) -> Tensor:
    """W (d_out, d_in) → its row-wise contiguous sub-vectors (d_out·d_in/d, d)."""
    return weight.detach().float().reshape(-1, d)


def kmeans_codebook(linear: nn.Linear, k: int, d: int, iters: int = 100, seed: int = 0,
                    chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """The layer's k-means codebook (k, d) and nearest assignments (N,), with a `DifftuneError` on bad shapes."""
    if linear.in_features % d:
        raise bad_value("d", d, f"a divisor of in_features={linear.in_features}")
    return kmeans(subvectors(linear.weight, d), k, iters=iters, seed=seed, chunk=chunk)


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` at ``name`` (a dotted submodule name), in place of what is there."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_kmeans_(model: nn.Module, config: VQ4DiTConfig) -> list[str]:
    """The "k-means only" baseline, in place: every selected Linear → `VQLinear` with its k-means codebook and
    nearest-codeword codes (no candidates, no calibration). Returns the replaced names."""
    names = block_linears(model, config.target_modules, config.exclude_modules)
    for i, name in enumerate(names):
        linear = model.get_submodule(name)
        cb, codes = kmeans_codebook(linear, config.k, config.d, config.kmeans_iters, config.seed + i, config.chunk)
        layer = VQLinear.from_codes(cb.to(linear.weight.dtype), codes, linear.bias, linear.in_features)
        layer.module_name = name
        swap_module(model, name, layer)
    return names


def size_report(model: nn.Module, k: int, d: int, target_modules: Sequence[str] = BLOCK_TARGETS,
                exclude_modules: Sequence[str] = BLOCK_EXCLUDE) -> dict[str, Any]:
    """Sizes counted like the paper, over the quantized Linears (works on the meta device).

    FP: weights and biases in FP32. Quantized: N indices at log2 k bits each, one FP32 codebook (k × d) per Linear,
    FP32 biases. ``file_bytes`` is what `VQLinear`s actually store (indices packed per layer, ceil to a byte).
    """
    k, d = _check_kd(k, d)
    names = block_linears(model, target_modules, exclude_modules)
    linears = [model.get_submodule(n) for n in names]
    weights = sum(m.weight.numel() for m in linears)
    biases = sum(m.bias.numel() for m in linears if m.bias is not None)
    bits = int(math.log2(k))
    index_bytes = weights / d * bits / 8
    codebook_bytes = len(linears) * k * d * 4
    with torch.device("meta"):
        shells = [VQLinear(m.in_features, m.out_features, k, d, m.bias is not None) for m in linears]
    file_bytes = sum(t.numel() * t.element_size() for s in shells for t in s.state_dict().values())
    fp = (weights + biases) * 4
    total = index_bytes + codebook_bytes + biases * 4
    return {"linears": len(linears), "weights": weights, "biases": biases, "k": k, "d": d, "bits_per_index": bits,
            "fp32_bytes": fp, "index_bytes": index_bytes, "codebook_bytes": codebook_bytes, "bias_bytes": biases * 4,
            "total_bytes": total, "file_bytes": file_bytes, "ratio": fp / total}


def format_size_report(report: dict[str, Any], preset: str = "") -> list[str]:
    """The report as printed by ``difftune quantize --dry-run`` (MiB with two decimals)."""
    r, mib = report, (lambda b: f"{b / MiB:.2f} MiB")
    label = f"{preset} " if preset else ""
    return [
        f"quantized linears: {r['linears']} ({r['weights']:,} weights, {r['biases']:,} biases)",
        f"FP32 blocks: {mib(r['fp32_bytes'])}",
        f"{label}(k={r['k']}, d={r['d']}): indices {mib(r['index_bytes'])} ({r['bits_per_index']} bits per "
        f"{r['d']} weights) + codebooks {mib(r['codebook_bytes'])} ({r['linears']} x {r['k']} x {r['d']} FP32) "
        f"+ biases {mib(r['bias_bytes'])} (FP32)",
        f"total {label}quantized: {mib(r['total_bytes'])} ({r['ratio']:.2f}x smaller); as stored by VQLinear: "
        f"{mib(r['file_bytes'])} ({r['file_bytes']:,} bytes)",
    ]
