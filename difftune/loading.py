"""The public verbs, for a model or a whole diffusers pipeline.

Every function takes either an ``nn.Module`` (a UNet, a DiT/PixArt transformer, a text encoder) or a diffusers
``DiffusionPipeline``. For a pipeline, adapters go to the denoiser (``unet``, else ``transformer``) unless the adapter
file or ``component`` says otherwise; the management verbs (weights, fuse, delete, list) act on every component.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from . import serialization
from .adapter_checks import check_safetensors_header
from .components import denoiser_name
from .errors import DifftuneError, bad_value
from .methods import verbs
from .methods.base import MethodConfig, check_adapter_name


def _is_pipeline(obj: object) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def modules_of(obj: Any) -> dict[str, nn.Module]:
    """``{component name: module}`` for a pipeline's torch components, or ``{"": obj}`` for a module."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    if _is_pipeline(obj):
        return {k: v for k, v in obj.components.items() if isinstance(v, nn.Module)}
    raise bad_value("pipe", type(obj).__name__, "a diffusers DiffusionPipeline or a torch nn.Module")


def component_of(obj: Any, component: str | None = None) -> tuple[str, nn.Module]:
    """The (name, module) an adapter goes to: ``component`` if given, else the pipeline's denoiser."""
    if isinstance(obj, nn.Module):
        return "", obj
    mods = modules_of(obj)
    if component:
        if not isinstance(component, str) or component not in mods:
            raise bad_value("component", component, f"one of this pipeline's torch components {sorted(mods)}")
        return component, mods[component]
    name = denoiser_name(mods)
    if name is not None:
        return name, mods[name]
    raise DifftuneError(f"pipeline {type(obj).__name__} has no unet or transformer; pass `component=`")


def _holder(obj: Any, name: str) -> tuple[str, nn.Module]:
    for comp, module in modules_of(obj).items():
        if name in verbs.adapter_names(module):
            return comp, module
    raise bad_value("name", name, f"one of the loaded adapters {list(list_adapters(obj))}")


def _base_model_name(obj: Any, module: nn.Module) -> str:
    if _is_pipeline(obj):
        return str(getattr(obj, "name_or_path", "") or "")
    cfg = getattr(module, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or (cfg.get("_name_or_path", "") if isinstance(cfg, dict) else ""))


def inject(
    obj: Any, config: MethodConfig, name: str = "default", weight: float = 1.0, *, component: str | None = None,
    freeze_base: bool = True,
) -> list[str]:
    """Add a new adapter of ``config``'s method to a model or a pipeline component. See `methods.verbs.inject`."""
    _, module = component_of(obj, component)
    check_name_free(obj, name)
    return verbs.inject(module, config, name=name, weight=weight, freeze_base=freeze_base)


def check_name_free(obj: Any, name: str | None) -> None:
    """Adapter names are unique across a pipeline's components: the verbs address adapters by name alone."""
    if name is not None and check_adapter_name(name) in list_adapters(obj):
        raise DifftuneError(f"an adapter named {name!r} is already loaded (component "
                            f"{list_adapters(obj)[name]['component']!r}); pick another name or delete it first")


def save_adapter(obj: Any, path: str | Path, name: str | None = None, *, base_model: str | None = None) -> Path:
    """Save adapter ``name`` to the folder ``path`` (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``name`` may be left out when exactly one adapter is loaded. ``base_model`` defaults to the pipeline's or
    model's ``name_or_path``.
    """
    if name is None:
        loaded = list(list_adapters(obj))
        if len(loaded) != 1:
            raise bad_value("name", name, f"one of the loaded adapters {loaded}", "Say which adapter to save.")
        name = loaded[0]
    comp, module = _holder(obj, name)
    return serialization.save_adapter_file(
        module, path, name=name, base_model=base_model if base_model is not None else _base_model_name(obj, module),
        component=comp,
    )


#: Readers of other tools' adapter files (kohya, LyCORIS, diffusers), tried by `load_adapter` for a ``.safetensors``
#: without difftune metadata. `difftune.interop.importer` registers its reader when imported (``import difftune``
#: does); this module never imports it, since the importer builds on these verbs.
FOREIGN_LOADERS: list[Callable[..., str]] = []


def _is_foreign(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        check_safetensors_header(p)  # a header too large to parse cheaply: read_header refuses it, naming the file
        with safe_open(str(p), framework="pt") as f:
            return serialization.METADATA_KEY not in (f.metadata() or {})
    except (SafetensorError, OSError, DifftuneError):  # unreadable or too large: read_header reports it
        return False


def load_adapter(
    obj: Any, path: str | Path, name: str | None = None, weight: float = 1.0, *, component: str | None = None
) -> str:
    """Load a saved adapter (folder or ``.safetensors`` file) into a pipeline or model.

    Args:
        obj: a diffusers pipeline (SD, SDXL, DiT, PixArt, ...) or an nn.Module.
        path: what `save_adapter` wrote, or its ``adapter_model.safetensors`` alone; or a kohya/LyCORIS (LoRA,
            LoCon, LoHa, LoKr, full) or diffusers/peft LoRA ``.safetensors``, converted by
            `difftune.interop.importer.load_foreign` (a file for several components adds one adapter each).
        name: the adapter's name here (default: the name it was saved under).
        weight: w in ``base + Σ w_i δ_i``; change it later with `set_adapter_weights`.
        component: override the pipeline component recorded in the file.

    Returns:
        The adapter's name.
    """
    if FOREIGN_LOADERS and _is_foreign(path):  # kohya/LyCORIS/diffusers file: converted (interop.importer)
        return FOREIGN_LOADERS[0](obj, path, name=name, weight=weight, component=component)
    header = serialization.read_header(path)
    if component is None and _is_pipeline(obj):
        component = header.get("component") or None
        _check_family(obj, component, header.get("base_model"))
    _, module = component_of(obj, component)
    check_name_free(obj, name if name is not None else header.get("name") or "default")
    return serialization.load_adapter_file(module, path, name=name, weight=weight)


_DENOISER_WORDS = {"unet": "a UNet", "transformer": "a DiT transformer"}


def _check_family(pipe: Any, recorded: str | None, base_model: object) -> None:
    """An adapter made for one denoiser family (its file records ``unet`` or ``transformer``) loaded into a pipeline
    whose denoiser is the other: say so in words, instead of a list of component names."""
    here = denoiser_name(modules_of(pipe))
    if recorded not in _DENOISER_WORDS or here is None or recorded == here or recorded in modules_of(pipe):
        return
    base = f" ({Path(str(base_model)).name})" if base_model else ""
    raise DifftuneError(
        f"this adapter was made for {_DENOISER_WORDS[recorded]}{base}; this pipeline "
        f"({type(pipe).__name__})'s denoiser is {_DENOISER_WORDS.get(here, here)}: the adapter's layers do not "
        f"exist in it. Hint: load it into a pipeline of the model it was trained on"
        f"{' (' + str(base_model) + ')' if base_model else ''}")


def set_adapter_weights(obj: Any, weights: Mapping[str, float]) -> None:
    """Set each named adapter's weight, e.g. ``{"style": 0.7, "subject": 1.0}``; fused adapters are re-fused."""
    if not isinstance(weights, Mapping):
        raise bad_value("weights", weights, "a mapping {adapter name: weight}")
    for name in weights:
        _holder(obj, name)
    for module in modules_of(obj).values():
        here = {n: w for n, w in weights.items() if n in verbs.adapter_names(module)}
        if here:
            verbs.set_weights(module, here)


def _per_module(obj: Any, names: str | Sequence[str] | None, verb: Any) -> None:
    names = [names] if isinstance(names, str) else names
    if names is not None:
        for n in names:
            _holder(obj, n)
    for module in modules_of(obj).values():
        present = verbs.adapter_names(module)
        here = None if names is None else [n for n in names if n in present]
        if present and (here is None or here):
            verb(module, here)


def fuse(obj: Any, names: str | Sequence[str] | None = None) -> None:
    """Merge the adapters' weighted ΔW into the base weights, computed in fp32.

    By default every enabled weight-space adapter is fused wherever it can be (activation-space adapters, and adapters
    on compressed layers that hold no weight to write, keep running as modules: the output is the same); named
    adapters must be mergeable everywhere and enabled, and a refused fuse changes nothing.
    """
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        for module in modules_of(obj).values():
            verbs.check_mergeable(module, [n for n in wanted if n in verbs.adapter_names(module)])
    _per_module(obj, names, verbs.merge)


def unfuse(obj: Any, names: str | Sequence[str] | None = None) -> None:
    """Undo `fuse`: the original weights come back bit-identical."""
    _per_module(obj, names, verbs.unmerge)


def delete_adapter(obj: Any, names: str | Sequence[str] | None = None, *, merge: bool = False) -> None:
    """Remove adapters (all when ``names`` is None) and free their parameters; modules left without adapters get
    their original layer back, with the original weights bit for bit (fused adapters are unfused first).

    With ``merge=True`` their weighted ΔW stays baked into the base weights instead (peft's ``merge_and_unload``).
    """
    _per_module(obj, names, lambda module, here: verbs.remove(module, here, merge=merge))


def enable_adapters(obj: Any, names: str | Sequence[str] | None = None) -> None:
    _per_module(obj, names, verbs.enable)


def disable_adapters(obj: Any, names: str | Sequence[str] | None = None) -> None:
    _per_module(obj, names, verbs.disable)


def list_adapters(obj: Any) -> dict[str, dict[str, Any]]:
    """``{name: {"method", "weight", "component", "modules", "enabled", "fused"}}`` for every loaded adapter."""
    out: dict[str, dict[str, Any]] = {}
    for comp, module in modules_of(obj).items():
        for _, host in verbs.hosts(module):
            for n, adapter in host.adapters.items():
                info = out.setdefault(n, {
                    "method": adapter.config.method, "weight": host.adapter_weights[n], "component": comp or None,
                    "modules": 0, "enabled": n not in host.disabled, "fused": n in host.merged,
                })
                info["modules"] += 1
    return out


def trainable_parameter_count(obj: Any, name: str | None = None) -> int:
    """Number of adapter parameters (of adapter ``name``, or of all adapters)."""
    total = 0
    for module in modules_of(obj).values():
        if name is None or name in verbs.adapter_names(module):
            total += sum(p.numel() for p in verbs.adapter_parameters(module, name))
    return total


# The vocabulary is fuse / unfuse / delete_adapter; peft's and diffusers' words are aliases, the same functions.
merge = fuse
unmerge = unfuse
remove = delete_adapter
