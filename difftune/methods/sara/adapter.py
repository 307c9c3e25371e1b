"""SaRA's data: the config, the selection M = |W0| < θ (read off the base, or kept as `positions`; saved as packed bits
with a fingerprint of the base values) and the adapter that trains the vector Δ at M. See the package docstring."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import DifftuneError, bad_value
from ..base import Adapter, MethodConfig, Site, register_method
from ..host import AdapterHost
from .fingerprint import check_base, fingerprint
from .grads import RouteGrad, WeightGrad, gradient_rule
from .positions import decode, encode, pack_bits, unpack_bits
from .unfused import UnfusedLayer, block_counts, moved, stands_in


@register_method("sara")
@dataclass
class SaRAConfig(MethodConfig):
    """SaRA hyperparameters.

    Attributes:
        target_modules: modules whose own parameters are selected from (default every module: the whole denoiser).
        threshold: θ; entries with |W0| < θ train. Paper: 2e-4 → ~5M, 8e-4 → ~20M, 2e-3 → ~50M on SD1.5.
        rank_weight: λ of the nuclear-norm term on ΔW (0 switches it off).
        rank_min_dim: only 2-D weights with both sides larger than this get the nuclear-norm term (official: 64).
        progressive_fraction: T_p as a fraction of training (paper: 0.5); ``None`` switches PPA off.
        fused_training: train with Δ written into the base weights (`prepare_sara`): each step is cheaper where
            passes over the weights dominate (CPU), for 5 more bytes per selected entry (W0[M] and the positions);
            by default SaRA trains unfused, at LoRA's memory for the same trainable count (`sara.unfused`).
    """

    target_modules: list[str] = field(default_factory=lambda: [".*"])
    threshold: float = 2e-3
    rank_weight: float = 5e-3
    rank_min_dim: int = 64
    progressive_fraction: float | None = 0.5
    fused_training: bool = False

    #: (numel, Σ W0², Σ W0) per parameter: checked in `SaRAAdapter.adopt`; a count overflows float16
    saved_statistics = ("sara_base_",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank_weight, int) and not isinstance(self.rank_weight, bool):
            self.rank_weight = float(self.rank_weight)
        self.check_types()
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise bad_value("threshold", self.threshold, "a positive number (θ)",
                            "The paper uses 2e-4 to 2e-3 on Stable Diffusion; see sara.threshold_for_fraction.")
        if not (math.isfinite(self.rank_weight) and self.rank_weight >= 0):
            raise bad_value("rank_weight", self.rank_weight, "a number >= 0 (λ; 0 turns the term off)")
        if self.rank_min_dim < 0:
            raise bad_value("rank_min_dim", self.rank_min_dim, "an integer >= 0")
        pf = self.progressive_fraction
        if pf is not None and (isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0 < pf < 1):
            raise bad_value("progressive_fraction", pf, "a number in (0, 1), or null to switch PPA off",
                            "The paper adjusts at half of training: 0.5.")

    def accepts(self, module: nn.Module) -> bool:
        return not isinstance(module, (Adapter, AdapterHost)) and any(
            p.is_floating_point() for p in module.parameters(recurse=False))

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        return SaRAAdapter(base_layer, self)

    @classmethod
    def describe(cls, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
        trained = sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[-1].startswith("sara_delta_"))
        base = sum(int(t[0].item()) for k, t in tensors.items() if k.rsplit(".", 1)[-1].startswith("sara_base_"))
        return {"parameters": trained, "base_parameters": base, "density": trained / base if base else 0.0}


# ---------------------------------------------------------------------------------------------------------------
# The adapter


@dataclass
class _Dense:
    """An unfused dense copy: the tensor it was made from (kept to compare identity), its key and the copy."""

    source: Tensor
    key: tuple[int, int, int, int, float]
    value: Tensor


class SaRAAdapter(Adapter):
    """Δ over the selected entries of each of one module's own parameters.

    Per parameter ``p``: ``sara_delta_p`` (Δ, fp32), ``sara_mask_p`` (M in bits) and ``sara_base_p`` (the base
    fingerprint) are saved; ``train_p`` (M' after PPA) lives in memory. Injected and never fused since (how SaRA
    trains), M is read off the base, which holds W0 untouched (`_derived` keeps |M| per block of rows, to find each
    block's Δ and to catch a base written since), and a stock Linear/Conv2d runs through `unfused.UnfusedLayer`
    (`layer_output`). Fused, cast, or loaded from a file, M is kept as positions (``pos_p``/``blocks_p``,
    `positions.encode`) with W0[M] (``w0_p``) for an exact unmerge (`_materialize`); unfused without a gradient,
    such an adapter runs its layer with a dense copy of each parameter kept until Δ, the weight or the base changes
    (`_dense`). ``dt.fuse`` needs none.
    """

    prefix = "sara_"
    sparse = True
    param_space = True

    def __init__(self, base_layer: nn.Module, config: SaRAConfig) -> None:
        super().__init__(config)
        self.pnames: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._synced: dict[str, tuple[int, float]] = {}
        self._dense: dict[str, _Dense] = {}
        # M read off the base layer: its dtype then and |M| per `unfused.row_blocks` (each block's Δ offset)
        self._derived: dict[str, tuple[torch.dtype, list[int]]] = {}
        object.__setattr__(self, "_layer", (base_layer,))  # not a submodule: where a derived M is read
        for pname, param in base_layer.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            if param.is_meta:
                raise DifftuneError("SaRA selects weights by their values (|W0| < θ) and the model is on the meta "
                                    "device, without values; load the real weights first")
            self.pnames.append(pname)
            self.shapes[pname] = tuple(param.shape)
            self.register_buffer(f"sara_base_{pname}", fingerprint(param))
            self._derive(pname, param)

    def _groups(self, pname: str) -> int:  # a grouped convolution's weight is one block (`unfused.row_blocks`)
        return getattr(self._layer[0], "groups", 1) if pname == "weight" else 1

    def _derive(self, pname: str, param: Tensor) -> None:
        """M = |param| < θ, read off ``param`` (the base layer's, holding W0) whenever needed."""
        for kind in ("pos_", "blocks_", "w0_"):
            self.register_buffer(f"{kind}{pname}", None, persistent=False)
        counts = block_counts(param.detach(), self.config.threshold, self._groups(pname))
        self._derived[pname] = (param.dtype, counts)
        self._new_delta(pname, sum(counts), param.device)

    def _select(self, pname: str, param: Tensor, mask: Tensor) -> None:
        """M given (``mask``), kept as positions with a copy of W0[M]."""
        self._derived.pop(pname, None)
        self._keep(pname, param, mask)
        self._new_delta(pname, self.positions(pname)[0].numel(), param.device)

    def _keep(self, pname: str, param: Tensor, mask: Tensor) -> None:
        low, counts = encode(mask)
        self.register_buffer(f"pos_{pname}", low, persistent=False)
        self.register_buffer(f"blocks_{pname}", counts, persistent=False)
        self.register_buffer(f"w0_{pname}", param.detach().reshape(-1).index_select(0, self.index(pname)),
                             persistent=False)

    def _materialize(self, pname: str) -> None:
        """Keep M as positions and W0[M] as a copy: from now on the base tensor may hold anything (fused values)."""
        if pname in self._derived:
            param, idx = getattr(self._layer[0], pname), self.index(pname)
            del self._derived[pname]
            mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
            mask[idx.long()] = True
            self._keep(pname, param, mask)

    def _new_delta(self, pname: str, n: int, device: torch.device) -> None:
        self.register_buffer(f"train_{pname}", None, persistent=False)  # allocated by PPA or a checkpoint
        delta = nn.Parameter(torch.zeros(n, dtype=torch.float32, device=device))
        delta._sara_owner = (weakref.ref(self), pname)  # lets SaRAAdamW find the mask of each vector it updates
        setattr(self, f"sara_delta_{pname}", delta)
        self._synced.pop(pname, None)
        self._dense.pop(pname, None)

    def _apply(self, fn: Any, recurse: bool = True) -> SaRAAdapter:
        # `model.half()` casts every floating buffer: the base fingerprints stay float64 (73,728 is inf in float16);
        # unfused copies on the old device or dtype must not stay (offloading to the CPU has to free GPU memory)
        self._dense.clear()
        fingerprints = {k: b for k, b in self._buffers.items() if k.startswith("sara_base_") and b is not None}
        super()._apply(fn, recurse)
        for k, b in fingerprints.items():
            if self._buffers[k].dtype != b.dtype:
                self._buffers[k] = b.to(self._buffers[k].device)
        return self

    def delta_vector(self, pname: str) -> nn.Parameter:
        """Δ for parameter ``pname``: (|M|,) fp32."""
        return getattr(self, f"sara_delta_{pname}")

    def forward(self, x: Tensor, out: Tensor, weight: float, base_layer: nn.Module,
                base: Mapping[str, Tensor]) -> Tensor:
        return out  # SaRA acts through the parameters (`param_overrides`), not on the output

    def _weight_grad_by_output(self, base_layer: nn.Module) -> bool:
        """Fused, with Δ of ``weight`` training: a stock Linear/Conv2d's weight and bias gradients are formed from
        the layer's output (`WeightGrad`, in blocks), not as autograd's dense dL/dW routed by `RouteGrad`."""
        return ("weight" in self.pnames and torch.is_grad_enabled() and self.delta_vector("weight").requires_grad
                and gradient_rule(base_layer))

    def merged_output(self, x: Tensor, out: Tensor, weight: float, base_layer: nn.Module) -> Tensor:
        if not self._weight_grad_by_output(base_layer):
            return out
        bias = "bias" in self.pnames
        where = (self.positions("weight"), self.positions("bias") if bias else None)
        return WeightGrad.apply(out, x, self.delta_vector("weight"), self.delta_vector("bias") if bias else None,
                                base_layer, where, weight)

    def positions(self, pname: str) -> tuple[Tensor, Tensor]:
        """M of ``pname`` as kept (`positions.encode`; a derived M is kept from this call on)."""
        self._materialize(pname)
        return getattr(self, f"pos_{pname}"), getattr(self, f"blocks_{pname}")

    def index(self, pname: str) -> Tensor:
        """The sorted flat indices of M (made on each call: hold them only while needed)."""
        if pname not in self._derived:
            return decode(getattr(self, f"pos_{pname}"), getattr(self, f"blocks_{pname}"))
        param = self._derived_base(pname)
        if param.dim() and block_counts(param, self.config.threshold, self._groups(pname)) != self._derived[pname][1]:
            raise moved()  # written since M was read
        return (param.abs().reshape(-1) < self.config.threshold).nonzero().squeeze(1)

    def _derived_base(self, pname: str) -> Tensor:
        """The base tensor a derived M is read off (refused once cast: rounding moves entries across θ)."""
        param = getattr(self._layer[0], pname).detach()
        if param.dtype != self._derived[pname][0]:
            raise moved()
        return param

    def base_values(self, pname: str) -> Tensor:
        """W0[M]: (|M|,) in the base dtype."""
        if pname in self._derived:
            return self._derived_base(pname).reshape(-1).index_select(0, self.index(pname))
        return getattr(self, f"w0_{pname}")

    def before_base_change(self, base_layer: nn.Module, fn: Any = None) -> None:
        for p in list(self._derived):  # a write or a cast (entries cross θ): keep M and W0[M] as they are now
            param = getattr(base_layer, p)
            if fn is None or fn(param.detach().reshape(-1)[:0]).dtype != param.dtype:
                self._materialize(p)

    def layer_output(self, x: Tensor, base_layer: nn.Module, weight: float) -> Tensor | None:
        """Trained unfused, a stock Linear/Conv2d with a derived M runs through `unfused.UnfusedLayer` (also without
        a gradient, e.g. validation during training: no dense copy is cached then)."""
        if "weight" not in self._derived or not self.delta_vector("weight").requires_grad or not stands_in(
                base_layer):
            return None
        bias = base_layer.bias
        if bias is not None and "bias" in self.pnames:
            bias = self.with_delta("bias", bias, weight)
        self._derived_base("weight")
        return UnfusedLayer.apply(x, bias, self.delta_vector("weight"), base_layer, self.config.threshold, weight,
                                  self._derived["weight"][1])

    def train_mask(self, pname: str) -> Tensor:
        """M' over the selected entries (all True until PPA); (|M|,) bool, allocated on first use."""
        mask = getattr(self, f"train_{pname}")
        if mask is None:
            delta = self.delta_vector(pname)
            mask = torch.ones(delta.numel(), dtype=torch.bool, device=delta.device)
            setattr(self, f"train_{pname}", mask)
        return mask

    def all_training(self, pname: str) -> bool:
        mask = getattr(self, f"train_{pname}")
        if mask is not None and bool(mask.all()):  # all True (a checkpoint allocated it): free its byte per entry
            mask = self._buffers[f"train_{pname}"] = None
        return mask is None

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The mask is saved packed (n/8 bytes) but kept in memory as positions: packing happens here.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for p in self.pnames:
            idx = self.index(p)
            mask = torch.zeros(math.prod(self.shapes[p]), dtype=torch.bool, device=idx.device)
            mask[idx.long()] = True
            destination[f"{prefix}sara_mask_{p}"] = pack_bits(mask)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for p in self.pnames:  # consumed by `adopt` (the loader calls it first); not a tensor of this module
            state_dict.pop(f"{prefix}sara_mask_{p}", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def selected(self) -> int:
        return sum(self.delta_vector(p).numel() for p in self.pnames)

    # -- weight space
    def merge_params(self) -> tuple[str, ...]:
        return tuple(self.pnames)

    def dense_delta(self, pname: str) -> Tensor:
        """Δ of parameter ``pname`` scattered into a dense fp32 tensor of its shape (zeros off the selection)."""
        delta = self.delta_vector(pname).detach().float()
        dense = torch.zeros(math.prod(self.shapes[pname]), dtype=torch.float32, device=delta.device)
        return dense.index_put_((self.index(pname),), delta).view(self.shapes[pname])  # in place: one dense tensor

    def delta_params(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {p: self.dense_delta(p) for p in self.pnames}  # Δ does not depend on W0

    def delta_weight(self, w0: Tensor) -> Tensor:
        if "weight" not in self.pnames:
            return super().delta_weight(w0)
        return self.dense_delta("weight")

    @staticmethod
    def _flat(param: Tensor) -> Tensor:
        if not param.is_contiguous():
            raise DifftuneError("SaRA writes weights in place and needs contiguous parameters; call "
                                "model.to(memory_format=torch.contiguous_format) first")
        return param.view(-1)

    def restore(self, pname: str, param: Tensor) -> None:
        self._materialize(pname)  # the host writes the tensor M was read off from here on
        # `_synced` stays: ``param`` may be the host's copy for W0; the host follows a live restore with `add_into`
        self._flat(param).index_put_((self.index(pname),), self.base_values(pname))
        self._dense.pop(pname, None)  # merged or read as W0: the unfused copy is not needed (and frees its memory)

    def add_into(self, pname: str, param: Tensor, weight: float, start: Tensor | None = None) -> None:
        """``param[M] = start + weight · Δ`` in fp32 (``start``: what ``param`` holds at M, read when None)."""
        self._materialize(pname)
        flat, idx, delta = self._flat(param), self.index(pname), self.delta_vector(pname)
        start = flat.index_select(0, idx) if start is None else start
        flat.index_put_((idx,), (start.float() + weight * delta.detach().float()).to(param.dtype))
        self._synced[pname] = (delta._version, weight)

    def rewrite(self, pname: str, param: Tensor, weight: float | None) -> None:
        self._dense.pop(pname, None)
        if weight is None:
            return self.restore(pname, param)
        return self.add_into(pname, param, weight, start=self.base_values(pname).to(param.dtype))  # W0[M] as held

    def recapture(self, base_layer: nn.Module) -> None:
        for p in self.pnames:  # a derived M: its base tensor was not written (no fused adapter touches it)
            if p not in self._derived:
                param = getattr(base_layer, p)
                self.base_values(p).copy_(param.detach().reshape(-1).index_select(0, self.index(p)))

    def is_stale(self, weight: float) -> bool:
        return any(self._synced.get(p) != (self.delta_vector(p)._version, weight) for p in self.pnames)

    def param_overrides(self, params: dict[str, Tensor], base_layer: nn.Module, weight: float,
                        merged: bool) -> dict[str, Tensor]:
        for p in self.pnames:
            current = params.get(p, getattr(base_layer, p))
            delta = self.delta_vector(p)
            if merged:
                self._dense.pop(p, None)
                # The values are already in place; route the gradient only (no copy of the weight is made).
                if torch.is_grad_enabled() and delta.requires_grad and not (
                        p in ("weight", "bias") and self._weight_grad_by_output(base_layer)):
                    params[p] = RouteGrad.apply(delta, current, *self.positions(p), weight)
            elif torch.is_grad_enabled() and (delta.requires_grad or current.requires_grad):
                self._dense.pop(p, None)
                params[p] = self.with_delta(p, current, weight)  # autograd needs this call's graph: built each time
            else:
                params[p] = self._dense_copy(p, current, weight)
        return params

    def with_delta(self, pname: str, current: Tensor, weight: float) -> Tensor:
        """A dense copy of ``current`` with ``current[M] + weight · Δ`` on the selected entries."""
        flat, idx = current.reshape(-1), self.index(pname)
        value = flat.index_select(0, idx) + (weight * self.delta_vector(pname)).to(current.dtype)
        return flat.index_put((idx,), value).view_as(current)

    def _dense_copy(self, pname: str, current: Tensor, weight: float) -> Tensor:
        """`with_delta`, kept until Δ, ``weight`` or ``current`` changes (their version counters tell; a write
        through ``.data`` bypasses them: `difftune.methods.verbs.refresh` drops the copy)."""
        delta = self.delta_vector(pname)
        key = (current._version, current.data_ptr(), delta._version, delta.data_ptr(), weight)
        cached = self._dense.get(pname)
        if (cached is None or cached.source is not current or cached.key != key
                or (cached.value.is_inference() and not torch.is_inference_mode_enabled())):
            self._dense.pop(pname, None)  # free the old copy before the new one is made
            cached = self._dense[pname] = _Dense(current, key, self.with_delta(pname, current, weight))
        return cached.value

    def clear_cache(self) -> None:
        """Drop the unfused dense copies (rebuilt at the next forward that needs them)."""
        self._dense.clear()

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles of the adapter leave the dense copies behind (they follow the layer they were made for)
        return {**self.__dict__, "_dense": {}}

    # -- loading
    def adopt(self, tensors: Mapping[str, Tensor], base_layer: nn.Module) -> None:
        """Take the saved mask (never recompute it) after checking the base values are the ones trained on."""
        for p in self.pnames:
            key = f"sara_mask_{p}"
            if key not in tensors or f"sara_base_{p}" not in tensors:
                continue  # reported as a missing key by the loader
            param = getattr(base_layer, p)
            n = param.numel()
            packed = tensors[key].to(device=param.device)
            if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
                raise DifftuneError(f"{key}: expected {(n + 7) // 8} packed bytes (uint8) for `{p}` of shape "
                                    f"{tuple(param.shape)}, got {tuple(packed.shape)} {packed.dtype}")
            mask = unpack_bits(packed, n)
            check_base(p, tensors[f"sara_base_{p}"], param, mask, self.config.threshold)
            self._select(p, param, mask)

    def extra_repr(self) -> str:
        total = sum(math.prod(s) for s in self.shapes.values())
        return f"threshold={self.config.threshold}, selected={self.selected()}/{total}"
