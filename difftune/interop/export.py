"""difftune adapters → the files other tools load: kohya LoRA/DoRA, diffusers/peft LoRA/DoRA, LyCORIS LoHa/LoKr,
full ΔW.

`export_adapter` reads one or more saved adapters (one per pipeline component: a UNet LoRA and a text-encoder LoRA
go into one file), writes the file, reads it back with the importer's own parser (`mmdit.read_file`) and reports
the largest fp32 difference between the file's ΔW and ours. What goes where:

==============  =====================================  ==========================================================
format          methods                                keys
==============  =====================================  ==========================================================
``kohya``       lora (DoRA too), spm; any weight-space  ``lora_unet_<path>.lora_down.weight`` (r, d_in[, k, k]),
                method with ``rank`` (truncated SVD    ``.lora_up.weight`` (d_out, r[, 1, 1]), ``.alpha``, DoRA's
                of ΔW; a LoHa at rank r² is exact up   ``.dora_scale`` (d_out, 1[, 1, 1]), LyCORIS's layout;
                to rounding)                           ``lora_te_text_model_<path>`` for the CLIP text encoder;
                                                       kohya ``ss_*`` training metadata
``kohya-ldm``   as kohya                               kohya's, with the UNet's LDM names (``lora_unet_input_blocks_
                                                       4_1_...``: kohya's SDXL layout; from the base's UNet config)
``diffusers``   as kohya                               ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (DoRA:
                                                       ``.lora_magnitude_vector``), ``text_encoder.<path>...``;
                                                       ``lora_adapter_metadata`` (r, lora_alpha, use_rslora,
                                                       use_dora, target_modules) so ``pipe.load_lora_weights``
                                                       builds the same LoRA/DoRA
``loha``        loha                                    LyCORIS LoHa: ``.hada_w1_a`` (d_out, r), ``.hada_w1_b``
                                                       (r, d_in·k·k), ``.hada_w2_a``, ``.hada_w2_b``, ``.alpha``
``lokr``        krona                                   LyCORIS LoKr (`difftune.interop.krona.export_krona`)
``diff``        every weight-space method               ``<kohya name>.diff`` / ``.diff_b`` (Linear, Conv2d and
                                                       others), ``.w_norm`` / ``.b_norm`` (GroupNorm, LayerNorm)
==============  =====================================  ==========================================================

``comfyui`` picks the one ComfyUI reads best for the method, and every export says who reads the file and warns
where one of them will not read all of it (`difftune.interop.tools`). LoRA-family formats cannot hold bias or norm
changes: a SaRA adapter exported with ``rank`` lists what it leaves out (``ExportReport.dropped``) and the error
counts it. lora/spm/krona/diff adapters (and loha to ``loha``) are read from their tensors alone; any other method
(SaRA, (IA)³, LoHa to other formats), and DoRA written as ``diff``, is loaded into its base model (``model``, default:
the adapter's recorded base) and its ΔW taken from the method itself (`Adapter.delta_params`, from the true W0, in the
layer's shape), so new weight-space methods export without code here. DoRA's ΔW depends on W0, so the error reported
for its LoRA-format files is that of its parts (s·BA and m), which fix ΔW for every base.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..fileio import atomic_write
from ..methods.base import get_method
from ..serialization import config_from_header, read_header, read_tensors
from ..version import __version__
from .kohya import kohya_name, kohya_prefix
from .kohya_meta import base_version, base_version_metadata, export_metadata
from .mmdit import kohya_layout, read_file
from .tools import READERS, export_warnings, ldm_module_names, resolve_format
from .updates import (
    Dense,
    Hadamard,
    Kron,
    LowRank,
    Update,
    comparable,
    low_rank_approximation,
    max_error,
)
from .writers import write_diff, write_kohya, write_loha

FORMATS = ("kohya", "kohya-ldm", "diffusers", "loha", "lokr", "diff")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Module paths of a transformers ≥ 5 CLIPTextModel (no ``text_model`` level); kohya keys keep the old level.
_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm")


class ExportWarning(UserWarning):
    """A file was written, but some tool will not read all of it (said with the format to use instead)."""


@dataclass
class ExportReport:
    """What `export_adapter` wrote and how exactly it matches the adapters.

    Attributes:
        path: the file.
        format: its format.
        modules: number of modules in the file.
        max_error: max |ΔW_file − ΔW_ours| over all modules and parameters, in fp32 (approximation included).
        approximation: for an SVD export, {"rank", "max_abs", "relative_fro"} of the rank-r approximation alone.
        dropped: parameters the format cannot hold (``module.bias``, norm scales), left out.
    """

    path: Path
    format: str
    modules: int
    max_error: float
    approximation: dict[str, float] | None = None
    dropped: list[str] = field(default_factory=list)


@dataclass
class _Source:
    path: Path
    header: dict[str, Any]
    component: str
    updates: dict[str, Update]
    norms: set[str] = field(default_factory=set)  #: modules that are GroupNorm/LayerNorm (diff keys w_norm/b_norm)


def adapter_updates(path: str | Path, model: str | Path | None = None, format: str = "kohya") -> _Source:
    """The saved adapter's per-module updates (`LowRank`/`Hadamard`/`Kron`/`Dense`) for export as ``format``: from
    its own tensors where that format holds them, else as `Dense` ΔW computed in its base model (DoRA's depends on
    W0; a LoHa's tensors do not say a conv's kernel shape).

    Raises:
        DifftuneError: an activation-space method (no ΔW), or a method that needs its base model and none is found.
    """
    header = read_header(path)
    config = config_from_header(header, path)
    component = header.get("component") or ""
    method = header["method"]
    dora = getattr(config, "use_dora", False)
    if method in ("spm", "krona", "diff") or (method == "lora" and not (dora and format == "diff")) or (
            method == "loha" and format == "loha"):
        groups: dict[str, dict[str, Tensor]] = {}
        for key, value in read_tensors(path).items():
            module, _, param = key.rpartition(".")
            groups.setdefault(module, {})[param] = value
        groups.pop("__model__", None)  # SPM's E(c): no ΔW, no key in any LoRA format
        updates: dict[str, Update] = {}
        norms = set()
        for module, t in groups.items():
            if method == "diff":  # Δ itself; a 1-D weight is a norm's scale (LyCORIS: w_norm/b_norm keys)
                updates[module] = Dense({k.removeprefix("diff_"): v for k, v in t.items()})
                if t.get("diff_weight", torch.zeros(0, 0)).dim() == 1:
                    norms.add(module)
            elif method == "lora":
                updates[module] = LowRank(t["lora_A"], t["lora_B"], config.scale, alpha=config.alpha,
                                          rslora=config.use_rslora, magnitude=t.get("lora_magnitude_vector"))
            elif method == "loha":
                updates[module] = Hadamard(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                                           config.scale, alpha=config.alpha)
            elif method == "spm":
                updates[module] = LowRank(t["spm_down"], t["spm_up"], config.scale, alpha=config.alpha)
            elif config.layout == "official":  # a row-permuted P(A⊗B): only its dense ΔW describes it
                from ..methods.krona import kron_delta

                updates[module] = Dense({"weight": kron_delta(t["krona_A"], t["krona_B"], config.scale, True)})
            else:
                updates[module] = Kron(t["krona_A"].float() * config.scale, t["krona_B"].float())
        return _Source(Path(path), header, component, updates, norms)
    return _loaded_updates(path, header, model)


def _loaded_updates(path: Any, header: dict[str, Any], model: str | Path | None) -> _Source:
    """ΔW of any weight-space adapter, from the method itself, after loading it into its base model."""
    from ..generation import load_pipeline
    from ..loading import component_of, load_adapter
    from ..methods.verbs import hosts
    from ..targeting import canonical_name

    base = model or header.get("base_model") or ""
    if not base or not (Path(base) / "model_index.json").is_file():
        raise bad_value("model", str(model) if model else None,
                        f"the local pipeline folder the {header['method']!r} adapter was trained on",
                        f"its ΔW is computed by loading it (recorded base: {header.get('base_model')!r}); pass "
                        "--model")
    if not get_method(header["method"]).is_adapter:
        raise DifftuneError(f"method {header['method']!r} saves whole models, not adapters")
    pipe = load_pipeline(base, device="cpu")
    name = load_adapter(pipe, path, name="export")
    comp, module = component_of(pipe, header.get("component") or None)
    updates: dict[str, Update] = {}
    norms = set()
    for host_name, host in hosts(module):
        if "export" not in host.adapters:
            continue
        adapter = host.adapters[name]
        if not adapter.mergeable:
            raise DifftuneError(f"method {header['method']!r} acts on activations (no ΔW): it has no file form "
                                "other tools can load; keep the difftune adapter")
        with torch.no_grad():
            params = {k: v.detach().float().cpu() for k, v in adapter.delta_params(host.base_params()).items()}
        updates[canonical_name(host_name)] = Dense(params)
        if isinstance(host.base_layer, (nn.GroupNorm, nn.LayerNorm)):
            norms.add(canonical_name(host_name))
    return _Source(Path(path), header, comp, updates, norms)


def kohya_key(component: str, module: str, prefix: str | None = None) -> str:
    """The kohya name of ``module`` of ``component``; CLIP text-encoder paths get kohya's ``text_model_`` level."""
    prefix = kohya_prefix(component, prefix)
    if component.startswith("text_encoder") and module.startswith(_CLIP_TOP):
        module = "text_model." + module
    return kohya_name(module, prefix)


def export_adapter(
    adapters: str | Path | list[str | Path], out: str | Path, format: str = "kohya", *, rank: int | None = None,
    model: str | Path | None = None, prefix: str | None = None, dtype: str | None = None,
) -> ExportReport:
    """Write saved difftune adapter(s) as one file another tool loads, and measure its ΔW against ours.

    Args:
        adapters: one adapter folder (or ``adapter_model.safetensors``), or several for different components.
        out: the ``.safetensors`` file to write (atomically).
        format: "kohya", "kohya-ldm" (LDM UNet names), "diffusers", "loha" (loha only), "lokr" (krona only),
            "diff", or "comfyui" (the one ComfyUI reads best for the method: `tools.resolve_format`).
        rank: for kohya/diffusers of a method without low-rank factors (SaRA): the rank of the truncated-SVD LoRA.
        model: the base pipeline folder, for methods whose ΔW needs it (SaRA; default the adapter's recorded base).
        prefix: kohya key prefix (default from the component); one adapter only.
        dtype: "float32", "float16" or "bfloat16" (default: fp32 for computed ΔW, else the adapter's dtype).

    Returns:
        An `ExportReport` (the measured ``max_error`` included).

    Raises:
        DifftuneError: unknown format/dtype, two adapters for one component, a method the format cannot hold
            (KronA in a LoRA format, an activation-space method), SaRA to LoRA without ``rank``.
    """
    paths = [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    if format not in (*FORMATS, "comfyui"):
        raise bad_value("format", format, f"one of {(*FORMATS, 'comfyui')}")
    if dtype is not None and dtype not in DTYPES:
        raise bad_value("dtype", dtype, f"one of {sorted(DTYPES)} or unset")
    if not paths or (prefix is not None and len(paths) > 1):
        raise bad_value("adapters", [str(p) for p in paths], "one adapter (with prefix), or several without")
    written = resolve_format(format, [read_header(p)["method"] for p in paths])
    if written == "lokr":
        return _export_lokr(paths, out, prefix, dtype)
    format = "kohya" if written == "kohya-ldm" else written  # kohya-ldm: kohya's keys, the UNet's LDM names
    sources = [adapter_updates(p, model, format) for p in paths]
    if format == "loha" and any(not isinstance(u, Hadamard) for s in sources for u in s.updates.values()):
        raise bad_value("format", format, "'kohya', 'diffusers' or 'diff' for a method other than loha",
                        "the LoHa format holds LoHa adapters (method 'loha')")
    comps = [s.component for s in sources]
    if len(set(comps)) != len(comps):
        raise bad_value("adapters", [str(p) for p in paths], "adapters of different components (one per component)",
                        f"their components are {comps}; merge same-component adapters in difftune first")
    report = ExportReport(Path(out), written, 0, 0.0)
    version = base_version_metadata(*base_version(
        comps, next((str(s.header.get("base_model") or "") for s in sources if s.header.get("base_model")), ""),
        [(s.component, s.updates) for s in sources]))
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {"format": "pt"}
    lora_config: dict[str, Any] = {}  # diffusers' lora_adapter_metadata: "<component>.<LoraConfig field>" → value
    expected: dict[str, dict[str, Tensor]] = {}  # file module key → our ΔW
    components: dict[str, dict[str, Update]] = {}  # what went into the file, for `tools.export_warnings`
    for source in sources:
        updates = source.updates
        if format in ("kohya", "diffusers"):
            updates = _as_low_rank(source, rank, report)
        components[source.component or "unet"] = updates
        layout = kohya_layout(source.header, list(updates), model, prefix) if format == "kohya" else None
        if layout is not None:  # SD3's SAI / Flux's BFL names, fused as the original model (sai.py, bfl.py)
            expected.update(layout.write(tensors, updates, DTYPES[dtype] if dtype else None))  # type: ignore[arg-type]
            metadata.update(export_metadata(format, source.header, source.path, updates, version))
            continue
        names = ldm_module_names(source.header, model, source.component, updates) if written == "kohya-ldm" \
            and not source.component.startswith("text_encoder") else {}
        for module, update in updates.items():
            key = kohya_key(source.component, names.get(module, module), prefix) if format != "diffusers" else module
            out_dtype = DTYPES[dtype] if dtype else _dtype(update)
            if format == "diff":
                write_diff(tensors, key, update, module in source.norms, out_dtype)
            elif format == "kohya":
                write_kohya(tensors, key, update, out_dtype)
            elif format == "loha":
                write_loha(tensors, key, update, out_dtype)
            else:
                key = f"{source.component or 'unet'}.{module}"
                tensors[f"{key}.lora_A.weight"] = update.down.to(out_dtype).contiguous()
                tensors[f"{key}.lora_B.weight"] = update.up.to(out_dtype).contiguous()
                if update.magnitude is not None:  # peft's own shapes: (d_out,), (1, d_out, 1, 1) for a conv
                    m = update.magnitude.reshape(1, -1, 1, 1) if update.up.dim() == 4 else update.magnitude
                    tensors[f"{key}.lora_magnitude_vector"] = m.to(out_dtype).contiguous()
            expected[key] = comparable(source.updates[module])
        if format == "diffusers":
            lora_config.update(_diffusers_config(source, updates))
        else:
            metadata.update(export_metadata(format, source.header, source.path, updates, version))
    if lora_config:
        metadata["lora_adapter_metadata"] = json.dumps(lora_config, sort_keys=True)
    metadata["difftune_export"] = json.dumps(
        [{"method": s.header["method"], "format": written, "component": s.component, "config": s.header.get("config"),
          "base_model": s.header.get("base_model", ""), "difftune_version": __version__} for s in sources],
        sort_keys=True)
    report.modules = len(expected)
    atomic_write(Path(out), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    base = model or next((s.header.get("base_model") for s in sources if s.header.get("base_model")), None)
    for why in export_warnings(written, components, list(tensors), base):
        warnings.warn(ExportWarning(why), stacklevel=2)
    report.max_error = _measure(out, expected)
    return report


def _dtype(update: Update) -> torch.dtype:
    if isinstance(update, LowRank):
        return update.down.dtype
    if isinstance(update, Hadamard):
        return update.w1a.dtype
    if isinstance(update, Kron):
        return update.w2.dtype
    return torch.float32


def _as_low_rank(source: _Source, rank: int | None, report: ExportReport) -> dict[str, LowRank]:
    """The source's updates as `LowRank`s: factors as they are, else (with ``rank``) a truncated SVD of ΔW."""
    if all(isinstance(u, LowRank) for u in source.updates.values()):
        return dict(source.updates)  # type: ignore[arg-type]
    method = source.header["method"]
    if any(isinstance(u, Kron) for u in source.updates.values()):
        raise bad_value("format", report.format, "'lokr' or 'diff' for a krona adapter",
                        "a Kronecker product has no low-rank factors; LoKr keeps it exact")
    if rank is None:
        raise bad_value("rank", None, f"a rank for the LoRA approximation of this {method!r} adapter",
                        "its ΔW has no low-rank factors: pass --rank R (truncated SVD, error reported), or use "
                        "--format diff for the exact ΔW")
    out: dict[str, LowRank] = {}
    worst, num, den = 0.0, 0.0, 0.0
    for module, update in source.updates.items():
        delta = update.delta()
        for p in sorted(delta):
            if p != "weight" or delta[p].dim() < 2 or module in source.norms:
                report.dropped.append(f"{module}.{p}")
                num += float(delta[p].square().sum())
                den += float(delta[p].square().sum())
                worst = max(worst, float(delta[p].abs().max()))
        if "weight" in delta and delta["weight"].dim() >= 2 and module not in source.norms:
            approx, err = low_rank_approximation(delta["weight"], rank)
            out[module] = approx
            worst = max(worst, err)
            num += float((approx.delta()["weight"] - delta["weight"]).square().sum())
            den += float(delta["weight"].square().sum())
    if not out:
        raise DifftuneError(f"the {method!r} adapter changes no 2-D/4-D weight, so no LoRA can carry it; use --format "
                            "diff")
    report.approximation = {"rank": rank, "max_abs": worst, "relative_fro": (num / den) ** 0.5 if den else 0.0}
    return out


def _diffusers_config(source: _Source, updates: dict[str, LowRank]) -> dict[str, Any]:
    """This component's part of diffusers' ``lora_adapter_metadata``: the LoraConfig that gives our scale."""
    comp = source.component or "unet"
    stated = {(u.alpha if u.alpha is not None else u.scale * u.rank, u.rslora, u.rank) for u in updates.values()}
    if len(stated) != 1:
        raise DifftuneError(f"the {source.header['method']!r} adapter's modules differ in rank/scale "
                            f"({sorted(map(str, stated))[:3]}); diffusers' metadata holds one rank and alpha per "
                            "component; use --format kohya (alpha per module)")
    alpha, rslora, r = next(iter(stated))
    dora = {u.magnitude is not None for u in updates.values()}
    if len(dora) != 1:
        raise DifftuneError(f"the {source.header['method']!r} adapter mixes DoRA and plain LoRA modules; diffusers' "
                            "metadata holds one use_dora per component")
    return {f"{comp}.r": r, f"{comp}.lora_alpha": alpha, f"{comp}.use_rslora": rslora, f"{comp}.use_dora": dora.pop(),
            f"{comp}.target_modules": sorted(updates)}


def _measure(out: str | Path, expected: dict[str, dict[str, Tensor]]) -> float:
    """Read the written file back and return max |ΔW_file − ΔW_ours| (a missing module is an error)."""
    fmt, groups = read_file(out)
    found = {(f"{c or 'unet'}.{k}" if fmt == "diffusers" else k): u for c, updates in groups.items()
             for k, u in updates.items()}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DifftuneError(f"the written {out} lacks modules {missing[:3]} (a bug in the exporter)")
    return max((max_error(comparable(found[k]), expected[k]) for k in expected), default=0.0)


def _export_lokr(paths: list[Any], out: Any, prefix: str | None, dtype: str | None) -> ExportReport:
    from .krona import export_krona

    if len(paths) != 1:
        raise bad_value("adapters", [str(p) for p in paths], "one krona adapter for format 'lokr'")
    source = adapter_updates(paths[0], format="lokr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_krona(paths[0], out, format="lokr", prefix=prefix, dtype=dtype)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    expected = {kohya_key(source.component, m, prefix): u.delta() for m, u in source.updates.items()}
    return ExportReport(Path(out), "lokr", len(expected), _measure(out, expected))


def describe_report(report: ExportReport) -> str:
    """What ``difftune export`` prints: the file, its size in modules, the measured ΔW error and who reads it."""
    lines = [f"wrote {report.path} ({report.format}, {report.modules} modules); max |ΔW_file − ΔW_ours| = "
             f"{report.max_error:.3e} (fp32)", f"read by {READERS[report.format]}"]
    if report.approximation:
        a = report.approximation
        lines.append(f"rank-{int(a['rank'])} SVD approximation: max abs error {a['max_abs']:.3e}, relative "
                     f"Frobenius error {a['relative_fro']:.3e}")
    if report.dropped:
        lines.append(f"left out (no LoRA form): {len(report.dropped)} tensors, e.g. {report.dropped[:3]}")
    return "\n".join(lines)
