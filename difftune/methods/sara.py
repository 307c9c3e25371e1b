"""SaRA: progressive sparse low-rank adaptation (Hu et al., ICLR 2025, arXiv 2409.06633).

The smallest weights of a pretrained model are "temporarily ineffective": SaRA trains exactly those and leaves the
rest untouched. For every targeted parameter tensor W0 (weights, biases, norm scales, embeddings: by default every
parameter of the denoiser, as the paper):

    M = |W0| < θ                    the selection, fixed at injection
    W = W0 + w · scatter_M(Δ)       Δ ∈ R^{|M|} is the flat trainable vector, Δ = 0 at the start

Training (`SaRAAdamW`, used by the trainer and as the paper's one-line API):

* **Unstructural backpropagation**: Δ is the only autograd leaf. The selected entries are written into the base
  tensor in place (`_RouteGrad` hands the layer an alias of it), and the backward pass returns grad_W[M] to Δ.
  No dense ``.grad`` and no optimizer state ever exist for frozen entries; the dense dL/dW of one layer is formed
  transiently by autograd, as in the paper.
* **Nuclear-norm constraint** (paper eq. 4-5) with weight λ: each step one 2-D weight whose smaller side exceeds
  ``rank_min_dim`` is drawn at random and λ·∂‖ΔW‖_* = λ·U Vᵀ (singular vectors of the non-zero singular values)
  is added to its Δ's gradient.
* **Progressive parameter adjustment** (PPA) at T_p: only the entries still below θ, M' = M ∧ (|W0 + Δ| < θ), keep
  training; the others keep their trained value; Adam's moments are reset.
* **Learning rate**: when none is given, lr = 1e-3 · exp(−350 θ) (paper eq. 12).

After training the weights are edited in place (`dt.fuse`): zero inference overhead. Saved: Δ, the mask M as packed
bits, and a fingerprint of the base values (so an adapter cannot be applied to another base by accident).

Deliberate differences from the official code (sjtuplayer/SaRA @ ea21192), each tested:

1. The nuclear-norm term reaches the trained values. (Officially it back-propagates into the original Parameters,
   which the optimizer no longer updates, so it is a no-op.) It acts on the update ΔW, the quantity the
   constraint is meant to keep low-rank, rather than on the selected absolute values W0⊙M + ΔW.
2. λ defaults to 5e-3, the value the paper's ablation (App. K) selects; the official README/script pass 5e-4, but
   there the term never took effect, so that value was never actually in use.
3. Gradient clipping acts on Δ (officially it sees no gradients in this mode and clips nothing).
4. The mask is stored, not recomputed from the base at load time (a dtype change or another checkpoint would
   silently shift it), and loading checks the base fingerprint.
5. No |·| on the selected values at initialization or at PPA (officially the first step runs on |W0|).
6. Decoupled weight decay pulls Δ toward 0, i.e. toward the base weights, as for any adapter; officially it pulls
   the selected absolute values toward 0. The PPA step updates as usual (officially it is skipped).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..targeting import canonical_name
from ..train.plugin import TrainerPlugin, register_plugin
from .base import Adapter, MethodConfig, Site, register_method
from .host import AdapterHost
from .model import adapter_parameters, hosts, inject, merge


def auto_lr(threshold: float) -> float:
    """The paper's fitted learning rate for threshold θ: 1e-3 · exp(−350 θ) (eq. 12)."""
    return 1e-3 * math.exp(-350.0 * threshold)


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
    """

    target_modules: list[str] = field(default_factory=lambda: [".*"])
    threshold: float = 2e-3
    rank_weight: float = 5e-3
    rank_min_dim: int = 64
    progressive_fraction: float | None = 0.5

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


def prepare_sara(model: nn.Module, config: SaRAConfig, name: str) -> None:
    """Inject and merge: the base tensors hold W0 + Δ from now on and are rewritten in place as Δ trains."""
    inject(model, config, name=name, freeze_base=True)
    merge(model, name)


@register_plugin("sara")
class SaRAPlugin(TrainerPlugin):
    """SaRA's training route: merged sparse Δ, its own AdamW, the paper's learning rate, PPA at T_p."""

    config: SaRAConfig

    def default_lr(self) -> float:
        return auto_lr(self.config.threshold)

    def prepare(self, pipe: Any, model: nn.Module) -> nn.Module:
        prepare_sara(model, self.config, self.name)
        return model

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Δ and, for a resume after PPA, which entries still train (the rest follows from the base)."""
        out = {}
        for host_name, host in hosts(model):
            if self.name in host.adapters:
                adapter = host.adapters[self.name]
                for p in adapter.pnames:
                    out[f"{canonical_name(host_name)}.sara_delta_{p}"] = adapter.delta_vector(p)
                    out[f"{canonical_name(host_name)}.train_{p}"] = adapter.train_mask(p)
        return out

    def make_optimizer(self, params: list[nn.Parameter], optimizer_config: Any,
                       lr: float) -> torch.optim.Optimizer | None:
        if optimizer_config.name != "adamw":
            raise bad_value("optimizer.name", optimizer_config.name, "'adamw' for SaRA",
                            "SaRA brings its own AdamW (sparse moments, nuclear-norm term, progressive adjustment)")
        c = self.config
        b1, b2 = optimizer_config.betas
        return SaRAAdamW(params, threshold=c.threshold, lr=lr, betas=(b1, b2), eps=optimizer_config.eps,
                         weight_decay=optimizer_config.weight_decay, rank_weight=c.rank_weight,
                         rank_min_dim=c.rank_min_dim)

    def on_step(self, model: nn.Module, step: int, max_steps: int, optimizer: Any) -> None:
        pf = self.config.progressive_fraction
        if pf is not None and step == progressive_step(pf, max_steps):
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
            if not isinstance(inner, SaRAAdamW):
                raise DifftuneError("SaRA's progressive adjustment needs its own optimizer (SaRAAdamW)")
            inner.progress()


def progressive_step(fraction: float, max_steps: int) -> int:
    """T_p: the optimizer step after which PPA re-selects (at least 1)."""
    return max(1, round(fraction * max_steps))


# ---------------------------------------------------------------------------------------------------------------
# Masks


def pack_bits(mask: Tensor) -> Tensor:
    """Bool (n,) → uint8 (⌈n/8⌉,); bit j of byte i is entry 8i + j."""
    n = mask.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.reshape(-1).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 (⌈n/8⌉,) → bool (n,), the inverse of `pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()


def _index(mask: Tensor) -> Tensor:
    idx = mask.reshape(-1).nonzero().squeeze(1)
    # int32 halves the index memory (indexing accepts it); tensors past 2^31 entries need int64
    return idx.to(torch.int32) if mask.numel() < 2**31 else idx


def _fingerprint(param: Tensor) -> Tensor:
    """(numel, Σ W0², Σ W0) in float64: cheap, and far apart for different checkpoints."""
    w = param.detach().double().reshape(-1)
    return torch.stack([torch.tensor(float(w.numel()), dtype=torch.float64, device=w.device), w.square().sum(),
                        w.sum()]).cpu()


def _check_base(name: str, saved: Tensor, param: Tensor, mask: Tensor, threshold: float) -> None:
    here = _fingerprint(param)
    if int(saved[0]) != int(here[0]):
        raise DifftuneError(f"`{name}` has {int(here[0]):,} entries, the adapter's mask {int(saved[0]):,}")
    # An fp16/bf16 copy of the same base differs by rounding only: at most 2·2^-8 relative in Σ W0², and it moves no
    # entry clearly across θ. Another checkpoint moves many (the energy test alone catches other initializations).
    scale = max(float(saved[1]), 1e-30)
    energy = abs(float(here[1]) - float(saved[1])) / scale
    magnitude = param.detach().abs().reshape(-1).float()
    # Rounding to fp16/bf16 moves a value by < 0.4 %: only entries clearly on the other side of θ count as flips.
    clear = (magnitude - threshold).abs() > 1e-2 * threshold
    flipped = int(((magnitude < threshold) != mask)[clear].sum())
    if energy > 2 * torch.finfo(torch.bfloat16).eps or flipped > max(10, 1e-3 * int(mask.sum())):
        raise DifftuneError(
            f"the base values of `{name}` differ from those the adapter was trained on (Σ W0² differs by "
            f"{energy:.2e} relative, {flipped:,} entries cross θ={threshold:g}). SaRA stores changes to specific "
            "weights, so it only applies to the exact base model it was trained on (any dtype of it)."
        )


# ---------------------------------------------------------------------------------------------------------------
# The adapter


class _RouteGrad(torch.autograd.Function):
    """Identity on the (already written) base tensor; the backward hands grad_W[M]·w to Δ and nothing to W."""

    @staticmethod
    def forward(ctx: Any, delta: Tensor, carrier: Tensor, idx: Tensor, weight: float) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.weight = weight
        ctx.delta_dtype = delta.dtype
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (idx,) = ctx.saved_tensors
        g_delta = grad.reshape(-1).index_select(0, idx).to(ctx.delta_dtype) * ctx.weight  # (|M|,)
        return g_delta, grad if ctx.needs_input_grad[1] else None, None, None


class SaRAAdapter(Adapter):
    """Δ over the selected entries of each of one module's own parameters.

    State per parameter ``p`` (``weight``, ``bias``, ...): ``sara_delta_p`` (the trained Δ, fp32), ``sara_mask_p``
    (M packed in bits) and ``sara_base_p`` (the base fingerprint) are saved; ``idx_p`` (M as indices), ``w0_p``
    (W0[M], for exact unmerge) and ``train_p`` (M' after PPA) live in memory.
    """

    prefix = "sara_"
    sparse = True
    param_space = True

    def __init__(self, base_layer: nn.Module, config: SaRAConfig) -> None:
        super().__init__(config)
        self.pnames: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._synced: dict[str, tuple[int, float]] = {}
        for pname, param in base_layer.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            if param.is_meta:
                raise DifftuneError("SaRA selects weights by their values (|W0| < θ) and the model is on the meta "
                                    "device, without values; load the real weights first")
            self.pnames.append(pname)
            self.shapes[pname] = tuple(param.shape)
            mask = param.detach().abs().reshape(-1) < config.threshold
            self.register_buffer(f"sara_base_{pname}", _fingerprint(param))
            self._select(pname, param, mask)

    def _select(self, pname: str, param: Tensor, mask: Tensor) -> None:
        idx = _index(mask)
        flat = param.detach().reshape(-1)
        self.register_buffer(f"idx_{pname}", idx, persistent=False)
        self.register_buffer(f"w0_{pname}", flat.index_select(0, idx).clone(), persistent=False)
        self.register_buffer(f"train_{pname}", None, persistent=False)  # allocated by PPA or a checkpoint
        delta = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=param.device))
        delta._sara_owner = (weakref.ref(self), pname)  # lets SaRAAdamW find the mask of each vector it updates
        setattr(self, f"sara_delta_{pname}", delta)
        self._synced.pop(pname, None)

    def delta_vector(self, pname: str) -> nn.Parameter:
        """Δ for parameter ``pname``: (|M|,) fp32."""
        return getattr(self, f"sara_delta_{pname}")

    def forward(self, x: Tensor, out: Tensor, weight: float, base_layer: nn.Module) -> Tensor:
        return out  # SaRA acts through the parameters (`param_overrides`), not on the output

    def index(self, pname: str) -> Tensor:
        return getattr(self, f"idx_{pname}")

    def base_values(self, pname: str) -> Tensor:
        return getattr(self, f"w0_{pname}")

    def train_mask(self, pname: str) -> Tensor:
        """M' over the selected entries (all True until PPA); (|M|,) bool, allocated on first use."""
        mask = getattr(self, f"train_{pname}")
        if mask is None:
            mask = torch.ones(self.index(pname).numel(), dtype=torch.bool, device=self.index(pname).device)
            setattr(self, f"train_{pname}", mask)
        return mask

    def all_training(self, pname: str) -> bool:
        mask = getattr(self, f"train_{pname}")
        return mask is None or bool(mask.all())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The mask is saved packed (n/8 bytes) but kept in memory only as indices: packing happens here.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for p in self.pnames:
            mask = torch.zeros(math.prod(self.shapes[p]), dtype=torch.bool, device=self.index(p).device)
            mask[self.index(p).long()] = True
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

    def delta_params(self) -> dict[str, Tensor]:
        out = {}
        for p in self.pnames:
            dense = torch.zeros(math.prod(self.shapes[p]), dtype=torch.float32, device=self.delta_vector(p).device)
            out[p] = dense.index_put((self.index(p),), self.delta_vector(p).detach().float()).view(self.shapes[p])
        return out

    def delta_weight(self) -> Tensor:
        if "weight" not in self.pnames:
            return super().delta_weight()
        return self.delta_params()["weight"]

    @staticmethod
    def _flat(param: Tensor) -> Tensor:
        if not param.is_contiguous():
            raise DifftuneError("SaRA writes weights in place and needs contiguous parameters; call "
                                "model.to(memory_format=torch.contiguous_format) first")
        return param.view(-1)

    def restore(self, pname: str, param: Tensor) -> None:
        self._flat(param).index_put_((self.index(pname),), self.base_values(pname))
        self._synced.pop(pname, None)

    def add_into(self, pname: str, param: Tensor, weight: float) -> None:
        flat, idx, delta = self._flat(param), self.index(pname), self.delta_vector(pname)
        value = flat.index_select(0, idx).float() + weight * delta.detach().float()
        flat.index_put_((idx,), value.to(param.dtype))
        self._synced[pname] = (delta._version, weight)

    def recapture(self, base_layer: nn.Module) -> None:
        for p in self.pnames:
            param = getattr(base_layer, p)
            self.base_values(p).copy_(param.detach().reshape(-1).index_select(0, self.index(p)))

    def is_stale(self, weight: float) -> bool:
        return any(self._synced.get(p) != (self.delta_vector(p)._version, weight) for p in self.pnames)

    def param_overrides(self, params: dict[str, Tensor], base_layer: nn.Module, weight: float,
                        merged: bool) -> dict[str, Tensor]:
        for p in self.pnames:
            current = params.get(p, getattr(base_layer, p))
            delta, idx = self.delta_vector(p), self.index(p)
            if merged:
                # The values are already in place; route the gradient only (no copy of the weight is made).
                if torch.is_grad_enabled() and delta.requires_grad:
                    params[p] = _RouteGrad.apply(delta, current, idx, weight)
            else:
                flat = current.reshape(-1)
                value = flat.index_select(0, idx) + (weight * delta).to(current.dtype)
                params[p] = flat.index_put((idx,), value).view_as(current)  # a dense copy: use dt.fuse to avoid it
        return params

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
            _check_base(p, tensors[f"sara_base_{p}"], param, mask, self.config.threshold)
            self._select(p, param, mask)

    def extra_repr(self) -> str:
        total = sum(math.prod(s) for s in self.shapes.values())
        return f"threshold={self.config.threshold}, selected={self.selected()}/{total}"


# ---------------------------------------------------------------------------------------------------------------
# The optimizer (the paper's one-line API, also used by the trainer)


def _owner(p: Tensor) -> tuple[SaRAAdapter, str] | None:
    ref = getattr(p, "_sara_owner", None)
    if ref is None:
        return None
    adapter = ref[0]()
    # a copied Parameter (deepcopy) still points at the original's adapter: only the live vector counts
    if adapter is None or getattr(adapter, f"sara_delta_{ref[1]}", None) is not p:
        return None
    return adapter, ref[1]


class SaRAAdamW(torch.optim.AdamW):
    """AdamW over SaRA's sparse vectors, with the nuclear-norm term, progressive adjustment and clipping.

    The paper's one-line API: replace ``AdamW(model.parameters())`` with ``SaRAAdamW(model, threshold=θ)``. Given
    a model, it injects SaRA (named ``name``) and trains only |W0| < θ; given parameters (the trainer), it
    optimizes those.

    Args:
        params: a model, or SaRA's Δ parameters.
        threshold: θ.
        lr: learning rate; ``None`` = 1e-3·exp(−350 θ).
        betas, eps, weight_decay: AdamW's (decoupled weight decay pulls Δ toward the base weights).
        rank_weight: λ of the nuclear-norm term on ΔW.
        rank_min_dim: 2-D weights with both sides larger than this are eligible for the nuclear-norm term.
        progressive_step: T_p, the step after which PPA runs (``None``: never, or call `progress` yourself).
        max_grad_norm: clip the Δ gradients to this global norm before each step (``None``: no clipping).
        target_modules: with a model, which modules to select from (default all).
        name: with a model, the adapter's name.
    """

    def __init__(self, params: nn.Module | Iterable[Tensor], threshold: float = 2e-3, lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 rank_weight: float = 5e-3, rank_min_dim: int = 64, progressive_step: int | None = None,
                 max_grad_norm: float | None = None, target_modules: Sequence[str] | None = None,
                 name: str = "sara") -> None:
        config = SaRAConfig(threshold=threshold, rank_weight=float(rank_weight), rank_min_dim=rank_min_dim,
                            **({"target_modules": list(target_modules)} if target_modules else {}))
        if isinstance(params, nn.Module):
            prepare_sara(params, config, name)
            params = adapter_parameters(params, name)
        params = list(params)
        if not params:
            raise DifftuneError("SaRAAdamW got no parameters: nothing is below the threshold, or no model was given")
        if progressive_step is not None and (isinstance(progressive_step, bool) or progressive_step < 1):
            raise bad_value("progressive_step", progressive_step, "an integer >= 1 or None")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise bad_value("max_grad_norm", max_grad_norm, "a positive number or None")
        super().__init__(params, lr=auto_lr(threshold) if lr is None else lr, betas=betas, eps=eps,
                         weight_decay=weight_decay)
        self.threshold = config.threshold
        self.rank_weight = config.rank_weight
        self.rank_min_dim = config.rank_min_dim
        self.progressive_step = progressive_step
        self.max_grad_norm = max_grad_norm
        self.steps_taken = 0
        self.progressed = False

    def _owned(self) -> list[tuple[Tensor, SaRAAdapter, str]]:
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                owner = _owner(p)
                if owner is not None:
                    out.append((p, *owner))
        return out

    def _add_nuclear_grad(self) -> None:
        """λ·U Vᵀ of one randomly drawn eligible ΔW, gathered into its Δ's gradient (paper eq. 4-5)."""
        eligible = [(p, a, n) for p, a, n in self._owned()
                    if len(a.shapes[n]) == 2 and min(a.shapes[n]) > self.rank_min_dim and p.numel() > 0]
        if not eligible:
            return
        p, adapter, pname = eligible[int(torch.randint(len(eligible), (1,)))]
        with torch.no_grad():
            dense = adapter.delta_params()[pname]
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            keep = s > s.max() * 1e-6 if s.numel() else s.bool()
            if not bool(keep.any()):
                return  # ΔW = 0: 0 is a subgradient of ‖·‖_* there
            sub = u[:, keep] @ vh[keep]  # ∂‖ΔW‖_* = U Vᵀ
            g = sub.reshape(-1).index_select(0, adapter.index(pname)).to(p.dtype) * self.rank_weight
            p.grad = g if p.grad is None else p.grad.add_(g)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owned = self._owned()
        if self.max_grad_norm is not None:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        if self.rank_weight > 0:
            self._add_nuclear_grad()
        frozen = []
        for p, adapter, pname in owned:
            if p.grad is not None and not adapter.all_training(pname):
                keep = adapter.train_mask(pname)
                stay = (~keep).nonzero().squeeze(1)
                p.grad.index_fill_(0, stay, 0)
                frozen.append((p, stay, p.index_select(0, stay)))
        super().step()
        for p, stay, values in frozen:  # weight decay would still move them
            p.index_copy_(0, stay, values)
        self.steps_taken += 1
        if self.progressive_step is not None and self.steps_taken == self.progressive_step:
            self.progress()
        return loss

    @torch.no_grad()
    def progress(self) -> dict[str, int]:
        """PPA: keep training only the selected entries whose current value is still below θ; reset Adam's moments.

        Returns the number of trainable entries before and after.
        """
        before = after = 0
        for p, adapter, pname in self._owned():
            keep = adapter.train_mask(pname)
            before += int(keep.sum())
            current = adapter.base_values(pname).float() + p.detach().float()
            keep &= current.abs() < self.threshold
            after += int(keep.sum())
            self.state[p] = {}
        self.progressed = True
        return {"before": before, "after": after}


def threshold_for_fraction(model: nn.Module, fraction: float, target_modules: Sequence[str] = (".*",),
                           sample: int = 10_000_000, seed: int = 0) -> float:
    """The θ that selects about ``fraction`` of the targeted parameters (|W| quantile over a random sample).

    Real checkpoints are not distributed like random initializations; use this to pick a budget (e.g. 0.05 for
    about 5 %) rather than guessing θ.
    """
    if not 0 < fraction < 1:
        raise bad_value("fraction", fraction, "a number in (0, 1)", "e.g. 0.05 to train about 5% of the weights")
    config = SaRAConfig(target_modules=list(target_modules))
    from ..targeting import find_targets

    tensors = []
    for name in find_targets(model, config.target_modules, config.exclude_modules):
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, AdapterHost) else module
        if config.accepts(base):
            tensors += [p.detach().reshape(-1) for p in base.parameters(recurse=False) if p.is_floating_point()]
    total = sum(t.numel() for t in tensors)
    g = torch.Generator().manual_seed(seed)
    parts = []
    for t in tensors:
        k = max(1, round(sample * t.numel() / total))
        parts.append(t[torch.randint(t.numel(), (k,), generator=g)].abs().float())
    values = torch.cat(parts)
    return float(torch.quantile(values[:16_000_000], fraction))


def sara_summary(model: nn.Module, name: str) -> dict[str, Any]:
    """Selected, still-training (after PPA) and total entries of adapter ``name``."""
    selected = training = total = 0
    for _, host in hosts(model):
        adapter = host.adapters[name] if name in host.adapters else None  # noqa: SIM401 (ModuleDict has no get)
        if isinstance(adapter, SaRAAdapter):
            selected += adapter.selected()
            training += sum(adapter.delta_vector(p).numel() if adapter.all_training(p)
                            else int(adapter.train_mask(p).sum()) for p in adapter.pnames)
            total += sum(math.prod(s) for s in adapter.shapes.values())
    return {"selected": selected, "training": training, "total": total,
            "density": selected / total if total else 0.0}
