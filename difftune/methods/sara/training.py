"""SaRA's training: `SaRAAdamW` (sparse moments, the nuclear-norm term, progressive adjustment, clipping), the
paper's learning rate, the trainer plugin, and `threshold_for_fraction` to pick θ for a budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import DifftuneError, bad_value
from ...targeting import canonical_name, find_targets
from ..host import AdapterHost
from ..plugin import TrainerPlugin, register_plugin
from ..verbs import adapter_parameters, hosts, inject, merge
from .adapter import SaRAAdapter, SaRAConfig


def auto_lr(threshold: float) -> float:
    """The paper's fitted learning rate for threshold θ: 1e-3 · exp(−350 θ) (eq. 12)."""
    return 1e-3 * math.exp(-350.0 * threshold)


def prepare_sara(model: nn.Module, config: SaRAConfig, name: str) -> None:
    """Inject. Unfused (the default), the base tensors keep W0 and M is read off them; each stock Linear/Conv2d
    makes its weight W0 + Δ in blocks per call (`unfused.UnfusedLayer`), so no state beyond Δ is kept per selected
    entry. With ``config.fused_training`` the adapter is merged: the base tensors hold W0 + Δ, rewritten in place as
    Δ trains."""
    inject(model, config, name=name, freeze_base=True)
    if config.fused_training:
        merge(model, name)


@register_plugin("sara")
class SaRAPlugin(TrainerPlugin):
    """SaRA's training route: sparse Δ (unfused, or merged with ``fused_training``), its own AdamW, the paper's
    learning rate, PPA at T_p."""

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
        # torch.initial_seed() is the run's seed here, the same on every process (see TrainerPlugin.make_optimizer)
        return SaRAAdamW(params, threshold=c.threshold, lr=lr, betas=(b1, b2), eps=optimizer_config.eps,
                         weight_decay=optimizer_config.weight_decay, rank_weight=c.rank_weight,
                         rank_min_dim=c.rank_min_dim, seed=torch.initial_seed())

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
        fused_training: with a model, train with Δ written into its weights (`SaRAConfig.fused_training`).
        max_grad_norm: clip the Δ gradients to this global norm before each step (``None``: no clipping).
        target_modules: with a model, which modules to select from (default all).
        name: with a model, the adapter's name.
        seed: seeds the optimizer's own generator, which draws the weight of each step's nuclear-norm term. Give
            every process of a distributed run the same seed: the term is added after DDP's gradient all-reduce,
            so each process must draw the same weight (the per-process global RNG would not; issue 31). The
            generator is saved with the optimizer's state, so a resumed run draws what the uninterrupted one did.
    """

    def __init__(self, params: nn.Module | Iterable[Tensor], threshold: float = 2e-3, lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 rank_weight: float = 5e-3, rank_min_dim: int = 64, progressive_step: int | None = None,
                 max_grad_norm: float | None = None, target_modules: Sequence[str] | None = None,
                 name: str = "sara", seed: int = 0, fused_training: bool = False) -> None:
        config = SaRAConfig(threshold=threshold, rank_weight=float(rank_weight), rank_min_dim=rank_min_dim,
                            fused_training=fused_training,
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
        self.generator = torch.Generator().manual_seed(seed)

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
        p, adapter, pname = eligible[int(torch.randint(len(eligible), (1,), generator=self.generator))]
        with torch.no_grad():
            dense = adapter.dense_delta(pname)
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            keep = s > s.max() * 1e-6 if s.numel() else s.bool()
            if not bool(keep.any()):
                return  # ΔW = 0: 0 is a subgradient of ‖·‖_* there
            sub = u[:, keep] @ vh[keep]  # ∂‖ΔW‖_* = U Vᵀ
            g = sub.reshape(-1).index_select(0, adapter.index(pname)).to(p.dtype) * self.rank_weight
            p.grad = g if p.grad is None else p.grad.add_(g)

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state plus SaRA's own (``"sara"``): the draw generator, the step count and whether PPA ran."""
        state = super().state_dict()
        state["sara"] = {"generator": self.generator.get_state(), "steps_taken": self.steps_taken,
                         "progressed": self.progressed}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("sara", None)  # absent from a checkpoint written before it was saved: kept as is
        super().load_state_dict(state_dict)
        if own is not None:
            self.generator.set_state(own["generator"].cpu())  # a loader may have mapped it to the GPU
            self.steps_taken, self.progressed = int(own["steps_taken"]), bool(own["progressed"])

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
