"""Adapter files: ``inspect``, ``export``, ``import`` and ``import-krona``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import bad_value
from .commands import command


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..counting import inspect_adapter

    if args.method is not None:
        return _inspect_method(args)
    if args.path is None:
        raise bad_value("path", None, "an adapter folder/file, or --method with --architecture or --model",
                        "e.g. difftune inspect out/adapter, or difftune inspect --method krona --architecture sd15")
    info = inspect_adapter(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("method", info["method"]), ("name", info["name"]),
            ("base model", info["base_model"] or "(not recorded)"),
            ("component", info["component"] or "(not recorded)"), ("adapted modules", info["modules"]),
            ("trainable params", f"{info['parameters']:,}")]
    if "density" in info:  # methods that select entries (SaRA)
        rows += [("density", f"{info['density']:.4%}"), ("base params", f"{info['base_parameters']:,}")]
    rows += [("size", f"{_human(info['file_bytes'])} ({', '.join(info['dtypes'])})"),
             ("difftune version", info["difftune_version"]), ("config", json.dumps(info["config"], sort_keys=True))]
    _print_rows(rows)
    return 0


def _print_rows(rows: Sequence[tuple[str, object]]) -> None:
    for label, value in rows:
        print(f"{label + ':':<19}{value}")


def _inspect_method(args: argparse.Namespace) -> int:
    from ..architectures import build_architecture
    from ..config import apply_overrides
    from ..counting import ARCHITECTURES, count_trainable, load_denoiser, method_config
    from ..methods.base import get_method

    if (args.architecture is None) == (args.model is None):
        raise bad_value("--architecture/--model", None, "exactly one of them with --method",
                        f"--architecture {'|'.join(ARCHITECTURES)} builds shapes only; --model loads a local pipeline")
    fields = apply_overrides({}, args.set or [])
    get_method(args.method)  # an unknown method is refused before a model is built
    model = build_architecture(args.architecture) if args.architecture else load_denoiser(args.model, args.component)
    config = method_config(args.method, fields, model)
    info = count_trainable(config, model)
    info["model"] = args.architecture or str(args.model)
    if args.method == "kind":  # trainable = learngenes (if trained) + fresh tailors; cost of one component index
        from ..methods.kind import calculator

        info.update(calculator(config, model, "count"))  # type: ignore[arg-type]
        info["fraction"] = info["parameters"] / info["base_parameters"] if info["base_parameters"] else 0.0
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_rows([("method", info["method"]), ("model", info["model"]), ("adapted modules", info["modules"]),
                 ("trainable params", f"{info['parameters']:,}"),
                 ("base params", f"{info['base_parameters']:,} ({info['fraction']:.4%} trainable)")])
    if "per_component" in info:
        near = info["paper_nearest"]
        _print_rows([("per component", f"{info['per_component']:,}"),
                     ("paper 45.4M", f"{near['components']} components = {near['parameters']:,} "
                                     f"({near['off_by']:+,}, {near['off_percent']:+.3f}%)")])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import warnings

    from ..interop.export import ExportWarning, describe_report, export_adapter
    from ..interop.krona import KronAExportWarning
    from ..serialization import read_header

    method = read_header(args.path[0])["method"]
    if method == "spm" and args.format == "lokr":
        raise bad_value("--format", args.format, "kohya (or unset), diffusers or diff for an SPM adapter",
                        "an SPM is a rank-1 LoRA: it exports as kohya lora_down/lora_up/alpha keys")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KronAExportWarning)
        warnings.simplefilter("always", ExportWarning)
        fmt = args.format or {"krona": "lokr", "loha": "loha"}.get(method, "kohya")
        report = export_adapter(args.path, args.out, format=fmt, rank=args.rank, model=args.model, prefix=args.prefix,
                                dtype=args.dtype)
    for w in caught:  # a plain line for people at a terminal, not a Python source location
        print(f"difftune: warning: {w.message}", file=sys.stderr)
    print(describe_report(report))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ..interop.importer import import_file

    out = args.out or str(Path(args.file).with_suffix(""))
    for folder in import_file(args.file, args.model, out, name=args.name, component=args.component):
        print(f"wrote {folder}")
    return 0


def cmd_import_krona(args: argparse.Namespace) -> int:
    from ..interop.krona import import_krona

    out = import_krona(args.checkpoint, args.model, args.out, format=args.format, name=args.name,
                       component=args.component)
    print(f"wrote {out}")
    return 0


@command("inspect", help="describe a saved adapter, or count what a method would train on a model")
def _inspect_arguments(s: argparse.ArgumentParser) -> None:
    from ..counting import ARCHITECTURES

    s.add_argument("path", nargs="?", help="adapter folder or adapter_model.safetensors")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--method", help="count this method's trainable parameters instead (e.g. lora, krona, sara)")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a method config field, e.g. rank=8")
    s.add_argument("--architecture", help="with --method: a published denoiser, built on the meta device: "
                   + ", ".join(ARCHITECTURES))
    s.add_argument("--model", help="with --method: a local diffusers pipeline folder (real weights)")
    s.add_argument("--component", help="with --model: the component to adapt (default unet/transformer)")
    s.set_defaults(func=cmd_inspect)


@command("export", help="write adapters as kohya/diffusers LoRA (DoRA), LyCORIS LoHa/LoKr or full-ΔW (diff) files")
def _export_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("path", nargs="+", help="adapter folder(s) or adapter_model.safetensors (several: one per "
                                           "component, e.g. a UNet and a text-encoder LoRA into one file)")
    s.add_argument("--out", required=True, help="the .safetensors file to write")
    s.add_argument("--format", choices=["kohya", "kohya-ldm", "diffusers", "loha", "lokr", "diff", "comfyui"],
                   default=None,
                   help="kohya (default; lora, spm, or any weight-space method with --rank: ComfyUI, A1111/Forge, "
                        "kohya, lycoris-lora, diffusers), kohya-ldm (kohya with LDM UNet names, as kohya's SDXL "
                        "scripts write), diffusers (pipe.load_lora_weights, peft; ComfyUI only in part), loha "
                        "(loha's default), lokr (krona's default), diff (exact full ΔW, every weight-space method) or "
                        "comfyui (the one ComfyUI reads best for the method); the export says who reads the file "
                        "and warns when one of them will not read all of it")
    s.add_argument("--rank", type=int, default=None, help="SaRA (or any method without low-rank factors) to "
                                                          "kohya/diffusers: rank of the truncated-SVD LoRA")
    s.add_argument("--model", default=None, help="base pipeline folder, for methods whose ΔW needs it (SaRA, IA3, "
                                                 "DoRA as diff; default the adapter's recorded base)")
    s.add_argument("--prefix", default=None, help="kohya key prefix (default from the component: lora_unet)")
    s.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="tensor dtype (default: the adapter's)")
    s.set_defaults(func=cmd_export)


@command("import", help="convert a kohya/LyCORIS (LoRA, LoCon, LoHa, LoKr, full) or diffusers/peft "
                       "LoRA file into difftune adapter folder(s)")
def _import_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("file", help="the .safetensors file")
    s.add_argument("--model", required=True, help="the local diffusers pipeline it was made for (config only read)")
    s.add_argument("--out", default=None, help="adapter folder (default: the file's name without .safetensors); "
                                               "one subfolder per component for a multi-component file")
    s.add_argument("--name", default="default", help="the adapter's name")
    s.add_argument("--component", default=None, help="component for a file that names none (default the denoiser)")
    s.set_defaults(func=cmd_import)


@command("import-krona", help="convert a LoKr file or an official DiffuseKronA checkpoint to an adapter")
def _import_krona_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", help="a LoKr .safetensors or an official pytorch_lora_weights.safetensors")
    s.add_argument("--model", required=True, help="the local diffusers pipeline it was trained on (config only read)")
    s.add_argument("--out", required=True, help="adapter folder to write")
    s.add_argument("--format", choices=["auto", "lokr", "official"], default="auto", help="default: from the keys")
    s.add_argument("--name", default="default", help="the adapter's name")
    s.add_argument("--component", default=None, help="the component it adapts (default unet/transformer)")
    s.set_defaults(func=cmd_import_krona)
