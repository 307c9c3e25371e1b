"""Compression commands: ``quantize`` (VQ4DiT, k-means, RTN) and ``distill plan`` (BK-SDM block removal)."""

from __future__ import annotations

import argparse
import json

from ..cli.commands import command
from ..errors import bad_value


def cmd_quantize(args: argparse.Namespace) -> int:
    from .vq4dit import VQ4DiTConfig, format_size_report, size_report

    fields = {"preset": args.preset}
    for name in ("iterations", "steps", "candidates", "kmeans_iters", "seed", "resolution"):
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
        from ..architectures import build_architecture, denoiser_on_meta

        if bool(args.architecture) == bool(args.model):
            raise bad_value("--architecture/--model", args.architecture or args.model, "exactly one of them")
        model = build_architecture(args.architecture) if args.architecture else denoiser_on_meta(args.model)[1]
        for line in format_size_report(size_report(model, config.k, config.d), args.preset):
            print(line)
        return 0
    if not args.model or not args.out:
        raise bad_value("--model/--out", args.model or args.out, "both a pipeline folder and an output folder",
                        "Or size an architecture without weights: --architecture dit-xl2 --dry-run")
    from .vq4dit_calib import quantize_pipeline_folder

    quantize_pipeline_folder(args.model, args.out, args.method, config)
    return 0


def cmd_distill_plan(args: argparse.Namespace) -> int:
    from ..architectures import build_architecture, denoiser_on_meta
    from .block_removal import NAMED_PLANS, TRANSFORMER_PLANS, is_unet_config
    from .macs import plan_summary

    if bool(args.architecture) == bool(args.model):
        raise bad_value("--architecture/--model", args.architecture or args.model, "exactly one of them")
    teacher = build_architecture(args.architecture) if args.architecture else denoiser_on_meta(args.model)[1]
    default = NAMED_PLANS if is_unet_config(dict(teacher.config)) else TRANSFORMER_PLANS
    rows = plan_summary(teacher, args.plan or list(default), args.resolution)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    at = f"MACs @{rows[0]['resolution']}px"
    width = max(10, *(len(r["model"]) for r in rows))
    print(f"{'model':<{width}} {'parameters':>15} {'params':>7} {at:>14} {'MACs':>7}")
    for r in rows:
        macs = "—" if r["macs"] is None else f"{r['macs'] / 1e9:.1f} G"
        ratio = "—" if r["macs_ratio"] is None else f"{r['macs_ratio']:.3f}"
        print(f"{r['model']:<{width}} {r['parameters']:>15,} {r['parameters_ratio']:>7.3f} {macs:>14} {ratio:>7}")
    return 0


@command("quantize", help="VQ4DiT / k-means / RTN weight quantization of a DiT, PixArt, SD3 or Flux transformer")
def _quantize_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", help="local DiT/PixArt/SD3/Flux pipeline folder")
    s.add_argument("--architecture", help="with --dry-run: a published denoiser on the meta device (e.g. flux-dev)")
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
    s.add_argument("--prompt", action="append", help="PixArt/SD3/Flux calibration prompt (repeatable)")
    s.add_argument("--resolution", type=int, default=None,
                   help="SD3/Flux calibration image size in px (default: the pipeline's)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--dry-run", action="store_true", help="print the sizes only (no weights needed)")
    s.add_argument("--out", help="folder for the compressed transformer (load with load_compressed_pipeline)")
    s.set_defaults(func=cmd_quantize)


@command("distill", help="block-removal distillation (BK-SDM): plan sizes without weights")
def _distill_arguments(s: argparse.ArgumentParser) -> None:
    from ..counting import ARCHITECTURES

    dsub = s.add_subparsers(dest="distill_command", required=True, metavar="DISTILL_COMMAND")
    d = dsub.add_parser("plan", help="parameters and MACs (thop's convention) of the teacher and its students")
    d.add_argument("--architecture", help="a published denoiser, built on the meta device: "
                   + ", ".join(ARCHITECTURES))
    d.add_argument("--model", help="or a local diffusers pipeline folder (its config only is read)")
    d.add_argument("--plan", action="append",
                   help="base, small, tiny (UNets), half (transformers), a YAML plan file or an inline mapping "
                   "such as '{blocks: [0, 1, 18]}' (repeatable; default: base, small, tiny for a UNet, half for a "
                   "transformer)")
    d.add_argument("--resolution", type=int, default=None, help="image size in px (default: the model's native size)")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=cmd_distill_plan)
