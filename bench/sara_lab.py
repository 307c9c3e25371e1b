"""SaRA vs LoRA on the shipped sd-mini at comparable trainable counts: the digit-9 subject and the "bold" style.

    python bench/sara_lab.py [--steps 300] [--n 20] [--tasks subject style] [--out outputs/bench/sara_lab]

Two budgets: LoRA r=8 on q/k/v/out (61,440 values) against SaRA with θ chosen to select as many entries of the
UNet, and LoRA r=32 (245,760) against SaRA at ~5 % of the UNet (θ by |W| quantile, as `threshold_for_fraction`).
Same data, steps, batch (16) and schedule (constant) for all; each method at the learning rate named in the table
(2e-3, the quickstart's LoRA rate, for all; plus SaRA at its own default 1e-3·exp(−350θ), fitted by the paper for
5,000-step runs on Stable Diffusion). Judged with the shipped classifier
(see lab.py): subject accuracy / style score, retention on 0–8 without the trigger, FD, and the VLHI index over
all rows of a task (base model included). One run, fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402

from difftune.generation import load_pipeline  # noqa: E402
from difftune.methods.sara import auto_lr, threshold_for_fraction  # noqa: E402
from difftune.zoo import path as zoo_path  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def arms(unet_params: int, theta_for) -> list[tuple[str, dict, float | None]]:
    small = theta_for(61_440 / unet_params)
    big = theta_for(0.05)
    return [
        ("LoRA r=8", {"name": "lora", "rank": 8, "alpha": 8.0, "target_modules": LORA_TARGETS}, 2e-3),
        (f"SaRA θ={small:.2e}", {"name": "sara", "threshold": small}, 2e-3),
        ("LoRA r=32", {"name": "lora", "rank": 32, "alpha": 32.0, "target_modules": LORA_TARGETS}, 2e-3),
        (f"SaRA θ={big:.2e}", {"name": "sara", "threshold": big}, 2e-3),
        (f"SaRA θ={big:.2e}", {"name": "sara", "threshold": big}, None),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=20, help="trigger samples (subject) / samples per digit (style: n/2)")
    p.add_argument("--tasks", nargs="+", default=["subject", "style"])
    p.add_argument("--out", default="outputs/bench/sara_lab")
    p.add_argument("--ablation", action="store_true",
                   help="instead: the paper's Tab. 2 ablation (PPA, nuclear norm) at ~5%% on the subject task")
    args = p.parse_args()
    out = Path(args.out)
    unet = load_pipeline(zoo_path("sd-mini")).unet
    unet_params = sum(q.numel() for q in unet.parameters())
    plan = arms(unet_params, lambda f: threshold_for_fraction(unet, f))
    if args.ablation:
        theta = threshold_for_fraction(unet, 0.05)
        plan = [(f"SaRA θ={theta:.2e}, {label}", {"name": "sara", "threshold": theta, **fields}, 2e-3)
                for label, fields in (("no PPA, λ=0", {"progressive_fraction": None, "rank_weight": 0.0}),
                                      ("PPA, λ=0", {"rank_weight": 0.0}),
                                      ("no PPA, λ=5e-3", {"progressive_fraction": None}),
                                      ("PPA, λ=5e-3 (default)", {}))]
        args.tasks, out = ["subject"], out / "ablation"
    results = {}
    for task in args.tasks:
        data = lab.subject_data(out / "data") if task == "subject" else lab.style_data(out / "data")
        judge = lab.judge_subject if task == "subject" else lab.judge_style
        n = args.n if task == "subject" else max(1, args.n // 2)
        score = "subject_accuracy" if task == "subject" else "style_score"
        rows = [{"method": "sd-mini (no adapter)", "lr": None, "trainable": 0, **judge(lab.load(None), n=n)}]
        for i, (label, method, lr) in enumerate(plan):
            run = lab.train(method, data, out / task / f"arm{i}", args.steps, lr)
            lr_used = lr if lr is not None else auto_lr(method["threshold"])
            row = {"method": label, "lr": lr_used, "lr_note": "auto" if lr is None else "", **run,
                   **judge(lab.load(run["adapter"]), n=n)}
            row["adapter"] = str(row["adapter"])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "adapter"}), file=sys.stderr, flush=True)
        for r, v in zip(rows, lab.vlhi(rows, "fd", score)):
            r["vlhi"] = v
        results[task] = rows
        unit = "trigger samples" if task == "subject" else "per digit"
        print(f"\n{task}: {args.steps} steps, batch 16; n = {n} {unit}")
        cols = [("method", "method", "{}"), ("lr", "lr", "{:.2e}"), ("trainable", "trainable", "{:,}"),
                ("adapter size", "adapter_bytes", "{:,} B")]
        if task == "subject":
            cols += [("subject acc. (9s)", "subject_accuracy", "{:.0%}"), ("FD (vs real 9s)", "fd", "{:.0f}")]
        else:
            cols += [("style score 0-8", "style_score", "{:.2f}"), ("style score 5-8 (unseen)",
                     "style_score_unseen", "{:.2f}"), ("bold digit acc.", "style_accuracy", "{:.0%}"),
                     ("FD (vs real bold)", "fd", "{:.0f}"), ("ink of plain prompts", "retention_ink", "{:.1%}")]
        cols += [("retention 0-8", "retention", "{:.0%}"), ("VLHI", "vlhi", "{:.2f}")]
        print(lab.table(rows, cols))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
