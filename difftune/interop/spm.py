"""SPM files in the kohya LoRA format, the official SPM code's own format (Con6924/SPM ``SPMNetwork.save_weights``).

An SPM is a rank-1 LoRA: ``lora_unet_<module path with _>.lora_down.weight`` (D: (r, d_in) or (r, d_in, k, k)),
``.lora_up.weight`` (U: (d_out, r) or (d_out, r, 1, 1)) and ``.alpha`` (α; the client scales U D by α / r). The erased
concepts go into the safetensors metadata as the official files carry them (``prompts``: the concepts joined by
",", ``rank``, ``alpha``), so `load_spm` of an official file or of our export recovers the concepts. The export
is the generic one (`difftune.interop.export.export_adapter` with format ``kohya``, ``difftune export``).

In ComfyUI, A1111 or ``pipe.load_lora_weights`` such a file is a plain LoRA: facilitated transport is off (γ = 1 on
every prompt). Loaded with `load_spm`, it is an SPM again (transport on; `encode_concepts` stores E(c) for the
cosine rule when a text encoder is at hand). The stored E(c) does not travel in the kohya file (no client would
know the key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..architectures import denoiser_on_meta
from ..errors import DifftuneError
from ..loading import component_of, inject
from ..methods.spm import SPMConfig
from ..methods.verbs import hosts
from ..serialization import save_adapter_file
from .kohya import group_by_module, kohya_prefix, match_modules, read_safetensors


def file_concepts(path: str | Path) -> list[str]:
    """The erased concepts recorded in an SPM file's metadata (``prompts``), [] when there are none."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return [p.strip() for p in meta.get("prompts", "").split(",") if p.strip()]


def load_spm(obj: Any, path: str | Path, name: str = "default", weight: float = 1.0, *,
             component: str | None = None, prefix: str | None = None, concepts: list[str] | None = None,
             **config: Any) -> str:
    """Inject a kohya-format SPM/LoRA file (ours or the official code's) as an ``spm`` adapter with the same ΔW.

    Args:
        obj: a pipeline or the denoiser; path: the ``.safetensors`` file; name/weight: the adapter's.
        concepts: the erased concepts (default: the file's ``prompts`` metadata).
        config: further `SPMConfig` fields (e.g. ``matching="fixed"``, ``gamma_mode="squared"``).

    Raises:
        DifftuneError: keys for modules the model lacks, parts other than lora_down/lora_up/alpha, mixed ranks or
            alphas, or shapes that do not fit the layers.
    """
    groups = group_by_module(read_safetensors(path, "an SPM (kohya LoRA) .safetensors file"))
    comp, module = component_of(obj, component)
    names = match_modules(module, groups, kohya_prefix(comp, prefix, guess=True), source=path)
    ranks, alphas = set(), set()
    for key, parts in groups.items():
        if set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"} or "lora_down.weight" not in parts \
                or "lora_up.weight" not in parts:
            raise DifftuneError(f"{str(path)!r}: {key} has parts {sorted(parts)}; an SPM module has lora_down.weight, "
                                "lora_up.weight and alpha")
        ranks.add(int(parts["lora_down.weight"].shape[0]))
        alphas.add(float(parts["alpha"]) if "alpha" in parts else float(parts["lora_down.weight"].shape[0]))
    if len(ranks) != 1 or len(alphas) != 1:
        raise DifftuneError(f"{str(path)!r} mixes ranks {sorted(ranks)} / alphas {sorted(alphas)}; one SPM has one")
    cfg = SPMConfig(target_modules=[names[k] for k in groups], rank=ranks.pop(), alpha=alphas.pop(),
                    concepts=file_concepts(path) if concepts is None else list(concepts), **config)
    inject(obj, cfg, name=name, weight=weight, component=comp or None)
    adapters = {n: h.adapters[name] for n, h in hosts(module) if name in h.adapters}
    with torch.no_grad():
        for key, parts in groups.items():
            adapter = adapters[names[key]]
            for src, dst in (("lora_down.weight", adapter.spm_down), ("lora_up.weight", adapter.spm_up)):
                if parts[src].numel() != dst.numel():
                    raise DifftuneError(f"{str(path)!r}: {key}.{src} has shape {tuple(parts[src].shape)}, the layer "
                                        f"needs {tuple(dst.shape)}")
                dst.copy_(parts[src].reshape(dst.shape).to(dst.dtype))
    return name


def import_spm(checkpoint: str | Path, model: str | Path, out: str | Path, name: str = "default",
               component: str | None = None) -> Path:
    """Convert a kohya-format SPM file (official or ours) into a difftune adapter folder.

    With a text encoder in ``model`` E(c) is encoded and stored (the cosine rule of transport works); the denoiser
    itself is built on the meta device only when no text encoder is needed.
    """
    from ..generation import load_pipeline
    from ..methods.spm import encode_concepts

    concepts = file_concepts(checkpoint)
    if concepts:
        pipe = load_pipeline(model, device="cpu")
        load_spm(pipe, checkpoint, name=name, component=component)
        encode_concepts(pipe, name)
        comp, module = component_of(pipe, component)
    else:
        comp, module = denoiser_on_meta(model, component)
        load_spm(module, checkpoint, name=name, prefix=kohya_prefix(comp, guess=True))
    return save_adapter_file(module, out, name=name, base_model=str(model), component=comp)
