"""Resumable checkpoints: accelerate's ``save_state`` (optimizer, LR schedule, RNG states of every process) plus a
``trainable.safetensors`` with only what trains (the plugin's `checkpoint_tensors` and the EMA), never the frozen base.

A checkpoint folder counts only once its ``trainer_state.json`` is written, after everything else: an interrupted save
is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..fileio import atomic_write
from .config import TrainConfig
from .plugin import TrainerPlugin

logger = logging.getLogger("difftune.train")

CHECKPOINT_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"


def checkpoint_hooks(accelerator: Any, plugin: TrainerPlugin, model: nn.Module, ema: Any,
                     progress: dict[str, Any]) -> Callable[[Path], None]:
    """Register accelerate save/load hooks; returns ``write_state(dir)``, called once a save_state has finished."""
    from safetensors.torch import load_file, save_file

    method, name = plugin.config, plugin.name

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # the frozen base is never written into a checkpoint
        if not accelerator.is_main_process:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in plugin.checkpoint_tensors(model).items()}
        if ema is not None:
            tensors.update({f"ema.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)})
        atomic_write(Path(output_dir) / CHECKPOINT_FILE, lambda tmp: save_file(tensors, tmp))

    def write_state(output_dir: Path) -> None:
        # Written after accelerate's files: a checkpoint folder without it is incomplete and is never resumed from.
        state = {"step": progress["step"], "method": method.method, "adapter_name": name,
                 "ema_step": ema.optimization_step if ema is not None else None}
        atomic_write(output_dir / STATE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        saved = load_file(str(Path(input_dir) / CHECKPOINT_FILE))
        state = json.loads((Path(input_dir) / STATE_FILE).read_text())
        live = plugin.checkpoint_tensors(model)
        problems = [f"missing {k!r}" for k in sorted(set(live) - set(saved))]
        problems += [f"{k!r}: checkpoint {tuple(saved[k].shape)}, now {tuple(v.shape)}" for k, v in live.items()
                     if k in saved and saved[k].shape != v.shape]
        if state.get("method") != method.method:
            problems.insert(0, f"method: checkpoint {state.get('method')!r}, now {method.method!r}")
        if (ema is not None) != (state.get("ema_step") is not None):
            problems.insert(0, f"train.ema: checkpoint {state.get('ema_step') is not None}, now {ema is not None}")
        if problems:
            raise DifftuneError(f"checkpoint {input_dir} does not fit this run's config ({len(problems)} "
                                f"difference(s), first: {problems[:3]}); resume with the config it was written with")
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(saved[k])
            if ema is not None:
                for i, p in enumerate(ema.shadow_params):
                    p.copy_(saved[f"ema.{i}"])
        progress["step"] = int(state["step"])
        if ema is not None and state.get("ema_step") is not None:
            ema.optimization_step = int(state["ema_step"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return write_state


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``checkpointing.resume_from_checkpoint`` names (``latest``: the newest complete one), or None."""
    value = cfg.checkpointing.resume_from_checkpoint
    if not value:
        return None
    if value == "latest":
        found = checkpoint_dirs(Path(cfg.output_dir))
        if not found:
            logger.warning("resume_from_checkpoint=latest: no checkpoint in %s yet; starting from step 0",
                           cfg.output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise bad_value("checkpointing.resume_from_checkpoint", value, "'latest' or an existing checkpoint folder",
                        f"checkpoints are written under {Path(cfg.output_dir) / 'checkpoints'}")
    return path


def save_checkpoint(accelerator: Any, cfg: TrainConfig, step: int, write_state: Callable[[Path], None]) -> None:
    """Write ``checkpoint-<step>`` (every process takes part) after dropping those beyond the retention limit."""
    out = Path(cfg.output_dir)
    if accelerator.is_main_process and cfg.checkpointing.checkpoints_total_limit:
        existing = checkpoint_dirs(out)
        for old in existing[: max(0, len(existing) - cfg.checkpointing.checkpoints_total_limit + 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    # Every process calls save_state: each writes its own RNG state, the main one the rest.
    folder = out / "checkpoints" / f"checkpoint-{step}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_state(folder)


def weights_digest(tensors: dict[str, Tensor]) -> str:
    """16 hex digits of SHA-256 over the tensors' names and fp32 values (the trainer prints it at the end)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

