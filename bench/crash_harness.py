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

    OMP_NUM_THREADS=1 .venv/bin/python bench/crash_harness.py --trials-per-limit 30 --limits 1 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/crash_harness.py --quick   # 6 trials, as tests/test_reliability.py
"""

from __future__ import annotations

import argparse
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
from difftune.testing import save_tiny_pipeline  # noqa: E402
from difftune.train import TrainConfig, main  # noqa: E402

STEPS = 12
#: event -> what is patched in the child; the kill fires at the N-th call (N drawn per trial)
EVENTS = ("save_state_file", "trainable_or_state_write", "rename_into_place", "delete_old", "final_save")


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


def _arm(event: str, n: int) -> None:
    """In the child: SIGKILL this process at the n-th call of ``event``."""
    import shutil

    import accelerate.checkpointing as acp

    from difftune import serialization
    from difftune.train import checkpoints

    calls = {"n": 0}

    def hit() -> None:
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

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
    elif event == "final_save":
        real = serialization.atomic_write

        def aw(path, write):
            hit()
            result = real(path, write)
            return result
        serialization.atomic_write = aw
    else:
        raise SystemExit(f"unknown event {event!r}")


def run_child(cfg: TrainConfig, timeout: float, kill_after: float | None = None, event: tuple[str, int] | None = None
              ) -> tuple[str, float]:
    """Fork a training run; returns (outcome, seconds): 'ok', 'killed', 'failed:<rc>' or 'timeout'."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            if event is not None:
                _arm(*event)
            main(cfg)
            code = 0
        except BaseException as e:  # report, then exit without running the parent's cleanup
            os.write(2, f"[child] {type(e).__name__}: {e}\n".encode())
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


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials-per-limit", type=int, default=30)
    ap.add_argument("--limits", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a run counts as stuck")
    ap.add_argument("--quick", action="store_true", help="3 trials per limit (the CI sample)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    per = 3 if args.quick else args.trials_per_limit
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.time()
        summary = run(args.limits, per, args.seed, args.timeout, Path(tmp))
        summary["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=2))
    ok = summary["resumed_equal"] == summary["trials"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(cli())
