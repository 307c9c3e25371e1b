"""The studio's path rules: everything it reads or writes lies inside the adapters folder, by its real path.

A key (``labs/style``) is resolved with every symlink followed, and the *real* path must lie inside the folder's real
path: a symlinked folder, a symlinked file inside a real folder (``adapter_model.safetensors -> /elsewhere``), or a
symlinked ``studio-mixes`` pointing out of the folder is refused. Symlinks that stay inside the folder are allowed.

The files the studio opens itself (mix bundles, hashed weights) and every file it writes are then opened by walking
the resolved path from the folder one component at a time with ``O_NOFOLLOW`` (``dir_fd`` chains): a symlink swapped
in between the check and the open makes the open fail instead of leading elsewhere. The adapter loader of difftune
opens its two files by path; `adapter_folder` checks both just before, so only a symlink planted in that instant,
by someone who can already write the folder, could still be followed.

Messages shown to a user name files relative to the adapters folder (`public_message`) and echo at most a short
prefix of what was sent (`clip`): a public studio must not hand out the server's paths or echo 10 MB back.
"""

from __future__ import annotations

import contextlib
import os
import re
import reprlib
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from difftune.errors import DifftuneError, bad_value

#: walking with dir_fd and O_NOFOLLOW needs both (Linux, macOS); elsewhere the checks after resolving remain
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_WALK = bool(_NOFOLLOW) and os.open in os.supports_dir_fd and os.replace in os.supports_dir_fd
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
_CLIP = 60  #: characters of a long value that a message shows
_REPR = reprlib.Repr()  # bounded repr of containers (keyword arguments need Python 3.12)
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = _CLIP, _CLIP, 4, 4, 2
# An absolute path in a message: a "/" that does not follow a word, a dot or another slash (so not "a/b", "1/2",
# "http://"), then path characters up to a quote, a space or punctuation.
_ABSOLUTE = re.compile(r"(?<![\w.~\-/\\])/[^\s'\"`,;:()<>\[\]{}/][^\s'\"`,;:()<>\[\]{}]*")


class _Shown:
    """A value whose ``repr`` is given text (what `bad_value` prints for it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def clip(value: object) -> object:
    """``value`` for a message: itself when short, else a bounded description (a prefix and the length)."""
    if isinstance(value, str):
        return value if len(value) <= _CLIP else _Shown(f"{value[:_CLIP]!r}… ({len(value):,} characters)")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return _Shown(f"an integer of {value.bit_length():,} bits")  # repr() of a 5000-digit int raises
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return _Shown(_REPR.repr(value))


def public_message(text: str, root: Path) -> str:
    """``text`` without the server's absolute paths: paths inside ``root`` become keys relative to it, the folder
    itself "<adapters folder>", any other absolute path its last component after "…/"."""
    for r in sorted({str(root), str(Path(root).resolve())}, key=len, reverse=True):
        text = text.replace(r + os.sep, "")
        text = re.sub(re.escape(r) + r"(?![^\s'\"`,;:()<>\[\]{}])", "<adapters folder>", text)
    return _ABSOLUTE.sub(lambda m: "…/" + (PurePosixPath(m.group()).name or ""), text)


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve(root: str | Path, key: object, what: str = "adapter") -> Path:
    """The real path of ``key`` inside ``root``; a `DifftuneError` for anything that would leave it.

    Refused: non-strings, empty or absolute keys, ``..`` parts, backslashes and NUL, and keys whose path, once
    symlinks are followed, is not inside the root's real path.
    """
    root_real = Path(root).resolve()
    if not isinstance(key, str) or not key or len(key) > 1024 or "\x00" in key or "\\" in key:
        raise bad_value(what, clip(key), "the key of an entry of the adapters folder (a relative path of at most "
                        "1024 characters)")
    parts = PurePosixPath(key)
    if parts.is_absolute() or ".." in parts.parts or key.startswith("~"):
        raise bad_value(what, clip(key), "a path inside the adapters folder",
                        "Absolute paths and '..' are refused: the studio reads only its adapters folder.")
    real = (root_real / Path(*parts.parts)).resolve()
    if not inside(real, root_real):
        raise bad_value(what, clip(key), "a path inside the adapters folder",
                        "It leads through a symlink out of the folder; the studio refuses it.")
    if not real.exists():
        raise bad_value(what, clip(key), "an entry of the adapters folder",
                        "Press 'refresh' to list the folder again.")
    return real


def check_files(root: Path, folder: Path, names: Iterable[str], key: str) -> None:
    """Each of ``names`` in ``folder`` that exists (a dangling link too) must have its real path inside ``root``."""
    root_real = Path(root).resolve()
    for name in names:
        path = folder / name
        if os.path.lexists(path) and not inside(path.resolve(), root_real):
            raise bad_value("adapter", clip(key), "a folder whose files lie inside the adapters folder",
                            f"Its {name} is a symlink out of the folder; the studio refuses it.")


def _walk(root_real: Path, real: Path) -> tuple[int, str]:
    """(fd of ``real``'s parent, ``real``'s name), the parent opened from the root one component at a time without
    following symlinks; the caller closes the fd."""
    rel = real.relative_to(root_real).parts
    if not rel:
        raise bad_value("path", ".", "a file inside the adapters folder")
    fd = os.open(root_real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for part in rel[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, rel[-1]


def _changed(key: str, e: OSError) -> DifftuneError:
    return DifftuneError(f"{key} changed while the studio opened it ({e.strerror or type(e).__name__}: a symlink or "
                         "another kind of file appeared); press 'refresh' and try again")


def open_read(root: Path, path: Path, key: str) -> BinaryIO:
    """``path`` (already resolved and checked by the caller) opened for reading without following any symlink."""
    root_real = Path(root).resolve()
    real = Path(path).resolve()
    if not inside(real, root_real):
        raise bad_value("file", clip(key), "a file inside the adapters folder", "It is a symlink out of the folder.")
    if not _WALK:
        return open(real, "rb")  # noqa: SIM115 (returned to the caller's `with`)
    try:
        parent, name = _walk(root_real, real)
        try:
            # O_NONBLOCK: a FIFO swapped in opens at once (and is refused below) instead of blocking the queue
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=parent)
        finally:
            os.close(parent)
    except OSError as e:
        raise _changed(key, e) from e
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise bad_value("file", clip(key), "a regular file")
    return f


def read_limited(root: Path, path: Path, key: str, limit: int, what: str) -> bytes:
    """The bytes of ``path`` (see `open_read`); a `DifftuneError` when it holds more than ``limit`` bytes."""
    with open_read(root, path, key) as f:
        data = f.read(limit + 1)  # never more than limit + 1 bytes, whatever the file grew to since it was listed
    if len(data) > limit:
        raise bad_value(what, clip(key), f"a file of at most {limit:,} bytes")
    return data


def make_folder(root: Path, name: str) -> Path:
    """The real path of the folder ``name`` directly under ``root``, created when missing; refused when it is (or
    leads through) a symlink out of ``root`` or is not a folder."""
    root_real = Path(root).resolve()
    path = root_real / name
    if not os.path.lexists(path):
        with contextlib.suppress(FileExistsError):  # made meanwhile (another request): checked below like any other
            os.mkdir(path)
    real = path.resolve()
    if not inside(real, root_real):
        raise bad_value("mix folder", name, "a folder inside the adapters folder",
                        f"{name} is a symlink out of the folder; the studio does not write through it. Remove it.")
    if not real.is_dir():
        raise bad_value("mix folder", name, "a folder", f"{name} is a file; move it away to save mixes.")
    return real


def write_file(root: Path, path: Path, write: Callable[[BinaryIO], object], key: str) -> Path:
    """Write ``path`` inside ``root`` atomically (a temporary file, then a rename) through ``write(file)``.

    The parent folder is reached from the root without following symlinks and the temporary file is created with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``; the rename replaces a symlink at ``path`` instead of writing through it.
    """
    root_real = Path(root).resolve()
    real = Path(os.path.realpath(Path(path).parent)) / Path(path).name
    if not inside(real.parent, root_real):
        raise bad_value("file", clip(key), "a file inside the adapters folder", "Its folder is a symlink out of it.")
    tmp = f".{real.name}.{secrets.token_hex(4)}.tmp"
    try:
        parent, name = _walk(root_real, real) if _WALK else (-1, real.name)
    except OSError as e:
        raise _changed(key, e) from e
    where = {"dir_fd": parent} if _WALK else {}
    target = real.name if _WALK else str(real)
    tmp = tmp if _WALK else str(real.parent / tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, **where)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            kw = {"src_dir_fd": parent, "dst_dir_fd": parent} if _WALK else {}
            os.replace(tmp, target, **kw)
        except BaseException:
            os.unlink(tmp, **where)
            raise
    finally:
        if _WALK:
            os.close(parent)
    return real


def copy_folder(root: Path, source: Path, target: Path, key: str) -> Path:
    """Copy the files of ``source`` (a folder the studio wrote elsewhere, e.g. a temporary one) into the new folder
    ``target`` inside ``root`` with `write_file`; the folder must not exist yet. Partly copied files are removed."""
    root_real = Path(root).resolve()
    target = Path(os.path.realpath(target.parent)) / target.name
    if not inside(target.parent, root_real):
        raise bad_value("mix", clip(key), "a folder inside the adapters folder", "Its folder is a symlink out of it.")
    try:
        parent, name = _walk(root_real, target) if _WALK else (-1, str(target))
    except OSError as e:
        raise _changed(key, e) from e
    where = {"dir_fd": parent} if _WALK else {}
    try:
        try:
            os.mkdir(name, **where)  # fails on anything already there, a dangling symlink included
        except FileExistsError:
            raise bad_value("mix name", clip(key), "a name not used yet in the adapters folder",
                            "Pick another name.") from None
        written: list[Path] = []
        try:
            for src in sorted(source.iterdir()):
                with open(src, "rb") as f:
                    written.append(write_file(root_real, target / src.name,
                                              lambda out, f=f: _copy(f, out), f"{key}/{src.name}"))
        except BaseException:
            _remove_new(parent, name, [p.name for p in written])
            raise
    finally:
        if _WALK:
            os.close(parent)
    return target


def _remove_new(parent: int, name: str, files: list[str]) -> None:
    """Remove the folder ``name`` (under the folder ``parent`` opened by `_walk`) and the ``files`` the studio wrote
    into it, without following a symlink swapped in meanwhile."""
    if not _WALK:
        for f in files:
            (Path(name) / f).unlink(missing_ok=True)
        os.rmdir(name)
        return
    sub = os.open(name, _DIR_FLAGS, dir_fd=parent)
    try:
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # never written or already gone: nothing of ours left
                os.unlink(f, dir_fd=sub)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=parent)


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        dst.write(chunk)
