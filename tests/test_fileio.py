"""Atomic writes: the file appears whole or not at all, and gets the mode the user's umask gives any new file; every
temp name carries difftune's prefix, so that cleanup never reaches a user's own ``*.tmp`` file (issue 32)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from difftune.fileio import TMP_PREFIX, atomic_write, is_temp, remove_temp


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


def test_the_temp_file_carries_the_prefix_and_sits_next_to_the_target(tmp_path):
    seen = []
    atomic_write(tmp_path / "c.json", lambda tmp: seen.append(Path(tmp)) or Path(tmp).write_text("{}"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(f"{TMP_PREFIX}c.json.") and is_temp(seen[0])
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_remove_temp_deletes_only_our_names(tmp_path):
    ours = tmp_path / f"{TMP_PREFIX}checkpoint-3"
    (ours / "sub").mkdir(parents=True)
    (ours / "sub" / "f").write_text("x")
    foreign = tmp_path / ".draft.tmp"
    foreign.write_text("x")
    remove_temp(ours)
    assert not ours.exists()
    with pytest.raises(ValueError, match="not a difftune temp name"):
        remove_temp(foreign)
    assert foreign.read_text() == "x"
