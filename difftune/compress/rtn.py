"""RTN: round-to-nearest uniform weight quantization, per output channel (the baseline VQ4DiT compares against).

For each output row w of a Linear weight W (d_out × d_in), with b bits and q_max = 2^b − 1 (GPTQ's asymmetric
quantizer, the form Q-DiT and VQ4DiT's RTN/GPTQ baselines use)::

    lo = min(min(w), 0),  hi = max(max(w), 0)      # the range always holds 0, so zero is exactly representable
    s  = (hi − lo) / q_max                         # scale (1 for an all-zero row: anything decodes it exactly)
    z  = round(−lo / s) ∈ [0, q_max]               # integer zero point
    q  = clamp(round(w / s) + z, 0, q_max)         # b-bit codes, packed (`difftune.compress.packing`)
    ŵ  = s · (q − z)

so |w − ŵ| <= s / 2 for every entry (with the scale stored in fp32). Activations and the bias stay in floating point.
Storage per layer: ceil(d_out·d_in·b / 8) code bytes + d_out scales + d_out uint8 zero points + the FP bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..targeting import find_targets
from .packing import pack, packed_size, unpack
from .replaced import ReplacedLinear, register_replacement

#: Bit widths RTNLinear supports (those the DiT quantization papers report).
RTN_BITS = (2, 3, 4, 8)
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _check_rtn_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in RTN_BITS:
        raise bad_value("bits", bits, f"one of {RTN_BITS}", "RTN stores b-bit codes per weight, e.g. 4.")
    return bits


def rtn_quantize(weight: Tensor, bits: int, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize a 2-D weight per output row (see the module docstring).

    Args:
        weight: W (d_out, d_in), floating point; a meta tensor gives meta results.
        bits: b in `RTN_BITS`.
        scale_dtype: the dtype the scale is stored in; codes are computed with the stored (rounded) scale, so
            decoding is consistent with them.

    Returns:
        (codes (d_out, d_in) uint8, scale (d_out,) in ``scale_dtype``, zero point (d_out,) uint8).
    """
    bits = _check_rtn_bits(bits)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = f"{weight.dtype} of shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise bad_value("weight", got, "a 2-D floating-point tensor (d_out, d_in)")
    w = weight.detach().float()
    if not w.is_meta and not torch.isfinite(w).all():
        raise DifftuneError("`weight` holds inf or NaN entries; RTN needs finite weights (check the checkpoint)")
    q_max = (1 << bits) - 1
    lo = w.amin(dim=1).clamp(max=0)  # (d_out,)
    hi = w.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / q_max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, q_max)  # (d_out,)
    codes = torch.clamp(torch.round(w / s[:, None]) + zero[:, None], 0, q_max)  # (d_out, d_in)
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


@register_replacement("rtn_linear")
class RTNLinear(ReplacedLinear):
    """A Linear with b-bit RTN weights: packed codes ``qweight``, per-row ``scale`` and ``zero_point``, FP ``bias``.

    Args:
        in_features: d_in.
        out_features: d_out.
        bits: b in `RTN_BITS`.
        bias: whether the layer has a bias (kept in floating point).
        dtype: the floating dtype of ``scale``, ``bias`` and the decoded weight, e.g. ``"float32"``.
    """

    method = "rtn"

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 dtype: str = "float32") -> None:
        super().__init__()
        for field, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_value(field, value, "a positive integer")
        if not isinstance(bias, bool):
            raise bad_value("bias", bias, "true or false")
        if dtype not in _FLOAT_DTYPES:
            raise bad_value("dtype", dtype, f"one of {_FLOAT_DTYPES}")
        self.in_features, self.out_features, self.bits = in_features, out_features, _check_rtn_bits(bits)
        fdtype = getattr(torch, dtype)
        n = in_features * out_features
        self.register_buffer("qweight", torch.zeros(packed_size(n, self.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, dtype=fdtype))
        self.register_buffer("zero_point", torch.zeros(out_features, dtype=torch.uint8))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=fdtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> RTNLinear:
        """The RTN-quantized copy of ``linear`` (on its device; the original is not changed).

        Raises:
            DifftuneError: ``linear`` is not an nn.Linear with a floating-point weight, or ``bits`` is unsupported.
        """
        if not isinstance(linear, nn.Linear):
            raise bad_value("linear", type(linear).__name__, "an nn.Linear")
        w = linear.weight
        if not w.is_floating_point():
            raise bad_value("linear.weight", w.dtype, "a floating-point weight", "Quantize the FP model.")
        with torch.device(w.device):
            module = cls(linear.in_features, linear.out_features, bits, linear.bias is not None,
                         str(w.dtype).removeprefix("torch."))
        codes, scale, zero = rtn_quantize(w, module.bits, scale_dtype=w.dtype)
        with torch.no_grad():
            module.qweight.copy_(pack(codes, module.bits))
            module.scale.copy_(scale)
            module.zero_point.copy_(zero)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        module.train(linear.training)
        return module

    def replacement_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "bias": self.bias is not None, "dtype": str(self.scale.dtype).removeprefix("torch.")}

    def codes(self) -> Tensor:
        """The b-bit codes q as a (out_features, in_features) uint8 tensor."""
        return unpack(self.qweight, self.bits, self.in_features * self.out_features).view(
            self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Ŵ = s · (q − z) (out_features, in_features), computed in fp32, returned in ``dtype`` (default: the
        module's floating dtype)."""
        q = self.codes().float()
        w = (q - self.zero_point.float()[:, None]) * self.scale.float()[:, None]  # (d_out, d_in)
        return w.to(dtype or self.scale.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


def quantize_rtn_(
    model: nn.Module, bits: int, target_modules: Sequence[str], exclude_modules: Sequence[str] = ()
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` selected by the patterns with its `RTNLinear`.

    Patterns follow `difftune.targeting` (equal name, dotted suffix such as ``"to_q"``, or a full regex); matched
    modules that are not Linears (containers such as a whole block) are passed over. Works on meta-device models,
    which gives exact sizes without weights. Every replacement is built before the first swap, so a refusal leaves
    the model unchanged.

    Args:
        model: the FP model (e.g. a ``DiTTransformer2DModel``); it must carry no difftune adapters.
        bits: b in `RTN_BITS`.
        target_modules: module-name patterns, e.g. ``[r"transformer_blocks\\.\\d+\\..*"]``.
        exclude_modules: patterns removed from the selection.

    Returns:
        The names of the replaced modules.

    Raises:
        DifftuneError: bad ``bits``, adapters in the model, or patterns that select no Linear.
    """
    bits = _check_rtn_bits(bits)
    adapted = [n for n, m in model.named_modules() if getattr(m, "_difftune_host", False)]
    if adapted:
        raise DifftuneError(f"the model carries difftune adapters (e.g. on {adapted[:3]}); quantize the base "
                            "model: remove the adapters first (or fuse them in with remove(merge=True)) and inject "
                            "them again on the quantized model")
    names = [n for n in find_targets(model, target_modules, exclude_modules)
             if isinstance(model.get_submodule(n), nn.Linear)]
    if not names:
        raise DifftuneError(f"`target_modules`={list(target_modules)!r} selects no nn.Linear of "
                            f"{type(model).__name__}; name the Linears (e.g. 'to_q', 'ff.net.2') or match them by "
                            "regex")
    replacements = {}
    for name in names:
        try:
            replacements[name] = RTNLinear.from_linear(model.get_submodule(name), bits)
        except DifftuneError as e:
            raise DifftuneError(f"cannot quantize {name!r}: {e}") from e
    for name, module in replacements.items():
        module.module_name = name
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    return names
