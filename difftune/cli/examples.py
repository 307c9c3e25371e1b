"""Getting started: ``quickstart`` (fine-tune the shipped sd-mini), ``demo`` (the tiny plumbing example) and ``zoo``
(the reference models' MNIST data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import bad_value
from .commands import command


def cmd_zoo_data(args: argparse.Namespace) -> int:
    from ..zoo import mnist

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
    from ..quickstart import run_quickstart

    run_quickstart(Path(args.out), steps=args.steps, n=args.n, sample_steps=args.sample_steps, model_name=args.model)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(Path(args.out))
    return 0


@command("zoo", help="reference-model data: write the MNIST benchmark folders")
def _zoo_arguments(s: argparse.ArgumentParser) -> None:
    zsub = s.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    z = zsub.add_parser("data", help="write pretraining, subject, style and held-out folders from real MNIST")
    z.add_argument("--out", default="outputs/zoo/data")
    z.set_defaults(func=cmd_zoo_data)


@command("quickstart", help="fine-tune the shipped sd-mini (or flow-mini) on a new digit; before/after numbers")
def _quickstart_arguments(s: argparse.ArgumentParser) -> None:
    from ..quickstart import MODELS

    s.add_argument("--model", default="sd-mini", choices=MODELS, help="the shipped reference model to personalize")
    s.add_argument("--out", default="outputs/quickstart")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: the quickstart config's)")
    s.add_argument("--n", type=int, default=20, help="trigger-prompt samples for the judge (n/2 per digit 0-8)")
    s.add_argument("--sample-steps", type=int, default=20, help="sampling steps")
    s.set_defaults(func=cmd_quickstart)


@command("demo", help="tiny end-to-end example: inject LoRA, save, generate at two weights")
def _demo_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="outputs/demo")
    s.set_defaults(func=cmd_demo)
