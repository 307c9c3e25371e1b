"""``train``: the one trainer, for every method (same as ``python -m difftune.train``)."""

from __future__ import annotations

import argparse

from .commands import command


def cmd_train(args: argparse.Namespace) -> int:
    from diffusers.utils import logging as diffusers_logging

    from ..config import load_config
    from ..train import TrainConfig
    from ..train import main as train_main
    from ..train.interrupt import TrainingInterrupted

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": the trainer has its own bar
    overrides = [*(args.set or []), *(["overwrite=true"] if args.overwrite else [])]
    try:
        train_main(load_config(TrainConfig, args.config, overrides))
    except TrainingInterrupted as e:  # the trainer printed the checkpoint and the resume command
        return e.exit_code
    return 0


@command("train", help="train with a YAML config (any method); same as python -m difftune.train")
def _train_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("config", help="training YAML (see configs/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. train.max_steps=500; repeatable")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in output_dir (same as --set overwrite=true)")
    s.set_defaults(func=cmd_train)


def cmd_push(args: argparse.Namespace) -> int:
    from ..train.hub import push_folder

    print(f"pushed {args.folder} to {args.repo_id}: {push_folder(args.folder, args.repo_id, private=args.private)}")
    return 0


@command("push", help="upload a finished run's folder to a Hugging Face Hub repo (what hub.push does at the end)")
def _push_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("folder", help="a run's output_dir (adapter or pipeline, README.md model card, config.yaml)")
    s.add_argument("repo_id", help="the Hub repo, user/name (created when it does not exist)")
    s.add_argument("--private", action="store_true", help="create the repo private")
    s.set_defaults(func=cmd_push)
