"""One training run per output folder: ``output_dir/.difftune.lock``.

Two runs writing one folder would delete each other's checkpoints and overwrite each other's result. The first run
takes an exclusive ``fcntl.flock`` on the lock file and writes who it is (pid, host, start time) into it; a second run
fails at once with a `DifftuneError` naming the running one. The kernel drops a flock when its process dies, however
it dies, so a lock left by a killed run is free: the next run takes it over (with a warning naming the dead run) and
never has to guess from a pid whether a run is alive. `release_output_dir` (the end of a run) deletes the file while
still holding the lock; a run that locked a file just before it was deleted notices (its inode is no longer the
path's) and locks the new one instead, so two runs never both hold the folder. The trainer releases it however a run
ends in Python (a refusal, an error, a full disk: `trainer.main`'s ``finally``); a killed process leaves the file, and
the kernel releases the lock at the process's exit. Within one process the lock is re-entrant (a notebook running
``main`` twice on one folder).

Where ``fcntl`` does not exist (Windows) the same file is created with ``O_EXCL`` and a lock whose pid is not alive on
this host counts as stale. A lock held on another host of a shared filesystem cannot be checked: the error says how to
remove it by hand.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import DifftuneError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("difftune.train")

LOCK_FILE = ".difftune.lock"
_held: dict[Path, int] = {}  #: resolved output folder -> open file descriptor holding its lock


def _owner() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')!r}, started {info.get('started')}"


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):  # a lock being written this instant, or garbage: describe it as unknown
        return {}
    return info if isinstance(info, dict) else {}


def _busy(path: Path, info: dict) -> DifftuneError:
    return DifftuneError(
        f"`output_dir` {str(path.parent)!r} is in use by another training run ({_describe(info)}); two runs in one "
        f"folder overwrite each other's checkpoints and result. Hint: pick another output_dir, or wait for that run "
        f"to finish (if you are sure it is not running, delete {path})")


def hold_output_dir(output_dir: str | Path) -> Path:
    """Take the lock on ``output_dir`` (created if needed) for this process; returns the lock file.

    Raises:
        DifftuneError: another live run holds it (the message names its pid, host and start time).
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = folder.resolve()
    if key in _held:
        return path
    if fcntl is None:
        return _hold_exclusive(path, key)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(path, _read(path)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder released (deleted) it between our open and our flock: lock the new file
    previous = _read(path)
    if previous:  # its holder died without releasing it (a clean end deletes the file)
        logger.warning("taking over the lock on %s left by a run that is no longer alive (%s)", folder,
                       _describe(previous))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        os.fsync(fd)
    except BaseException:  # e.g. a full disk: leave no lock file behind (deleted while still locked, as on release)
        path.unlink(missing_ok=True)
        os.close(fd)
        raise
    _held[key] = fd
    return path


def _hold_exclusive(path: Path, key: Path) -> Path:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read(path)
            if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(
                    info["pid"]):
                logger.warning("taking over the lock on %s left by a run that is no longer alive (%s)", path.parent,
                               _describe(info))
                path.unlink(missing_ok=True)
                continue
            raise _busy(path, info) from None
        try:
            os.write(fd, json.dumps(_owner()).encode())
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        _held[key] = fd
        return path
    raise _busy(path, _read(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: what a run writes only at its end: a folder holding one of them holds a finished run
FINISHED = ("adapter", "pipeline", "README.md")


def check_unfinished(output_dir: str | Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into a folder holding a finished run unless ``overwrite`` or ``resuming``; with
    ``overwrite``, remove the old run's checkpoints and validation grids (so `latest` cannot pick one of them).
    Called under the output-folder lock.

    Raises:
        DifftuneError: ``output_dir`` holds a finished run and neither flag is set.
    """
    import shutil

    folder = Path(output_dir)
    found = [name for name in FINISHED if (folder / name).exists()]
    if not found or resuming:
        return
    if not overwrite:
        raise DifftuneError(
            f"`output_dir` {str(folder)!r} already holds a finished run ({', '.join(found)}); training again would "
            "overwrite it. Hint: choose another output_dir, pass --overwrite (config: overwrite: true) to replace "
            "it, or set checkpointing.resume_from_checkpoint to continue from one of its checkpoints")
    for name in ("checkpoints", "validation"):
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)
    logger.warning("overwrite: replacing the finished run in %s", folder)


def release_output_dir(output_dir: str | Path) -> None:
    """Release this process's lock on ``output_dir`` (a no-op when it holds none)."""
    folder = Path(output_dir)
    fd = _held.pop(folder.resolve(), None)
    if fd is None:
        return
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)  # while still locked: see the module docstring
    finally:
        os.close(fd)
