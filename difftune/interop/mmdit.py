"""Which layout a LoRA file addresses a model in, and the MMDiT transformers' original layouts.

A file names the denoiser's modules in one of three layouts: kohya's (``lora_unet_<module name>.lora_down.weight``),
ComfyUI's dotted one (``diffusion_model.<module path>.lora_down.weight`` or ``.lora_A.weight``) or diffusers/peft's
(``transformer.<module path>.lora_A.weight``); a file that mixes them is refused (`check_one_layout`), naming a key of
each, rather than read half. Within kohya's and ComfyUI's layouts an SD3 or Flux transformer may be named as its
original code names it: Stability AI's SD3 (`difftune.interop.sai`, ``joint_blocks``) or Black Forest Labs' Flux
(`difftune.interop.bfl`, ``double_blocks``/``single_blocks``). `read_file` maps those onto diffusers' modules of the
``transformer`` component (splitting fused layers), ComfyUI's dotted spelling
(``diffusion_model.double_blocks.0.img_attn.qkv``) as the kohya one (``lora_unet_double_blocks_0_img_attn_qkv``),
as diffusers' own Flux converter and ComfyUI read it. `kohya_layout` picks the layout an export writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DifftuneError, bad_value
from . import updates as _updates
from .bfl import BFL, BFL_PREFIX, is_bfl, is_flux_module
from .fused import Layout
from .kohya import kohya_component, safetensors_keys
from .layouts import is_attn_procs_key
from .ldm import LDM_PREFIX
from .sai import SAI, is_sai

__all__ = ["check_one_layout", "kohya_layout", "read_file"]

_LAYOUTS = {
    "kohya": "kohya's <prefix>_<module name>.<part>",
    "dotted": f"ComfyUI's {LDM_PREFIX}<module path>.<part>",
    "diffusers": "diffusers/peft's <component>.<module path>.lora_A/lora_B",
}
_DENOISERS = ("unet", "transformer", "prior")
_SHARED = "both"


def _key_layout(key: str) -> str | None:
    """The layout a key addresses the denoiser in, or None (a text encoder's key, or one no reader knows: those
    readers name it)."""
    if key.startswith(LDM_PREFIX):
        return "dotted"
    module, _, part = key.partition(".")
    if part in _updates.KOHYA_PARTS:
        return "kohya" if kohya_component(module) in (None, "unet", "transformer") else None
    if key.endswith(tuple(_updates.DIFFUSERS_PARTS)) or is_attn_procs_key(key):
        head = key.removeprefix("base_model.model.").split(".", 1)[0]
        return "diffusers" if head in _DENOISERS or head not in _updates.DIFFUSERS_COMPONENTS else None
    return None


def check_one_layout(keys: list[str], path: Any) -> None:
    """Refuse a file whose keys address the denoiser in more than one layout (module docstring), naming one key of
    each; text-encoder keys (``lora_te_*``, ``text_encoder.*``) may sit beside any of them."""
    first: dict[str, str] = {}
    for key in keys:
        layout = _key_layout(key)
        if layout is not None:
            first.setdefault(layout, key)
    if len(first) > 1:
        found = "; ".join(f"{_LAYOUTS[layout]} (e.g. {key!r})" for layout, key in first.items())
        raise DifftuneError(f"{str(path)!r} addresses the model in {len(first)} layouts: {found}. One file uses one "
                            "layout; split it, or convert one part with the tool that wrote it")


def _undot(updates: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's ``diffusion_model.<SAI/BFL path>`` keys renamed to their kohya names (``lora_unet_<path with _>``);
    others (a UNet's LDM paths) as they are."""
    out = {}
    for key, u in updates.items():
        name = key.removeprefix(LDM_PREFIX).replace(".", "_")
        out[f"{BFL_PREFIX}_{name}" if key.startswith(LDM_PREFIX) and _original(name) is not None else key] = u
    return out


def _knows(layout: Layout, name: str) -> bool:
    try:
        layout.members(name)
    except DifftuneError:
        return False
    return True


def _original(name: str) -> Layout | str | None:
    """The original layout a kohya module name without prefix belongs to: SAI or BFL by their block names (typos
    included, so that they get the layout's own error) or by a top-level layer only that layout has; `_SHARED` for
    one both have (``final_layer_*``, mapped alike); None for other names (diffusers', a UNet's)."""
    if is_sai(name):
        return SAI
    if is_bfl([f"{BFL_PREFIX}_{name}"]):
        return BFL
    owners = [layout for layout in (SAI, BFL) if _knows(layout, name)]
    return owners[0] if len(owners) == 1 else _SHARED if owners else None


def _from_original(updates: dict[str, Any], path: Any) -> tuple[Layout | None, dict[str, Any]]:
    """The original layout of a file's ``lora_unet`` modules (None: diffusers' or a UNet's names) and the modules,
    mapped onto diffusers' names where it is one. Refuses SAI beside BFL names, or either beside other names."""
    first: dict[Any, str] = {}
    for key in updates:
        layout = _original(key.removeprefix(f"{BFL_PREFIX}_")) if key.startswith(f"{BFL_PREFIX}_") else None
        first.setdefault(layout, key)
    if _SHARED in first and len(first) == 1:  # final_layer_* alone: SD3's and Flux's, mapped alike
        first = {BFL: first[_SHARED]}
    first.pop(_SHARED, None)  # beside other keys: whichever layout those are
    found = [layout for layout in first if isinstance(layout, Layout)]
    if not found:
        return None, updates
    if len(first) > 1:
        named = "; ".join(f"{x.name if isinstance(x, Layout) else 'other module names'} (e.g. {k!r})"
                          for x, k in first.items())
        raise DifftuneError(f"{str(path)!r} names the model's modules in more than one layout: {named}. One file "
                            "addresses one layout")
    return found[0], found[0].from_original(updates)


def read_file(path: str | Path) -> tuple[str, dict[str, dict[str, _updates.Update]]]:
    """`updates.read_file`, refusing mixed layouts, with an SD3 (SAI) or Flux (BFL) LoRA in the original names, kohya
    or ComfyUI's dotted spelling, read as diffusers' modules of the transformer (component ``"transformer"``, keys
    ``lora_unet_<diffusers path>``): what the importer and the exporter's check read."""
    check_one_layout(safetensors_keys(path, "a LoRA/LyCORIS .safetensors file"), path)
    fmt, out = _updates.read_file(path)
    if out.get("unet"):
        layout, modules = _from_original(_undot(out["unet"]), path)
        if layout is not None and out.get("transformer"):  # diffusers' Flux reader drops the lora_unet_* keys here
            ours, theirs = next(iter(out["unet"])), next(iter(out["transformer"]))
            raise DifftuneError(f"{str(path)!r} names the transformer in {layout.name}'s layout (e.g. {ours!r}) and "
                                f"in diffusers' (e.g. {theirs!r}). One file addresses one layout")
        if layout is not None:
            del out["unet"]
            out["transformer"] = modules
    return fmt, out


def base_transformer_class(header: dict[str, Any], model: str | Path | None = None) -> str | None:
    """The ``_class_name`` of the transformer in the adapter's base pipeline folder (``model`` or the recorded
    base), or None without a readable one."""
    base = model or header.get("base_model")
    config = Path(base or ".") / "transformer" / "config.json"
    if not base or not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # unreadable: judged by the module names
    return name if isinstance(name, str) else None


def kohya_layout(header: dict[str, Any], paths: list[str], model: str | Path | None = None,
                 prefix: str | None = None) -> Layout | None:
    """The original layout ``--format kohya`` writes a transformer adapter in: SAI's for an SD3 base, BFL's for a
    Flux base (or, with no base at hand, for an adapter of modules only Flux has: single blocks); None otherwise.

    Raises:
        DifftuneError: an MMDiT adapter (joint-block text-stream modules) without a base to tell SD3 from Flux and
            without an explicit ``prefix`` (which writes diffusers' module names under it).
    """
    cls = base_transformer_class(header, model)
    if cls == "FluxTransformer2DModel" or (cls is None and any(map(is_flux_module, paths))):
        return BFL
    if cls == "SD3Transformer2DModel":
        return SAI
    joint = [p for p in paths if ".attn.add_" in p or ".norm1_context." in p or ".ff_context." in p]
    if cls is None and joint and prefix is None and (header.get("component") or "") == "transformer":
        raise bad_value("model", None, "the base pipeline folder of this SD3 or Flux adapter",
                        f"kohya files name an MMDiT's layers as SD3's (SAI) or Flux's (BFL) original code does, and "
                        f"its modules (e.g. {joint[0]}) exist in both; pass --model DIR, or --prefix lora_unet for "
                        "diffusers' module names")
    return None
