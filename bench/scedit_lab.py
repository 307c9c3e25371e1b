"""SCEdit on sd-mini: SC-Tuner vs LoRA (style and subject), and CSC-Tuner control by digit outlines.

    python bench/scedit_lab.py --part tuning   [--steps 300]   # (a) SC-Tuner vs LoRA r=12 (similar size)
    python bench/scedit_lab.py --part control  [--steps 300]   # (b) outline control, (c) two conditions at once

(a) The lab tasks of bench/lab.py (subject: digit 9 with the trigger "zxq"; style: "bold" digits 0-4), trained through
the trainer with the same recipe for both methods (batch 16, constant lr ``--lr``). SC-Tuner on sd-mini's 4 skips has
88,896 parameters; LoRA r=12 on q/k/v/out 92,160.

(b) CSC adapters trained through the trainer (``data.kind: control``) on sd-mini's pretraining digits 0-8 (400 per
class, captioned as in pretraining), the condition extracted on the fly: ``outline`` (the boundary of the ink) and,
for (c), ``skeleton`` (the ink thinned to 1-pixel lines). Judged on held-out real digits (5 per class 0-8): the
condition of each is given with the prompt of its own class ("prompt and outline agree"), and the generated digit is
compared with the real one the condition came from:

* ink IoU: |gen ∩ real| / |gen ∪ real| of the ink masks (> 0.5);
* chamfer: the symmetric mean distance in pixels between the generated digit's outline and the condition outline;
* accuracy: the shipped classifier still reads the prompted class.

The no-control baseline is sd-mini with the same prompts and seeds. Results: outputs/bench/scedit_lab/*.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402

import difftune as dt  # noqa: E402
from difftune.eval import evaluate  # noqa: E402
from difftune.methods.scedit.conditions import outline, skeleton  # noqa: E402
from difftune.zoo.mnist import DIGIT_WORDS, from_rgb32, split, to_rgb32, write_pretrain_captions  # noqa: E402

OUT = lab.REPO / "outputs" / "bench" / "scedit_lab"
SC = {"name": "scedit"}
LORA = {"name": "lora", "rank": 12, "alpha": 12.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def part_tuning(steps: int, lr: float) -> list[dict]:
    rows = []
    base = lab.load(None)
    rows.append({"task": "subject", "method": "sd-mini (no adapter)", "trainable": 0, **lab.judge_subject(base)})
    rows.append({"task": "style", "method": "sd-mini (no adapter)", "trainable": 0, **lab.judge_style(base)})
    for task, data, judge in (("subject", lab.subject_data(OUT / "data"), lab.judge_subject),
                              ("style", lab.style_data(OUT / "data"), lab.judge_style)):
        for label, method in (("SC-Tuner", SC), ("LoRA r=12", LORA)):
            facts = lab.train(method, data, OUT / f"{task}-{method['name']}", steps, lr)
            row = {"task": task, "method": label, "lr": lr, **facts, **judge(lab.load(facts["adapter"]))}
            row["adapter"] = str(row["adapter"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def train_csc(condition: str, data: Path, steps: int, lr: float) -> Path:
    facts = lab.train({"name": "csc"}, data, OUT / f"csc-{condition}", steps, lr,
                      extra=["data.kind=control", f"data.condition={condition}"])
    print(json.dumps({"condition": condition, **{k: str(v) for k, v in facts.items()}}), flush=True)
    return facts["adapter"]


def _outline_points(digit: np.ndarray) -> np.ndarray:
    return np.argwhere(np.asarray(outline(digit)) > 127).astype(np.float64)


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean nearest-neighbour distance (pixels) between the outlines of two 28×28 digits."""
    pa, pb = _outline_points(a), _outline_points(b)
    if not len(pa) or not len(pb):
        return 28.0  # an empty image: the largest distance on the canvas
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float((d.min(1).mean() + d.min(0).mean()) / 2)


def judge_control(pipe, real: np.ndarray, labels: np.ndarray, control: dict | None, steps: int = 20,
                  guidance: float = 4.0) -> dict:
    prompts = [f"a handwritten digit {DIGIT_WORDS[int(d)]}" for d in labels]
    kw = {"control": control} if control else {}
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
               generator=torch.Generator().manual_seed(0), **kw)
    gen = np.stack([from_rgb32(im) for im in out.images])  # (N, 28, 28) in [0, 1]
    real = real.astype(np.float32) / 255.0
    ious = [float(((g > 0.5) & (r > 0.5)).sum() / max(1, ((g > 0.5) | (r > 0.5)).sum())) for g, r in zip(gen, real)]
    ev = evaluate(out.images, labels.tolist())
    return {"iou": float(np.mean(ious)), "chamfer": float(np.mean([chamfer(g, r) for g, r in zip(gen, real)])),
            "accuracy": ev["accuracy"], "n": len(labels)}


def part_control(steps: int, lr: float, per_digit: int) -> list[dict]:
    from difftune.pipelines.difftune_scedit import DifftuneSCEditPipeline

    data = OUT / "data" / "digits-0-8"
    if not data.exists():
        write_pretrain_captions(data)
    adapters = {c: train_csc(c, data, steps, lr) for c in ("outline", "skeleton")}
    x, y = split("heldout", tuple(range(9)))
    keep = np.concatenate([np.flatnonzero(y == d)[:per_digit] for d in range(9)])
    real, labels = x[keep], y[keep]
    conds = {"outline": [outline(to_rgb32(r)) for r in real], "skeleton": [skeleton(to_rgb32(r)) for r in real]}
    pipe = lab.load(None)
    pipe = DifftuneSCEditPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    rows = [{"setting": "no control (sd-mini)", **judge_control(pipe, real, labels, None)}]
    for c, path in adapters.items():
        dt.load_adapter(pipe, path, name=c)
    for setting, scales in (("outline CSC", {"outline": 1.0, "skeleton": 0.0}),
                            ("skeleton CSC", {"outline": 0.0, "skeleton": 1.0}),
                            ("outline + skeleton (1.0 each)", {"outline": 1.0, "skeleton": 1.0}),
                            ("outline + skeleton (0.5 each)", {"outline": 0.5, "skeleton": 0.5})):
        dt.set_adapter_weights(pipe, scales)
        row = {"setting": setting, **judge_control(pipe, real, labels, conds)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # a condition that disagrees with the prompt: the outline of the next class's digit
    dt.set_adapter_weights(pipe, {"outline": 1.0, "skeleton": 0.0})
    shifted = np.roll(np.arange(len(labels)), per_digit)
    row = judge_control(pipe, real[shifted], labels, {"outline": [conds["outline"][i] for i in shifted],
                                                      "skeleton": conds["skeleton"]})
    row["setting"] = "outline CSC, outline of another digit"
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["tuning", "control"], required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--per-digit", type=int, default=5)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.part == "tuning":
        rows = part_tuning(args.steps, args.lr)
    else:
        rows = part_control(args.steps, args.lr, args.per_digit)
    (OUT / f"{args.part}.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"{args.part}: {time.perf_counter() - t0:.0f} s, {args.steps} steps, lr {args.lr}")
    if args.part == "tuning":
        print("| task | method | trainable | subject acc. / style score | FD | retention 0-8 |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            score = r.get("subject_accuracy", r.get("style_score"))
            print(f"| {r['task']} | {r['method']} | {r['trainable']:,} | {score:.2f} | {r['fd']:.0f} | "
                  f"{r['retention']:.0%} |")
    else:
        print("| setting | ink IoU with the real digit | chamfer to its outline (px) | prompted class held |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['iou']:.2f} | {r['chamfer']:.2f} | {r['accuracy']:.0%} |")


if __name__ == "__main__":
    main()
