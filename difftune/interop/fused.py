"""Layers that the original implementations of MMDiT models fuse and diffusers keeps apart, for their LoRA files.

Black Forest Labs' Flux (`difftune.interop.bfl`) and Stability AI's SD3 (`difftune.interop.sai`) compute q, k and v
of an attention with one ``qkv`` linear (Flux's single blocks also put the MLP input in it: ``linear1``), where
diffusers' transformers have ``to_q``/``to_k``/``to_v`` (and ``proj_mlp``). A LoRA on a fused layer is written as

    down = [D_1; D_2; ...]  (stacked downs, rank n·r)      up = diag(U_1, U_2, ...)  (block-diagonal)

so up @ down = [U_1 D_1; U_2 D_2; ...], each member's own ΔW in its rows; a member the adapter does not adapt gets a
zero block (its rows must exist: a reader adds ΔW to the whole fused weight). α is n·α, so α / rank is unchanged.

Reading splits a fused module as diffusers' own Flux converter (``_convert_kohya_flux_lora_to_diffusers``) does:
when the rank divides into the members and ``up`` is zero off its diagonal blocks, each member gets its own down/up
block (rank r, α / n); otherwise each gets the whole ``down`` and its rows of ``up``. Either gives each member the
same ΔW rows. Members whose blocks are both zero (the padding above) get no adapter, so export → import is exact.
LoHa/LoKr/full modules on fused layers split their dense ΔW by rows.

Both originals also order an AdaLN modulation's halves (shift, scale) where diffusers' ``AdaLayerNormContinuous``
has (scale, shift): `swapped` exchanges the halves of an update's output rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import DifftuneError
from .kohya import kohya_name
from .updates import Dense, LowRank, Update, comparable
from .writers import write_kohya

__all__ = ["Layout", "fuse", "out_in", "split", "swapped"]

_MLP_RATIO = 4  # Flux's single blocks: proj_mlp is 4 × the width (diffusers' FluxSingleTransformerBlock default)


def out_in(u: Update) -> tuple[int, int]:
    """(output rows, input features) of the layer an update is for (a conv's input: its channels)."""
    if isinstance(u, LowRank):
        return int(u.up.shape[0]), int(u.down.shape[1])
    weight = u.delta()["weight"]
    return int(weight.shape[0]), int(weight.shape[1])


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def swapped(u: Update) -> Update:
    """The update with the two halves of its output rows exchanged ((shift, scale) ↔ (scale, shift))."""
    if isinstance(u, LowRank):
        return LowRank(u.down, _swap_halves(u.up), u.scale, u.alpha, u.rslora,
                       None if u.magnitude is None else _swap_halves(u.magnitude.flatten()))
    return Dense({k: _swap_halves(v) for k, v in u.delta().items()})


def fuse(name: str, members: tuple[str, ...], got: dict[str, LowRank]) -> LowRank:
    """One LoRA for the fused layer ``name`` from the LoRAs ``got`` of some of its ``members`` (module docstring).

    Raises:
        DifftuneError: a DoRA among them (its magnitudes would need the fused layer's norms).
    """
    if any(u.magnitude is not None for u in got.values()):
        raise DifftuneError(f"{name}: a DoRA on a layer the original model fuses ({', '.join(got)}) has no kohya form "
                            "here; export it with --format diffusers")
    first = next(iter(got.values()))
    d_in, r = int(first.down.shape[1]), max(u.rank for u in got.values())
    # q/k/v have equal rows (square in SD3 and Flux); a single block's proj_mlp is 4 × the width
    qkv_rows = next((int(u.up.shape[0]) for m, u in got.items() if not m.endswith("proj_mlp")), d_in)
    same = len({(u.rank, u.alpha, u.rslora) for u in got.values()}) == 1 and first.alpha is not None \
        and not first.rslora
    downs, ups = [], []
    for m in members:
        u = got.get(m)
        if u is None:  # not adapted: zero rows (and a zero rank block, keeping the layout block-diagonal)
            rows = d_in * _MLP_RATIO if m.endswith("proj_mlp") else qkv_rows
            downs.append(torch.zeros(r, d_in, dtype=first.down.dtype))
            ups.append(torch.zeros(rows, r, dtype=first.up.dtype))
            continue
        pad = r - u.rank
        up = u.up if same else (u.up.float() * u.scale).to(u.up.dtype)  # differing scales: each folded into U
        downs.append(torch.cat([u.down, u.down.new_zeros(pad, d_in)]))
        ups.append(torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1))
    rank = r * len(members)
    alpha = first.alpha * len(members) if same else float(rank)  # type: ignore[operator]
    return LowRank(torch.cat(downs), torch.block_diag(*ups), alpha / rank, alpha=alpha)


def split(key: str, members: tuple[str, ...], u: Update) -> dict[str, Update]:
    """A fused layer's update → one per member (rows of ΔW), as diffusers' converter splits it: three members are
    equal thirds (q, k, v), four are q, k, v of the input's width and the rest (Flux's ``linear1``: the MLP)."""
    n = len(members)
    rows, d_in = out_in(u)
    dims = [rows // n] * n if n == 3 else [d_in, d_in, d_in, rows - 3 * d_in]
    if sum(dims) != rows or min(dims) < 1:
        raise DifftuneError(f"{key}: {rows} output rows do not split into {', '.join(members)} (expected 3 equal "
                            "parts for qkv, 3 × the width + the MLP for linear1)")
    starts = [sum(dims[:j]) for j in range(n)]
    if not isinstance(u, LowRank):  # LoHa/LoKr/full: the dense ΔW, by rows
        delta = u.delta()
        return {m: Dense({p: v[s:s + d] for p, v in delta.items()}) for m, s, d in zip(members, starts, dims)}
    if u.magnitude is not None:
        raise DifftuneError(f"{key}: a DoRA on a fused layer does not split into diffusers' modules")
    r = u.rank // n
    sparse = u.rank % n == 0 and all(
        not u.up[s:s + d, k * r:(k + 1) * r].any() for j, (s, d) in enumerate(zip(starts, dims)) for k in range(n)
        if k != j)
    out: dict[str, Update] = {}
    for j, (m, s, d) in enumerate(zip(members, starts, dims)):
        if sparse:
            down, up = u.down[j * r:(j + 1) * r], u.up[s:s + d, j * r:(j + 1) * r]
            if not down.any() and not up.any():  # the exporter's padding for a member it did not adapt
                continue
            alpha = None if u.alpha is None or u.rslora else u.alpha / n
            out[m] = LowRank(down, up, u.scale if alpha is None else alpha / r, alpha=alpha)
        else:
            out[m] = LowRank(u.down, u.up[s:s + d], u.scale, alpha=u.alpha, rslora=u.rslora)
    return out


@dataclass(frozen=True)
class Layout:
    """An original implementation's names for a diffusers transformer's layers, as kohya files spell them.

    Attributes:
        name: what the layout is called in messages ("BFL Flux").
        layer: diffusers module path → (original name without prefix, its diffusers members in order); raises for a
            module the layout has no name for.
        members: original name without prefix → its diffusers members; raises for an unknown name.
        swap: whether a one-member module's update has its halves in the other order (``(path, update)``).
        prefix: the kohya key prefix of the denoiser.
    """

    name: str
    layer: Callable[[str], tuple[str, tuple[str, ...]]]
    members: Callable[[str], tuple[str, ...]]
    swap: Callable[[str, Update], bool]
    prefix: str = "lora_unet"

    def to_original(self, updates: dict[str, LowRank]) -> dict[str, LowRank]:
        """{diffusers module path: LoRA} → {kohya key of the original layer: LoRA}, fusing what the original fuses.

        Raises:
            DifftuneError: a module with no name in the layout, or a DoRA on a fused layer.
        """
        layers = dict(self.layer(path) for path in updates)
        out: dict[str, LowRank] = {}
        for name, members in layers.items():
            got = {m: updates[m] for m in members if m in updates}
            if len(members) == 1:
                u = got[members[0]]
                out[f"{self.prefix}_{name}"] = swapped(u) if self.swap(members[0], u) else u  # type: ignore[assignment]
            else:
                out[f"{self.prefix}_{name}"] = fuse(f"{self.prefix}_{name}", members, got)
        return out

    def from_original(self, updates: dict[str, Update]) -> dict[str, Update]:
        """{kohya key of an original layer: update} → {kohya name of each diffusers module
        (``lora_unet_transformer_blocks_0_attn_to_q``): update}, splitting fused layers."""
        out: dict[str, Update] = {}
        for key, u in updates.items():
            members = self.members(key.removeprefix(self.prefix + "_"))
            if len(members) == 1:
                parts = {members[0]: swapped(u) if self.swap(members[0], u) else u}
            else:
                parts = split(key, members, u)
            out.update({kohya_name(m, self.prefix): v for m, v in parts.items()})
        return out

    def write(self, tensors: dict[str, Tensor], updates: dict[str, LowRank], dtype: torch.dtype | None
              ) -> dict[str, Any]:
        """Write a transformer's LoRA in this layout into ``tensors``; returns {kohya name of each diffusers module:
        its ΔW}, what reading the file back must give (`from_original`'s names)."""
        for key, u in self.to_original(updates).items():
            write_kohya(tensors, key, u, dtype or u.down.dtype)
        return {kohya_name(m, self.prefix): comparable(u) for m, u in updates.items()}
