"""Model-level verbs: inject, remove, merge/unmerge, weights, enable/disable, and the adapters' tensors.

Each takes the model (an nn.Module: a UNet, a transformer, a text encoder) the adapters live in; `difftune.loading`
lifts them to whole pipelines. An adapter is its per-layer parts (in `AdapterHost`s) plus, optionally, one
model-level part at ``model.difftune_parts[<name>]``, whose tensors are saved under the ``__model__.`` key prefix.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..targeting import PARTS, canonical_name, find_targets
from .base import METHODS, Adapter, MethodConfig, Site, check_adapter_name, check_weight
from .context import InputCapture
from .host import AdapterHost

#: The key prefix of model-level parts in adapter files (they live at ``model.difftune_parts``, `PARTS`).
MODEL_KEY = "__model__"
CAPTURE = "_difftune_capture"


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """(name, host) for every adapter host in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterHost):
            yield name, module


def model_parts(model: nn.Module) -> nn.ModuleDict:
    """``{adapter name: model-level module}`` (`MethodConfig.make_model_part`); empty when there are none."""
    parts = model._modules.get(PARTS)
    return parts if isinstance(parts, nn.ModuleDict) else nn.ModuleDict()


def model_part(model: nn.Module, name: str) -> nn.Module | None:
    """Adapter ``name``'s model-level module, or None."""
    parts = model_parts(model)
    return parts[name] if name in parts else None  # noqa: SIM401 (ModuleDict has no get)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in injection order."""
    seen: dict[str, None] = {}
    for _, host in hosts(model):
        seen.update(dict.fromkeys(host.adapters))
    seen.update(dict.fromkeys(model_parts(model)))
    return list(seen)


def get_config(model: nn.Module, name: str) -> MethodConfig:
    """The config adapter ``name`` was injected with."""
    for _, host in hosts(model):
        if name in host.adapters:
            return host.adapters[name].config
    parts = model_parts(model)
    if name in parts and isinstance(getattr(parts[name], "config", None), MethodConfig):
        return parts[name].config
    raise _unknown_adapter(model, name)


def _unknown_adapter(model: nn.Module, name: object) -> DifftuneError:
    return bad_value("name", name, f"one of the adapters in the model {adapter_names(model)}")


def _names(model: nn.Module, names: str | Sequence[str] | None) -> list[str]:
    existing = adapter_names(model)
    if names is None:
        return existing
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in existing:
            raise _unknown_adapter(model, n)
    return names


def _check_prefix(config: MethodConfig, module: nn.Module, where: str, prefix: str) -> None:
    """Saving filters state dicts by the method's prefix: a tensor outside it would be lost, so refuse it now."""
    stray = [k for k in module.state_dict(keep_vars=True) if not k.split(".")[0].startswith(prefix)]
    if not prefix or stray:
        raise DifftuneError(f"method {config.method!r}: {where} holds state {stray[:5]} whose names do not start with "
                            f"its prefix {prefix!r}; every saved parameter/buffer must carry the method prefix "
                            "(a bug in the method, not in your input)")


def _install_capture(model: nn.Module) -> None:
    if not isinstance(model.__dict__.get(CAPTURE), InputCapture):
        model.__dict__[CAPTURE] = InputCapture(model)


def _uninstall_capture(model: nn.Module) -> None:
    capture = model.__dict__.pop(CAPTURE, None)
    if isinstance(capture, InputCapture):
        capture.remove()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(
    model: nn.Module, config: MethodConfig, name: str = "default", weight: float = 1.0, freeze_base: bool = True
) -> list[str]:
    """Add adapter ``name`` of ``config``'s method to every module of ``model`` that ``config`` targets.

    Works on models built on the meta device (adapter tensors are created where the base weights live).

    Args:
        model: the module to adapt (a UNet, a transformer, a text encoder, or any nn.Module).
        config: a registered method's config (e.g. ``LoRAConfig(rank=4, alpha=4, target_modules=["to_q"])``).
        name: the adapter's name; several adapters can live in one model.
        weight: its weight w in ``base + Σ w_i δ_i``.
        freeze_base: make only this adapter's parameters trainable (everything else ``requires_grad=False``).

    Returns:
        The names of the adapted modules.

    Raises:
        DifftuneError: unregistered config type, bad name or weight, a name already in use, a model the method
            does not apply to (`MethodConfig.check_model`), nothing matched, or matched modules of a type the method
            does not support.
    """
    if not isinstance(config, MethodConfig) or type(config).method not in METHODS:
        raise bad_value("config", config, f"a registered method config ({sorted(METHODS)})")
    if not config.is_adapter:
        raise DifftuneError(f"method {config.method!r} trains the model itself and adds no adapter; use it through "
                            "the trainer (difftune train), not inject()")
    name, weight = check_adapter_name(name), check_weight(weight)
    if not isinstance(freeze_base, bool):
        raise bad_value("freeze_base", freeze_base, "true or false")
    if name in adapter_names(model):
        raise DifftuneError(f"an adapter named {name!r} is already in the model; pick another name or remove it first")
    config.check_model(model)
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    part = config.make_model_part(model)
    prefix = ""
    if part is not None:
        prefix = getattr(type(part), "prefix", "")  # a part declares the method's prefix as its adapters do
        _check_prefix(config, part, "its model-level part", prefix)
    planned: list[tuple[str, nn.Module, Adapter]] = []
    unsupported: dict[str, str] = {}
    for target in targets:
        module = model.get_submodule(target)
        base = module.base_layer if isinstance(module, AdapterHost) else module
        if not config.accepts(base):
            continue
        merged = module.merged[:] if isinstance(module, AdapterHost) else []
        if merged:  # a new adapter sees (and may record) the true base values, not merged ones
            module.unmerge()
        adapter = None
        try:
            adapter = config.make_adapter(base, Site(canonical_name(target), model, part))
        except DifftuneError as e:  # a per-layer refusal (e.g. shapes a method cannot split): name the layer
            raise DifftuneError(f"cannot adapt {canonical_name(target)!r}: {e}") from e
        finally:
            if merged:
                if adapter is not None:  # not in the host yet: told of the write itself (SaRA keeps M first)
                    adapter.before_base_change(base)
                module.merge(merged)
        if adapter is None:
            unsupported[canonical_name(target)] = type(base).__name__
        else:
            _check_prefix(config, adapter, f"its adapter on {canonical_name(target)!r}", type(adapter).prefix)
            if prefix and type(adapter).prefix != prefix:
                raise DifftuneError(f"method {config.method!r}: its adapters' prefix {type(adapter).prefix!r} differs "
                                    f"from its model-level part's {prefix!r} (a bug in the method)")
            planned.append((target, module, adapter))
    if not planned and not unsupported:
        raise DifftuneError(f"method {config.method!r}: none of the {len(targets)} module(s) matched by "
                            f"`target_modules`={config.target_modules} has anything it can adapt")
    if unsupported:
        examples = dict(list(unsupported.items())[:5])
        raise DifftuneError(
            f"method {config.method!r} cannot adapt {len(unsupported)} matched module(s) of unsupported type, e.g. "
            f"{examples}. Narrow `target_modules` or add `exclude_modules` for them."
        )
    if part is not None:
        if PARTS not in model._modules:
            model.add_module(PARTS, nn.ModuleDict())
        model._modules[PARTS][name] = part
        part.adapter_name = name  # a part serving per-adapter inputs (e.g. a control image each) finds its own
    for target, module, adapter in planned:
        if part is not None:
            adapter._part_ref = weakref.ref(part)
        host = module if isinstance(module, AdapterHost) else AdapterHost(module)
        host.adapters[name] = adapter
        host.adapter_weights[name] = weight
        if host is not module:
            _set_module(model, target, host)
    _install_capture(model)
    if freeze_base:
        markers = (f"adapters.{name}.", f"{PARTS}.{name}.")
        for pname, p in model.named_parameters():
            p.requires_grad_(any(pname.startswith(m) or f".{m}" in pname for m in markers))
    return [canonical_name(t) for t, _, _ in planned]


def remove(model: nn.Module, names: str | Sequence[str] | None = None, merge: bool = False) -> None:
    """Delete adapters (all when ``names`` is None); hosts left empty are replaced by their original module.

    With ``merge=True`` the adapters' weighted ΔW is baked into the base weights first (peft's ``merge_and_unload``);
    otherwise merged adapters are unmerged, so the base weights are restored exactly. Parameters are freed.
    """
    names = _names(model, names)
    if merge:
        _merge(model, names)
    # Innermost hosts first: putting back an outer host's base_layer renames the hosts nested inside it.
    for host_name, host in sorted(hosts(model), key=lambda item: -item[0].count(".")):
        gone = [n for n in names if n in host.adapters]
        if not gone:
            continue
        baked = [n for n in gone if n in host.merged]
        if merge and baked:
            # The baked adapters become part of the original, so that adapters that stay merged can still be
            # unmerged exactly down to the new base.
            host.bake(baked)
        host.unmerge(gone)
        for n in gone:
            del host.adapters[n]
            host.adapter_weights.pop(n, None)
            host.disabled.discard(n)
        host.forget_kept()  # the copies of W0 kept for fusing again (the next fuse of the others copies anew)
        if not len(host.adapters):
            _set_module(model, host_name, host.base_layer)
    parts = model_parts(model)
    for n in names:
        if n in parts:
            del parts[n]
    if PARTS in model._modules and not len(parts):
        del model._modules[PARTS]
    if not adapter_names(model):
        _uninstall_capture(model)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Write ``W0 + Σ w_i ΔW_i`` into the base weights.

    ``names=None`` merges every enabled weight-space adapter (activation-space ones keep running as modules);
    named adapters must all be mergeable and enabled. Nothing changes when the merge is refused.
    """
    _merge(model, names)


def check_mergeable(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse (naming the module) when a named adapter cannot be merged everywhere it sits, or is disabled."""
    for host_name, host in hosts(model):
        try:
            host.check_mergeable([n for n in names if n in host.adapters])
        except DifftuneError as e:
            raise DifftuneError(f"cannot merge into {canonical_name(host_name)!r}: {e}") from e


def _merge(model: nn.Module, names: str | Sequence[str] | None) -> None:  # `remove(merge=...)` shadows `merge`
    explicit = names is not None
    names = _names(model, names)
    if explicit:
        check_mergeable(model, names)
    for _, host in hosts(model):
        here = [n for n in names if n in host.adapters]
        if not explicit:  # what cannot be merged here keeps running as a module, with the same output
            here = [n for n in here if host.merge_refusal(n) is None and n not in host.disabled]
        host.merge(here)


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Restore the exact original weights for the named (default: all) merged adapters."""
    names = _names(model, names)
    for _, host in hosts(model):
        host.unmerge([n for n in names if n in host.adapters])


def set_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Set each named adapter's weight w; merged adapters are re-merged with the new weight."""
    if not isinstance(weights, Mapping):
        raise bad_value("weights", weights, "a mapping {adapter name: weight}")
    checked = {n: check_weight(w, f"weights[{n!r}]") for n, w in weights.items()}
    _names(model, list(checked))
    for _, host in hosts(model):
        touched = False
        for n, w in checked.items():
            if n in host.adapters:
                host.adapter_weights[n] = w
                touched = touched or n in host.merged
        if touched:
            host._write_merged()


def refresh(model: nn.Module) -> None:
    """Rewrite every merged adapter's values into the base weights and drop the adapters' caches and the hosts'
    copies of W0 kept after unfusing (after tensors were changed via ``.data``, which version counters do not see)."""
    for _, host in hosts(model):
        host.forget_kept()
        for adapter in host.adapters.values():
            adapter.clear_cache()
        if host.merged:
            host._write_merged()


def enable(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Re-enable adapters turned off by `disable`."""
    names = _names(model, names)
    for _, host in hosts(model):
        host.disabled.difference_update(names)


def disable(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Turn adapters off without deleting them (the model then computes the base output for them)."""
    names = _names(model, names)
    for _, host in hosts(model):
        merged = [n for n in names if n in host.merged]
        if merged:
            raise DifftuneError(f"adapter(s) {merged} are merged into the weights; unmerge before disabling")
        host.disabled.update(n for n in names if n in host.adapters)


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors keyed ``<canonical module name>.<prefixed tensor name>``."""
    out: dict[str, Tensor] = {}
    for host_name, host in hosts(model):
        if name in host.adapters:
            path = canonical_name(host_name)
            for key, tensor in host.adapters[name].state_dict().items():
                out[f"{path}.{key}"] = tensor
    parts = model_parts(model)
    if name in parts:
        out.update({f"{MODEL_KEY}.{k}": v for k, v in parts[name].state_dict().items()})
    if not out and name not in adapter_names(model):
        raise _unknown_adapter(model, name)
    return out


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Like `adapter_state_dict` but the live tensors (parameters and persistent buffers), for loading in place."""
    out: dict[str, Tensor] = {}
    for host_name, host in hosts(model):
        if name in host.adapters:
            path = canonical_name(host_name)
            # persistent state only (not caches such as indices); entries an adapter computes at save time
            # (SaRA's packed mask) come as fresh tensors, so copying into them is harmless
            for key, tensor in host.adapters[name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = tensor
    parts = model_parts(model)
    if name in parts:
        out.update({f"{MODEL_KEY}.{k}": v for k, v in parts[name].state_dict(keep_vars=True).items()})
    return out


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Parameters of the named adapter (all adapters when None)."""
    names = _names(model, name)
    params = []
    for _, host in hosts(model):
        for n in names:
            if n in host.adapters:
                params.extend(host.adapters[n].parameters())
    parts = model_parts(model)
    for n in names:
        if n in parts:
            params.extend(parts[n].parameters())
    return params


def target_fingerprint(model: nn.Module, name: str) -> dict[str, Any]:
    """Names, types and parameter shapes of the base layers adapter ``name`` sits on, hashed.

    Recorded at save time and compared at load time to tell "this adapter was made for another base model".
    """
    import hashlib

    lines = []
    for host_name, host in hosts(model):
        if name in host.adapters:
            layer = host.base_layer
            if getattr(layer, "_difftune_linear_like", False):
                # a compressed Linear (difftune.compress) stands for the Linear it replaced: an adapter trained on
                # the full-precision model loads onto its quantized copy, and the other way round
                kind, shapes = "Linear", [f"weight:{(layer.out_features, layer.in_features)}"] + (
                    [f"bias:{(layer.out_features,)}"] if getattr(layer, "bias", None) is not None else [])
            else:
                kind = type(layer).__name__
                shapes = [f"{canonical_name(k)}:{tuple(v.shape)}" for k, v in layer.named_parameters()
                          if ".adapters." not in k and not k.startswith("adapters.")]
            lines.append(f"{canonical_name(host_name)}|{kind}|{','.join(shapes)}")
    lines.sort()
    return {"modules": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
