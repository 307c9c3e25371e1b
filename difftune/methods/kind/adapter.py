"""KIND's configuration, layers (learngenes + class-gated tailors, class-embedding rows); their model-level
verbs are in `parts.py`. See the package docstring."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DifftuneError, bad_value
from ..base import Adapter, MethodConfig, Site, register_method

S_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
ADALN_TARGET = "norm1.linear"
EMBED_TARGET = "class_embedder.embedding_table"  # diffusers DiT: one LabelEmbedding per block's adaLN
INITS = ("svd", "random")
PAPER_TRAINABLE = 45.4e6  # DiT-L/2 headline, v1 abstract


@register_method("kind")
@dataclass
class KINDConfig(MethodConfig):
    """KIND hyperparameters (reconstructed; see the module docstring).

    Attributes:
        learngenes: N_G, components active for every sample.
        tailors_per_class: t, components in each class's tailor group.
        classes: class ids that own a tailor group; other labels (CFG null class) use learngenes only.
        init: "svd" (from the dense weight: starts equal to it when N_G + t = min(m, n)) or "random".
        adaln: also factor the blocks' adaLN modulation linear (not in the paper's S).
        source: path of a saved KIND adapter whose learngenes (and ``reuse_classes`` tailors) are transferred, frozen.
        reuse_classes: classes whose tailors come from ``source`` (frozen); the rest of ``classes`` are fresh.
        train_learngenes: train the learngenes (pretraining); false freezes them (transfer).
        train_base: also train the base model's parameters outside S (embedders, adaLN, final layer): pretraining.
        class_embeddings: give each class of ``classes`` its own row of the DiT's class-embedding tables, held by
            the adapter as part of the class's tailors (fresh classes of a transfer learn their embedding with their
            tailors; without it a new class would keep the pretrained model's untrained random row).
    """

    target_modules: list[str] = field(default_factory=lambda: list(S_TARGETS))
    learngenes: int = 64
    tailors_per_class: int = 8
    classes: list[int] = field(default_factory=list)
    init: str = "svd"
    adaln: bool = False
    source: str = ""
    reuse_classes: list[int] = field(default_factory=list)
    train_learngenes: bool = True
    train_base: bool = False
    class_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_types()
        if self.learngenes < 1:
            raise bad_value("learngenes", self.learngenes, "an integer >= 1", "N_G, the shared components, e.g. 64.")
        if self.tailors_per_class < 0:
            raise bad_value("tailors_per_class", self.tailors_per_class, "an integer >= 0",
                            "t, components per class group; 0 gives a learngene-only model.")
        for name in ("classes", "reuse_classes"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                      for c in value):
                raise bad_value(name, value, "a list of class ids (integers >= 0)", "e.g. [0, 1, 2, 3, 4].")
            if len(set(value)) != len(value):
                raise bad_value(name, value, "distinct class ids", "Each class owns one tailor group.")
        missing = sorted(set(self.reuse_classes) - set(self.classes))
        if missing:
            raise bad_value("reuse_classes", self.reuse_classes, f"a subset of classes {self.classes}",
                            f"Add {missing} to `classes` too: a reused group is still a group of the model.")
        if self.reuse_classes and not self.source:
            raise bad_value("reuse_classes", self.reuse_classes, "empty unless `source` is set",
                            "Reused tailors are read from the saved KIND adapter named by `source`.")
        if self.init not in INITS:
            raise bad_value("init", self.init, f"one of {INITS}", "'svd' starts equal to the dense weight.")
        if self.adaln and ADALN_TARGET not in self.target_modules:
            self.target_modules = [*self.target_modules, ADALN_TARGET]
        if self.class_embeddings and self.classes and EMBED_TARGET not in self.target_modules:
            self.target_modules = [*self.target_modules, EMBED_TARGET]

    @property
    def trains_whole_model(self) -> bool:
        return self.train_base

    def check_model(self, model: nn.Module) -> None:
        # SD3/Flux take no class labels and no per-call labels reach their blocks' linears through the pipelines;
        # PixArt (also text-conditioned) is allowed: its class labels come per call (`adapter_inputs`, the studio's
        # class picker), docs/methods/kind.md
        kind = type(model).__name__
        if kind in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
            raise DifftuneError(
                f"method 'kind' routes each item to its class's tailor components by its class label; {kind} is "
                "text-conditioned and takes no class labels, so KIND's class gate cannot apply. On SD3/Flux use LoRA, "
                "LoHa, KronA, SaRA or full fine-tuning (MMDiT default targets: docs/sd3-flux.md); KIND needs a "
                "class-conditional DiT (or PixArt with class labels given per call)")

    def probe_inputs(self, name: str) -> tuple[int, dict[str, Any]]:
        # one item per class (its tailor group) plus one of no class (learngenes only)
        return len(self.classes) + 1, {"class_labels": torch.tensor([*self.classes, -1])}

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        if isinstance(base_layer, nn.Embedding):
            return KINDClassRows(base_layer, self) if self.class_embeddings else None
        return KINDAdapter(base_layer, self) if isinstance(base_layer, nn.Linear) else None


def _unit(shape: tuple[int, ...], dim: int, like: Tensor) -> Tensor:
    t = torch.randn(shape, device=like.device, dtype=torch.float32)
    return (t / t.norm(dim=dim, keepdim=True).clamp_min(1e-12)).to(like.dtype)


class KINDAdapter(Adapter):
    """One KIND layer: learngenes ``kind_gU`` (m, N_G), ``kind_gS`` (N_G), ``kind_gV`` (N_G, n) and, per class c,
    tailors ``kind_tU.<c>`` (m, t), ``kind_tS.<c>`` (t), ``kind_tV.<c>`` (t, n)."""

    prefix = "kind_"

    def __init__(self, base_layer: nn.Linear, config: KINDConfig) -> None:
        super().__init__(config)
        m, n = base_layer.out_features, base_layer.in_features
        g, t = config.learngenes, config.tailors_per_class
        if g + t > min(m, n):
            raise bad_value("learngenes + tailors_per_class", g + t, f"<= min(m, n) = {min(m, n)} for a layer of "
                            f"shape {(m, n)}", "W has at most min(m, n) components; lower N_G or t, or exclude it.")
        w = base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.m, self.n = m, n
        self.kind_gU = nn.Parameter(torch.empty(m, g, device=w.device, dtype=dtype))
        self.kind_gS = nn.Parameter(torch.empty(g, device=w.device, dtype=dtype))
        self.kind_gV = nn.Parameter(torch.empty(g, n, device=w.device, dtype=dtype))
        self.kind_tU, self.kind_tS, self.kind_tV = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for c in config.classes:
            self.add_group(c, fresh=False)
        if w.is_meta:  # shape-only models (the parameter calculator): nothing to initialise
            return
        with torch.no_grad():
            if config.init == "svd":
                u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
                self.kind_gU.copy_(u[:, :g])
                self.kind_gS.copy_(s[:g])
                self.kind_gV.copy_(vh[:g])
                for c in config.classes:  # every class starts at the same rank-(N_G + t) truncation of W
                    self.kind_tU[str(c)].copy_(u[:, g:g + t])
                    self.kind_tS[str(c)].copy_(s[g:g + t])
                    self.kind_tV[str(c)].copy_(vh[g:g + t])
            else:
                # unit u, v; Σ_i σ² u vᵀ has entry variance rσ²/(mn) = 1/(3n) (a Kaiming-uniform layer's) at σ² = m/3r
                sigma = math.sqrt(m / (3 * (g + t)))
                self.kind_gU.copy_(_unit((m, g), 0, w))
                self.kind_gV.copy_(_unit((g, n), 1, w))
                self.kind_gS.fill_(sigma)
                for c in config.classes:
                    self.kind_tU[str(c)].copy_(_unit((m, t), 0, w))
                    self.kind_tV[str(c)].copy_(_unit((t, n), 1, w))
                    self.kind_tS[str(c)].fill_(sigma)

    def add_group(self, c: int, fresh: bool = True) -> None:
        """Add class ``c``'s tailor group; ``fresh``: random unit u, v with σ = 0 (contributes nothing at first)."""
        key, t, like = str(c), self.config.tailors_per_class, self.kind_gU
        self.kind_tU[key] = nn.Parameter(torch.zeros(self.m, t, device=like.device, dtype=like.dtype))
        self.kind_tS[key] = nn.Parameter(torch.zeros(t, device=like.device, dtype=like.dtype))
        self.kind_tV[key] = nn.Parameter(torch.zeros(t, self.n, device=like.device, dtype=like.dtype))
        if fresh and not like.is_meta:
            with torch.no_grad():
                self.kind_tU[key].copy_(_unit((self.m, t), 0, like))
                self.kind_tV[key].copy_(_unit((t, self.n), 1, like))

    def drop_group(self, c: int) -> None:
        for d in (self.kind_tU, self.kind_tS, self.kind_tV):
            del d[str(c)]

    def groups(self) -> list[int]:
        return [int(k) for k in self.kind_tU]

    def learngene_parameters(self) -> list[nn.Parameter]:
        return [self.kind_gU, self.kind_gS, self.kind_gV]

    def tailor_parameters(self, c: int) -> list[nn.Parameter]:
        return [d[str(c)] for d in (self.kind_tU, self.kind_tS, self.kind_tV)]

    def dense_weight(self, c: int | None = None) -> Tensor:
        """W_y (fp32) for class ``c`` (None: learngenes only)."""
        w = (self.kind_gU.float() * self.kind_gS.float()) @ self.kind_gV.float()
        if c is not None and str(c) in self.kind_tU:
            u, s, v = (p.float() for p in self.tailor_parameters(c))
            w = w + (u * s) @ v
        return w

    def _labels(self, x: Tensor) -> Tensor | None:
        labels = self.inputs().get("class_labels")
        if labels is None or not len(self.kind_tU):
            return None
        labels = torch.as_tensor(labels, device=x.device).reshape(-1)
        if labels.numel() == 1 and x.shape[0] != 1:
            labels = labels.expand(x.shape[0])
        if labels.shape[0] != x.shape[0]:
            raise DifftuneError(f"KIND's class gate got {labels.shape[0]} class labels for a batch of {x.shape[0]} "
                                "items; pass one class label per item (`class_labels`)")
        return labels

    def _gate(self, x: Tensor) -> tuple[list[str], Tensor, Tensor] | None:
        """The class gate of this call: the groups present, each item's group (0 where it has none) and its 0/1
        gate, or None when no item has a group (no labels, no groups, only classes without one)."""
        labels = self._labels(x)
        if labels is None:
            return None
        seen = set(labels.unique().tolist())  # one device sync per layer, not one per class group
        present = [k for k in self.kind_tU if int(k) in seen]
        if not present:
            return None
        owner = torch.tensor([int(k) for k in present], device=x.device)
        match = labels[:, None] == owner[None, :]  # (B, P)
        return present, match.to(torch.long).argmax(1), match.any(1).to(x.dtype)[:, None]

    def _add_tailors(self, x: Tensor, gated: tuple[list[str], Tensor, Tensor], y: Tensor,
                     bias: Tensor | None) -> Tensor:
        """y + Σ_{i∈T(y)} u_i σ_i v_iᵀ x (+ b) per item: each item's own group gathered by the class gate, then one
        batched matmul pair over the items, the second adding into y (in place where autograd allows it: one pass
        over the output) together with the bias, as an extra component of constant input 1. An item of a class
        without a group (the null class) has gate 0; a group gets exactly zero gradient from the items of other
        classes, and groups of absent classes are not in the graph.

        Why per-item gathering rather than one matmul pair over the stacked groups: an item's value must not depend
        on which other classes share its batch. A stacked pair reduces over P·t components, so its rounding changes
        with the set of classes present (seen on AMD CPUs); here every reduction has a fixed length (n, then t or
        t + 1) and each item is its own GEMM of a fixed shape. For a batch of the same shape an item's output is
        therefore bit-identical whatever else is in the batch (tested); across batch sizes BLAS may block
        differently and only a tolerance holds. It is also P times cheaper than the stacked pair."""
        present, group, gate = gated
        b = x.shape[0]
        # gathered in the layouts the matmuls read (contiguous Vᵀ, Uᵀ); index_select's backward is a plain index_add
        ut = torch.stack([self.kind_tU[k].T for k in present]).index_select(0, group)  # (P, t, m) -> (B, t, m)
        s = torch.stack([self.kind_tS[k] for k in present]).index_select(0, group) * gate  # (B, t)
        vt = torch.stack([self.kind_tV[k].T for k in present]).index_select(0, group)  # (B, n, t)
        h = x.reshape(b, -1, self.n)  # (B, ..., n) -> (B, T, n)
        z = torch.bmm(h, vt) * s[:, None, :]  # (B, T, t)
        if bias is not None:
            z = torch.cat([z, z.new_ones(*z.shape[:2], 1)], 2)  # (B, T, t + 1)
            ut = torch.cat([ut, bias.to(ut.dtype).expand(b, 1, self.m)], 1)  # (B, t + 1, m)
        y3 = y if y.dim() == 3 else y.reshape(b, -1, self.m)
        # in place unless y3 is a view (autograd would then copy its whole base) or autocast changed a dtype
        in_place = not (torch.is_grad_enabled() and y3._is_view()) and y3.dtype == z.dtype == ut.dtype
        out = y3.baddbmm_(z, ut) if in_place else torch.baddbmm(y3, z, ut)  # (B, T, m)
        return out.reshape(*x.shape[:-1], self.m)

    def _learngenes(self, x: Tensor, w0: Tensor | None, bias: Tensor | None = None) -> Tensor:
        """U_G Σ_G V_Gᵀ x (− W0 x) (+ b): in factored order, or through the composed (m, n) matrix when that is
        cheaper (many tokens, N_G close to min(m, n): pretraining); the two orders are the same function. The bias
        goes into the last matmul (one pass over the output, as in the base layer) when no tailor runs."""
        tokens = x.numel() // self.n
        g = self.kind_gS.shape[0]
        if tokens * g * (self.m + self.n) <= g * self.m * self.n + tokens * self.m * self.n:
            y = F.linear((x @ self.kind_gV.T) * self.kind_gS, self.kind_gU, bias)
            return y if w0 is None else y - F.linear(x, w0)
        w = (self.kind_gU * self.kind_gS) @ self.kind_gV
        return F.linear(x, w if w0 is None else w - w0, bias)

    def kind_forward(self, x: Tensor) -> Tensor:
        """W_y x (no bias) per batch item: learngenes for all, each item's own tailor group by the class gate."""
        return self._forward(x.to(self.kind_gU.dtype), None)

    def _forward(self, x: Tensor, w0: Tensor | None, bias: Tensor | None = None) -> Tensor:
        gated = self._gate(x)
        if gated is None:
            return self._learngenes(x, w0, bias)
        # the learngenes without the bias: their output is then a fresh tensor (not a view), which the tailors add
        # into in place, the bias with them
        return self._add_tailors(x, gated, self._learngenes(x, w0), bias)

    def replace_output(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        """W_y x + b, the layer at weight 1, without W0 x: the host's ``base(x) + δ(x)`` computes W0 x twice (once
        in the base layer, once subtracted in δ) for a result that does not depend on W0 (`delta`). The same
        function, rounded differently (W0 x no longer cancels; tested against the host's route)."""
        h = x.to(self.kind_gU.dtype)
        bias = base["bias"].to(h.dtype) if "bias" in base else None
        y = self._forward(h, None, bias)
        # the dtype the base layer would return: autocast's (a linear runs in it), else its input's
        device = x.device.type
        return y.to(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype)

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
        # the KIND layer replaces W0: δ = W_y x − W0 x, so the host's base(x) + δ(x) is W_y x + b at weight 1. W0 is
        # the supplied true base weight: with another adapter fused into the layer, base(x) holds its change too,
        # and KIND keeps it on top (W_y x + w ΔW x) instead of cancelling it
        return self._forward(x.to(self.kind_gU.dtype), base["weight"].to(self.kind_gU.dtype))


class KINDClassRows(Adapter):
    """Each class's own row ``kind_row.<c>`` (D,) of a class-embedding table, part of that class's tailors: at weight
    1 the table returns it for items of class c (other labels, the null class included, keep the base row).
    Starts as the base row, so injecting changes nothing."""

    prefix = "kind_"

    def __init__(self, base_layer: nn.Embedding, config: KINDConfig) -> None:
        super().__init__(config)
        self.__dict__["_table"] = base_layer  # not a submodule: the base table is never part of the adapter's state
        self.kind_row = nn.ParameterDict()
        for c in config.classes:
            self.add_group(c)

    def add_group(self, c: int, fresh: bool = True) -> None:
        w = self._table.weight
        if not 0 <= c < w.shape[0]:
            raise bad_value("classes", c, f"class ids below the class-embedding table's {w.shape[0]} rows",
                            "or set class_embeddings: false")
        row = torch.zeros(w.shape[1], device=w.device, dtype=w.dtype) if w.is_meta else w.detach()[c].clone()
        self.kind_row[str(c)] = nn.Parameter(row)

    def drop_group(self, c: int) -> None:
        del self.kind_row[str(c)]

    def groups(self) -> list[int]:
        return [int(k) for k in self.kind_row]

    def learngene_parameters(self) -> list[nn.Parameter]:
        return []

    def tailor_parameters(self, c: int) -> list[nn.Parameter]:
        return [self.kind_row[str(c)]]

    def delta(self, x: Tensor, base_layer: nn.Module, base: Mapping[str, Tensor]) -> Tensor | None:
        seen = set(x.unique().tolist())
        present = [k for k in self.kind_row if int(k) in seen]
        if not present:
            return None
        owner = torch.tensor([int(k) for k in present], device=x.device)
        rows = torch.stack([self.kind_row[k] for k in present]) - base["weight"][owner]  # (P, D)
        return (x.unsqueeze(-1) == owner).to(rows.dtype) @ rows  # (B,) labels -> (B, P) -> (B, D)
