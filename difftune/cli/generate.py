"""Sampling: ``generate`` (any pipeline, adapters, control images) and ``eval`` (digits judged by the MNIST
classifier)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import DifftuneError, bad_value
from .commands import command, parse_adapter_spec, parse_control_spec


def model_of(args: argparse.Namespace) -> str:
    """``--model``, or else the base model the first ``--adapter`` records (the name it was trained from: a Hub id,
    a shipped model, a folder or a checkpoint file), resolved as ``--model`` would be."""
    if args.model:
        return args.model
    from ..serialization import read_header

    if not args.adapter:
        raise bad_value("--model", None, "given (or an --adapter that records its base model)", "e.g. --model sd-mini")
    path = parse_adapter_spec(args.adapter[0])[0]
    try:
        base = read_header(path).get("base_model")
    except DifftuneError as e:
        raise bad_value("--model", None, f"given: the base of {path!r} cannot be read from it ({e})") from e
    if not base:
        raise bad_value("--model", None, f"given: {path!r} records no base model")
    print(f"--model {base} (the base model {path} records)")
    return str(base)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation import generate, load_pipeline
    from ..loading import load_adapter

    specs = [parse_adapter_spec(s) for s in args.adapter or []]
    controls = [parse_control_spec(s) for s in args.control or []]
    pipe = load_pipeline(model_of(args), device=args.device, revision=args.revision, config=args.config)
    aliases: dict[str, str] = {}  # --control may name an adapter by its --adapter path, folder/file name or adapterN
    for i, (path, weight) in enumerate(specs):
        name = load_adapter(pipe, path, name=f"adapter{i}", weight=weight)
        for alias in (path, Path(path).name, Path(path).stem, name):
            aliases.setdefault(alias, name)
    inputs = None
    if controls:
        from ..loading import set_adapter_weights
        from ..methods.scedit.conditions import control_inputs

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
                      guidance=args.guidance, height=args.height, width=args.width, adapter_inputs=inputs,
                      negative_prompt=args.negative_prompt, max_sequence_length=args.max_sequence_length)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out)
    print(f"wrote {out}")
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
    from ..eval import evaluate, generate_digits, write_report
    from ..generation import load_pipeline
    from ..loading import load_adapter

    model = model_of(args)
    pipe = load_pipeline(model, device=args.device, revision=args.revision, config=args.config)
    for i, spec in enumerate(args.adapter or []):
        path, weight = parse_adapter_spec(spec)
        load_adapter(pipe, path, name=f"adapter{i}", weight=weight)
    digits = parse_digits(args.digits)
    if args.prompt and len(digits) != 1:
        raise bad_value("--digits", args.digits, "one digit (the one --prompt should produce)")
    images, labels = generate_digits(pipe, digits, args.n, prompt=args.prompt, seed=args.seed, steps=args.steps,
                                     guidance=args.guidance)
    metrics = evaluate(images, labels)
    metrics.update(model=model, adapters=args.adapter or [], prompt=args.prompt, guidance=args.guidance,
                   steps=args.steps, seed=args.seed)
    out = write_report(args.out, metrics, images, rows=len(digits))
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "fd", "fd_floor", "n_floor", "ink", "diversity")},
                     indent=2))
    print(f"wrote {out / 'metrics.json'} and {out / 'grid.png'}")
    return 0


def add_model_arguments(s: argparse.ArgumentParser) -> None:
    """``--model`` (+ ``--revision``, ``--config``): a base model as `difftune.basemodel.resolve_model` takes it."""
    s.add_argument("--model", default=None,
                   help="base model: a diffusers pipeline folder, a shipped model (sd-mini, dit-mini), a Hub repo id "
                        "(org/name; the cache when HF_HUB_OFFLINE=1) or a single-file .safetensors checkpoint "
                        "(default: the base model the first --adapter records)")
    s.add_argument("--revision", default=None, help="with a Hub repo id: the branch, tag or commit")
    s.add_argument("--config", default=None, help="with a single-file checkpoint: the pipeline folder or Hub repo id "
                                                  "holding its configs")


@command("generate", help="generate an image with a diffusers pipeline and adapters")
def _generate_arguments(s: argparse.ArgumentParser) -> None:
    add_model_arguments(s)
    s.add_argument("--adapter", action="append", metavar="PATH[:WEIGHT]", help="adapter to load; repeatable")
    s.add_argument("--control", action="append", metavar="IMAGE[:ADAPTER[:SCALE]]",
                   help="control image for a CSC (SCEdit) adapter, named as in --adapter, with its scale; repeatable")
    s.add_argument("--prompt", help="text prompt (text-to-image pipelines)")
    s.add_argument("--class-label", type=int, help="class id (class-conditional DiT pipelines)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    s.add_argument("--negative-prompt", default=None, help="what guidance steers away from (text pipelines)")
    s.add_argument("--max-sequence-length", type=int, default=None,
                   help="SD3/Flux: T5 tokens per prompt (default: what the model folder records, else the pipeline's)")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--out", required=True, help="output PNG path")
    s.set_defaults(func=cmd_generate)


@command("eval", help="generate digits with a reference model (+ adapters) and judge them")
def _eval_arguments(s: argparse.ArgumentParser) -> None:
    add_model_arguments(s)
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
