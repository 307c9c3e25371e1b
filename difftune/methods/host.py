"""`AdapterHost`: the module that replaces an adapted layer and runs its adapters around the original.

Merging writes ``W = W0 + Σ_merged w_i ΔW_i`` (sums in fp32) and keeps W0 while merged, so unmerging is exact
(no drift over fuse/unfuse cycles). Sparse adapters restore their own entries instead of a dense copy of W0. The dense
copy stays after unmerging while the parameter is unchanged, so fusing again adds in place and copies nothing.

Every adapter computes its ΔW and its output from the true W0 (`BaseParams`), whatever else is fused: the kept
original while a dense adapter is fused into the parameter, else the live parameter, which holds W0 unless sparse
adapters are fused into it (then a copy with their entries restored, the one case that copies).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError
from .base import Adapter
from .context import WEIGHTS_KEY, current_inputs, item_weight


class BaseParams(Mapping[str, Tensor]):
    """W0 of one host: {parameter name of the base layer: its true base value}, each computed when first read.

    Made once per forward and per merge, so a layer whose adapters ignore W0 never computes it (a compressed layer
    would decode its weight) and several adapters that read it share one lookup. The values are the host's own
    tensors (its kept original, or the live parameter): read-only for adapters.
    """

    def __init__(self, host: AdapterHost) -> None:
        self._host = host
        self._values: dict[str, Tensor] = {}

    def __getitem__(self, pname: str) -> Tensor:
        if pname not in self._values:
            self._values[pname] = self._host.base_value(pname)
        return self._values[pname]

    def _names(self) -> list[str]:
        layer = self._host.base_layer
        names = [n for n, _ in layer.named_parameters(recurse=False)]
        # a compressed layer (difftune.compress) exposes its decoded `weight` as a property, not a Parameter
        return names if "weight" in names or not isinstance(getattr(layer, "weight", None), Tensor) else \
            ["weight", *names]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class AdapterHost(nn.Module):
    """Wraps one base layer and holds every adapter injected into it, by name."""

    _difftune_host = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.adapter_weights: dict[str, float] = {}
        self.disabled: set[str] = set()
        self.merged: list[str] = []
        # {parameter name: (version, storage) when unmerged} for each dense copy of W0 kept after the unmerge
        self._kept: dict[str, tuple[int, int]] = {}

    def __getattr__(self, name: str) -> Any:
        # Code that reads e.g. `attn.to_q.weight.dtype` or `conv.in_channels` must keep working on the host.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterHost:
        for adapter in self.adapters.values():  # before a cast rounds W0 (SaRA takes what it reads off W0 first)
            adapter.before_base_change(self.base_layer, fn)
        return super()._apply(fn, recurse)

    def active(self) -> list[tuple[str, Adapter, float]]:
        return [(n, a, self.adapter_weights[n]) for n, a in self.adapters.items()
                if n not in self.disabled and n not in self.merged]

    def _item_weights(self, active: list[tuple[str, Adapter, float]]) -> dict[str, bool]:
        """Which adapters have per-item weights in this call; refuses those that cannot take them."""
        weights = current_inputs().get(WEIGHTS_KEY) or {}
        if not weights:
            return {}
        for n in weights:
            if n in self.merged:
                raise DifftuneError(f"adapter {n!r} is fused into the weights, so it cannot take per-item weights "
                                    f"(`{WEIGHTS_KEY}`); unfuse it first")
            if n in self.adapters and self.adapters[n].param_space:
                raise DifftuneError(f"adapter {n!r} ({self.adapters[n].config.method}) acts through the layer's "
                                    f"parameters and cannot take per-item weights (`{WEIGHTS_KEY}`)")
        return {n: n in weights for n, _, _ in active}

    def base_value(self, pname: str) -> Tensor:
        """The true base value W0 of the base layer's ``pname`` (see the module docstring); KeyError if it has none."""
        original = self._original(pname)
        if original is not None:
            return original
        value = getattr(self.base_layer, pname, None)
        if not isinstance(value, Tensor):
            raise KeyError(pname)
        sparse = [a for n, a in self.adapters.items() if a.sparse and n in self.merged and pname in a.merge_params()]
        if sparse:  # rare: W0 is the live values with the fused sparse entries put back, in a copy
            value = value.detach().clone()
            for adapter in sparse:
                adapter.restore(pname, value)
        return value

    def base_params(self) -> BaseParams:
        """W0 for every parameter of the base layer, computed when read (what adapters receive as ``base``)."""
        return BaseParams(self)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        active = self.active()
        base = BaseParams(self)
        per_item = self._item_weights(active)
        for n, adapter, w in active:
            x = adapter.pre_forward(x, item_weight(n, x) if per_item.get(n) else w)
        params: dict[str, Tensor] = {}
        out = None
        if len(active) == 1 and not self.merged and not args and not kwargs and active[0][1].param_space:
            out = active[0][1].layer_output(x, self.base_layer, active[0][2])  # per-item weights: refused above
            if out is not None:
                return out
        if any(a.param_space for a in self.adapters.values()):
            if any(self.adapters[n].is_stale(self.adapter_weights[n]) for n in self.merged):
                self._write_merged()  # merged values follow an adapter that trains (in place, no copy)
            for n, adapter in self.adapters.items():
                if adapter.param_space and n not in self.disabled:
                    w, merged = self.adapter_weights[n], n in self.merged
                    params = adapter.param_overrides(params, self.base_layer, w, merged)
        if active and not params and not self.merged and not args and not kwargs:
            first, adapter, w = active[0]  # `Adapter.replace_output`: the only case where it is the same function
            if w == 1.0 and not per_item.get(first):
                out = adapter.replace_output(x, self.base_layer, base)
        if out is not None:
            active = active[1:]
        elif params:
            out = torch.func.functional_call(self.base_layer, params, (x, *args), kwargs)
        else:
            out = self.base_layer(x, *args, **kwargs)
        for n in self.merged:  # non-empty: `out` is the base layer's own output on x (no `replace_output`)
            if self.adapters[n].param_space and n not in self.disabled:
                out = self.adapters[n].merged_output(x, out, self.adapter_weights[n], self.base_layer)
        for n, adapter, w in active:
            out = adapter(x, out, item_weight(n, out) if per_item.get(n) else w, self.base_layer, base)
        return out

    # -- merging: W = W0 + Σ_merged w_i ΔW_i in fp32, with W0 kept so unmerge is exact (no drift over cycles).
    def merge_refusal(self, n: str) -> str | None:
        """Why adapter ``n`` cannot be merged into this layer, or None when it can."""
        adapter = self.adapters[n]
        if not adapter.mergeable:
            return (f"adapter {n!r} ({adapter.config.method}) acts on activations and cannot be merged into weights; "
                    "keep it unmerged (it runs as a module at inference)")
        params = {p for p, _ in self.base_layer.named_parameters(recurse=False)}
        missing = [p for p in adapter.merge_params() if p not in params]
        if missing:  # e.g. a compressed layer (difftune.compress) that stores codes, not a `weight` Parameter
            return (f"adapter {n!r} ({adapter.config.method}) cannot be merged into {type(self.base_layer).__name__}: "
                    f"it has no parameter {missing} to write into; keep the adapter unmerged (it runs on top of the "
                    "layer)")
        return None

    def check_mergeable(self, names: Iterable[str]) -> None:
        for n in names:
            why = self.merge_refusal(n)
            if why:
                raise DifftuneError(why)
            if n in self.disabled:
                raise DifftuneError(f"adapter {n!r} is disabled; enable it before merging")

    def merge(self, names: Iterable[str]) -> None:
        names = [n for n in names if n not in self.merged]
        if not names:
            return
        self.check_mergeable(names)  # before any state changes: a refused merge leaves the host as it was
        self.merged.extend(names)
        self._write_merged()

    def unmerge(self, names: Iterable[str] | None = None) -> None:
        drop = set(self.merged if names is None else names) & set(self.merged)
        if drop:
            self.merged = [n for n in self.merged if n not in drop]
            self._write_merged()

    def _write_merged(self) -> None:
        """Set each parameter to ``W0 + Σ_merged w_i Δ_i`` (sums in fp32).

        Two passes: first every parameter goes back to W0 (from the dense copy kept only while a dense adapter such
        as LoRA is merged into it, and from the base values sparse adapters keep for their own entries), then each
        is written from W0. So every Δ_i is computed from the true base values of all parameters (`BaseParams`),
        whatever was merged before.
        """
        with torch.no_grad():
            params = []
            for pname, param in self.base_layer.named_parameters(recurse=False):
                touching = self._touching(pname)
                if len(touching) == 1 and f"original_{pname}" not in self._buffers:
                    (n, only), = touching.items()
                    if only.sparse:  # SaRA training rewrites its entries every step: one pass, not two
                        only.rewrite(pname, param, self.adapter_weights[n] if n in self.merged else None)
                        continue
                params.append((pname, param))
            for pname, param in params:
                self._restore_param(pname, param)
            base = BaseParams(self)
            for pname, param in params:
                self._write_param(pname, param, base)

    def _touching(self, pname: str) -> dict[str, Adapter]:
        return {n: a for n, a in self.adapters.items() if pname in a.merge_params()}

    def _original(self, pname: str) -> Tensor | None:
        """The dense copy of W0 of ``pname``, or None. A copy kept after unmerging is W0 only while the parameter is
        the tensor it was then, unwritten since (its version counter; `forget_kept` for writes through ``.data``):
        otherwise it goes, and the live parameter is the base again, as without a copy."""
        key = f"original_{pname}"
        original = self._buffers.get(key)
        kept = self._kept.get(pname)
        if original is not None and kept is not None:
            param = getattr(self.base_layer, pname)
            if kept != (param._version, param.data_ptr()):
                del self._buffers[key], self._kept[pname]
                return None
        return original

    def forget_kept(self) -> None:
        """Drop the copies of W0 kept after unmerging (a later merge copies again); frees their memory."""
        for pname in self._kept:
            self._buffers.pop(f"original_{pname}", None)
        self._kept.clear()

    def _restore_param(self, pname: str, param: Tensor) -> None:
        """``param`` ← W0; keep a dense copy of it while a dense adapter is merged into it or may be again."""
        key = f"original_{pname}"
        touching = self._touching(pname)
        original = self._original(pname)
        if original is not None and self._kept.pop(pname, None) is None:
            param.copy_(original)  # a dense adapter is merged; a kept copy is what the parameter holds already
        for adapter in touching.values():
            if adapter.sparse:
                adapter.restore(pname, param)
        dense = any(n in touching and not touching[n].sparse for n in self.merged)
        if dense and original is None:
            self.register_buffer(key, param.detach().clone(), persistent=False)
        elif original is not None and all(a.sparse for a in touching.values()):
            del self._buffers[key]  # no dense adapter left to merge here

    def _write_param(self, pname: str, param: Tensor, base: BaseParams) -> None:
        touching = self._touching(pname)
        merged = [n for n in self.merged if n in touching]
        dense = [n for n in merged if not touching[n].sparse]
        if dense and param.dtype == torch.float32:
            # param holds W0 now (`_restore_param`): add in place, the same fp32 sum in the same order as below,
            # without a working copy (dt.fuse's cost; bench/fuse_speed.py)
            for n in dense:
                d, w = touching[n].delta_params(base)[pname].float(), self.adapter_weights[n]
                param.add_(d if w == 1.0 else w * d)
        elif dense:
            total = base[pname].float()  # the dense copy of W0 (`_restore_param` made it)
            for n in dense:
                total = total + self.adapter_weights[n] * touching[n].delta_params(base)[pname].float()
            param.copy_(total.to(param.dtype))
        for n in merged:
            if touching[n].sparse:
                touching[n].add_into(pname, param, self.adapter_weights[n])
        if not dense and f"original_{pname}" in self._buffers:  # kept: see `_original`
            self._kept[pname] = (param._version, param.data_ptr())

    def bake(self, names: Sequence[str]) -> None:
        """Make merged adapters ``names`` part of the base, W0 ← W0 + Σ w_i Δ_i, so they can be deleted."""
        keep = [n for n in self.merged if n not in names]
        self.merged = [n for n in self.merged if n in names]
        self._write_merged()
        with torch.no_grad():
            for key in [k for k in self._buffers if k.startswith("original_")]:
                del self._buffers[key]  # the current values are the new base
            self._kept.clear()
            for adapter in self.adapters.values():
                if adapter.sparse:
                    adapter.recapture(self.base_layer)
        self.merged = []
        self.merge(keep)

    def extra_repr(self) -> str:
        return f"weights={self.adapter_weights}, disabled={sorted(self.disabled)}, merged={self.merged}"

