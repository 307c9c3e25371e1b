"""A sample of bench/crash_harness.py's injections (issues 29 and 32), so that the harness keeps working: a full disk
while deleting an old checkpoint, a Ctrl-C during the final save of a run without checkpoints, foreign temp files,
a refused run. The full set runs with ``bench/crash_harness.py --injections-only``."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import crash_harness  # noqa: E402


def test_crash_harness_injection_sample(tmp_path):
    names = ["enospc:delete_old", "sigint:final_save_no_checkpoints", "foreign_tmp", "lock_after_refusal"]
    summary = crash_harness.run_injections([1], 300, tmp_path, names)
    assert summary["injections"] == 4 and summary["passed"] == 4, summary["failures"]
