"""Every registered method under 2-process DDP on CPU ends with identical trainable weights on both ranks (issue 31).

One `accelerate launch` (2 processes, gloo) runs this file as a script; the script trains every method of the
registry in turn, for 3 steps on the tiny SD and DiT models, with the smoke runs' settings (`test_trainer.SMOKE`),
then a selection of methods on the tiny SD3 and Flux pipelines (`MMDIT_RUNS`),
and writes each rank's final trainable-weights digest (the line the trainer prints) to a JSON file. Paying for the
process start and the process group once keeps the whole file at about a minute on 2 cores.

Identity across ranks is bit-exact by construction: both ranks apply the same all-reduced gradient with the same
kernels in the same order, so any term that is rank-local (a draw from the per-rank RNG, a gradient added after the
all-reduce) shows up as different digests. There is no single-process equivalent to compare with: each rank draws
its own noise and timesteps (seed + rank) and reads its own shard of the data, and the README promises none.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

# run as a script by `accelerate launch` (no conftest): the case table in tests/methods must be importable too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))

from test_trainer import CASES, REPO, SMOKE, SMOKE_KINDS, SMOKE_SETS  # noqa: E402

from difftune.methods import METHODS  # noqa: E402

DIGEST = re.compile(r"rank (\d+): final trainable-weights digest (\w+)")


def _worker(plan_path: str) -> None:
    """Under `accelerate launch`: train every run of the plan; write this rank's digests to ``digests-<rank>.json``."""
    from difftune.config import load_config
    from difftune.train import TrainConfig, main

    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ["RANK"])
    digests = {}
    for run in plan["runs"]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(load_config(TrainConfig, run["config"], run["sets"]))
        sys.stdout.write(out.getvalue())
        found = dict(DIGEST.findall(out.getvalue()))
        digests[run["name"]] = found.get(str(rank))
    target = Path(plan_path).with_name(f"digests-{rank}.json")
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(digests))
    tmp.replace(target)


STEPS = 3


def _runs(tiny, root: Path) -> list[dict]:
    """Every registered method on every tiny model it adapts, with the smoke runs' fields and settings."""
    runs = []
    for method in sorted(METHODS):
        fields = "".join(f", {k}: {v}" for k, v in SMOKE[method][0].items())
        for kind in SMOKE_KINDS.get(method, ("sd", "dit")):
            name = f"{method}-{kind}"
            data = tiny["classes"] if kind == "dit" else tiny["captions"]
            sets = [f"model.path={tiny[kind]}", f"data.path={data}", f"output_dir={root / name}",
                    f"method={{name: {method}{fields}}}", f"train.max_steps={STEPS}",
                    *SMOKE_SETS.get(method, ()), *CASES[method].smoke.ddp_sets]
            runs.append({"name": name, "config": str(REPO / "configs" / "debug" / f"tiny_{kind}.yaml"),
                         "sets": sets})
    return runs


#: SD3 and Flux (flow matching) under DDP: LoRA on both, and one run each of a selection-based, a whole-model and a
#: data-free method (each adds a few seconds to the one launch).
MMDIT_RUNS = {"lora-sd3": ("sd3", ""), "lora-flux": ("flux", ""),
              "sara-sd3": ("sd3", "method={name: sara, threshold: 0.02, rank_min_dim: 16}"),
              "bk-flux": ("flux", "method={name: bk, plan: {single_blocks: [1]}}"),
              "spm-flux": ("flux", "method={name: spm, concepts: [cat], sampling_steps: 3, num_anchors: 2}")}


def _mmdit_runs(tiny, root: Path) -> list[dict]:
    from difftune.testing import save_tiny_pipeline

    paths = {k: save_tiny_pipeline(k, root / "pipelines" / k) for k in ("sd3", "flux")}
    runs = []
    for name, (kind, method) in MMDIT_RUNS.items():
        sets = [f"model.path={paths[kind]}", f"data.path={tiny['captions']}", f"output_dir={root / name}",
                f"train.max_steps={STEPS}", "validation.prompts=[]", *([method] if method else [])]
        if name.startswith("spm"):
            sets += ["data.kind=none", "data.num_samples=4", "data.path=''", "data.label_dropout=0.0"]
        runs.append({"name": name, "config": str(REPO / "configs" / "debug" / f"tiny_{kind}.yaml"), "sets": sets})
    return runs


def _free_port() -> int:
    # not the config's fixed port: another suite on this machine may be launching at the same time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_method_ends_with_identical_weights_on_both_ranks(tiny, tmp_path):
    runs = _runs(tiny, tmp_path / "runs")
    assert {r["name"].rsplit("-", 1)[0] for r in runs} == set(METHODS)
    # the text encoders' adapters live outside the DDP-wrapped denoiser (train/textenc.py): averaged by their own hooks
    joint = next(r for r in runs if r["name"] == "lora-sd")
    runs.append({**joint, "name": "lora+text-encoder-sd",
                 "sets": [*joint["sets"], f"output_dir={tmp_path / 'runs' / 'joint'}", "model.train_text_encoder=true",
                          "train.text_encoder_lr=0.01"]})
    runs += _mmdit_runs(tiny, tmp_path / "runs")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": runs}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
           __file__, str(plan)]
    # FORK_LAUNCHED: accelerate's end_training then keeps the process group, so one launch serves every run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FORK_LAUNCHED": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"{len(runs)} DDP runs in {time.monotonic() - start:.0f} s")
    ranks = [json.loads((tmp_path / f"digests-{r}.json").read_text()) for r in (0, 1)]
    table = {name: (ranks[0].get(name), ranks[1].get(name)) for name in (r["name"] for r in runs)}
    print("\n".join(f"{name}: {a} {b}" for name, (a, b) in table.items()))
    assert all(a and b for a, b in table.values()), table  # every run reported a digest on both ranks
    diverged = {name: pair for name, pair in table.items() if pair[0] != pair[1]}
    assert not diverged, f"the ranks ended with different weights: {diverged}"
    # each run trained its own weights: a digest shared by two runs would mean the runs did not happen as planned
    assert len({a for a, _ in table.values()}) == len(table)


if __name__ == "__main__":
    _worker(sys.argv[1])
