"""SaRA trained unfused: a stock Linear/Conv2d runs with W0 + w·scatter_M(Δ) made a block of output channels at a time,
in the forward and again in the backward (`UnfusedLayer`), so the base weights keep W0 and nothing per selected entry
is kept beyond Δ itself: not W0[M] (the weights are W0) and not the positions (M = |W0| < θ is read off each block).
At equal trainable count that is the state LoRA keeps (Δ, its gradient, Adam's moments). See
`SaRAAdapter.layer_output`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DifftuneError
from .grads import gradient_rule, weight_block

#: weight entries made at a time (4 MiB in fp32): at most this much of a layer's weight exists twice
CHUNK = 1 << 20


def row_blocks(shape: tuple[int, ...], groups: int = 1) -> list[tuple[int, int]]:
    """Ranges [r0, r1) of the first dimension of a tensor of ``shape`` holding about `CHUNK` entries each (a grouped
    convolution's weight in one range)."""
    if not shape:
        return [(0, 1)]
    rows = shape[0] if groups != 1 else max(1, CHUNK // max(1, math.prod(shape[1:])))
    return [(r0, min(r0 + rows, shape[0])) for r0 in range(0, shape[0], rows)] or [(0, 0)]


def block_counts(w0: Tensor, theta: float, groups: int = 1) -> list[int]:
    """|M| in each of `row_blocks` of ``w0``: where each block's Δ entries start (read once, when M is made)."""
    if w0.dim() == 0:
        return [int(w0.abs() < theta)]
    return [int((w0[r0:r1].abs() < theta).sum()) for r0, r1 in row_blocks(tuple(w0.shape), groups)]


class _Blocks:
    """Walks a layer's weight in `row_blocks`: each block's mask M = |W0| < θ and, when asked, W0 + w·Δ on it, made
    in two buffers reused from block to block (a fresh tensor per step is slow where memory is mapped per call)."""

    def __init__(self, w0: Tensor, groups: int, theta: float, delta: Tensor, weight: float, counts: list[int],
                 counting: bool = True):
        self.w0, self.theta, self.delta, self.weight, self.counts = w0, theta, delta, weight, counts
        self.counting = counting
        self.ranges = row_blocks(tuple(w0.shape), groups)
        size = max((r1 - r0) * math.prod(w0.shape[1:]) for r0, r1 in self.ranges)
        # fp32 holds bf16/fp16 values exactly, so off M the sum below gives W0 back; float64 stays float64
        self.values = torch.empty(size, dtype=torch.promote_types(w0.dtype, torch.float32), device=w0.device)
        self.flags = torch.empty(size, dtype=torch.bool, device=w0.device)
        self.seen: list[Tensor] = []

    def __iter__(self) -> Iterator[tuple[int, int, Tensor, int, int]]:
        """(o0, o1, the block's mask, its |M|, where its Δ entries start); the masks are counted into ``seen`` when
        `check` is to follow (the forward; the backward reads the same W0 again)."""
        at = 0
        for (o0, o1), n in zip(self.ranges, self.counts):
            w0 = self.w0[o0:o1]
            values, mask = self.values[:w0.numel()].view(w0.shape), self.flags[:w0.numel()].view(w0.shape)
            torch.lt(torch.abs(w0, out=values) if w0.dtype == values.dtype else w0.abs(), self.theta, out=mask)
            if self.counting:
                self.seen.append(torch.count_nonzero(mask))
            yield o0, o1, mask, n, at
            at += n

    def made(self, o0: int, o1: int, mask: Tensor, n: int, at: int, flat: Tensor | None = None) -> Tensor:
        """The block W0 + w·Δ on M, in the weight's dtype (valid until the next block); ``flat``: M's flat indices
        in the block when they were made anyway (a scatter by index is quicker than by mask)."""
        w0 = self.w0[o0:o1]
        # fp32 sum, rounded once to the weight's dtype: the values `add_into` writes when fused. Off M the sum is
        # W0 + 0, W0 itself (|W0| >= θ > 0 there); no boolean gather, which syncs the host and is slow on CPUs
        step = self.values[:w0.numel()].view(w0.shape).zero_()
        values = (self.weight * self.delta[at:at + n].float()).to(step.dtype)
        if flat is None:
            step.masked_scatter_(mask, values)
        else:
            step.view(-1).index_put_((flat,), values)
        step.add_(w0)
        return step if w0.dtype == step.dtype else step.to(w0.dtype)

    def check(self) -> None:
        """Raise if the blocks' masks select other counts than when M was made (one host synchronisation)."""
        if self.seen and torch.stack(self.seen).cpu().tolist() != self.counts:
            raise moved()


def stands_in(layer: nn.Module) -> bool:
    """Whether `UnfusedLayer` may compute ``layer(x)``: a stock Linear/Conv2d (`grads.gradient_rule`) whose weight
    needs no gradient (it is read detached) and that nothing watches being called (hooks, a wrapped ``forward``):
    `UnfusedLayer` never calls the layer."""
    hooks = (layer._forward_hooks, layer._forward_pre_hooks, layer._backward_hooks, layer._backward_pre_hooks,
             nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    return (gradient_rule(layer) and not layer.weight.requires_grad and not any(hooks)
            and "forward" not in layer.__dict__)


def moved() -> DifftuneError:
    """The error for a base that no longer gives the M an adapter was made with."""
    return DifftuneError("the base weights under a SaRA adapter that trains unfused no longer select the entries it "
                         "was made for (|W0| < θ counts differently): they were cast or written after injection. "
                         "Cast the model before injecting SaRA, and do not write its base weights while it trains")


class UnfusedLayer(torch.autograd.Function):
    """``layer(x)`` with its weight W0 + w·scatter_M(Δ) and the given ``bias``, the weight made `CHUNK` entries at a
    time (`row_blocks`; ``counts``: |M| per block, `block_counts`); the backward makes each block again for the input
    gradient and forms dL/dW at M from the same block of the output gradient (Δ's gradient, times w). Under autocast
    the layer runs in the autocast dtype, as a stock layer does."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, delta: Tensor, layer: nn.Module, theta: float,
                weight: float, counts: list[int]) -> Tensor:
        device = x.device.type
        # autocast leaves float64 alone (a stock layer of a float64 model runs in float64 under it)
        cast = torch.is_autocast_enabled(device) and torch.float64 not in (x.dtype, layer.weight.dtype)
        dtype = torch.get_autocast_dtype(device) if cast else x.dtype
        linear = isinstance(layer, nn.Linear)
        unbatched = not linear and x.dim() == 3
        xc = (x.unsqueeze(0) if unbatched else x).to(dtype)
        blocks = _Blocks(layer.weight.detach(), getattr(layer, "groups", 1), theta, delta.detach(), weight, counts)
        parts = []
        with torch.autocast(device, enabled=False):
            for o0, o1, mask, n, at in blocks:
                made = blocks.made(o0, o1, mask, n, at).to(dtype)
                b = None if bias is None else bias[o0:o1].to(dtype)
                if linear:
                    parts.append(F.linear(xc, made, b))
                else:
                    parts.append(F.conv2d(xc, made, b, layer.stride, layer.padding, layer.dilation, layer.groups))
        blocks.check()
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1 if linear else 1)
        ctx.save_for_backward(xc, delta)  # Δ is the leaf itself: no copy; a write to it before backward is caught
        ctx.layer, ctx.theta, ctx.weight, ctx.counts, ctx.unbatched = layer, theta, weight, counts, unbatched
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        return out.squeeze(0) if unbatched else out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, delta = ctx.saved_tensors
        shape = xc.shape
        layer, linear = ctx.layer, isinstance(ctx.layer, nn.Linear)
        grad = (grad.unsqueeze(0) if ctx.unbatched else grad).to(xc.dtype)
        need_x, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        w0 = layer.weight.detach()
        if linear:
            xc, grad = xc.reshape(-1, shape[-1]), grad.reshape(-1, grad.shape[-1])  # (tokens, in), (tokens, out)
        g_bias = None
        if ctx.needs_input_grad[1] and ctx.bias_dtype is not None:
            g_bias = grad.sum((0,) if linear else (0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        g_x = torch.zeros_like(xc) if linear and need_x else None
        g_delta = torch.empty_like(delta) if need_d else None  # (|M|,), filled block by block
        blocks = _Blocks(w0, getattr(layer, "groups", 1), ctx.theta, delta.detach(), ctx.weight, ctx.counts,
                         counting=False)
        for o0, o1, mask, n, at in blocks:
            # |M| of the block is known: no host synchronisation on a GPU (`nonzero` waits for the count)
            flat = torch.nonzero_static(mask.reshape(-1), size=n).squeeze(1) if need_d and n else None
            if flat is not None:
                block = weight_block(layer, xc, grad, o0, o1)
                # the flat positions then a gather: quicker on CPUs than a boolean index of the block
                torch.mul(block.reshape(-1).index_select(0, flat), ctx.weight, out=g_delta[at:at + n])
                del block
            if need_x:
                made = blocks.made(o0, o1, mask, n, at, flat).to(xc.dtype)
                if linear:
                    g_x.addmm_(grad[:, o0:o1], made)
                else:
                    part = torch.nn.grad.conv2d_input(shape, made, grad[:, o0:o1], layer.stride, layer.padding,
                                                      layer.dilation, layer.groups)
                    g_x = part if g_x is None else g_x.add_(part)
        if g_x is not None:
            g_x = g_x.reshape(shape).to(ctx.x_dtype)
            g_x = g_x.squeeze(0) if ctx.unbatched else g_x
        return g_x, g_bias, g_delta, None, None, None, None
