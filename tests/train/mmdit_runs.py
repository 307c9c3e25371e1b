"""Helpers of the SD3/Flux trainer tests (the tiny pipelines come from the ``mmdit`` fixture in conftest.py): the
tiny debug config with the paths set, and the trainer's `setup` as a context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from difftune.config import load_config
from difftune.train import TrainConfig
from difftune.train.lock import release_output_dir
from difftune.train.trainer import setup

REPO = Path(__file__).resolve().parents[2]


def tiny_mmdit_cfg(paths: dict[str, Path], root: Path, kind: str, *sets: str) -> TrainConfig:
    """``configs/debug/tiny_{kind}.yaml`` on the tiny ``kind`` pipeline and the caption set of ``paths`` (the
    ``mmdit`` fixture), writing under ``root / "out"``, without validation prompts; ``sets`` as ``--set``."""
    return load_config(TrainConfig, REPO / "configs" / "debug" / f"tiny_{kind}.yaml", [
        f"model.path={paths[kind]}", f"data.path={paths['captions']}", f"output_dir={root / 'out'}",
        "validation.prompts=[]", *sets])


@contextlib.contextmanager
def setup_run(cfg: TrainConfig) -> Iterator[Any]:
    """The trainer's run for ``cfg`` (`difftune.train.trainer.setup`), its output folder's lock released after, so
    the test's next run may use the folder."""
    run = setup(cfg)
    try:
        yield run
    finally:
        release_output_dir(cfg.output_dir)
