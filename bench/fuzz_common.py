"""Shared by the fuzzers (bench/fuzz_adapters.py, bench/fuzz_configs.py) and their CI sample
(tests/test_reliability.py): run one case in a forked child with a wall-clock limit and an address-space cap,
and classify what happened.

A case is a function returning a short string (its outcome: "ok", or "refused" when it raised a `DifftuneError`;
a string starting "changed", "nan" or "accepted" reports a bug the case detected itself: a failed load that changed
the model, a clean load whose output is NaN/inf, a hostile value that was accepted); anything else it raises is a bug
("error: <type>: <message>"); a child that uses more than ``timeout`` seconds of CPU
(RLIMIT_CPU, so a busy shared machine does not turn a slow case into a "hang") or is still running after
``wall_factor`` × ``timeout`` seconds of wall time (a case blocked without computing) is a hang; a child killed by
another signal (the memory cap hit in C code, a segfault) is a crash.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from difftune.errors import DifftuneError

#: module patterns that hang a backtracking matcher, in every syntax Python >= 3.11 parses (issue 29: the atomic group
#: passed the guard)
REGEX_BOMBS = ["(?>(.*.*)*Z)", "(?>.*)*Z", "x(?>(a+)+)y", "(.*.*)*+Z", "(a|aa)++b", "(?:x+)*+y", "(.*)*+", "a{1,9}+",
               "(?>(a|aa)*)b", "((?>a*))*b", "(x+x+)+y", "(?=.*)(.*)*", r"(\w+\s?)*$", ".*" * 40 + "Z"]
OUTCOMES = ("ok", "refused", "error", "hang", "crash", "changed", "nan", "accepted")
BAD = ("error", "hang", "crash", "changed", "nan", "accepted")


def run_forked(case: Callable[[], str], timeout: float = 5.0, memory_gb: float = 4.0, wall_factor: float = 12.0
               ) -> tuple[str, str, float]:
    """(outcome, detail, CPU seconds) of ``case()`` run in a forked child."""
    read, write = os.pipe()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            limit = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            cpu = max(1, math.ceil(timeout))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at `timeout` CPU seconds
            try:
                out = ("ok", case() or "")
            except DifftuneError as e:
                out = ("refused", str(e)[:300])
            except BaseException as e:  # noqa: BLE001 - the point is to classify every other exception as a bug
                tb = traceback.format_exc(limit=-3)
                out = ("error", f"{type(e).__name__}: {str(e)[:200]} | {tb[-600:]}")
            for bug in ("changed", "nan", "accepted"):
                if out[0] == "ok" and out[1].startswith(bug):
                    out = (bug, out[1])
            os.write(write, json.dumps(out).encode()[:60000])
        finally:
            os.close(write)
            os._exit(code)
    os.close(write)
    chunks = []
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.time() - t0 > wall_factor * timeout:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            os.close(read)
            return "hang", f"blocked: still running after {wall_factor * timeout:.0f} s of wall time", usage.ru_utime
        time.sleep(0.002)
    seconds = usage.ru_utime + usage.ru_stime  # CPU seconds: what the limit bounds
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL) and seconds >= timeout - 0.5:
            return "hang", f"over {timeout:.0f} s of CPU time", seconds
        return "crash", f"signal {os.WTERMSIG(status)}", seconds
    try:
        outcome, detail = json.loads(b"".join(chunks).decode())
    except ValueError:
        return "crash", "no report from the child", seconds
    return outcome, detail, seconds


def summarize(rows: list[dict]) -> dict:
    counts = {k: 0 for k in OUTCOMES}
    for r in rows:
        counts[r["outcome"]] += 1
    return {"cases": len(rows), **counts, "slowest_cpu_s": round(max((r["s"] for r in rows), default=0.0), 2)}


def cli(run: Callable[..., tuple[dict, list[dict]]], description: str, argv: list[str] | None = None) -> int:
    """The fuzzers' command line: ``run(cases, seed, timeout, root, verbose)``; prints the summary; exit 1 on any
    bad outcome (`BAD`)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--cases", type=int, default=1600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        summary, _ = run(args.cases, args.seed, args.timeout, Path(tmp), args.verbose)
    summary["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=2))
    bad = sum(summary[k] for k in BAD)
    return 0 if bad == 0 else 1
