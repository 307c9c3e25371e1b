"""Resumable checkpoints: accelerate's ``save_state`` (optimizer, LR schedule, RNG states of every process) plus a
``trainable.safetensors`` with only what trains (the plugin's `checkpoint_tensors` and the EMA), never the frozen base.

Crash safety (issue 17): a checkpoint is written whole into ``checkpoints/.difftune-tmp-checkpoint-<step>`` (its
``trainer_state.json`` last, every file fsynced) and renamed to ``checkpoint-<step>`` only then; old checkpoints are
deleted only after that, each first renamed out of the ``checkpoint-*`` namespace (``.difftune-tmp-trash-*``). A
SIGKILL at any moment therefore leaves every ``checkpoint-*`` folder complete and the newest one in place; the
leftovers are removed at the next start (`clean_leftovers`: only names with difftune's temp prefix, issue 32). A
write that fails (a full disk) removes the checkpoint's temp folder and stops the run with a message naming the last
complete checkpoint and the command resuming it (`saving.py`, issue 29). `restore` falls back to the previous
checkpoint, with a warning, when the newest cannot be read, and refuses a checkpoint whose RNG state does not restore
(accelerate only logs that) unless ``checkpointing.allow_inexact_resume``. A checkpoint whose trainable tensors are
not finite is never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..fileio import TMP_PREFIX, atomic_write, is_temp, remove_temp
from ..methods.plugin import TrainerPlugin
from .config import TrainConfig
from .reporting import say
from .saving import STATE_FILE, checkpoint_dirs, discard_on_failure, saving

logger = logging.getLogger("difftune.train")

CHECKPOINT_FILE = "trainable.safetensors"
TRASH_PREFIX = f"{TMP_PREFIX}trash-"  #: a checkpoint being deleted (a checkpoint being written: TMP_PREFIX)
#: the folders a run writes temp names into (the output folder itself is the first)
WRITTEN = ("", "checkpoints", "adapter", "pipeline", "validation")
#: the checkpoint temp and trash folders of difftune before the common prefix (in ``checkpoints/`` only)
_LEGACY = re.compile(r"\.(tmp|trash)-checkpoint-\d+(-[0-9a-f]{8})?")


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
        check_finite_tensors(tensors, f"checkpoint {output_dir}")
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


def clean_leftovers(output_dir: Path) -> list[Path]:
    """Remove what a killed run left behind: temp checkpoint folders, checkpoints renamed out of the namespace for
    deletion, a half-moved result, ``atomic_write`` temp files. Only difftune's own temp names (`TMP_PREFIX`) in the
    folders a run writes (`WRITTEN`) are touched: a user's ``notes/.draft.tmp`` is not ours (issue 32). Called under
    the output-folder lock, so no other run is writing them. Returns what went."""
    removed = []
    for place in WRITTEN:
        folder = output_dir / place
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in sorted(folder.iterdir()):
            if is_temp(p):
                remove_temp(p)
            elif place == "checkpoints" and _LEGACY.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                remove_temp(p.rename(p.with_name(f"{TRASH_PREFIX}{p.name}")))
            else:
                continue
            removed.append(p)
    if removed:
        logger.warning("removed %d leftover(s) of an interrupted run in %s: %s", len(removed), output_dir,
                       [str(p.relative_to(output_dir)) for p in removed[:5]])
    return removed


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder by first renaming it out of the ``checkpoint-*`` namespace: a kill during the
    deletion leaves a ``.difftune-tmp-trash-*`` folder that is never resumed from (and is cleaned at the next
    start); a failed deletion is retried once, then reported on the exception."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}")
    os.replace(folder, trash)
    _fsync_dir(folder.parent)
    try:
        remove_temp(trash)
    except BaseException as e:
        discard_on_failure(trash, e)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename itself has still happened
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Any, cfg: TrainConfig, step: int, write_state: Callable[[Path], None]) -> None:
    """Write ``checkpoint-<step>`` (every process takes part), then drop those beyond the retention limit.

    The newest complete checkpoint is never in danger: the new one is written whole into
    ``.difftune-tmp-checkpoint-<step>`` and renamed into place only after its ``trainer_state.json``; only then are
    old ones removed, each renamed out of the ``checkpoint-*`` namespace before its files are deleted. A kill at any
    moment leaves every ``checkpoint-*`` folder complete. A failed write removes the temp folder and raises
    `saving.SaveFailed` (the message names the last complete checkpoint and the command resuming it).
    """
    root = Path(cfg.output_dir) / "checkpoints"
    tmp = root / f"{TMP_PREFIX}checkpoint-{step}"
    folder = root / f"checkpoint-{step}"
    with saving(cfg, f"saving checkpoint step {step}", tmp):
        try:
            if accelerator.is_main_process:
                if tmp.exists():
                    remove_temp(tmp)
                root.mkdir(parents=True, exist_ok=True)
            accelerator.wait_for_everyone()
            # Every process calls save_state: each writes its own RNG state, the main one the rest.
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_state(tmp)
                for f in tmp.iterdir():  # durable before the rename makes the folder count
                    if f.is_file():
                        with open(f, "rb") as fh:
                            os.fsync(fh.fileno())
                if folder.exists():  # a resumed run saving a step again (its earlier copy was unreadable or older)
                    _discard(folder)
                os.replace(tmp, folder)
                _fsync_dir(root)
        except BaseException as e:
            if accelerator.is_main_process:
                discard_on_failure(tmp, e)
            raise
    if accelerator.is_main_process:
        limit = cfg.checkpointing.checkpoints_total_limit
        if limit:
            with saving(cfg, f"deleting old checkpoints (checkpointing.checkpoints_total_limit: {limit})", root):
                existing = [p for p in checkpoint_dirs(Path(cfg.output_dir)) if p != folder]
                for old in existing[: max(0, len(existing) + 1 - limit)]:
                    _discard(old)
        say(f"checkpoint step {step}: {folder}")
    accelerator.wait_for_everyone()


class _RNGSentinel:
    """Detects a checkpoint whose RNG state was not restored: accelerate's ``load_state`` skips an unreadable
    ``random_states_<i>.pkl`` with an info log. The generators are set to a fresh random state before loading; if
    they still hold it afterwards, nothing was restored and the resume would not be exact."""

    def __init__(self) -> None:
        import random

        import numpy as np

        seed = int.from_bytes(os.urandom(8), "little")
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.torch, self.python = torch.get_rng_state(), random.getstate()

    def restored(self) -> bool:
        import random

        return not (torch.equal(torch.get_rng_state(), self.torch) or random.getstate() == self.python)


def restore(accelerator: Any, cfg: TrainConfig) -> Path | None:
    """Load the checkpoint ``checkpointing.resume_from_checkpoint`` names; returns it, or None when there is none.

    ``latest`` tries the complete checkpoints newest first: one that cannot be read (a corrupt optimizer, trainable
    or state file, an RNG state that does not restore) is passed over with a warning naming it and the reason, and
    the previous one is used. A named folder that cannot be read is an error. An RNG state that cannot be restored
    is an error unless ``checkpointing.allow_inexact_resume`` (then a warning: the run continues, not bit-exactly).
    """
    value = cfg.checkpointing.resume_from_checkpoint
    if not value:
        return None
    candidates = list(reversed(checkpoint_dirs(Path(cfg.output_dir)))) if value == "latest" else [resolve_resume(cfg)]
    if not candidates:
        logger.warning("resume_from_checkpoint=latest: no checkpoint in %s yet; starting from step 0", cfg.output_dir)
        return None
    failures = []
    for folder in candidates:
        sentinel = _RNGSentinel()
        try:
            accelerator.load_state(str(folder))
        except DifftuneError as e:
            if "does not fit this run's config" in str(e):
                raise  # a config mismatch is the user's to fix, not a damaged file to skip
            failures.append((folder, e))
        except Exception as e:  # accelerate/torch/safetensors/json errors: the files are damaged
            failures.append((folder, e))
        else:
            if sentinel.restored():
                return folder
            if cfg.checkpointing.allow_inexact_resume:
                logger.warning("%s: its RNG state (random_states_%d.pkl) could not be restored; continuing because "
                               "checkpointing.allow_inexact_resume is set: this run will NOT reproduce an "
                               "uninterrupted one bit-exactly", folder, accelerator.process_index)
                return folder
            failures.append((folder, DifftuneError(
                f"its RNG state (random_states_{accelerator.process_index}.pkl) is missing or unreadable")))
        if len(candidates) > 1 and folder is not candidates[-1]:
            logger.warning("cannot resume from %s (%s: %s); falling back to the previous checkpoint", folder,
                           type(failures[-1][1]).__name__, failures[-1][1])
    listed = "; ".join(f"{f.name}: {type(e).__name__}: {e}" for f, e in failures)
    raise DifftuneError(
        f"cannot resume from `checkpointing.resume_from_checkpoint`={value!r}: no readable checkpoint ({listed}). "
        "Hint: delete the damaged checkpoint folder(s) to start over, or set checkpointing.allow_inexact_resume: "
        "true when only the RNG state is lost")


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


def check_finite_tensors(tensors: dict[str, Tensor], what: str) -> None:
    """Refuse to write NaN/inf trained values: a run that diverged saves nothing as its result or checkpoint."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DifftuneError(f"training diverged: {len(bad)} trained tensor(s) hold NaN/inf (first: {bad[:3]}); "
                            f"{what} was not written. Hint: lower optimizer.lr, keep train.max_grad_norm set, or "
                            "use bf16 instead of fp16")


def weights_digest(tensors: dict[str, Tensor]) -> str:
    """16 hex digits of SHA-256 over the tensors' names and fp32 values (the trainer prints it at the end)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

