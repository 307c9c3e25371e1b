"""Atomic file writes: every checkpoint, adapter and config difftune writes goes through `atomic_write`.

Every temporary file or folder difftune creates next to what it writes is named ``TMP_PREFIX...``
(``.difftune-tmp-``), and cleanup after a crash (`difftune.train.checkpoints.clean_leftovers`) removes only names
with that prefix: a user's own ``notes/.draft.tmp`` in an output folder is never ours to delete (issue 32).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".difftune-tmp-"  #: the start of every temp name difftune creates; nothing else is ever cleaned up


def is_temp(path: str | Path) -> bool:
    """Whether ``path``'s name is one of difftune's temp names (`TMP_PREFIX`)."""
    return Path(path).name.startswith(TMP_PREFIX)


def remove_temp(path: str | Path) -> None:
    """Delete a temp file or folder of ours (a folder with its contents; a symlink itself, never its target).

    Raises:
        ValueError: ``path`` is not a temp name of ours (a guard: cleanup must never reach a user's file).
    """
    path = Path(path)
    if not is_temp(path):
        raise ValueError(f"refusing to delete {str(path)!r}: not a difftune temp name ({TMP_PREFIX}*)")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would set it, for all threads, for an instant)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass  # no /proc (macOS, Windows): fall back to os.umask below
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file behind.

    The temporary file (``.difftune-tmp-<name>.<random>.tmp`` in ``path``'s folder) is removed if ``write`` fails;
    the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; the file gets the mode a plain open() would give it under the user's umask
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
