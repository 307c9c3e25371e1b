"""Writes of a training run that fail (a full disk, a read-only folder, an I/O error), and the result's safe save.

Every save step of the trainer (preparing the output folder, each checkpoint, the rotation of old checkpoints, the
validation grids, the result, the model card) runs inside `saving`. A failed write there (`write_error`: an
``OSError``, or torch's or safetensors' own wrapping of one) becomes a `SaveFailed`: one message naming the step,
the path and the error text, the free space left there, what is intact (the last complete checkpoint, by name, or
the finished result) and the exact command that resumes, instead of a traceback (issue 29). The step removes its own
temp files before that (`atomic_write`, `save_checkpoint`, `save_result`), so nothing half-written stays behind.

`save_result` writes the result into a temp folder and only then moves it into place: a crash part-way through the
final save leaves no partial ``adapter``/``pipeline`` folder (which would count as a finished run), only a temp
folder that the next start removes.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import DifftuneError
from ..fileio import TMP_PREFIX, remove_temp

#: torch's zip writer reports a failed write as a RuntimeError ("[enforce fail at inline_container.cc:672] .
#: unexpected pos 576 vs 534" on a full disk), without the OS error
_TORCH_WRITE = ("inline_container", "PytorchStreamWriter", "file write failed")


class SaveFailed(DifftuneError):
    """A save step of a training run could not write; the message says what is intact and how to go on."""


def write_error(error: BaseException) -> bool:
    """Whether ``error`` is a failed write: an ``OSError``, safetensors' ``SafetensorError`` for an I/O error
    ("I/O error: No space left on device (os error 28)"), or torch's zip-writer ``RuntimeError``."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        return "I/O error" in text
    return isinstance(error, RuntimeError) and any(s in text for s in _TORCH_WRITE)


def resume_command(cfg: Any, checkpoint: Path) -> str:
    """The command that continues the run from ``checkpoint``: it trains from the config the run wrote into its
    output folder (so every ``--set`` of the run is kept)."""
    out = Path(cfg.output_dir)
    return (f"difftune train {shlex.quote(str(out / 'config.yaml'))} "
            f"--set checkpointing.resume_from_checkpoint={shlex.quote(str(checkpoint))}")


def what_is_intact(cfg: Any, result: Path | None = None, fix: str = "fix the cause") -> str:
    """What a failed run leaves: the finished ``result``, or the last complete checkpoint and the command resuming
    it (to run once the user did ``fix``; last, without a full stop, so that it can be copied), or that there is
    none."""
    from .checkpoints import checkpoint_dirs

    if result is not None:
        return f"The result {result} is complete and can be used."
    found = checkpoint_dirs(Path(cfg.output_dir))
    if not found:
        return ("No checkpoint of this run exists (checkpointing.checkpointing_steps: "
                f"{cfg.checkpointing.checkpointing_steps}), so there is nothing to resume from: {fix}, then train "
                "again (it starts at step 0). Hint: set checkpointing.checkpointing_steps so that a failure keeps "
                "the progress made.")
    head = f"The last complete checkpoint, {found[-1]}, is intact. {fix[0].upper()}{fix[1:]}, then resume with"
    if not (Path(cfg.output_dir) / "config.yaml").is_file():  # the failure was writing it: the user's own command
        return f"{head} your command plus --set checkpointing.resume_from_checkpoint={shlex.quote(str(found[-1]))}"
    return f"{head}: {resume_command(cfg, found[-1])}"


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                free = shutil.disk_usage(folder).free
            except OSError:
                return "unknown"
            for unit in ("bytes", "KiB", "MiB", "GiB"):
                if free < 1024 or unit == "GiB":
                    return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
                free /= 1024
    return "unknown"


@contextmanager
def saving(cfg: Any, what: str, target: str | Path, result: Path | None = None) -> Iterator[None]:
    """Run one save step: a failed write in it (`write_error`) becomes a `SaveFailed` naming ``what`` failed, the
    path (the error's own, else ``target``), the error text, the free space there, what is intact (``result`` when
    the result was already saved) and how to go on. Other exceptions pass unchanged.

    Raises:
        SaveFailed: a write failed.
    """
    try:
        yield
    except Exception as e:
        if not write_error(e):
            raise
        path = Path(getattr(e, "filename", None) or target)
        code = getattr(e, "errno", None)
        found = re.search(r"os error (\d+)", str(e))  # safetensors' text for the OS error
        code = code if code is not None or found is None else int(found.group(1))
        if isinstance(e, OSError):
            detail = f"{e.strerror or e} ([Errno {code}] {errno.errorcode.get(code, '?')})" if code else str(e)
        elif isinstance(e, RuntimeError):  # torch's zip writer names neither the file nor the OS error
            detail = f"torch could not write a file of it (RuntimeError: {e})"
        else:
            detail = f"{type(e).__name__}: {e}"
        fix = ("free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "fix the cause above" if code
               else "fix the cause (a full disk is the usual one)")
        notes = " ".join(getattr(e, "__notes__", [])) or "Nothing half-written was left behind."
        raise SaveFailed(f"{what} failed at {path}: {detail}; free space there: {_free_space(path)}. {notes} "
                         f"{what_is_intact(cfg, result, fix)}") from e


def discard_on_failure(temp: Path, error: BaseException) -> None:
    """Remove ``temp`` (a temp file or folder of ours) after ``error`` stopped the step writing it; if that fails
    too, a note on ``error`` says so (the next start removes it: it carries `TMP_PREFIX`)."""
    try:
        if temp.exists() or temp.is_symlink():
            remove_temp(temp)
    except OSError as e:
        error.add_note(f"The temp {temp} could not be removed ({e}); the next run in this folder removes it.")


def save_result(output_dir: Path, name: str, save: Callable[[Path], Path]) -> Path:
    """Write the run's result by ``save(path)`` into a temp folder in ``output_dir``, then move what it wrote
    (``name``, and any sibling such as KIND's trained-base ``pipeline``, said in one line each) into place,
    replacing an earlier run's.

    Returns:
        The result's path in ``output_dir``.
    """
    from .reporting import say

    stage = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}result-", dir=output_dir))
    try:
        written = Path(save(stage / name))
        for entry in sorted(stage.iterdir()):
            _into_place(entry, output_dir / entry.name)
            if entry.name != name:  # the trainer announces the result itself
                say(f"saved {output_dir / entry.name} (next to the result)")
        remove_temp(stage)
    except BaseException as e:
        discard_on_failure(stage, e)
        raise
    try:
        return output_dir / written.relative_to(stage)
    except ValueError:  # the plugin wrote somewhere else and said so
        return written


def _into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; an existing ``dst`` (an overwritten run's result) is first renamed to a temp
    name, so the path never holds a mix of the two, and deleted after."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f"{TMP_PREFIX}old-{dst.name}-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        remove_temp(old)
