"""SaRA's weight gradient at M formed a block of output channels at a time (`WeightGrad`), for a fused Linear/Conv2d
whose Δ trains: the dense dL/dW of the layer (118 MB for one 1280×2560×3×3 convolution of SD1.5's up blocks) never
exists, only blocks of `CHUNK` entries. See `SaRAAdapter.merged_output`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .positions import decode

#: entries of dL/dW formed at a time (4 MiB in fp32)
CHUNK = 1 << 20


def gradient_rule(layer: nn.Module) -> bool:
    """Whether `WeightGrad` can form dL/dW of ``layer``'s weight from its input and output gradient: a stock Linear or
    a stock Conv2d with zero padding given as numbers (subclasses may compute something else from their weight)."""
    if type(layer) is nn.Linear:
        return True
    return type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


class WeightGrad(torch.autograd.Function):
    """Identity on the layer's output ``out``; the backward forms dL/dW = grad_outᵀ·x (the convolution's weight
    gradient for a Conv2d) a block of output channels at a time, and dL/db = Σ grad_out, and hands each Δ its entries
    at M times ``weight``.

    The layer itself runs with its fused weight and bias, neither needing a gradient, so autograd forms only the input
    gradient there: a convolution asked for its bias gradient forms the dense dL/dW too (oneDNN computes both in one
    primitive; 118 MB more at one 1280×2560×3×3 convolution of SD1.5). ``x`` is the layer's input, which the layer's
    own node keeps too (no second copy). ``where`` holds the positions (`positions.encode`) of the weight and of the
    bias (None when the bias does not train).
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, x: Tensor, delta_w: Tensor, delta_b: Tensor | None, layer: nn.Module,
                where: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None], weight: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.layer, ctx.where, ctx.weight = layer, where, weight
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        (w_low, w_counts), bias_at = ctx.where
        if not isinstance(ctx.layer, nn.Linear) and grad.dim() == 3:  # an unbatched (C, H, W) convolution
            x, grad = x.unsqueeze(0), grad.unsqueeze(0)
        g_w = g_b = None
        if ctx.needs_input_grad[2]:
            g_w = weight_grad_at(ctx.layer, x.to(grad.dtype), grad, decode(w_low, w_counts)) * ctx.weight
        if ctx.needs_input_grad[3] and bias_at is not None:
            channel = grad.dim() - 1 if isinstance(ctx.layer, nn.Linear) else 1
            dims = tuple(i for i in range(grad.dim()) if i != channel)
            per_channel = grad.sum(dims) if dims else grad  # sum(()) would sum everything (an unbatched Linear)
            g_b = per_channel.float().index_select(0, decode(*bias_at)) * ctx.weight  # (|M_b|,)
        return grad if ctx.needs_input_grad[0] else None, None, g_w, g_b, None, None, None


def weight_grad_at(layer: nn.Module, x: Tensor, grad: Tensor, idx: Tensor) -> Tensor:
    """dL/dW of ``layer``'s weight at the sorted flat indices ``idx``: (|idx|,) fp32, `CHUNK` entries at a time."""
    shape = layer.weight.shape  # (out, in) or (out, in / groups, kh, kw)
    per_row = math.prod(shape[1:])
    rows = shape[0] if getattr(layer, "groups", 1) != 1 else max(1, CHUNK // per_row)
    starts = list(range(0, shape[0], rows)) + [shape[0]]
    bounds = torch.searchsorted(idx, torch.tensor(starts, dtype=idx.dtype, device=idx.device) * per_row).tolist()
    if isinstance(layer, nn.Linear):
        x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (tokens, in), (tokens, out)
    parts = []
    for i, (o0, o1) in enumerate(zip(starts[:-1], starts[1:])):
        if bounds[i] == bounds[i + 1]:
            continue  # nothing selected in these rows
        block = weight_block(layer, x, grad, o0, o1)
        parts.append(block.reshape(-1).index_select(0, idx[bounds[i]:bounds[i + 1]] - o0 * per_row).float())
    return torch.cat(parts) if parts else grad.new_zeros(0, dtype=torch.float32)


def weight_block(layer: nn.Module, x: Tensor, grad: Tensor, o0: int, o1: int) -> Tensor:
    """dL/dW of output channels [o0, o1) of ``layer``'s weight from its input and output gradient (a Linear's as
    (tokens, in) and (tokens, out)): (o1 - o0, *weight.shape[1:])."""
    if isinstance(layer, nn.Linear):
        return grad[:, o0:o1].t().mm(x)
    return torch.nn.grad.conv2d_weight(x, (o1 - o0, *layer.weight.shape[1:]), grad[:, o0:o1], layer.stride,
                                       layer.padding, layer.dilation, layer.groups)


class RouteGrad(torch.autograd.Function):
    """Identity on the (already written) base tensor; the backward hands grad_W[M]·w to Δ and nothing to W."""

    @staticmethod
    def forward(ctx: Any, delta: Tensor, carrier: Tensor, low: Tensor, counts: Tensor, weight: float) -> Tensor:
        ctx.save_for_backward(low, counts)  # the kept positions: the flat indices are decoded in the backward only
        ctx.weight = weight
        ctx.delta_dtype = delta.dtype
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        idx = decode(*ctx.saved_tensors)
        g_delta = grad.reshape(-1).index_select(0, idx).to(ctx.delta_dtype) * ctx.weight  # (|M|,)
        return g_delta, grad if ctx.needs_input_grad[1] else None, None, None, None
