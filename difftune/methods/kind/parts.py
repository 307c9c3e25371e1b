"""KIND's model-level verbs over the layers of `adapter.py`: finding an adapter's layers, part loading,
recombination, MACs and the parameter calculator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import DifftuneError, bad_value
from ..verbs import hosts
from .adapter import PAPER_TRAINABLE, KINDAdapter, KINDClassRows, KINDConfig


def kind_adapters(model: nn.Module, name: str, rows: bool = False) -> list[tuple[str, Any]]:
    """The KIND layers of adapter ``name`` (with ``rows``: also its class-embedding rows)."""
    found = [(n, h.adapters[name]) for n, h in hosts(model) if name in h.adapters]
    if not found or not all(isinstance(a, (KINDAdapter, KINDClassRows)) for _, a in found):
        raise bad_value("name", name, "the name of a KIND adapter in the model", "Inject a `kind` config first.")
    return found if rows else [(n, a) for n, a in found if isinstance(a, KINDAdapter)]


def load_parts(model: nn.Module, name: str, tensors: Mapping[str, Tensor], learngenes: bool = True,
               classes: list[int] | tuple[int, ...] = ()) -> None:
    """Copy learngenes and/or the tailor groups of ``classes`` from saved KIND ``tensors`` (the common format's
    ``<module>.kind_*`` keys, `difftune.serialization.read_tensors`) into adapter ``name``; each part loads alone."""
    for module, adapter in kind_adapters(model, name, rows=True):
        rows = isinstance(adapter, KINDClassRows)
        wanted = ["kind_gU", "kind_gS", "kind_gV"] if learngenes and not rows else []
        wanted += [f"{p}.{c}" for c in classes for p in (("kind_row",) if rows else ("kind_tU", "kind_tS", "kind_tV"))]
        live = dict(adapter.named_parameters())
        for local in wanted:
            key = f"{module}.{local}"
            if rows and key not in tensors:
                continue  # a source without class rows: the class keeps this model's own (pretrained) row
            if key not in tensors:
                raise DifftuneError(f"the saved KIND adapter has no tensor {key!r}: it lacks that learngene/tailor "
                                    f"part (saved classes differ, or another model)")
            if local not in live:
                raise DifftuneError(f"class {local.rpartition('.')[2]} has no tailor group in adapter {name!r}; add "
                                    "it to `classes`")
            if tensors[key].shape != live[local].shape:
                raise DifftuneError(f"{key}: saved shape {tuple(tensors[key].shape)} differs from "
                                    f"{tuple(live[local].shape)}; learngenes/tailors_per_class must match the source")
            with torch.no_grad():
                live[local].copy_(tensors[key])


def recombine(model: nn.Module, name: str, keep: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """Keep learngenes + the tailor groups of ``keep`` (drop the others, in place): a smaller deployable model.
    Returns its KIND parameter count and `factored_macs`."""
    for _, adapter in kind_adapters(model, name, rows=True):
        unknown = sorted(set(keep) - set(adapter.groups()))
        if unknown:
            raise bad_value("keep", list(keep), f"classes among the adapter's groups {adapter.groups()}",
                            f"{unknown} have no tailors to keep")
        for c in adapter.groups():
            if c not in keep:
                adapter.drop_group(c)
    params = sum(p.numel() for _, a in kind_adapters(model, name, rows=True) for p in a.parameters())
    return {"kept_classes": sorted(keep), "kind_parameters": params, **factored_macs(model, name)}


def factored_macs(model: nn.Module, name: str) -> dict[str, int]:
    """MACs per token over the KIND layers for one item (learngenes + one class's group, run factored:
    (N_G + t)(m + n) + r_active) against the dense m·n."""
    factored = dense = 0
    for _, a in kind_adapters(model, name):
        r = a.config.learngenes + (a.config.tailors_per_class if len(a.kind_tU) else 0)
        factored += r * (a.m + a.n) + r
        dense += a.m * a.n
    return {"factored_macs_per_token": factored, "dense_macs_per_token": dense}


def calculator(config: KINDConfig, model: nn.Module, name: str) -> dict[str, Any]:
    """`difftune inspect --method kind`: trainable count of ``config`` and the cost of one component index over the
    adapted linears of all blocks (Σ m + n + 1), with the component count nearest the paper's 45.4M trainable."""
    per_component = sum(a.m + a.n + 1 for _, a in kind_adapters(model, name))
    fresh = [c for c in config.classes if c not in config.reuse_classes]
    components = (config.learngenes if config.train_learngenes else 0) + len(fresh) * config.tailors_per_class
    best = max(1, round(PAPER_TRAINABLE / per_component))
    rows = sum(a.kind_row[str(c)].numel() for _, a in kind_adapters(model, name, rows=True)
               if isinstance(a, KINDClassRows) for c in fresh)  # the trained classes' embedding rows
    return {"per_component": per_component, "trainable_components": components, "class_row_parameters": rows,
            "parameters": components * per_component + rows,
            "paper_nearest": {"target": int(PAPER_TRAINABLE), "components": best, "parameters": best * per_component,
                              "off_by": best * per_component - int(PAPER_TRAINABLE),
                              "off_percent": round(100 * (best * per_component / PAPER_TRAINABLE - 1), 3)}}
