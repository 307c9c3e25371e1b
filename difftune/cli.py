"""``difftune`` command line: it parses arguments and dispatches; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import DifftuneError, bad_value


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` → (path, weight). A suffix after the last ':' that is not a number is an error."""
    path, sep, weight = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise bad_value("--adapter", spec, "PATH or PATH:WEIGHT with a numeric weight (e.g. out/style:0.8)") from None


def parse_control_spec(spec: str) -> tuple[str, str | None, float | None]:
    """``IMAGE[:ADAPTER[:SCALE]]`` → (image path, adapter or None, scale or None)."""
    if Path(spec).exists():
        return spec, None, None
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise bad_value("--control", spec, "IMAGE, IMAGE:ADAPTER or IMAGE:ADAPTER:SCALE (e.g. edges.png:canny:0.8)")
    scale = None
    if len(parts) == 3:
        try:
            scale = float(parts[2])
        except ValueError:
            raise bad_value("--control", spec, "a numeric SCALE after the second ':'") from None
    return parts[0], (parts[1] or None) if len(parts) > 1 else None, scale


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .serialization import inspect_adapter

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
    from .architectures import build_architecture
    from .config import apply_overrides
    from .counting import ARCHITECTURES, count_trainable, load_denoiser, method_config

    if (args.architecture is None) == (args.model is None):
        raise bad_value("--architecture/--model", None, "exactly one of them with --method",
                        f"--architecture {'|'.join(ARCHITECTURES)} builds shapes only; --model loads a local pipeline")
    fields = apply_overrides({}, args.set or [])
    config = method_config(args.method, fields)
    model = build_architecture(args.architecture) if args.architecture else load_denoiser(args.model, args.component)
    info = count_trainable(config, model)
    info["model"] = args.architecture or str(args.model)
    if args.method == "kind":  # trainable = learngenes (if trained) + fresh tailors; cost of one component index
        from .methods.kind import calculator

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


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generate, load_pipeline
    from .loading import load_adapter

    specs = [parse_adapter_spec(s) for s in args.adapter or []]
    controls = [parse_control_spec(s) for s in args.control or []]
    pipe = load_pipeline(args.model, device=args.device)
    aliases: dict[str, str] = {}  # --control may name an adapter by its --adapter path, folder/file name or adapterN
    for i, (path, weight) in enumerate(specs):
        name = load_adapter(pipe, path, name=f"adapter{i}", weight=weight)
        for alias in (path, Path(path).name, Path(path).stem, name):
            aliases.setdefault(alias, name)
    inputs = None
    if controls:
        from .conditions import control_inputs
        from .loading import set_adapter_weights

        if len(controls) == 1 and controls[0][1] is None:
            control: object = controls[0][0]  # one image for the only CSC adapter
        else:
            if any(a is None for _, a, _ in controls):
                raise bad_value("--control", args.control, "IMAGE:ADAPTER for each image when several are given")
            control = {aliases.get(a, a): img for img, a, _ in controls}
        inputs = {"control": control_inputs(pipe, control)}
        only = next(iter(inputs["control"]))
        scales = {aliases.get(a, a) if a else only: s for _, a, s in controls if s is not None}
        set_adapter_weights(pipe, scales)
    images = generate(pipe, prompt=args.prompt, class_label=args.class_label, seed=args.seed, steps=args.steps,
                      guidance=args.guidance, height=args.height, width=args.width, adapter_inputs=inputs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out)
    print(f"wrote {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffusers.utils import logging as diffusers_logging

    from .config import load_config
    from .train import TrainConfig
    from .train import main as train_main
    from .train.interrupt import TrainingInterrupted

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": the trainer has its own bar
    overrides = [*(args.set or []), *(["overwrite=true"] if args.overwrite else [])]
    try:
        train_main(load_config(TrainConfig, args.config, overrides))
    except TrainingInterrupted as e:  # the trainer printed the checkpoint and the resume command
        return e.exit_code
    return 0


def parse_digits(spec: str) -> list[int]:
    """``"0-8"`` or ``"1,3,9"`` → digits."""
    try:
        if "-" in spec:
            lo, hi = (int(v) for v in spec.split("-"))
            digits = list(range(lo, hi + 1))
        else:
            digits = [int(v) for v in spec.split(",")]
    except ValueError:
        digits = []
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise bad_value("--digits", spec, "digits 0-9 as a range '0-8' or a list '1,3,9'")
    return digits


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate, generate_digits, write_report
    from .generation import load_pipeline
    from .loading import load_adapter

    pipe = load_pipeline(args.model, device=args.device)
    for i, spec in enumerate(args.adapter or []):
        path, weight = parse_adapter_spec(spec)
        load_adapter(pipe, path, name=f"adapter{i}", weight=weight)
    digits = parse_digits(args.digits)
    if args.prompt and len(digits) != 1:
        raise bad_value("--digits", args.digits, "one digit (the one --prompt should produce)")
    images, labels = generate_digits(pipe, digits, args.n, prompt=args.prompt, seed=args.seed, steps=args.steps,
                                     guidance=args.guidance)
    metrics = evaluate(images, labels)
    metrics.update(model=str(args.model), adapters=args.adapter or [], prompt=args.prompt, guidance=args.guidance,
                   steps=args.steps, seed=args.seed)
    out = write_report(args.out, metrics, images, rows=len(digits))
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "fd", "fd_floor", "n_floor", "ink", "diversity")},
                     indent=2))
    print(f"wrote {out / 'metrics.json'} and {out / 'grid.png'}")
    return 0


def cmd_zoo_data(args: argparse.Namespace) -> int:
    from .zoo import mnist

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise bad_value("--out", args.out, "a folder that can be created", str(e)) from e
    writers = {"pretrain-captions": mnist.write_pretrain_captions, "pretrain-classes": mnist.write_pretrain_classes,
               "subject-nine": mnist.write_personalization_set, "style-bold": mnist.write_style_set,
               "style-bold-reg": mnist.write_styled_regularized_set,
               "heldout": mnist.write_heldout,
               # KIND's recipe (configs/kind): pretrain on 0-4, learn 5-9
               "classes-0-4": lambda o: mnist.write_pretrain_classes(o, (0, 1, 2, 3, 4)),
               "classes-5-9": lambda o: mnist.write_pretrain_classes(o, (5, 6, 7, 8, 9))}
    for name, write in writers.items():
        print(f"wrote {write(out / name)}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(Path(args.out), steps=args.steps, n=args.n, sample_steps=args.sample_steps)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    if importlib.util.find_spec("apps") is None and (root / "apps" / "studio").is_dir():
        sys.path.insert(0, str(root))  # the studio lives in the repository's apps/, next to the package
    if importlib.util.find_spec("apps") is None or importlib.util.find_spec("gradio") is None:
        raise DifftuneError("`difftune app` needs gradio (pip install 'difftune[app]') and the repository's apps/ "
                            "folder (run it from a checkout: pip install -e '.[app]')")
    from apps.studio import main as studio_main

    from .zoo import path as zoo_path

    studio_main(args.model or str(zoo_path("sd-mini")), args.adapters, host=args.host, port=args.port,
                compare=args.compare, out=args.out, device=args.device)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import warnings

    from .interop.export import ExportWarning, describe_report, export_adapter
    from .interop.krona import KronAExportWarning
    from .serialization import read_header

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
    from .interop.importer import import_file

    out = args.out or str(Path(args.file).with_suffix(""))
    for folder in import_file(args.file, args.model, out, name=args.name, component=args.component):
        print(f"wrote {folder}")
    return 0


def cmd_import_spm(args: argparse.Namespace) -> int:
    from .interop.spm import import_spm

    print(f"wrote {import_spm(args.checkpoint, args.model, args.out, name=args.name, component=args.component)}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from . import loading
    from .erase import evaluate_erasure, write_report
    from .generation import load_pipeline
    from .methods.spm import set_transport

    pipe = load_pipeline(args.model)
    for spec in args.adapter or []:
        path, weight = parse_adapter_spec(spec)
        name = loading.load_adapter(pipe, path, weight=weight)
        if args.no_transport and loading.list_adapters(pipe)[name]["method"] == "spm":
            set_transport(loading.component_of(pipe)[1], name, False)
    templates = args.template or ["a handwritten digit {}"]
    result = evaluate_erasure(pipe, args.erase, args.keep or [], judge=args.judge, templates=templates,
                              n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance)
    result["knobs"].update(model=str(args.model), adapters_given=args.adapter or [], transport=not args.no_transport)
    out = write_report(result, args.out)
    h = result["harmonic_mean"]
    print(f"efficacy {result['efficacy']:.1%}  specificity "
          f"{'—' if result['specificity'] is None else format(result['specificity'], '.1%')}  "
          f"H {'—' if h is None else format(h, '.3f')}  ({out})")
    return 0


def cmd_import_krona(args: argparse.Namespace) -> int:
    from .interop.krona import import_krona

    out = import_krona(args.checkpoint, args.model, args.out, format=args.format, name=args.name,
                       component=args.component)
    print(f"wrote {out}")
    return 0


def cmd_distill_plan(args: argparse.Namespace) -> int:
    from .architectures import build_architecture, denoiser_on_meta
    from .compress.block_removal import NAMED_PLANS, plan_summary

    if bool(args.architecture) == bool(args.model):
        raise bad_value("--architecture/--model", args.architecture or args.model, "exactly one of them")
    teacher = build_architecture(args.architecture) if args.architecture else denoiser_on_meta(args.model)[1]
    rows = plan_summary(teacher, args.plan or list(NAMED_PLANS), args.resolution)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    at = f"MACs @{rows[0]['resolution']}px"
    print(f"{'model':<10} {'parameters':>15} {'params':>7} {at:>14} {'MACs':>7}")
    for r in rows:
        macs = "—" if r["macs"] is None else f"{r['macs'] / 1e9:.1f} G"
        ratio = "—" if r["macs_ratio"] is None else f"{r['macs_ratio']:.3f}"
        print(f"{r['model']:<10} {r['parameters']:>15,} {r['parameters_ratio']:>7.3f} {macs:>14} {ratio:>7}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .compress.vq4dit import VQ4DiTConfig, format_size_report, size_report

    fields = {"preset": args.preset}
    for name in ("iterations", "steps", "candidates", "kmeans_iters", "seed"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.classes:
        try:
            lo, _, hi = args.classes.partition("-")
            fields["class_labels"] = (list(range(int(lo), int(hi) + 1)) if hi
                                      else [int(v) for v in args.classes.split(",")])
        except ValueError as e:
            raise bad_value("--classes", args.classes, "a range '0-9' or a list '1,3,207'") from e
    if args.prompt:
        fields["prompts"] = args.prompt
    if args.paper and args.official:
        raise bad_value("--paper/--official", "both", "at most one of them", "The default is neither (see --help).")
    config = (VQ4DiTConfig.paper(**fields) if args.paper else VQ4DiTConfig.official(**fields) if args.official
              else VQ4DiTConfig(**fields))
    if args.dry_run:
        from .architectures import build_architecture, denoiser_on_meta

        if bool(args.architecture) == bool(args.model):
            raise bad_value("--architecture/--model", args.architecture or args.model, "exactly one of them")
        model = build_architecture(args.architecture) if args.architecture else denoiser_on_meta(args.model)[1]
        for line in format_size_report(size_report(model, config.k, config.d), args.preset):
            print(line)
        return 0
    if not args.model or not args.out:
        raise bad_value("--model/--out", args.model or args.out, "both a pipeline folder and an output folder",
                        "Or size an architecture without weights: --architecture dit-xl2 --dry-run")
    from .compress.vq4dit_calib import quantize_pipeline_folder

    quantize_pipeline_folder(args.model, args.out, args.method, config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .counting import ARCHITECTURES

    p = argparse.ArgumentParser(prog="difftune", description="Customize and compress diffusion models.")
    p.add_argument("--version", action="version", version=f"difftune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="describe a saved adapter, or count what a method would train on a model")
    s.add_argument("path", nargs="?", help="adapter folder or adapter_model.safetensors")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--method", help="count this method's trainable parameters instead (e.g. lora, krona, sara)")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a method config field, e.g. rank=8")
    s.add_argument("--architecture", help="with --method: a published denoiser, built on the meta device: "
                   + ", ".join(ARCHITECTURES))
    s.add_argument("--model", help="with --method: a local diffusers pipeline folder (real weights)")
    s.add_argument("--component", help="with --model: the component to adapt (default unet/transformer)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("generate", help="generate an image with a local diffusers pipeline and adapters")
    s.add_argument("--model", required=True, help="local diffusers pipeline folder")
    s.add_argument("--adapter", action="append", metavar="PATH[:WEIGHT]", help="adapter to load; repeatable")
    s.add_argument("--control", action="append", metavar="IMAGE[:ADAPTER[:SCALE]]",
                   help="control image for a CSC (SCEdit) adapter, named as in --adapter, with its scale; repeatable")
    s.add_argument("--prompt", help="text prompt (text-to-image pipelines)")
    s.add_argument("--class-label", type=int, help="class id (class-conditional DiT pipelines)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--out", required=True, help="output PNG path")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("train", help="train with a YAML config (any method); same as python -m difftune.train")
    s.add_argument("config", help="training YAML (see configs/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. train.max_steps=500; repeatable")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in output_dir (same as --set overwrite=true)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="generate digits with a reference model (+ adapters) and judge them")
    s.add_argument("--model", required=True, help="local pipeline folder (e.g. difftune/assets/sd-mini)")
    s.add_argument("--adapter", action="append", metavar="PATH[:WEIGHT]")
    s.add_argument("--digits", default="0-8", help="intended digits: '0-8' or '1,3,9'")
    s.add_argument("--n", type=int, default=20, help="samples per digit")
    s.add_argument("--prompt", help="a custom prompt for the single digit in --digits (e.g. a trigger prompt)")
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--out", default="outputs/eval")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("zoo", help="reference-model data: write the MNIST benchmark folders")
    zsub = s.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    z = zsub.add_parser("data", help="write pretraining, subject, style and held-out folders from real MNIST")
    z.add_argument("--out", default="outputs/zoo/data")
    z.set_defaults(func=cmd_zoo_data)

    s = sub.add_parser("quickstart", help="fine-tune the shipped sd-mini on a new digit; before/after numbers")
    s.add_argument("--out", default="outputs/quickstart")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: the quickstart config's)")
    s.add_argument("--n", type=int, default=20, help="trigger-prompt samples for the judge (n/2 per digit 0-8)")
    s.add_argument("--sample-steps", type=int, default=20, help="sampling steps")
    s.set_defaults(func=cmd_quickstart)

    s = sub.add_parser("demo", help="tiny end-to-end example: inject LoRA, save, generate at two weights")
    s.add_argument("--out", default="outputs/demo")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("app", help="the studio: a Gradio app to generate with and combine adapters")
    s.add_argument("--model", default=None, help="local pipeline folder (default: the shipped sd-mini)")
    s.add_argument("--adapters", default="outputs", help="adapters folder, read recursively (default: outputs/, "
                                                         "where quickstart and the labs write)")
    s.add_argument("--compare", default=None, help="a second model for A/B: a BK student pipeline folder or a "
                                                   "compressed model (difftune quantize --out) of --model")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    s.add_argument("--out", default="outputs/studio", help="where generated PNGs (with infotext) are written")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_app)

    s = sub.add_parser("export", help="write adapters as kohya/diffusers LoRA (DoRA), LyCORIS LoHa/LoKr or full-ΔW "
                                      "(diff) files")
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

    s = sub.add_parser("import", help="convert a kohya/LyCORIS (LoRA, LoCon, LoHa, LoKr, full) or diffusers/peft "
                                      "LoRA file into difftune adapter folder(s)")
    s.add_argument("file", help="the .safetensors file")
    s.add_argument("--model", required=True, help="the local diffusers pipeline it was made for (config only read)")
    s.add_argument("--out", default=None, help="adapter folder (default: the file's name without .safetensors); "
                                               "one subfolder per component for a multi-component file")
    s.add_argument("--name", default="default", help="the adapter's name")
    s.add_argument("--component", default=None, help="component for a file that names none (default the denoiser)")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("import-spm", help="convert a kohya-format SPM file (official or exported) to an spm adapter")
    s.add_argument("checkpoint", help="an SPM .safetensors (lora_unet_*.lora_down/lora_up/alpha)")
    s.add_argument("--model", required=True, help="a local diffusers pipeline of the same UNet layout (its text "
                                                  "encoder stores E(concept) for transport)")
    s.add_argument("--out", required=True, help="adapter folder to write")
    s.add_argument("--name", default="default", help="the adapter's name")
    s.add_argument("--component", default=None, help="the component it adapts (default unet/transformer)")
    s.set_defaults(func=cmd_import_spm)

    s = sub.add_parser("erase", help="judge concept erasure: efficacy, specificity and their harmonic mean (JSON)")
    s.add_argument("--model", required=True, help="local diffusers pipeline folder")
    s.add_argument("--adapter", action="append", metavar="PATH[:WEIGHT]", help="adapter to load (repeatable)")
    s.add_argument("--erase", nargs="+", required=True, help="the erased concepts (e.g. seven)")
    s.add_argument("--keep", nargs="*", help="concepts that must survive (e.g. zero one two)")
    s.add_argument("--template", action="append", default=None, help="prompt template with {} (repeatable; default "
                                                                      "'a handwritten digit {}')")
    s.add_argument("--judge", default="mnist", help="registered judge (difftune.erase.JUDGES); default mnist")
    s.add_argument("--n", type=int, default=20, help="images per concept and template")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-transport", action="store_true", help="SPMs at fixed strength (γ = 1) on every prompt")
    s.add_argument("--out", required=True, help="the JSON report to write")
    s.set_defaults(func=cmd_erase)

    s = sub.add_parser("import-krona", help="convert a LoKr file or an official DiffuseKronA checkpoint to an adapter")
    s.add_argument("checkpoint", help="a LoKr .safetensors or an official pytorch_lora_weights.safetensors")
    s.add_argument("--model", required=True, help="the local diffusers pipeline it was trained on (config only read)")
    s.add_argument("--out", required=True, help="adapter folder to write")
    s.add_argument("--format", choices=["auto", "lokr", "official"], default="auto", help="default: from the keys")
    s.add_argument("--name", default="default", help="the adapter's name")
    s.add_argument("--component", default=None, help="the component it adapts (default unet/transformer)")
    s.set_defaults(func=cmd_import_krona)
    s = sub.add_parser("quantize", help="VQ4DiT / k-means / RTN weight quantization of a DiT or PixArt transformer")
    s.add_argument("--model", help="local DiT/PixArt pipeline folder")
    s.add_argument("--architecture", help="with --dry-run: a published denoiser on the meta device (e.g. dit-xl2)")
    s.add_argument("--preset", choices=["2bit", "3bit"], default="2bit", help="2bit: k=256, d=4; 3bit: k=64, d=2")
    s.add_argument("--method", choices=["vq4dit", "kmeans", "rtn"], default="vq4dit")
    s.add_argument("--paper", action="store_true", help="the paper's choices where it differs from the official code")
    s.add_argument("--official", action="store_true",
                   help="the official code's schedule (codebooks after freezing, lr 1e-4; default: joint, 1e-3)")
    s.add_argument("--iterations", type=int, default=None, help="calibration trajectories (default 20)")
    s.add_argument("--steps", type=int, default=None, help="timesteps per calibration trajectory (default 50)")
    s.add_argument("--candidates", type=int, default=None, help="n candidate codewords per sub-vector")
    s.add_argument("--kmeans-iters", type=int, default=None, help="Lloyd iterations (default 100)")
    s.add_argument("--classes", help="DiT classes drawn for calibration, e.g. '0-9' (default: all)")
    s.add_argument("--prompt", action="append", help="PixArt calibration prompt (repeatable)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--dry-run", action="store_true", help="print the sizes only (no weights needed)")
    s.add_argument("--out", help="folder for the compressed transformer (load with load_compressed_pipeline)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("distill", help="block-removal distillation (BK-SDM): plan sizes without weights")
    dsub = s.add_subparsers(dest="distill_command", required=True, metavar="DISTILL_COMMAND")
    d = dsub.add_parser("plan", help="parameters and MACs (thop's convention) of the teacher and its students")
    d.add_argument("--architecture", help="a published denoiser, built on the meta device: "
                   + ", ".join(ARCHITECTURES))
    d.add_argument("--model", help="or a local diffusers pipeline folder (its config only is read)")
    d.add_argument("--plan", action="append",
                   help="base, small, tiny or a YAML plan file (repeatable; default all three)")
    d.add_argument("--resolution", type=int, default=None, help="image size in px (default: the model's native size)")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_distill_plan)
    return p


class _DropTorchvisionNotice:
    """transformers announces, once per image-processor class it imports, that torchvision is absent and it falls
    back to PIL; difftune never uses those processors, so the notice is noise on every command."""

    def filter(self, record: object) -> bool:
        return "requires torchvision" not in str(getattr(record, "msg", ""))


def quiet_dependencies() -> None:
    """Silence the dependencies' notices that say nothing about the user's command (CLI entry points only)."""
    import logging
    import os

    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())
    # the per-file "Loading weights" bars of local folders (transformers reads this when imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DifftuneError as e:
        print(f"difftune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop (which saves a checkpoint first): stop without a traceback
        print("\ndifftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
