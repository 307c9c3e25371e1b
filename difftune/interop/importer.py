"""Other tools' adapter files → difftune adapters: kohya LoRA/LoCon, LyCORIS LoHa/LoKr/full, diffusers/peft LoRA.

`load_foreign` injects a file into a pipeline or model (`difftune.load_adapter` calls it for any ``.safetensors``
that is not a difftune adapter), `import_file` converts it into difftune adapter folders without loading base
weights. What each module becomes (the same ΔW, so it combines with SaRA/KronA/SPM/SCEdit adapters as any other):

=====================================  =============================================================================
file module                            difftune adapter
=====================================  =============================================================================
kohya / LoCon ``lora_down/up/alpha``   ``lora`` (same rank and α when the file has one of each: bit-identical ΔW;
diffusers/peft ``lora_A/lora_B``       otherwise ranks are zero-padded to the largest and each α/r folded into B)
+ ``dora_scale`` / peft                ``lora`` with ``use_dora`` (the magnitude as is; every module of the
``lora_magnitude_vector``              component must have one)
LyCORIS LoHa ``hada_w{1,2}_{a,b}``     ``loha`` (same rank and α when shared, else zero-padded and α/r folded into
                                       W1a); in a file that also has LoRA modules, each LoHa becomes its exactly
                                       equal rank-r² LoRA (`loha_as_low_rank`) and the component one ``lora``
LyCORIS LoKr ``lokr_w1/lokr_w2``       ``krona`` (A = w1, B = w2; low-rank factors multiplied out); full ``diff``
                                       modules beside them become 1 ⊗ diff
LyCORIS full ``diff``/``diff_b``,      ``diff``: a dense Δ per parameter (`difftune.methods.diff`), exactly the file's;
norms ``w_norm``/``b_norm``            LoRA/LoHa/LoKr modules in the same component are multiplied out into it
=====================================  =============================================================================

Tucker cores (``hada_t1/t2``, ``lokr_t2``, ``lora_mid``) are folded into the plain forms (`layouts.untucker`); the
module names may be diffusers', LDM's (kohya's SDXL scripts, ComfyUI's ``diffusion_model.`` keys: `ldm`) or a CLIP
encoder's with or without ``text_model``; diffusers ≤ 0.20 attention-processor keys read as peft's. DoRA on
LoHa/LoKr, LoKr's ``lokr_t1``, ``scalar``, OFT and whole replaced weights have no difftune adapter form and are
refused by name; so are keys for modules the model does not have, and keys of no known kind. Nothing is dropped.

A file holding several components (kohya ``lora_unet_*`` + ``lora_te_*``) becomes one adapter per component: the
denoiser's is called ``name``, the others ``name_<component>`` (e.g. ``style_text_encoder``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..components import denoiser_name
from ..errors import DifftuneError, bad_value
from ..loading import FOREIGN_LOADERS, check_name_free, component_of, modules_of
from ..methods import verbs as core
from ..methods.diff import DiffConfig
from ..methods.krona import layer_dims
from ..methods.loha import LoHaConfig
from ..methods.lora import LoRAConfig
from ..serialization import save_adapter_file
from ..targeting import canonical_name
from .kohya import KOHYA_COMPONENTS, base_layer, fill_injected, match_modules, module_paths
from .krona import inject_factors
from .ldm import LDM_PREFIX
from .mmdit import read_file  # updates.read_file; SD3's/Flux's original names mapped to diffusers'
from .updates import Dense, Hadamard, Kron, LowRank, Update


def load_foreign(obj: Any, path: str | Path, name: str | None = None, weight: float = 1.0, *,
                 component: str | None = None) -> str:
    """Inject the kohya/LyCORIS/diffusers file at ``path`` as difftune adapter(s) with the same ΔW.

    Args:
        obj: a diffusers pipeline or an nn.Module.
        path: the ``.safetensors`` file.
        name: the adapter's name (default "default"); other components get ``<name>_<component>``.
        weight: the adapters' weight w.
        component: the pipeline component for a file that names none (a bare peft file) or for a module ``obj``.

    Returns:
        The name of the denoiser's adapter (the only one for a one-component file).

    Raises:
        DifftuneError: unknown keys, keys for modules the model lacks (listed), parts without a difftune form,
            a module ``obj`` given a file for several components.
    """
    try:
        return _load_foreign(obj, path, name or "default", weight, component)
    except DifftuneError as e:  # say first what kind of file this was taken for
        raise DifftuneError(f"{str(path)!r} was not written by difftune; read as a kohya/LyCORIS/diffusers file: "
                            f"{e}") from None


def _load_foreign(obj: Any, path: str | Path, name: str, weight: float, component: str | None) -> str:
    fmt, groups = read_file(path)
    if isinstance(obj, nn.Module):
        if len(groups) > 1:
            raise DifftuneError(f"{str(path)!r} holds adapters for components {sorted(groups)}; load it into the "
                                "whole pipeline (each component gets its own adapter)")
        targets = {next(iter(groups)): ("", obj)}
        denoiser = ""
    else:
        if component is not None and len(groups) > 1:
            raise bad_value("component", component, "unset for a file naming its components",
                            f"{str(path)!r} holds keys for {sorted(groups)}")
        targets = {c: component_of(obj, component or c or None) for c in groups}
        denoiser = denoiser_name(modules_of(obj)) or ""
    comps = [comp for comp, _ in targets.values()]
    if len(set(comps)) != len(comps):
        raise DifftuneError(f"{str(path)!r} addresses the component {comps} twice (under two key prefixes)")
    names = {c: name if len(groups) == 1 or comp == denoiser else f"{name}_{comp}"
             for c, (comp, _) in targets.items()}
    for n in names.values():
        check_name_free(obj, n)
    loaded: list[tuple[nn.Module, str]] = []
    try:
        for c, updates in groups.items():
            comp, module = targets[c]
            load_updates(obj if comp else module, module, comp, fmt, updates, names[c], weight, path)
            loaded.append((module, names[c]))
    except BaseException:
        for module, n in loaded:
            core.remove(module, n)
        raise
    main = next((c for c, (comp, _) in targets.items() if comp == denoiser), next(iter(groups)))
    return names[main]


def resolve_modules(module: nn.Module, comp: str, fmt: str, keys: list[str], path: Any) -> dict[str, str]:
    """{file key: module name in ``module``}; keys naming no module are an error listing them.

    kohya keys (``lora_unet_<path with _>``) are looked up among the model's kohya names; module paths (diffusers/peft
    keys, ComfyUI's ``diffusion_model.<path>``) among its paths. Both know a UNet's LDM names and a CLIP text
    encoder's paths with and without ``text_model`` (`kohya.module_paths`).
    """
    kohya = [k for k in keys if fmt == "kohya" and not k.startswith(LDM_PREFIX)]
    out = {}
    if kohya:
        prefixes = {next((p for p in KOHYA_COMPONENTS if k.startswith(p + "_")), k.split("_", 1)[0]) for k in kohya}
        prefix = sorted(prefixes)[0] if len(prefixes) == 1 else ("lora_unet" if comp in ("", "unet") else "lora_te")
        if prefix not in KOHYA_COMPONENTS:  # e.g. LyCORIS's own "lycoris_" prefix: the denoiser
            prefix = next(iter(prefixes))
        out.update(match_modules(module, kohya, prefix, source=path))
    known = module_paths(module) if len(out) < len(keys) else {}
    unknown = []
    for k in keys:
        if k in out:
            continue
        p = k.removeprefix(LDM_PREFIX) if fmt == "kohya" else k
        if p in known:
            out[k] = known[p]
        else:
            unknown.append(k)
    if unknown:
        raise DifftuneError(f"{len(unknown)} module(s) in {str(path)!r} are not in this {type(module).__name__}"
                            f"{f' ({comp})' if comp else ''}, e.g. {unknown[:3]}; was it made for another base "
                            "model or component?")
    return {k: out[k] for k in keys}


def load_updates(obj: Any, module: nn.Module, comp: str, fmt: str, updates: dict[str, Update], name: str,
                 weight: float, path: Any) -> str:
    """Inject ``updates`` (file key → update) into ``module`` as one adapter ``name``."""
    modules = resolve_modules(module, comp, fmt, list(updates), path)
    by_module = {modules[k]: u for k, u in updates.items()}
    kinds = {type(u).__name__ for u in by_module.values()}
    if kinds == {"Hadamard"}:
        return _load_loha(obj, module, comp, by_module, name, weight, path)
    if kinds <= {"LowRank", "Hadamard"}:  # one method per component: a LoHa is exactly a rank-r² LoRA
        lora = {m: u.as_low_rank() if isinstance(u, Hadamard) else u for m, u in by_module.items()}
        return _load_lora(obj, module, comp, lora, name, weight, path)
    if "Kron" in kinds and kinds <= {"Kron", "Dense"} and all(_plain_diff(module, m, u) for m, u in by_module.items()):
        factors = {m: _kron_factors(m, u, base_layer(module, m, needed_by="LoKr/full modules"), path)
                   for m, u in by_module.items()}  # a weight diff on a Linear/Conv2d is 1 ⊗ diff
        return inject_factors(obj, module, comp, factors, name, weight, layout="canonical", path=path)
    # full diffs alone, or any mix with bias/norm diffs: one `diff` adapter holding each module's dense ΔW
    return _load_diff(obj, module, comp, by_module, name, weight, path)


def _plain_diff(module: nn.Module, name: str, update: Update) -> bool:
    """Whether ``update`` is a Kronecker product, or a weight-only diff of a Linear/Conv2d (a 1 ⊗ diff)."""
    if isinstance(update, Kron):
        return True
    if not isinstance(update, Dense) or update.norm or set(update.params) != {"weight"}:
        return False
    try:
        base_layer(module, name)
    except DifftuneError:
        return False
    return True


def _load_diff(obj: Any, module: nn.Module, comp: str, updates: dict[str, Update], name: str, weight: float,
               path: Any) -> str:
    """One ``diff`` adapter: each module's dense Δ per parameter (LoRA/LoHa/LoKr modules multiplied out in fp32)."""
    dora = sorted(m for m, u in updates.items() if isinstance(u, LowRank) and u.magnitude is not None)
    if dora:
        raise DifftuneError(f"{str(path)!r}: DoRA modules (e.g. {dora[0]}) beside full/norm diffs in one component; "
                            "a DoRA's ΔW depends on the base weights, so it cannot join the dense diff adapter the "
                            "other modules need. Split the file (DoRA modules alone import as a DoRA LoRA)")
    deltas = {m: u.delta() for m, u in updates.items()}
    params = [p for p in ("weight", "bias") if any(p in d for d in deltas.values())]
    params += sorted({p for d in deltas.values() for p in d} - set(params))
    config = DiffConfig(target_modules=_targets(module, updates), params=params)

    def fill(layer: str, adapter: Any) -> None:
        delta = deltas[layer]
        missing = sorted(set(delta) - set(adapter.pnames))
        if missing:
            raise DifftuneError(f"{str(path)!r}: {layer}: the file changes {missing}, which this "
                                f"{type(base_layer(module, layer, kinds=(nn.Module,))).__name__} does not have")
        for p in adapter.pnames:
            dst = adapter.diff(p)
            value = delta.get(p)
            if value is None:  # another module of the file changes this parameter, this one does not
                dst.zero_()
            elif value.numel() != dst.numel():
                raise DifftuneError(f"{str(path)!r}: {layer}: Δ{p} has shape {tuple(value.shape)}, the layer's {p} "
                                    f"{tuple(dst.shape)}")
            else:
                dst.copy_(value.reshape(dst.shape).to(dst.dtype))

    return fill_injected(obj, module, comp, config, name, weight, fill)


def _kron_factors(module: str, update: Kron | Dense, layer: nn.Module, path: Any) -> tuple[Tensor, Tensor]:
    """(A, B) with A ⊗ B = the update's ΔW for ``layer`` (a full diff is A = [[1]], B = diff)."""
    d_out, d_in, kernel = layer_dims(layer)
    if isinstance(update, Dense):  # a weight-only diff (`_plain_diff`)
        w1, w2 = torch.ones(1, 1), update.params["weight"].float()
    else:
        w1, w2 = update.w1.float(), update.w2.float()
    a1, a2 = w1.shape
    numel = (d_out // max(a1, 1)) * (d_in // max(a2, 1)) * int(torch.Size(kernel).numel())
    if d_out % a1 or d_in % a2 or w2.shape[0] != d_out // a1 or w2.numel() != numel:
        raise DifftuneError(f"{str(path)!r}: {module}: w1 {tuple(w1.shape)} ⊗ w2 {tuple(w2.shape)} does not make its "
                            f"{type(layer).__name__} weight {(d_out, d_in, *kernel)}")
    return w1, w2.reshape(d_out // a1, d_in // a2, *kernel)


def _load_lora(obj: Any, module: nn.Module, comp: str, updates: dict[str, LowRank], name: str, weight: float,
               path: Any) -> str:
    """One ``lora`` adapter over ``updates``' modules: the file's own rank/α when shared, else padded and folded."""
    dora = sum(u.magnitude is not None for u in updates.values())
    if dora not in (0, len(updates)):
        raise DifftuneError(f"{str(path)!r}: {dora} of the component's {len(updates)} LoRA modules are DoRA (with a "
                            "magnitude); difftune gives a component one adapter, all DoRA or none. Split the file")
    ranks = {u.rank for u in updates.values()}
    stated = {(u.alpha, u.rslora) for u in updates.values()}
    shared = len(ranks) == 1 and len(stated) == 1 and None not in {a for a, _ in stated}
    if shared:
        alpha, rslora = next(iter(stated))
        config = LoRAConfig(target_modules=_targets(module, updates), rank=ranks.pop(), alpha=alpha,
                            use_rslora=rslora, use_dora=bool(dora))
        shared = all(config.scale == u.scale for u in updates.values())
    if not shared:  # zero rows/columns add nothing to U D; each module's own α/r goes into its U
        r = max(u.rank for u in updates.values())
        config = LoRAConfig(target_modules=_targets(module, updates), rank=r, alpha=float(r), use_dora=bool(dora))

    def fill(layer: str, adapter: Any) -> None:
        u = updates[layer]
        up = u.up.float() if shared else u.up.float() * u.scale
        _copy_factor(adapter.lora_A, u.down.float(), 0, layer, "down", path)
        _copy_factor(adapter.lora_B, up, 1, layer, "up", path)
        if u.magnitude is not None:  # (d_out,) from any file layout → this adapter's (peft's) shape
            m = adapter.lora_magnitude_vector
            if u.magnitude.numel() != m.numel():
                raise DifftuneError(f"{str(path)!r}: {layer}: a DoRA magnitude of {u.magnitude.numel()} values for "
                                    f"{m.numel()} output channels")
            m.copy_(u.magnitude.reshape(m.shape).to(m.dtype))

    return fill_injected(obj, module, comp, config, name, weight, fill)


def _load_loha(obj: Any, module: nn.Module, comp: str, updates: dict[str, Hadamard], name: str, weight: float,
               path: Any) -> str:
    """One ``loha`` adapter: the file's rank and α when shared, else zero-padded ranks and each α/r folded into W1a."""
    ranks = {u.rank for u in updates.values()}
    alphas = {u.alpha for u in updates.values()}
    shared = len(ranks) == 1 and len(alphas) == 1
    r = max(ranks)
    config = LoHaConfig(target_modules=_targets(module, updates), rank=r,
                        alpha=float(next(iter(alphas))) if shared else float(r))

    def fill(layer: str, adapter: Any) -> None:
        u = updates[layer]
        w1a = u.w1a.float() if shared else u.w1a.float() * (u.scale / config.scale)
        for what, src, rank_dim in (("hada_w1_a", w1a, 1), ("hada_w1_b", u.w1b, 0), ("hada_w2_a", u.w2a, 1),
                                    ("hada_w2_b", u.w2b, 0)):
            _copy_factor(getattr(adapter, what), src.float(), rank_dim, layer, what, path)

    return fill_injected(obj, module, comp, config, name, weight, fill)


def _copy_factor(dst: Tensor, src: Tensor, rank_dim: int, module: str, what: str, path: Any) -> None:
    """Copy a file factor into an adapter's, zero-padding the rank dimension (``src`` may be flattened)."""
    r = src.shape[rank_dim]
    view = dst.narrow(rank_dim, 0, r)
    if src.numel() != view.numel():
        raise DifftuneError(f"{str(path)!r}: {canonical_name(module)}: {what} has shape {tuple(src.shape)}, the "
                            f"layer needs {tuple(view.shape)}")
    dst.zero_()
    view.copy_(src.reshape(view.shape).to(dst.dtype))


def _targets(module: nn.Module, updates: dict[str, Any]) -> list[str]:
    """The adapted modules' full names in model order, as exact patterns: a name that is also the dotted end of
    another module's (Flux's top-level ``proj_out`` and its single blocks' ``…proj_out``) is written as an anchored
    regex, since a plain target name selects every module it ends."""
    names = list(dict.fromkeys(canonical_name(n) for n, _ in module.named_modules()))
    ends = {n.split(".", i)[i] for n in names for i in range(1, n.count(".") + 1)}
    return [f"^{re.escape(n)}$" if n in ends else n for n in names if n in updates]


# ---------------------------------------------------------------------------------------------------------------
# Without base weights


def component_on_meta(model: str | Path, component: str) -> nn.Module:
    """Component ``component`` of the local pipeline folder ``model``, built from its config on the meta device."""
    import json

    from ..architectures import denoiser_on_meta

    index = Path(model) / "model_index.json"
    if not index.is_file():
        raise bad_value("model", str(model), "a local diffusers pipeline folder (holding model_index.json)")
    entries = json.loads(index.read_text())
    entry = entries.get(component)
    if not isinstance(entry, list) or len(entry) != 2:
        raise bad_value("component", component, f"a model component of {model} ({sorted(entries)})")
    if entry[0] == "transformers":
        import transformers

        cls = getattr(transformers, entry[1], None)
        if cls is None:
            raise bad_value("component", component, "a transformers model class this transformers knows")
        config = cls.config_class.from_pretrained(str(Path(model) / component))
        with torch.device("meta"):
            return cls(config)
    return denoiser_on_meta(model, component)[1]


def import_file(path: str | Path, model: str | Path, out: str | Path, name: str = "default",
                component: str | None = None) -> list[Path]:
    """Convert a kohya/LyCORIS/diffusers file into difftune adapter folder(s); base weights are never read.

    A one-component file becomes the folder ``out``; a file for several components becomes ``out/<component>``
    per component (each loads with `difftune.load_adapter`).

    Returns:
        The folders written.
    """
    fmt, groups = read_file(path)
    index = Path(model) / "model_index.json"
    if not index.is_file():
        raise bad_value("--model", str(model), "a local diffusers pipeline folder (holding model_index.json)",
                        "the file's module names and shapes are resolved against it; no weights are read")
    import json

    entries = {k: v for k, v in json.loads(index.read_text()).items() if isinstance(v, list)}
    denoiser = denoiser_name(entries)
    if component is not None and len(groups) > 1:
        raise bad_value("component", component, "unset for a file naming its components")
    comps = {c: component or c or denoiser for c in groups}
    names = {comp: name if len(groups) == 1 or comp == denoiser else f"{name}_{comp}" for comp in comps.values()}
    written = []
    for c, updates in groups.items():
        comp = comps[c]
        if comp is None or comp not in entries:
            raise bad_value("component", comp, f"a component of {model} ({sorted(entries)})")
        module = component_on_meta(model, comp)
        load_updates(module, module, comp, fmt, updates, names[comp], 1.0, path)
        folder = Path(out) if len(groups) == 1 else Path(out) / comp
        written.append(save_adapter_file(module, folder, name=names[comp], base_model=str(model), component=comp))
    return written


FOREIGN_LOADERS.append(load_foreign)  # difftune.load_adapter hands it every non-difftune .safetensors
