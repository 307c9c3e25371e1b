"""DiffuseKronA (``krona``) adapters ⇄ the files other tools read: kohya/LyCORIS LoKr, full-ΔW "diff", official.

Export, `export_krona`, turns a saved difftune ``krona`` adapter into one safetensors file with kohya key names
(``<prefix>_<module path with "." → "_">``, prefix ``lora_unet`` for the UNet; see `difftune.interop.kohya`):

* ``format="lokr"``: ``<name>.lokr_w1`` = s·A (a1, a2), ``<name>.lokr_w2`` = B (b1, b2), or (b1, b2, k, k) for
  convolutions such as SD1.5's 1×1 ``proj_in``/``proj_out``, and ``<name>.alpha`` = 1. Every client rebuilds
  ΔW = kron(w1, w2); with two full factors all of them ignore alpha (scale 1), so our scale s is folded into w1.
  A1111 and ComfyUI load any split. The ``lycoris-lora`` package instead re-derives each module's split from the
  stored shapes with its own ``factorization(dim, factor)`` and fails on any other split: the export then warns
  (`KronAExportWarning`) and names the fix: ``format="diff"``, or training with ``factor_mode: lycoris``.
* ``format="diff"``: ``<name>.diff`` = ΔW itself (LyCORIS's "full" module; A1111 and ComfyUI read it too). Exact for
  every split and layout, at the size of the base layers.

Import injects a ``krona`` adapter with the same ΔW into a model or pipeline (then `difftune.save_adapter` writes
it in difftune's format; ``difftune import-krona`` does both without loading any base weights):

* `load_lokr`: LoKr files with full or low-rank (``_a``/``_b``) factors; low-rank factors are multiplied out and
  alpha/dim folded into A, a Tucker w2 (``lokr_t2``) rebuilt. DoRA and "diff" modules have no Kronecker-factor form
  and are refused.
* `load_official_krona`: checkpoints of the official code (IBM/DiffuseKronA), diffusers-LoRA-style keys
  ``unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight`` with down = Aᵀ (a2, a1) and up = B (b1, b2).
  That code computes a row-permuted P (A ⊗ B) (its output p·a1 + q is Kronecker row q·b1 + p), which no canonical
  Kronecker pair reproduces, so the adapter gets ``layout="official"``: the same function, exactly.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..architectures import denoiser_on_meta
from ..errors import DifftuneError, bad_value
from ..fileio import atomic_write
from ..loading import component_of
from ..methods.krona import KronAConfig, kron_delta, layer_dims, lycoris_factorization
from ..serialization import read_header, read_tensors, save_adapter_file
from ..targeting import canonical_name, find_targets
from ..version import __version__
from .kohya import (
    KOHYA_PREFIXES,  # noqa: F401 (kept importable from here, where it used to live)
    base_layer,
    fill_injected,
    group_by_module,
    kohya_name,
    kohya_prefix,
    match_modules,
    read_safetensors,
    safetensors_keys,
)
from .layouts import untucker

FORMATS = ("lokr", "diff")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha")
OFFICIAL_KEY = re.compile(
    r"^(?:unet\.)?(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)


class KronAExportWarning(UserWarning):
    """An exported LoKr file that A1111/ComfyUI load but the lycoris-lora package will refuse."""


# ---------------------------------------------------------------------------------------------------------------
# Export


def lycoris_split(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int]:
    """The (a1, a2) that lycoris-lora builds when it loads full factors w1 (``a_shape``) and w2 (``b_shape``).

    Mirrors ``LokrModule.make_module_from_state_dict`` (lycoris-lora 4.x): it infers a ``factor`` from the shapes
    (-1 when w1 is the balanced split, else the larger side of w1 or of w2 if that divides both dimensions and
    appears on both sides, else the smaller of the two), re-splits both dimensions with ``factorization`` and copies
    the stored tensors in, which fails unless the split is the same. The tests compare this with lycoris-lora itself.
    """
    a1, a2 = a_shape
    b1, b2 = b_shape[:2]
    d_out, d_in = a1 * b1, a2 * b2
    if (a1, a2) == (lycoris_factorization(d_out)[0], lycoris_factorization(d_in)[0]):
        factor = -1
    else:
        factor1, factor2 = max(a_shape), max(b_shape)  # LyCORIS takes max over all of w2's dims, kernel included
        for f in (factor1, factor2):
            if d_out % f == 0 and d_in % f == 0 and f in (a1, b1) and f in (a2, b2):
                factor = f
                break
        else:
            factor = min(factor1, factor2)
    return lycoris_factorization(d_out, factor)[0], lycoris_factorization(d_in, factor)[0]


def export_krona(
    adapter: str | Path, out: str | Path, format: str = "lokr", prefix: str | None = None, dtype: str | None = None
) -> Path:
    """Write a saved ``krona`` adapter as a kohya-named LoKr (``format="lokr"``) or full-ΔW (``"diff"``) file.

    Args:
        adapter: a folder written by `difftune.save_adapter` (or its ``adapter_model.safetensors``).
        out: the ``.safetensors`` file to write (atomically).
        format: "lokr" (factors: small; loads in A1111/ComfyUI, and in lycoris-lora for LyCORIS's own splits) or
            "diff" (ΔW = s·A⊗B per module: exact everywhere, as large as the adapted layers).
        prefix: kohya key prefix; default from the adapter's component (``lora_unet`` for the UNet).
        dtype: "float32", "float16" or "bfloat16" (default: the adapter's own dtype).

    Returns:
        The file written.

    Raises:
        DifftuneError: not a ``krona`` adapter, unknown format/dtype/component, or ``format="lokr"`` for an
            adapter in the official DiffuseKronA layout (only its full ΔW describes it).

    Warns:
        KronAExportWarning: ``format="lokr"`` and some module's split is not the one lycoris-lora derives, so that
            package will refuse the file (A1111 and ComfyUI still load it).
    """
    header = read_header(adapter)
    if header["method"] != "krona":
        raise bad_value("adapter", str(adapter), "a difftune 'krona' adapter",
                        f"this one is a {header['method']!r} adapter; only DiffuseKronA adapters export to LoKr")
    if format not in FORMATS:
        raise bad_value("format", format, f"one of {FORMATS}")
    if dtype is not None and dtype not in DTYPES:
        raise bad_value("dtype", dtype, f"one of {sorted(DTYPES)} or unset (the adapter's own dtype)")
    config = KronAConfig.from_dict(header.get("config", {}))
    component = header.get("component") or ""
    prefix = kohya_prefix(component, prefix)
    if format == "lokr" and config.layout == "official":
        raise bad_value("format", format, "'diff' for an adapter in the official DiffuseKronA layout",
                        "that code's row-permuted P(A⊗B) is no Kronecker product of any factor pair, so only the "
                        "full ΔW describes it exactly")
    factors = _factors(read_tensors(adapter), adapter)
    out_dtype = DTYPES[dtype] if dtype else next(iter(factors.values()))[0].dtype
    tensors: dict[str, Tensor] = {}
    refused: list[str] = []
    for module, (a, b) in factors.items():
        key = kohya_name(module, prefix)
        if format == "diff":
            tensors[f"{key}.diff"] = kron_delta(a, b, config.scale, config.layout == "official").to(out_dtype)
            continue
        tensors[f"{key}.lokr_w1"] = (a.float() * config.scale).to(out_dtype)  # s folded in: full factors → scale 1
        tensors[f"{key}.lokr_w2"] = b.to(out_dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(1.0, dtype=out_dtype)  # ignored by every client for full factors
        if lycoris_split(tuple(a.shape), tuple(b.shape)) != tuple(a.shape):
            refused.append(module)
    if refused:
        a, b = factors[refused[0]]
        expected = lycoris_split(tuple(a.shape), tuple(b.shape))
        warnings.warn(
            f"{len(refused)} of {len(factors)} modules use a Kronecker split that the lycoris-lora package cannot "
            f"load (e.g. {refused[0]}: A {tuple(a.shape)} ⊗ B {tuple(b.shape)}, where lycoris-lora builds A "
            f"{expected}). A1111 and ComfyUI load {str(out)!r} as is; for lycoris-lora export format='diff' (the "
            "exact full ΔW, larger) or train with factor_mode: lycoris.",
            KronAExportWarning, stacklevel=2,
        )
    source = {"method": "krona", "format": format, "difftune_version": __version__, "config": config.to_dict(),
              "base_model": header.get("base_model", ""), "component": component}
    metadata = {"format": "pt", "difftune_export": json.dumps(source, sort_keys=True)}
    return atomic_write(Path(out), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _factors(tensors: dict[str, Tensor], path: Any) -> dict[str, tuple[Tensor, Tensor]]:
    """{module: (A, B)} from a difftune krona adapter's ``<module>.krona_A`` / ``<module>.krona_B`` tensors."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        module, _, param = key.rpartition(".")
        out.setdefault(module, {})[param] = value
    broken = [m for m, p in out.items() if set(p) != {"krona_A", "krona_B"}]
    if broken or not out:
        raise DifftuneError(f"{str(path)!r} does not hold krona_A/krona_B pairs (e.g. {broken[:3]}); re-save it")
    return {m: (p["krona_A"], p["krona_B"]) for m, p in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# Import


def load_lokr(
    obj: Any, path: str | Path, name: str = "default", weight: float = 1.0, *, component: str | None = None,
    prefix: str | None = None,
) -> str:
    """Inject the LoKr file at ``path`` as a ``krona`` adapter with the same ΔW.

    Args:
        obj: a diffusers pipeline or an nn.Module (the denoiser).
        path: a kohya-named LoKr ``.safetensors`` (``<prefix>_<module>.lokr_w1`` ...).
        name: the adapter's name; weight: its weight w.
        component: the pipeline component (default: the denoiser).
        prefix: kohya key prefix (default from the component: ``lora_unet`` for the UNet).

    Returns:
        The adapter's name.

    Raises:
        DifftuneError: keys for modules the model lacks, Tucker/DoRA/diff modules, factor shapes that do not
            multiply to the layer's weight, or splits that no single `KronAConfig` describes.
    """
    groups = group_by_module(read_safetensors(path, "a LoKr .safetensors file"))
    comp, module = component_of(obj, component)
    names = match_modules(module, groups, kohya_prefix(comp, prefix, guess=True), source=path)
    factors = {names[k]: _lokr_factors(k, parts, _base_layer(module, names[k])) for k, parts in groups.items()}
    return inject_factors(obj, module, comp, factors, name, weight, layout="canonical", path=path)


def load_official_krona(
    obj: Any, path: str | Path, name: str = "default", weight: float = 1.0, *, component: str | None = None
) -> str:
    """Inject a checkpoint of the official DiffuseKronA code as a ``krona`` adapter computing the same function.

    The file is what its training scripts write (diffusers ``save_lora_weights``): keys
    ``unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight``, down = Aᵀ of shape (a2, a1), up = B of
    shape (b1, b2). The official forward is y = P (A ⊗ B) x with P the perfect shuffle that sends Kronecker row
    q·b1 + p to output p·a1 + q, so the adapter is injected with ``layout="official"``.

    Returns:
        The adapter's name.

    Raises:
        DifftuneError: keys of another kind (text encoder, LoRA), modules the model lacks, shapes that do not form a
            Kronecker split of the layer.
    """
    tensors = read_safetensors(path, "an official DiffuseKronA .safetensors checkpoint")
    comp, module = component_of(obj, component)
    pairs: dict[str, dict[str, Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        match = OFFICIAL_KEY.match(key)
        if match is None:
            foreign.append(key)
            continue
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        pairs.setdefault(f"{match['module']}.{proj}", {})[match["part"]] = value
    if foreign:
        raise DifftuneError(
            f"{len(foreign)} key(s) of {str(path)!r} are not official DiffuseKronA UNet keys, e.g. {foreign[:3]}; "
            "expected 'unet.<attention path>.processor.to_{q,k,v,out}_lora.{down,up}.weight' (text-encoder KronA "
            "is not supported)"
        )
    factors = {}
    for module_name, parts in pairs.items():
        if set(parts) != {"down", "up"}:
            raise DifftuneError(f"{str(path)!r}: {module_name} has only {sorted(parts)}; a module needs down and up")
        layer = _base_layer(module, module_name)
        d_out, d_in, kernel = layer_dims(layer)
        down, up = parts["down"], parts["up"]
        if kernel or down.dim() != 2 or up.dim() != 2 or down.shape[1] * up.shape[0] != d_out \
                or down.shape[0] * up.shape[1] != d_in:
            raise DifftuneError(
                f"{str(path)!r}: {module_name}: down {tuple(down.shape)} and up {tuple(up.shape)} are no Kronecker "
                f"split of its {type(layer).__name__} weight {(d_out, d_in, *kernel)} (expected down (a2, a1), up "
                "(d_out/a1, d_in/a2)). A LoRA checkpoint of the official code loads with pipe.load_lora_weights."
            )
        factors[module_name] = (down.T.contiguous(), up)  # down is nn.Linear(a1, a2).weight = Aᵀ
    return inject_factors(obj, module, comp, factors, name, weight, layout="official", path=path)


def detect_format(path: str | Path) -> str:
    """"lokr" or "official" from a checkpoint's key names."""
    keys = safetensors_keys(path, "a .safetensors checkpoint")
    if any(".lokr_w1" in k for k in keys):
        return "lokr"
    if keys and all(OFFICIAL_KEY.match(k) for k in keys):
        return "official"
    raise DifftuneError(f"{str(path)!r} is neither a LoKr file (*.lokr_w1 keys) nor an official DiffuseKronA "
                        f"checkpoint (*.processor.to_q_lora.down.weight keys); first keys: {keys[:3]}")


def import_krona(
    checkpoint: str | Path, model: str | Path, out: str | Path, format: str = "auto", name: str = "default",
    component: str | None = None,
) -> Path:
    """Convert a LoKr file or an official DiffuseKronA checkpoint into a difftune adapter folder.

    Only ``model``'s config is read (the denoiser is built on the meta device for names and shapes), so this runs
    without loading gigabytes of weights; the folder records ``model`` as the base and its target fingerprint.
    """
    if format not in ("auto", "lokr", "official"):
        raise bad_value("format", format, "one of ('auto', 'lokr', 'official')")
    format = detect_format(checkpoint) if format == "auto" else format
    comp, module = denoiser_on_meta(model, component)
    if format == "lokr":
        load_lokr(module, checkpoint, name=name, prefix=kohya_prefix(comp, guess=True))
    else:
        load_official_krona(module, checkpoint, name=name)
    return save_adapter_file(module, out, name=name, base_model=str(model), component=comp)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _base_layer(module: nn.Module, name: str) -> nn.Module:
    return base_layer(module, name, needed_by="Kronecker adapters")


def _lokr_factors(key: str, parts: dict[str, Tensor], layer: nn.Module) -> tuple[Tensor, Tensor]:
    """(A, B) with s·A⊗B = the LoKr module's ΔW: low-rank factors multiplied out, alpha/dim folded into A (a Tucker
    w2, ``lokr_t2``, is rebuilt densely with its α / r: `layouts.untucker`)."""
    extra = sorted(set(parts) - set(LOKR_KEYS) - {"lokr_t2"})
    parts = untucker(key, parts) if not extra else parts
    if extra:
        why = {"lokr_t1": "Tucker-decomposed w1", "dora_scale": "DoRA",
               "diff": "a full ΔW module", "lora_down.weight": "a LoRA module"}
        kinds = sorted({why.get(e, f"unknown key {e!r}") for e in extra})
        raise DifftuneError(f"{key}: {', '.join(kinds)} has no Kronecker-factor form; only LoKr modules with "
                            "lokr_w1[_a/_b] and lokr_w2[_a/_b] import")
    d_out, d_in, kernel = layer_dims(layer)
    w1 = parts.get("lokr_w1")
    if w1 is None and {"lokr_w1_a", "lokr_w1_b"} <= set(parts):
        w1 = parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    w2 = parts.get("lokr_w2")
    if w2 is None and {"lokr_w2_a", "lokr_w2_b"} <= set(parts):
        w2 = parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float()  # (b1, b2·k·k) for convs
    if w1 is None or w2 is None or w1.dim() != 2:
        raise DifftuneError(f"{key}: needs lokr_w1 (or lokr_w1_a + lokr_w1_b) and lokr_w2 (or lokr_w2_a + lokr_w2_b)")
    a1, a2 = w1.shape
    numel = (d_out // max(a1, 1)) * (d_in // max(a2, 1)) * int(torch.Size(kernel).numel())
    if d_out % a1 or d_in % a2 or w2.shape[0] != d_out // a1 or w2.numel() != numel:
        raise DifftuneError(f"{key}: w1 {tuple(w1.shape)} ⊗ w2 {tuple(w2.shape)} does not make the "
                            f"{type(layer).__name__} weight {(d_out, d_in, *kernel)}")
    scale = 1.0
    rank_part = parts.get("lokr_w1_a", parts.get("lokr_w2_a"))
    if rank_part is not None:  # LyCORIS/ComfyUI/A1111: a low-rank factor brings the scale alpha / dim
        dim = rank_part.shape[1]
        alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else dim
        scale = alpha / dim
    return w1.float() * scale, w2.float().reshape(d_out // a1, d_in // a2, *kernel)


def _leaf(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def inject_factors(
    obj: Any, module: nn.Module, comp: str, factors: dict[str, tuple[Tensor, Tensor]], name: str, weight: float,
    layout: str, path: Any,
) -> str:
    """Inject a krona adapter over exactly ``factors``' modules and copy the factors in (nothing kept on failure)."""
    config_fields = _split_rule(factors, module, path)
    wanted = set(factors)
    # Short patterns ("to_q", "to_out.0") when they select exactly these modules, so the saved config reads well.
    names = (canonical_name(n) for n, _ in module.named_modules())
    in_model_order = list(dict.fromkeys(n for n in names if n in wanted))
    leaves = list(dict.fromkeys(_leaf(n) for n in in_model_order))
    try:
        selected = {canonical_name(t) for t in find_targets(module, leaves)}
    except DifftuneError:
        selected = set()
    targets = leaves if selected == wanted else in_model_order
    config = KronAConfig(target_modules=targets, layout=layout, **config_fields)

    def fill(layer: str, adapter: Any) -> None:
        a, b = factors[layer]
        adapter.krona_A.copy_(a)
        adapter.krona_B.copy_(b)

    return fill_injected(obj, module, comp, config, name, weight, fill)


def _split_rule(factors: dict[str, tuple[Tensor, Tensor]], module: nn.Module, path: Any) -> dict[str, Any]:
    """The `KronAConfig` fields that reproduce every module's (a1, a2): one fixed pair, or LyCORIS's rule."""
    splits = {n: tuple(a.shape) for n, (a, _) in factors.items()}
    distinct = sorted(set(splits.values()))
    if len(distinct) == 1:
        return {"a1": distinct[0][0], "a2": distinct[0][1]}
    dims = {n: layer_dims(_base_layer(module, n))[:2] for n in factors}
    for f in (-1, *sorted({x for s in distinct for x in s})):
        if all((lycoris_factorization(do, f)[0], lycoris_factorization(di, f)[0]) == splits[n]
               for n, (do, di) in dims.items()):
            return {"factor_mode": "lycoris", "factor": f}
    raise DifftuneError(
        f"{str(path)!r} splits its modules in {len(distinct)} different ways (e.g. {distinct[:4]}) that neither one "
        "(a1, a2) nor LyCORIS's factorization rule describes, so no single KronAConfig reproduces it"
    )
