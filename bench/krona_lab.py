"""DiffuseKronA vs LoRA on sd-mini's subject task (the held-out digit 9), and the spread over learning rates.

    flock /tmp/difftune-bench.lock python bench/krona_lab.py [--lrs 3e-4 1e-3 3e-3 1e-2] [--steps 300] [--n 20]

Each adapter trains through the trainer (`lab.train`: the quickstart recipe, batch 16, constant lr) on 20 real 9s
captioned "a handwritten digit zxq" plus 5 regularization images per digit 0–8, and is judged by the shipped
classifier (`lab.judge_subject`): subject accuracy (trigger-prompt samples classified 9), FD of those samples
against real 9s, retention (accuracy on prompts for 0–8) and the adapter file size. KronA (64, 8) is the paper's
default (17,280 parameters on sd-mini's 32 attention projections), KronA (16, 8) a split scaled to sd-mini's
128-wide attention (7,680); the LoRAs have equal (r = 1), similar (r = 2) and larger (r = 4) parameter counts.
The paper's robustness claim is checked as the spread (max − min) of each score over the learning rates.

Results are cached per run in --out (delete a run's JSON to redo it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402

METHODS = {
    "KronA (64, 8)": {"name": "krona", "a1": 64, "a2": 8},
    "KronA (16, 8)": {"name": "krona", "a1": 16, "a2": 8},
    "LoRA r=1": {"name": "lora", "rank": 1, "alpha": 1.0},
    "LoRA r=2": {"name": "lora", "rank": 2, "alpha": 2.0},
    "LoRA r=4": {"name": "lora", "rank": 4, "alpha": 4.0},
}
SCORES = (("subject_accuracy", "subject acc"), ("retention", "retention 0–8"), ("fd", "FD (9s)"))


def run(label: str, method: dict, lr: float, args: argparse.Namespace, data: Path) -> dict:
    slug = f"{method['name']}-{'-'.join(str(v) for k, v in method.items() if k != 'name')}-lr{lr:g}"
    cache = args.out / f"{slug}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    info = lab.train(method, data, args.out / slug, steps=args.steps, lr=lr)
    t0 = time.perf_counter()
    scores = lab.judge_subject(lab.load(info["adapter"]), n=args.n)
    row = {"method": label, "lr": lr, "trainable": info["trainable"], "adapter_bytes": info["adapter_bytes"],
           "train_s": info["seconds"], "judge_s": time.perf_counter() - t0, **scores}
    cache.write_text(json.dumps(row, indent=2, default=str))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=20, help="trigger samples (n/2 per digit 0-8 for retention)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=Path("outputs/bench/krona_lab"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = lab.subject_data(args.out / "data")

    base_cache = args.out / "base.json"
    if not base_cache.is_file():
        base_cache.write_text(json.dumps(lab.judge_subject(lab.load(None), n=args.n), indent=2))
    rows = [{"method": "sd-mini, no adapter", **json.loads(base_cache.read_text())}]
    for label in args.methods:
        for lr in args.lrs:
            rows.append(run(label, METHODS[label], lr, args, data))
            print(f"{label} lr={lr:g}: " + ", ".join(f"{k}={rows[-1][k]:.3g}" for k, _ in SCORES), flush=True)

    print(f"\nsd-mini subject task: {args.steps} steps × batch 16, constant lr; judged on {args.n} trigger samples "
          f"and {max(1, args.n // 2)} per digit 0-8 (20 DDIM steps, guidance 4)\n")
    print(lab.table(rows, [("method", "method", "{}"), ("params", "trainable", "{:,}"),
                           ("adapter", "adapter_bytes", "{:,} B"), ("lr", "lr", "{:g}"),
                           ("subject acc", "subject_accuracy", "{:.0%}"), ("retention 0–8", "retention", "{:.0%}"),
                           ("FD (9s)", "fd", "{:.0f}"), ("FD floor", "fd_floor", "{:.0f}"),
                           ("train s", "train_s", "{:.0f}")]))
    spread = []
    for label in args.methods:
        runs = [r for r in rows if r["method"] == label]
        out = {"method": label, "trainable": runs[0]["trainable"], "lrs": ", ".join(f"{r['lr']:g}" for r in runs)}
        for key, _ in SCORES:
            values = [r[key] for r in runs]
            out[f"{key}_range"] = f"{min(values):.3g} – {max(values):.3g}"
            out[f"{key}_spread"] = max(values) - min(values)
            out[f"{key}_mean"] = statistics.fmean(values)
        spread.append(out)
    print("\nspread over the learning rates (max − min; lower = more robust)\n")
    print(lab.table(spread, [("method", "method", "{}"), ("params", "trainable", "{:,}"), ("lrs", "lrs", "{}"),
                             ("subject acc: mean", "subject_accuracy_mean", "{:.0%}"),
                             ("spread", "subject_accuracy_spread", "{:.0%}"),
                             ("retention: mean", "retention_mean", "{:.0%}"), ("spread", "retention_spread", "{:.0%}"),
                             ("FD: mean", "fd_mean", "{:.0f}"), ("spread", "fd_spread", "{:.0f}")]))
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "spread": spread}, indent=2, default=str))


if __name__ == "__main__":
    main()
