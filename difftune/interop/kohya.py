"""kohya-ss key names: how A1111, ComfyUI, kohya sd-scripts and LyCORIS address a model's modules in a file.

A kohya file stores each adapted module's tensors as ``<kohya name>.<part>``, where the kohya name is a prefix for
the pipeline component followed by the module's path with "." replaced by "_"::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight
    └prefix─┘└─────────────── down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0 ──┘└─ part ─────┘

Module names contain "_" themselves (``down_blocks``, ``to_out``), so a kohya name cannot be split back into a
path: `kohya_names` lists the kohya names of a model's own modules, and `match_modules` looks a file's names up
there, with an error that names what it could not find. Names are those of the unadapted model (adapter hosts are
looked through), so a file maps the same way before and after adapters are injected.

The helpers here know nothing about any method: each format module (``krona.py``, ...) reads the parts it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..loading import inject
from ..methods import verbs as core
from ..methods.base import Adapter, MethodConfig
from ..methods.host import AdapterHost
from ..targeting import canonical_name

__all__ = [
    "KOHYA_COMPONENTS",
    "KOHYA_PREFIXES",
    "base_layer",
    "fill_injected",
    "group_by_module",
    "kohya_component",
    "kohya_name",
    "kohya_names",
    "kohya_prefix",
    "match_modules",
    "module_paths",
    "read_safetensors",
    "safetensors_keys",
]

#: kohya key prefix per pipeline component ("" is a bare denoiser saved without a pipeline).
KOHYA_PREFIXES = {"": "lora_unet", "unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
#: The component each prefix addresses, for reading: kohya's SDXL and SD3 scripts call the first text encoder
#: ``lora_te1``, its SD3 scripts the T5 ``lora_te3``; ``lora_transformer`` is diffusers' module names of an SD3/Flux
#: transformer (ComfyUI reads it, and diffusers' Flux converter).
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3", "lora_transformer": "transformer"}

_V = TypeVar("_V")


def kohya_prefix(component: str, prefix: str | None = None, *, guess: bool = False) -> str:
    """The key prefix for ``component``'s modules: ``prefix`` when given, else kohya's for that component.

    Args:
        component: The pipeline component (``"unet"``, ``"text_encoder"``, ...; ``""`` for a bare denoiser).
        prefix: An explicit prefix, checked and returned as is.
        guess: For a component kohya has no prefix for (e.g. ``"transformer"``), return ``lora_<component>``
            instead of raising. Readers guess; writers do not, since other tools would not find the keys.

    Returns:
        The prefix, without the joining "_".

    Raises:
        DifftuneError: ``prefix`` is empty or contains "."; or no prefix is known for ``component`` and not ``guess``.
    """
    if prefix is None:
        if component in KOHYA_PREFIXES:
            prefix = KOHYA_PREFIXES[component]
        elif guess:
            prefix = f"lora_{component}"
        else:
            raise bad_value("prefix", None, f"a kohya key prefix for the adapter's component {component!r}",
                            "e.g. prefix='lora_unet'")
    if not prefix or "." in prefix:
        raise bad_value("prefix", prefix, "a non-empty key prefix without '.'", "e.g. 'lora_unet'")
    return prefix


def kohya_name(module_name: str, prefix: str) -> str:
    """``<prefix>_<module path with "." → "_">`` for a module name (``base_layer`` hops of adapter hosts dropped)."""
    return f"{prefix}_{canonical_name(module_name).replace('.', '_')}"


def kohya_component(key: str) -> str | None:
    """The component a kohya key or name addresses by its prefix (``lora_te1_...`` → ``"text_encoder"``), or None."""
    prefix = _known_prefix(key)
    return None if prefix is None else KOHYA_COMPONENTS[prefix]


def _known_prefix(key: str) -> str | None:
    return next((p for p in KOHYA_COMPONENTS if key.startswith(p + "_")), None)


def _unadapted_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every submodule as in the unadapted model: hosts stand for their base layer."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, AdapterHost):  # its adapters are not modules of the base model
            child = child.base_layer
        yield full, child
        yield from _unadapted_modules(child, full)


def kohya_names(model: nn.Module, prefix: str) -> dict[str, str]:
    """{kohya name: module name} for every submodule of ``model`` (unadapted names), each under every spelling of
    its path that `module_paths` knows (a UNet's LDM names, a CLIP text encoder's path with and without
    ``text_model``).

    Raises:
        DifftuneError: two modules get the same kohya name (``a_b.c`` and ``a.b_c``), so no file can tell them apart.
    """
    names: dict[str, str] = {}
    for path, module_name in module_paths(model).items():
        key = kohya_name(path, prefix)
        if names.setdefault(key, module_name) != module_name:
            raise DifftuneError(f"modules {names[key]!r} and {module_name!r} of this {type(model).__name__} have "
                                f"the same kohya name {key!r}; a kohya file cannot address them")
    return names


def module_paths(model: nn.Module) -> dict[str, str]:
    """{path: module name} for every submodule of ``model`` (unadapted names) under each spelling files use.

    * its own path;
    * for a diffusers ``UNet2DConditionModel``, its LDM path (`difftune.interop.ldm`: ``input_blocks.4.1.proj_in``),
      as kohya's SDXL scripts and ComfyUI write it;
    * for a CLIP text encoder, the path with transformers 4's ``text_model`` level when the model has none
      (transformers 5 folded it into ``CLIPTextModel``; kohya files keep ``lora_te_text_model_encoder_...``) and
      without it when the model has one (files written from a transformers 5 ``CLIPTextModel``).
    """
    from .ldm import ldm_names

    own = [name for name, _ in _unadapted_modules(model)]
    paths = {name: name for name in own}
    paths.update(ldm_names(model, own))
    if type(model).__name__.startswith("CLIPTextModel"):
        if "text_model" in model._modules:
            paths.update({n.removeprefix("text_model."): n for n in own if n.startswith("text_model.")})
        else:
            paths.update({f"text_model.{n}": n for n in own})
    return paths


def match_modules(model: nn.Module, names: Iterable[str], prefix: str, source: Any = "the file") -> dict[str, str]:
    """{kohya name: module name} for the kohya ``names`` of a file, all of which must be modules of ``model``.

    Args:
        model: The model (component) the names should address.
        names: kohya module names, e.g. the keys of `group_by_module`.
        prefix: The prefix they are expected to carry (see `kohya_prefix`).
        source: What the names come from, for the error message (usually the file's path).

    Returns:
        The module name of each kohya name, in the order given.

    Raises:
        DifftuneError: some names are not modules of ``model`` under ``prefix``; the message lists the first ones and
            says which component the keys with another known prefix (``lora_te_*``, ...) belong to.
    """
    known = kohya_names(model, prefix)
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DifftuneError(f"{len(unknown)} module(s) in {str(source)!r} are not in this model under prefix "
                            f"{prefix!r}, e.g. {unknown[:3]}. Hint: {_unknown_hint(unknown, prefix)}")
    return {n: known[n] for n in names}


def _unknown_hint(unknown: list[str], prefix: str) -> str:
    """Say which component (or prefix) the keys with another known prefix belong to."""
    hints = set()
    for p in filter(None, map(_known_prefix, unknown)):
        component = KOHYA_COMPONENTS[p]
        if component != KOHYA_COMPONENTS.get(prefix):
            hints.add(f"{p}_* keys address the {component} (pass component={component!r}, or prefix={p!r} to read "
                      "them into this model)")
        elif p != prefix:
            hints.add(f"{p}_* keys address this component under another spelling: pass prefix={p!r}")
    if hints:
        return "; ".join(sorted(hints))
    return "was it made for another base model, or another component (lora_te_* keys are the text encoder)?"


def group_by_module(tensors: Mapping[str, _V]) -> dict[str, dict[str, _V]]:
    """``{"<kohya name>.<part>": v}`` → ``{kohya name: {part: v}}`` (a part may hold dots: ``lora_down.weight``).

    Raises:
        DifftuneError: a key has no "." (it names no tensor of a module).
    """
    groups: dict[str, dict[str, _V]] = {}
    for key, value in tensors.items():
        module, sep, part = key.partition(".")
        if not sep or not module or not part:
            raise DifftuneError(f"key {key!r} is not '<kohya module name>.<tensor>' (e.g. "
                                "'lora_unet_mid_block_attentions_0_proj_in.lora_down.weight'); is this a kohya file?")
        groups.setdefault(module, {})[part] = value
    return groups


def read_safetensors(path: str | Path, what: str = "a .safetensors file") -> dict[str, Tensor]:
    """Every tensor of the safetensors file at ``path`` (no pickle is ever read).

    Args:
        path: The file.
        what: What the file should be, for the error message (e.g. ``"a LoKr .safetensors file"``).

    Raises:
        DifftuneError: the file does not exist or is not a readable safetensors file.
    """
    with _open(path, what) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def safetensors_keys(path: str | Path, what: str = "a .safetensors file") -> list[str]:
    """The tensor names of the safetensors file at ``path``, without reading the tensors (see `read_safetensors`)."""
    with _open(path, what) as f:
        return list(f.keys())


def _open(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise bad_value("path", str(path), what, "the file does not exist")
    try:
        return safe_open(str(p), framework="pt")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DifftuneError(f"{p} could not be read as safetensors ({e}); only safetensors files are loaded") from e


def base_layer(
    model: nn.Module, name: str, kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    needed_by: str = "this adapter",
) -> nn.Module:
    """The layer ``name`` of ``model`` as in the unadapted model (an adapter host's ``base_layer``), of ``kinds``.

    Args:
        model: The model (component).
        name: The module's name (canonical, as `match_modules` returns it).
        kinds: The layer types the caller can handle.
        needed_by: Who needs them, for the error message (e.g. ``"Kronecker adapters"``).

    Raises:
        DifftuneError: no module ``name``, or it is not one of ``kinds``.
    """
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise DifftuneError(f"module {name!r} does not exist in this {type(model).__name__}; was the file made for "
                            "another base model?") from None
    while isinstance(layer, AdapterHost):
        layer = layer.base_layer
    if not isinstance(layer, kinds):
        need = " or ".join(k.__name__ for k in kinds)
        raise DifftuneError(f"module {name!r} is a {type(layer).__name__}; {needed_by} need {need}")
    return layer


def fill_injected(obj: Any, module: nn.Module, comp: str, config: MethodConfig, name: str, weight: float,
                  fill: Callable[[str, Adapter], None]) -> str:
    """Inject ``config`` as adapter ``name`` (into the pipeline or model ``obj``, component ``comp`` being
    ``module``) and hand each of its layers, (canonical module name, adapter), to ``fill``, which copies a file's
    tensors in (under no_grad). Nothing is kept when anything fails: the adapter is removed again."""
    inject(obj, config, name=name, weight=weight, component=comp or None, freeze_base=False)
    try:
        with torch.no_grad():
            for host_name, host in core.hosts(module):
                if name in host.adapters:
                    adapter = host.adapters[name]
                    if any(p.is_meta for p in adapter.parameters()):  # a model built on the meta device: give only
                        adapter.to_empty(device="cpu")  # the adapter memory
                    fill(canonical_name(host_name), adapter)
    except BaseException:
        core.remove(module, name)
        raise
    return name
