"""Ctrl-C and SIGTERM during training: finish the optimizer step, save a resumable checkpoint, say how to resume.

The first SIGINT/SIGTERM only sets a flag; the loop checks it after each optimizer step (a half-done step cannot be
checkpointed: its gradients would be lost), saves ``checkpoint-<step>`` through the crash-safe `save_checkpoint`
(written into a temp folder, renamed into place) and raises `TrainingInterrupted`. A signal during the final save
(after the last step) lets that save finish, since a run without periodic checkpoints would otherwise leave nothing
to resume from (issue 32): the result is saved whole, the final validation grid skipped, and `TrainingInterrupted`
names the result. A second signal exits the process at once, saying what is left (a checkpoint being written is
then a temp folder, never resumed from, and the previous complete checkpoints are intact). The CLI turns
`TrainingInterrupted` into one line and exit code 128 + signal (130 for Ctrl-C), without a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):  # noqa: N818 (it is not an error: the user asked for it)
    """Training stopped on a signal after saving ``checkpoint`` (``resume_command`` continues it), or during the
    final save, which was finished: ``result`` is then the complete result."""

    def __init__(self, signum: int, checkpoint: Path | None, resume_command: str | None,
                 result: Path | None = None) -> None:
        self.signum, self.checkpoint, self.resume_command, self.result = signum, checkpoint, resume_command, result
        name = signal.Signals(signum).name
        if result is not None:
            super().__init__(f"training interrupted ({name}) during the final save, which was finished: {result}")
        elif checkpoint is None:
            super().__init__(f"training interrupted ({name}); no step had finished, nothing saved")
        else:
            super().__init__(f"training interrupted ({name}); saved {checkpoint}; resume with: {resume_command}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InterruptFlag:
    """While entered (main thread only), SIGINT/SIGTERM set ``signum`` instead of raising; a second one exits.

    Attributes:
        action: what the first signal makes the run do (said when it arrives).
        abandon: what a second signal, exiting at once, leaves behind (said when it arrives).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.action = "saving a checkpoint after this step"
        self.abandon = "without saving (the checkpoint being written is dropped; earlier ones are intact)"
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second Ctrl-C: the user does not want to wait for the save
            sys.stderr.write(f"\n[difftune] {signal.Signals(signum).name} again: exiting now {self.abandon}\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"\n[difftune] {signal.Signals(signum).name}: {self.action} "
                         "(press Ctrl-C again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, accelerator: Any) -> int | None:
        """The signal, agreed by every process (the largest any rank received), so all save the same step."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
