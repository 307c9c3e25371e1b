"""Atomic writes: the file appears whole or not at all, and gets the mode the user's umask gives any new file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from difftune.fileio import atomic_write


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_keep_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_failed_write_leaves_nothing(tmp_path):
    def boom(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "b.json", boom)
    assert list(tmp_path.iterdir()) == []
