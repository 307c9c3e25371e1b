""""Save this mix" as one adapter: the weighted sum of weight-space adapters, written as an exact LoRA.

For every adapted layer l the mix changes the weight by ΔW_l = Σ_i w_i ΔW_{i,l} over the enabled adapters i (LoRA,
KronA, SaRA's weight entries: every method whose ΔW is defined, `Adapter.delta_params`). One LoRA holds it exactly:
with the SVD ΔW_l = U Σ Vᵀ (ΔW flattened to (d_out, d_in·k·k) for convolutions), B_l = U_{:r} Σ_{:r} and
A_l = Vᵀ_{:r} with r the largest numerical rank over the layers (singular values above 1e-6 · σ_max), α = r so the
scale α / r is 1. Layers of lower rank are zero-padded. The file is an ordinary LoRA adapter: it loads anywhere
difftune loads one and can be exported to kohya/peft formats.

Not merged (the caller writes a bundle instead): activation-space adapters (SCEdit, CSC: no ΔW), SPMs with
facilitated transport on (their strength depends on the prompt, a fixed ΔW would drop that), adapters on several
pipeline components, and deltas on parameters other than ``weight`` (SaRA on biases).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from difftune import loading
from difftune.errors import DifftuneError, bad_value
from difftune.methods.lora import LoRAConfig
from difftune.methods.verbs import hosts, model_part
from difftune.targeting import canonical_name

from . import library, paths
from .library import MixItem
from .paths import clip

if TYPE_CHECKING:  # models imports nothing of this module; the slot is only a parameter here
    from .models import Slot

MIX_FOLDER = "studio-mixes"  #: where "save this mix" writes, inside the adapters folder

RELATIVE_TOL = 1e-6  #: singular values below this fraction of the layer's largest one count as zero


class NotMergeable(DifftuneError):
    """The mix cannot be one weight-space adapter; the message says which adapter and why."""


def _why_not(name: str, module: nn.Module, adapter: nn.Module, base_layer: nn.Module) -> str:
    if not adapter.mergeable:
        return f"{adapter.config.method} acts on activations (no ΔW)"
    if tuple(adapter.merge_params()) != ("weight",):
        return f"it changes {list(adapter.merge_params())}, and a LoRA holds weight changes only"
    part = model_part(module, name)
    if adapter.config.method == "spm" and part is not None and part.transport and adapter.config.matching != "fixed":
        return "an SPM with facilitated transport on has a prompt-dependent strength (turn transport off to merge)"
    linear = isinstance(base_layer, nn.Linear) or getattr(base_layer, "_difftune_linear_like", False)
    if not (linear or (isinstance(base_layer, nn.Conv2d) and base_layer.groups == 1)):
        return f"it adapts a {type(base_layer).__name__}, which a LoRA cannot"
    return ""


def mixed_deltas(pipe: object, names: Sequence[str]) -> tuple[str | None, dict[str, Tensor]]:
    """(component, {layer name: Σ_i w_i ΔW_i in fp32}) of the named, loaded adapters at their current weights.

    Raises:
        NotMergeable: an adapter is not weight-space (see the module docstring) or the adapters sit on different
            components.
    """
    if not names:
        raise NotMergeable("the mix is empty; enable at least one adapter")
    info = loading.list_adapters(pipe)
    comps = {info[n]["component"] for n in names}
    if len(comps) != 1:
        raise NotMergeable(f"the adapters adapt different components {sorted(map(str, comps))}; one adapter file "
                           "holds one component")
    comp = comps.pop()
    _, module = loading.component_of(pipe, comp)
    deltas: dict[str, Tensor] = {}
    for host_name, host in hosts(module):
        for n in names:
            if n not in host.adapters:
                continue
            adapter = host.adapters[n]
            why = _why_not(n, module, adapter, host.base_layer)
            if why:
                raise NotMergeable(f"adapter {n!r} cannot be merged: {why}")
            with torch.no_grad():
                d = adapter.delta_params(host.base_params())["weight"].float() * float(host.adapter_weights[n])
            key = canonical_name(host_name)
            deltas[key] = deltas[key] + d if key in deltas else d
    return comp, deltas


def low_rank(deltas: dict[str, Tensor], max_rank: int | None = None) -> tuple[int, dict[str, tuple[Tensor, Tensor]]]:
    """(r, {layer: (A, B)}) with B A = ΔW per layer (A: (r, d_in[, k, k]), B: (d_out, r[, 1, 1])).

    ``r`` is the largest numerical rank over the layers (exact), or ``max_rank`` when that is smaller (then each
    layer keeps its top singular directions: the best rank-r approximation in Frobenius norm).
    """
    factors: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    rank = 1
    for key, dw in deltas.items():
        u, s, vh = torch.linalg.svd(dw.flatten(1), full_matrices=False)  # (d_out, q), (q,), (q, d_in·k·k)
        kept = int((s > s[0] * RELATIVE_TOL).sum()) if s.numel() and s[0] > 0 else 0
        rank = max(rank, kept)
        factors[key] = (u, s, vh)
    if max_rank is not None:
        rank = min(rank, max_rank)
    out = {}
    for key, (u, s, vh) in factors.items():
        shape = deltas[key].shape
        q = min(rank, s.numel())
        b = torch.zeros(shape[0], rank)
        a = torch.zeros(rank, vh.shape[1])
        b[:, :q] = u[:, :q] * s[:q]
        a[:q] = vh[:q]
        if len(shape) == 4:  # conv: A is a (r, d_in, k, k) conv, B a 1×1 conv
            out[key] = (a.view(rank, *shape[1:]), b.view(shape[0], rank, 1, 1))
        else:
            out[key] = (a, b)
    return rank, out


def save_merged(pipe: object, names: Sequence[str], folder: str | Path, adapter_name: str,
                max_rank: int | None = None) -> tuple[Path, int]:
    """Write the mix of the named adapters (at their current weights) as one LoRA adapter folder.

    Returns:
        (folder, rank).
    """
    comp, deltas = mixed_deltas(pipe, names)
    rank, factors = low_rank(deltas, max_rank)
    _, module = loading.component_of(pipe, comp)
    # One exact name per layer: an equal name matches before any suffix or regex reading of the pattern.
    config = LoRAConfig(rank=rank, alpha=float(rank), target_modules=sorted(factors))
    loading.inject(pipe, config, name=adapter_name, component=comp)
    try:
        for host_name, host in hosts(module):
            if adapter_name in host.adapters:
                a, b = factors[canonical_name(host_name)]
                lora = host.adapters[adapter_name]
                with torch.no_grad():
                    lora.lora_A.copy_(a.to(lora.lora_A.dtype))
                    lora.lora_B.copy_(b.to(lora.lora_B.dtype))
        return loading.save_adapter(pipe, folder, name=adapter_name), rank
    finally:
        loading.delete_adapter(pipe, adapter_name)


def save_mix(root: Path, slot: Slot, name: str, items: list[MixItem], fused: bool, how: str = "auto"
             ) -> tuple[str, str]:
    """Save the mix as one merged LoRA (weight-space adapters only) or as a bundle that reloads it.

    Both are written only into a real ``studio-mixes`` folder inside the adapters folder (`paths.make_folder`
    refuses a symlink out of it) and without following symlinks (`paths.write_file`, `paths.copy_folder`).

    Args:
        root: the adapters folder; slot: the model whose adapters are merged.
        how: "merged", "bundle", or "auto" (merged when possible, else a bundle).

    Returns:
        (the new entry's key, a sentence saying what was written).
    """
    library.check_save_name(name)
    if how not in ("auto", "merged", "bundle"):
        raise bad_value("save as", clip(how), "'auto', 'merged' or 'bundle'")
    items = library.check_mix(items)
    if not items:
        raise bad_value("mix", [], "at least one enabled adapter")
    folder = paths.make_folder(root, MIX_FOLDER)
    if any(os.path.lexists(folder / n) for n in (name, f"{name}{library.BUNDLE_SUFFIX}")):  # a link counts too
        raise bad_value("mix name", name, "a name not used yet in the adapters folder", "Pick another name.")
    why = ""
    if how in ("auto", "merged"):
        with slot.lock:
            slot.apply_mix(root, items, fused=False)
            names = [slot.loaded[i.key][0] for i in items]
            try:
                # written to a private temporary folder, then copied in without following any symlink
                with tempfile.TemporaryDirectory(prefix="difftune-studio-") as tmp:
                    _, rank = save_merged(slot.pipe, names, Path(tmp) / name,
                                          adapter_name=f"mix_{name.replace('-', '_')}")
                    paths.copy_folder(root, Path(tmp) / name, folder / name, f"{MIX_FOLDER}/{name}")
                return f"{MIX_FOLDER}/{name}", (f"merged {len(items)} adapter(s) into one LoRA of rank {rank}: "
                                                f"{MIX_FOLDER}/{name}")
            except NotMergeable as e:
                if how == "merged":
                    raise
                why = f" ({e})"
    key = library.write_bundle(root, MIX_FOLDER, name, items, fused, slot.label)
    return key, f"saved a bundle that reloads the mix{why}: {key}"
