"""SPM's commands: ``import-spm`` (a kohya-format SPM file to an adapter) and ``erase`` (the erasure report)."""

from __future__ import annotations

import argparse

from ...cli.commands import command, parse_adapter_spec


def cmd_import_spm(args: argparse.Namespace) -> int:
    from ...interop.spm import import_spm

    print(f"wrote {import_spm(args.checkpoint, args.model, args.out, name=args.name, component=args.component)}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from ... import loading
    from ...generation import load_pipeline
    from .adapter import set_transport
    from .erase import evaluate_erasure, write_report

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


@command("import-spm", help="convert a kohya-format SPM file (official or exported) to an spm adapter")
def _import_spm_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", help="an SPM .safetensors (lora_unet_*.lora_down/lora_up/alpha)")
    s.add_argument("--model", required=True, help="a local diffusers pipeline of the same UNet layout (its text "
                                                  "encoder stores E(concept) for transport)")
    s.add_argument("--out", required=True, help="adapter folder to write")
    s.add_argument("--name", default="default", help="the adapter's name")
    s.add_argument("--component", default=None, help="the component it adapts (default unet/transformer)")
    s.set_defaults(func=cmd_import_spm)


@command("erase", help="judge concept erasure: efficacy, specificity and their harmonic mean (JSON)")
def _erase_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help="local diffusers pipeline folder")
    s.add_argument("--adapter", action="append", metavar="PATH[:WEIGHT]", help="adapter to load (repeatable)")
    s.add_argument("--erase", nargs="+", required=True, help="the erased concepts (e.g. seven)")
    s.add_argument("--keep", nargs="*", help="concepts that must survive (e.g. zero one two)")
    s.add_argument("--template", action="append", default=None, help="prompt template with {} (repeatable; default "
                                                                      "'a handwritten digit {}')")
    s.add_argument("--judge", default="mnist",
                   help="registered judge (difftune.methods.spm.erase.JUDGES); default mnist")
    s.add_argument("--n", type=int, default=20, help="images per concept and template")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-transport", action="store_true", help="SPMs at fixed strength (γ = 1) on every prompt")
    s.add_argument("--out", required=True, help="the JSON report to write")
    s.set_defaults(func=cmd_erase)
