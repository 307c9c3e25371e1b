"""Flux LoRA files in the Black Forest Labs (BFL) layout, the naming ComfyUI, kohya sd-scripts and ai-toolkit use:
``lora_unet_double_blocks_{i}_img_attn_qkv``, ``lora_unet_single_blocks_{i}_linear1``, ...

BFL's reference Flux implementation fuses layers that diffusers' `FluxTransformer2DModel` keeps apart: a double
block's image (and text) attention has one ``qkv`` linear for diffusers' ``attn.to_q``/``to_k``/``to_v``
(``add_q_proj``/``add_k_proj``/``add_v_proj``), and a single block's ``linear1`` is ``attn.to_q``/``to_k``/``to_v``
and ``proj_mlp`` stacked along the output. A LoRA on a fused layer is written as

    down = [D_1; D_2; ...]  (stacked downs, rank n·r)      up = diag(U_1, U_2, ...)  (block-diagonal)

so up @ down = [U_1 D_1; U_2 D_2; ...], each member's own ΔW in its rows; a member the adapter does not adapt gets a
zero block (its rows must exist: a reader adds ΔW to the whole fused weight). α is n·α, so α / rank is unchanged.

Reading splits a fused module as diffusers' own converter (``_convert_kohya_flux_lora_to_diffusers``) does: when
the rank divides into the members and ``up`` is zero off its diagonal blocks, each member gets its own down/up
block (rank r, α / n); otherwise each gets the whole ``down`` and its rows of ``up``. Either gives each member the
same ΔW rows. Members whose blocks are both zero (the padding above) get no adapter, so export → import is exact.
LoHa/LoKr/full modules on fused layers split their dense ΔW by rows. The final layer's modulation is (shift, scale)
in BFL's order and (scale, shift) in diffusers': its rows are swapped both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DifftuneError
from . import updates as _updates
from .kohya import kohya_name
from .updates import Dense, LowRank, Update
from .writers import write_kohya

__all__ = ["BFL_PREFIX", "from_bfl", "is_bfl", "is_flux_adapter", "is_flux_module", "read_file", "to_bfl",
           "write_bfl"]

BFL_PREFIX = "lora_unet"
#: BFL layer in double_blocks.{i} → diffusers module(s) in transformer_blocks.{i}
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),  # both orders: shift, scale, gate (attention), then the same for the MLP
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
#: BFL layer in single_blocks.{i} → diffusers module(s) in single_transformer_blocks.{i}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
#: BFL's layers outside the blocks → diffusers' modules
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_SWAPPED = "norm_out.linear"  # BFL (shift, scale), diffusers (scale, shift)
_MLP_RATIO = 4  # Flux's single blocks: proj_mlp is 4 × the width (diffusers' FluxSingleTransformerBlock default)
_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_(.+)")
_PATH = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)")


def is_bfl(keys: list[str]) -> bool:
    """Whether kohya module names are BFL's (no UNet or other model has ``double_blocks``/``single_blocks``)."""
    return any(_BLOCK.match(k.removeprefix(BFL_PREFIX + "_")) for k in keys if k.startswith(BFL_PREFIX + "_"))


def is_flux_module(path: str) -> bool:
    """Whether a diffusers module path is one only Flux has (its single blocks)."""
    return path.startswith("single_transformer_blocks.")


def _bfl_layer(path: str) -> tuple[str, tuple[str, ...]]:
    """(BFL name without prefix, the diffusers members of that layer, in order) of a Flux module path."""
    m = _PATH.fullmatch(path)
    if m:
        kind, i, rest = m.groups()
        table, block = (SINGLE, "single") if kind == "single_transformer_blocks" else (DOUBLE, "double")
        for name, members in table.items():
            if rest in members:
                return f"{block}_blocks_{i}_{name}", tuple(f"{kind}.{i}.{x}" for x in members)
    for name, module in TOP.items():
        if path == module:
            return name, (module,)
    raise DifftuneError(f"module {path!r} has no name in the BFL Flux layout; kohya's Flux format holds the "
                        "transformer's linear layers (double/single blocks, embedders, final layer) only")


def _diffusers_members(name: str) -> tuple[str, ...]:
    """The diffusers module paths of a BFL module name (without prefix)."""
    m = _BLOCK.fullmatch(name)
    if m:
        kind, i, rest = m.groups()
        table, block = (DOUBLE, "transformer_blocks") if kind == "double" else (SINGLE, "single_transformer_blocks")
        if rest in table:
            return tuple(f"{block}.{i}.{x}" for x in table[rest])
    elif name in TOP:
        return (TOP[name],)
    raise DifftuneError(f"{BFL_PREFIX}_{name}: no such layer in the BFL Flux layout (known: double_blocks_<i>_"
                        f"{{{', '.join(DOUBLE)}}}, single_blocks_<i>_{{{', '.join(SINGLE)}}}, {', '.join(TOP)})")


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_bfl(updates: dict[str, LowRank]) -> dict[str, LowRank]:
    """{Flux module path: LoRA} → {BFL kohya name: LoRA}, fusing q/k/v (and a single block's MLP input) as BFL does.

    Raises:
        DifftuneError: a module with no BFL name, or a DoRA on a fused layer (its magnitudes would need the fused
            layer's norms; use the diffusers format).
    """
    layers: dict[str, tuple[str, ...]] = {}
    for path in updates:
        name, members = _bfl_layer(path)
        layers[name] = members
    out = {}
    for name, members in layers.items():
        got = {m: updates[m] for m in members if m in updates}
        if len(members) == 1:
            u = got[members[0]]
            if members[0] == _SWAPPED:
                u = LowRank(u.down, _swap_halves(u.up), u.scale, u.alpha, u.rslora,
                            None if u.magnitude is None else _swap_halves(u.magnitude))
            out[f"{BFL_PREFIX}_{name}"] = u
        else:
            out[f"{BFL_PREFIX}_{name}"] = _fuse(name, members, got)
    return out


def _fuse(name: str, members: tuple[str, ...], got: dict[str, LowRank]) -> LowRank:
    if any(u.magnitude is not None for u in got.values()):
        raise DifftuneError(f"{BFL_PREFIX}_{name}: a DoRA on a layer BFL fuses ({', '.join(got)}) has no kohya Flux "
                            "form here; export it with --format diffusers")
    first = next(iter(got.values()))
    d_in, r = int(first.down.shape[1]), max(u.rank for u in got.values())
    same = len({(u.rank, u.alpha, u.rslora) for u in got.values()}) == 1 and first.alpha is not None \
        and not first.rslora
    downs, ups = [], []
    for m in members:
        u = got.get(m)
        rows = d_in * _MLP_RATIO if m.endswith("proj_mlp") else d_in  # Flux: q/k/v keep the width
        if u is None:  # not adapted: zero rows (and a zero rank block, keeping the layout block-diagonal)
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


def from_bfl(updates: dict[str, Update]) -> dict[str, Update]:
    """{BFL kohya name: update} → {kohya name of the diffusers module (``lora_unet_transformer_blocks_0_attn_to_q``):
    update}, splitting fused layers (see the module's docstring)."""
    out: dict[str, Update] = {}
    for key, u in updates.items():
        if not key.startswith(BFL_PREFIX + "_"):
            raise DifftuneError(f"{key!r} beside BFL Flux keys: one file addresses one layout ({BFL_PREFIX}_double_"
                                "blocks_*, single_blocks_*, ...)")
        members = _diffusers_members(key.removeprefix(BFL_PREFIX + "_"))
        if len(members) == 1:
            split = {members[0]: _swapped(u) if members[0] == _SWAPPED else u}
        else:
            split = _split(key, members, u)
        out.update({kohya_name(m, BFL_PREFIX): v for m, v in split.items()})
    return out


def _swapped(u: Update) -> Update:
    if isinstance(u, LowRank):
        return LowRank(u.down, _swap_halves(u.up), u.scale, u.alpha, u.rslora,
                       None if u.magnitude is None else _swap_halves(u.magnitude.flatten()))
    return Dense({k: _swap_halves(v) for k, v in u.delta().items()})


def _split(key: str, members: tuple[str, ...], u: Update) -> dict[str, Update]:
    """A fused layer's update → one per member (rows of ΔW), as diffusers' converter splits it."""
    n = len(members)
    if isinstance(u, LowRank):
        rows, d_in = int(u.up.shape[0]), int(u.down.shape[1])
    else:
        delta = u.delta()
        rows, d_in = int(delta["weight"].shape[0]), int(delta["weight"].flatten(1).shape[1])
    dims = [rows // n] * n if n == 3 else [d_in, d_in, d_in, rows - 3 * d_in]  # linear1: q, k, v, then the MLP
    if sum(dims) != rows or min(dims) < 1:
        raise DifftuneError(f"{key}: {rows} output rows do not split into {', '.join(members)} (expected 3 equal "
                            "parts for qkv, 3 × the width + the MLP for linear1)")
    starts = [sum(dims[:j]) for j in range(n)]
    if not isinstance(u, LowRank):  # LoHa/LoKr/full: the dense ΔW, by rows
        return {m: Dense({p: v[s:s + d] for p, v in delta.items()}) for m, s, d in zip(members, starts, dims)}
    if u.magnitude is not None:
        raise DifftuneError(f"{key}: a DoRA on a fused BFL layer does not split into diffusers' modules")
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


def read_file(path: str | Path) -> tuple[str, dict[str, dict[str, Update]]]:
    """`updates.read_file`, with a Flux LoRA in BFL's names read as diffusers' modules of the transformer (component
    ``"transformer"``, keys ``lora_unet_<diffusers path>``): what the importer and the exporter's check read."""
    fmt, out = _updates.read_file(path)
    if is_bfl(list(out.get("unet", {}))):
        out["transformer"] = from_bfl(out.pop("unet"))
    return fmt, out


def is_flux_adapter(header: dict[str, Any], paths: list[str], model: str | Path | None = None) -> bool:
    """Whether a saved adapter adapts a Flux transformer: its base's transformer config says so (``model`` or the
    recorded base), or, with no base at hand, it adapts modules only Flux has (single blocks)."""
    base = model or header.get("base_model")
    config = Path(base or ".") / "transformer" / "config.json"
    if base and config.is_file():
        try:
            return json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel"
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            pass  # unreadable: judge by the module names
    return any(map(is_flux_module, paths))


def write_bfl(tensors: dict[str, Tensor], updates: dict[str, LowRank], dtype: torch.dtype | None) -> dict[str, Any]:
    """Write a Flux transformer's LoRA in the BFL layout into ``tensors``; returns {kohya name of each diffusers
    module: its ΔW}, what reading the file back must give (`from_bfl` names)."""
    for key, u in to_bfl(updates).items():
        write_kohya(tensors, key, u, dtype or u.down.dtype)
    return {kohya_name(m, BFL_PREFIX): _updates.comparable(u) for m, u in updates.items()}
