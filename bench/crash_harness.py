"""Crash harness (issue 17): SIGKILL a training run at random moments and at each checkpoint, rotation and final-save
step, resume it with ``resume_from_checkpoint: latest``, and check the result is ``torch.equal`` to an uninterrupted
run.

Each trial: a fresh output folder; run 1 is killed (SIGKILL, no cleanup of any kind) either after a random delay or
at the N-th call of one step of saving (named ``EVENTS`` below: inside accelerate's ``save_state``, the trainable /
state file writes, the rename of a finished checkpoint into place, the deletion of an old checkpoint, the final
adapter save); run 2 resumes with ``latest`` and must finish (exit 0, within ``--timeout`` seconds) with every saved
tensor equal to the uninterrupted run's. A trial whose kill never fired (the run ended first) is still resumed and
compared, and counted separately.

Runs are forked from one parent that has imported torch/diffusers once (no re-import per run); the killed child
dies by SIGKILL exactly as a machine crash or the OOM killer would end it.

Injections (issues 29 and 32), once per limit each, after the kill trials (`INJECTIONS`): a full disk (``OSError``
ENOSPC) at the N-th call of each save step above and of the model card write, which must stop the run with the
trainer's `SaveFailed` (exit 2) naming the last complete checkpoint and the command resuming it, leave no
``.difftune-tmp-*`` name and no lock file, and resume (by that very command) to the uninterrupted result; a SIGINT
during the final save, with and without periodic checkpoints, which must finish the save (exit 130, the
uninterrupted result, no lock); foreign ``*.tmp`` files in the output folder, which a run must keep while removing
its own leftovers; and a refused run (a finished folder, no ``--overwrite``), which must leave no lock file.

    OMP_NUM_THREADS=1 .venv/bin/python bench/crash_harness.py --trials-per-limit 30 --limits 1 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/crash_harness.py --quick   # 6 trials, as tests/test_reliability.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/crash_harness.py --injections-only --limits 1
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from difftune.config import load_config  # noqa: E402
from difftune.fileio import TMP_PREFIX  # noqa: E402
from difftune.testing import save_tiny_pipeline  # noqa: E402
from difftune.train import TrainConfig, main  # noqa: E402
from difftune.train.checkpoints import checkpoint_dirs  # noqa: E402
from difftune.train.lock import LOCK_FILE  # noqa: E402

STEPS = 12
#: event -> what is patched in the child; the kill fires at the N-th call (N drawn per trial)
EVENTS = ("save_state_file", "trainable_or_state_write", "rename_into_place", "delete_old", "final_save")
#: injection -> (event, N): ENOSPC at the N-th call of a save step (N inside the run: checkpoint-1 is complete by
#: then), a SIGINT at the first write of the final save, foreign temp files, a refused run
INJECTIONS = {
    "enospc:save_state_file": ("save_state_file", 7), "enospc:trainable_write": ("trainable_or_state_write", 5),
    "enospc:state_write": ("trainable_or_state_write", 6), "enospc:rename_into_place": ("rename_into_place", 3),
    "enospc:delete_old": ("delete_old", 2), "enospc:final_save": ("final_save", 2),
    "enospc:model_card": ("model_card", 1), "sigint:final_save": ("final_save", 1),
    "sigint:final_save_no_checkpoints": ("final_save", 1), "foreign_tmp": None, "lock_after_refusal": None,
}


def make_fixture(root: Path) -> dict[str, Path]:
    """The tiny SD pipeline and 6 captioned random images (as tests/train/conftest.py)."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a photo of a cat", "a red car"][i % 2])
    return {"model": save_tiny_pipeline("sd", root / "sd"), "images": images}


def config(fixture: dict[str, Path], out: Path, limit: int | None, resume: bool) -> TrainConfig:
    sets = [f"model.path={fixture['model']}", f"data.path={fixture['images']}", f"output_dir={out}",
            f"train.max_steps={STEPS}", "checkpointing.checkpointing_steps=1", "validation.prompts=[]",
            "train.ema=true", "train.ema_decay=0.9", "method.dropout=0.1", "schedule.name=cosine",
            f"checkpointing.checkpoints_total_limit={'null' if limit is None else limit}"]
    if resume:
        sets.append("checkpointing.resume_from_checkpoint=latest")
    return load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", sets)


def _arm(event: str, n: int, action: str = "kill") -> None:
    """In the child: at the n-th call of ``event``, SIGKILL this process (``action`` "kill"), raise ENOSPC there
    ("enospc") or send it a SIGINT and go on ("sigint")."""
    import shutil

    import accelerate.checkpointing as acp

    from difftune import serialization
    from difftune.train import checkpoints, reporting

    calls = {"n": 0}

    def hit() -> None:
        calls["n"] += 1
        if calls["n"] != n:
            return
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {event} call {n})")
        os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGKILL)

    if event == "save_state_file":  # between two of accelerate's files (optimizer, scheduler, RNG)
        real_save, real_torch_save = acp.save, torch.save

        def save(*a, **k):
            hit()
            return real_save(*a, **k)

        def torch_save(*a, **k):
            hit()
            return real_torch_save(*a, **k)
        acp.save, torch.save = save, torch_save
    elif event == "trainable_or_state_write":
        real = checkpoints.atomic_write

        def aw(path, write):
            hit()
            return real(path, write)
        checkpoints.atomic_write = aw
    elif event == "rename_into_place":
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name.startswith("checkpoint-"):
                hit()
            return real_replace(src, dst)
        os.replace = replace
    elif event == "delete_old":  # half-way through deleting an old checkpoint: one file gone, then the kill
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if files and calls["n"] + 1 == n:
                files[0].unlink()
            hit()
            return real_rmtree(path, *a, **k)
        shutil.rmtree = rmtree
    elif event in ("final_save", "model_card"):
        owner = serialization if event == "final_save" else reporting
        real = owner.atomic_write

        def aw(path, write):
            hit()
            result = real(path, write)
            return result
        owner.atomic_write = aw
    else:
        raise SystemExit(f"unknown event {event!r}")


def run_child(cfg: TrainConfig, timeout: float, kill_after: float | None = None, event: tuple[str, int] | None = None,
              action: str = "kill", report: Path | None = None) -> tuple[str, float]:
    """Fork a training run; returns (outcome, seconds): 'ok', 'killed', 'failed:<rc>' or 'timeout'. The child exits
    as the CLI does (2 for a DifftuneError, 128 + signal for an interrupt) and writes the exception's type and
    message as JSON to ``report``."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            if event is not None:
                _arm(*event, action=action)
            main(cfg)
            code = 0
        except BaseException as e:  # report, then exit without running the parent's cleanup
            from difftune.errors import DifftuneError

            code = getattr(e, "exit_code", 2 if isinstance(e, DifftuneError) else 1)
            if report is not None:
                report.write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
            os.write(2, f"[child] {type(e).__name__}: {str(e)[:300]}\n".encode())
        finally:
            os._exit(code)
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        elapsed = time.time() - t0
        if done:
            break
        if kill_after is not None and not killed and elapsed >= kill_after:
            os.kill(pid, signal.SIGKILL)
            killed = True
        if elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", elapsed
        time.sleep(0.01)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", elapsed
    rc = os.WEXITSTATUS(status)
    return ("ok" if rc == 0 else f"failed:{rc}"), elapsed


def result_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def trials_plan(limits: list[int], per_limit: int, rng: random.Random, full_time: float) -> list[dict]:
    plan = []
    for limit in limits:
        for i in range(per_limit):
            if i % 2 == 0:  # half at random moments of the whole run
                plan.append({"limit": limit, "kill_after": rng.uniform(0.5, full_time)})
            else:
                event = EVENTS[(i // 2) % len(EVENTS)]
                top = {"save_state_file": 3 * STEPS, "trainable_or_state_write": 2 * STEPS,
                       "rename_into_place": STEPS, "delete_old": STEPS - limit, "final_save": 2}[event]
                plan.append({"limit": limit, "event": event, "n": rng.randint(1, max(1, top))})
    return plan


def run(limits: list[int], per_limit: int, seed: int, timeout: float, root: Path) -> dict:
    fixture = make_fixture(root / "fixture")
    rng = random.Random(seed)
    reference, full_time = {}, 0.0
    for limit in limits:
        out = root / f"reference-{limit}"
        outcome, seconds = run_child(config(fixture, out, limit, False), timeout)
        if outcome != "ok":
            raise SystemExit(f"the uninterrupted run failed ({outcome})")
        reference[limit] = result_tensors(out)
        full_time = max(full_time, seconds)
    # the result does not depend on the retention limit: one reference would do; both are checked equal
    first = reference[limits[0]]
    assert all(all(torch.equal(first[k], r[k]) for k in first) for r in reference.values())
    rows = []
    for i, trial in enumerate(trials_plan(limits, per_limit, rng, full_time)):
        out = root / f"trial-{i}"
        event = (trial["event"], trial["n"]) if "event" in trial else None
        first_outcome, _ = run_child(config(fixture, out, trial["limit"], False), timeout,
                                     kill_after=trial.get("kill_after"), event=event)
        left = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
        second, seconds = run_child(config(fixture, out, trial["limit"], True), timeout)
        equal = None
        if second == "ok":
            got = result_tensors(out)
            equal = got.keys() == first.keys() and all(torch.equal(first[k], got[k]) for k in first)
        row = {**trial, "first": first_outcome, "left": left, "resume": second, "equal": equal,
               "resume_s": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    killed = [r for r in rows if r["first"] == "killed"]
    summary = {
        "trials": len(rows), "killed": len(killed), "kill_never_fired": len(rows) - len(killed),
        "resumed_equal": sum(r["equal"] is True for r in rows),
        "resumed_different": sum(r["equal"] is False for r in rows),
        "stuck_or_failed": sum(r["resume"] != "ok" for r in rows),
        "by_event": {e: sum(r.get("event", "random") == e and r["first"] == "killed" for r in rows)
                     for e in (*EVENTS, "random")},
        "limits": limits, "seed": seed, "uninterrupted_run_s": round(full_time, 1),
    }
    return summary


def _leftovers(out: Path) -> list[str]:
    """Temp names of ours and a lock file: what no run may leave behind once it has ended in Python."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) or
                  p.name == LOCK_FILE)


def _equal(out: Path, reference: dict[str, torch.Tensor]) -> bool:
    got = result_tensors(out)
    return got.keys() == reference.keys() and all(torch.equal(reference[k], got[k]) for k in got)


def injection(name: str, fixture: dict[str, Path], out: Path, limit: int, reference: dict[str, torch.Tensor],
              timeout: float) -> dict:
    """Run one injection (`INJECTIONS`) in ``out``; returns its row, with ``problems`` empty when every check held."""
    report = out.parent / f"{out.name}.json"
    problems: list[str] = []
    row: dict = {"injection": name, "limit": limit}
    cfg = config(fixture, out, limit, False)
    if name == "sigint:final_save_no_checkpoints":
        cfg.checkpointing.checkpointing_steps = 0
    if name.startswith(("enospc:", "sigint:")):
        action = name.split(":")[0]
        first, _ = run_child(cfg, timeout, event=INJECTIONS[name], action=action, report=report)
        said = json.loads(report.read_text()) if report.exists() else {}
        row.update(first=first, error=said.get("type"))
        if action == "enospc":
            if first != "failed:2" or said.get("type") != "SaveFailed" or "No space left" not in said.get("message"):
                problems.append(f"not a clean SaveFailed: {first} {said}")
            message = said.get("message", "")
            command = message.split("resume with: ")[1] if "resume with: " in message else None
            row["says"] = "result complete" if "is complete and can be used" in message else (
                "resume command" if command else "no checkpoint")
        elif first != "failed:130" or said.get("type") != "TrainingInterrupted" or not (out / "README.md").is_file():
            problems.append(f"the final save was not finished: {first} {said}")
        if _leftovers(out):
            problems.append(f"left behind: {_leftovers(out)}")
        if action == "enospc" and command:
            checkpoint = Path(command.split("resume_from_checkpoint=")[1])
            if checkpoint not in checkpoint_dirs(out):
                problems.append(f"{checkpoint} is not a complete checkpoint")
            resumed = load_config(TrainConfig, out / "config.yaml", [command.split("--set ")[1]])
            second, _ = run_child(resumed, timeout)
            row["resume"] = second
            if second != "ok":
                problems.append(f"the printed command did not resume: {second}")
    elif name == "foreign_tmp":
        foreign = [out / "notes" / ".draft.tmp", out / ".draft.tmp", out / "checkpoints" / ".mine.tmp"]
        ours = [out / f"{TMP_PREFIX}result-x1" / "adapter" / "a",
                out / "checkpoints" / f"{TMP_PREFIX}checkpoint-9" / "b"]
        for p in foreign + ours:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
        row["first"], _ = run_child(cfg, timeout)
        if [p for p in foreign if not p.is_file()] or _leftovers(out) or row["first"] != "ok":
            problems.append(f"foreign kept: {[p.is_file() for p in foreign]}, left: {_leftovers(out)}")
    elif name == "lock_after_refusal":
        if run_child(cfg, timeout)[0] != "ok":
            problems.append("the first run failed")
        row["first"], _ = run_child(cfg, timeout, report=report)  # into the finished folder, without overwrite
        said = json.loads(report.read_text()) if report.exists() else {}
        if row["first"] != "failed:2" or "already holds a finished run" not in said.get("message", ""):
            problems.append(f"not refused: {row['first']} {said}")
        if (out / LOCK_FILE).exists():
            problems.append("the refused run left its lock file")
    if (out / "adapter").is_dir() and not _equal(out, reference):
        problems.append("the result differs from the uninterrupted run's")
    if not (out / "adapter").is_dir():
        problems.append("no result in the end")
    row["problems"] = problems
    return row


def run_injections(limits: list[int], timeout: float, root: Path, names: list[str] | None = None) -> dict:
    """Every injection once per limit; returns the summary (``failed`` counts trials with any problem)."""
    fixture = make_fixture(root / "fixture")
    reference_out = root / "injection-reference"
    if run_child(config(fixture, reference_out, limits[0], False), timeout)[0] != "ok":
        raise SystemExit("the uninterrupted run failed")
    reference = result_tensors(reference_out)
    rows = []
    for limit in limits:
        for name in names or list(INJECTIONS):
            row = injection(name, fixture, root / f"{name.replace(':', '-')}-{limit}", limit, reference, timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"injections": len(rows), "passed": sum(not r["problems"] for r in rows),
            "failed": sum(bool(r["problems"]) for r in rows),
            "failures": {f"{r['injection']}@{r['limit']}": r["problems"] for r in rows if r["problems"]}}


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials-per-limit", type=int, default=30)
    ap.add_argument("--limits", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a run counts as stuck")
    ap.add_argument("--quick", action="store_true", help="3 trials per limit (the CI sample)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--injections-only", action="store_true", help="skip the SIGKILL trials")
    ap.add_argument("--no-injections", action="store_true", help="only the SIGKILL trials")
    args = ap.parse_args(argv)
    per = 3 if args.quick else args.trials_per_limit
    summary: dict = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.time()
        if not args.injections_only:
            summary = run(args.limits, per, args.seed, args.timeout, Path(tmp) / "kills")
        if not args.no_injections:
            summary["injections"] = run_injections(args.limits, args.timeout, Path(tmp) / "injections")
        summary["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=2))
    ok = (args.injections_only or summary["resumed_equal"] == summary["trials"]) and (
        args.no_injections or summary["injections"]["failed"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(cli())
