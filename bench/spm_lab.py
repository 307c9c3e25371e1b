"""SPM lab on sd-mini: erase digits with concept membranes, judged by the shipped MNIST classifier.

Parts (each one process, within ~10 minutes on 2 shared CPU cores; trained adapters are reused when present):

* ``erase``: SPM "seven" with latent anchoring and without (``action: erase``); rate of "seven" prompts judged 7
  and accuracy on the other digits 0–8, with γ = 1 forced ("fixed") and with facilitated transport (the official
  "clipcos_tokenuni" rule, and "tokenuni" alone); the pixel distance to the base model's images (same seeds) on
  prompts without "seven".
* ``compose``: SPMs "seven" and "three" loaded together (separate adapters, each with its own γ).
* ``transfer``: the "seven" SPM on sd-mini with a merged LoRA (the quickstart subject LoRA, "zxq" → 9).

    python bench/spm_lab.py --part erase [--steps 150 --lr 2e-3 --la 100 --n 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lab
import numpy as np
import torch

import difftune as dt
from difftune.config import load_config
from difftune.eval import evaluate
from difftune.generation import load_pipeline
from difftune.methods.spm import set_matching
from difftune.methods.spm.erase import evaluate_erasure, generate
from difftune.train import TrainConfig, main
from difftune.zoo import path as zoo_path
from difftune.zoo.mnist import DIGIT_WORDS

CONFIG = lab.REPO / "configs" / "spm" / "sd-mini.yaml"
WORDS = list(DIGIT_WORDS[:9])  # sd-mini knows 0-8


def train_spm(out: Path, concepts: list[str], action: str, steps: int, lr: float, la: float = 1000.0) -> Path:
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return adapter
    overrides = [f"model.path={zoo_path('sd-mini')}", f"output_dir={out}", f"train.max_steps={steps}",
                 f"optimizer.lr={lr}", f"method.concepts={json.dumps(concepts)}", f"method.action={action}",
                 f"method.la_strength={la}", "logging.progress_bar=false"]
    t0 = time.perf_counter()
    path = main(load_config(TrainConfig, CONFIG, overrides))
    print(f"trained {concepts} ({action}) in {time.perf_counter() - t0:.0f} s")
    return path


def pipeline(adapters: dict[str, Path], matching: str = "clipcos_tokenuni", lora: Path | None = None) -> Any:
    from difftune.pipelines.difftune_stable_diffusion import DifftuneStableDiffusionPipeline

    pipe = DifftuneStableDiffusionPipeline(**load_pipeline(zoo_path("sd-mini")).components)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:  # a style/subject adapter merged into the weights: a "different model" of the same layout
        dt.load_adapter(pipe, lora, name="lora")
        dt.remove(pipe, merge=True)
    for name, path in adapters.items():
        dt.load_adapter(pipe, path, name=name)
        set_matching(pipe.unet, name, matching)
    return pipe


def judge(pipe: Any, erased: list[str], n: int, steps: int) -> dict[str, Any]:
    kept = [w for w in WORDS if w not in erased]
    r = evaluate_erasure(pipe, erased, kept, judge="mnist", n=n, steps=steps, guidance=4.0)
    row = {f"{c}_rate": r["present"][c] for c in erased}
    row.update(others=r["specificity"], efficacy=r["efficacy"], h=r["harmonic_mean"], present=r["present"],
               knobs=r["knobs"])
    print({k: v for k, v in row.items() if k != "knobs"}, flush=True)
    return row


def distance(pipe: Any, base: Any, erased: list[str], n: int, steps: int) -> float:
    """Mean |Δpixel| (0-1 scale) to the base model's images, same seeds, on prompts without the erased concepts."""
    diffs = []
    for i, w in enumerate(x for x in WORDS if x not in erased):
        prompt = f"a handwritten digit {w}"
        a = np.stack([np.asarray(im, np.float32) / 255 for im in generate(pipe, prompt, n, 77 + i, steps, 4.0)])
        b = np.stack([np.asarray(im, np.float32) / 255 for im in generate(base, prompt, n, 77 + i, steps, 4.0)])
        diffs.append(float(np.abs(a - b).mean()))
    return float(np.mean(diffs))


def row_text(label: str, r: dict[str, Any], erased: list[str]) -> str:
    rates = " / ".join(f"{r[f'{c}_rate']:.0%}" for c in erased)
    dist = f"{r['distance']:.4f}" if "distance" in r else "—"
    return f"| {label} | {rates} | {r['others']:.1%} | {r['h']:.3f} | {dist} |"


def main_lab() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["erase", "compose", "transfer"], required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--la", type=float, default=1000.0, help="λ_LA of the anchored SPMs")
    p.add_argument("--no-ablation", action="store_true", help="erase: skip the SPM without anchoring")
    p.add_argument("--out", type=Path, default=lab.REPO / "outputs" / "bench" / "spm_lab")
    args = p.parse_args()
    torch.manual_seed(0)
    out = args.out
    t0 = time.perf_counter()
    base = pipeline({})
    rows: list[tuple[str, dict[str, Any]]] = []
    n, st = args.n, args.sample_steps
    seven = lambda: train_spm(out / f"seven-la{args.la:g}", ["seven"], "erase_with_la", args.steps, args.lr,  # noqa: E731
                              args.la)
    # transport variants: "fixed" = γ 1 on every prompt (a fused SPM, or a plain LoRA loader); the official
    # "clipcos_tokenuni"; "tokenuni" alone (the cosine over the whole 77×64 embedding is high for every prompt here)
    variants = ("fixed", "clipcos_tokenuni", "tokenuni")
    if args.part == "erase":
        erased = ["seven"]
        rows.append(("sd-mini (no SPM)", judge(base, erased, n, st)))
        runs = [(f"SPM seven, anchoring λ_LA={args.la:g}", seven(), variants)]
        if not args.no_ablation:
            runs.append(("SPM seven, no anchoring", train_spm(out / "seven-noLA", erased, "erase", args.steps,
                                                              args.lr), ("fixed",)))
        for label, path, matchings in runs:
            for matching in matchings:
                pipe = pipeline({"seven": path}, matching=matching)
                r = judge(pipe, erased, n, st)
                r["distance"] = distance(pipe, base, erased, max(4, n // 4), st)
                rows.append((f"{label}, γ: {matching}", r))
    elif args.part == "compose":
        erased = ["seven", "three"]
        rows.append(("sd-mini (no SPM)", judge(base, erased, n, st)))
        three = train_spm(out / f"three-la{args.la:g}", ["three"], "erase_with_la", args.steps, args.lr, args.la)
        for matching in variants:
            pipe = pipeline({"seven": seven(), "three": three}, matching=matching)
            r = judge(pipe, erased, n, st)
            r["distance"] = distance(pipe, base, erased, max(4, n // 4), st)
            rows.append((f"SPM seven + SPM three, γ: {matching}", r))
    else:
        erased = ["seven"]
        lora = out / "lora-nine"
        if not (lora / "adapter" / "adapter_config.json").is_file():
            lab.train({"name": "lora", "rank": 8, "alpha": 8}, lab.subject_data(out / "data"), lora, 150, 2e-3)
        merged = pipeline({}, lora=lora / "adapter")
        rows.append(("sd-mini + merged LoRA (no SPM)", judge(merged, erased, n, st)))
        pipe = pipeline({"seven": seven()}, matching="tokenuni", lora=lora / "adapter")
        r = judge(pipe, erased, n, st)
        r["distance"] = distance(pipe, merged, erased, max(4, n // 4), st)
        rows.append(("sd-mini + merged LoRA + SPM seven (trained on sd-mini), γ: tokenuni", r))
        from difftune.zoo.mnist import SUBJECT_PROMPT

        for tag, model in (("without", merged), ("with", pipe)):
            imgs = generate(model, SUBJECT_PROMPT, n, 5, st, 4.0)
            rows[-2 if tag == "without" else -1][1]["subject_nine_rate"] = evaluate(imgs, [9] * len(imgs))["accuracy"]
    header = ("| model | " + " / ".join(f'"{c}" judged {WORDS.index(c)}' for c in erased)
              + " | other digits' accuracy | H | distance to base (other prompts) |")
    lines = [header, "|---|---|---|---|---|"] + [row_text(label, r, erased) for label, r in rows]
    print("\n".join(lines))
    extra = {label: r.get("subject_nine_rate") for label, r in rows if "subject_nine_rate" in r}
    if extra:
        print("subject 'zxq' prompts judged 9:", extra)
    out.mkdir(parents=True, exist_ok=True)
    results = {"part": args.part, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": [{"label": label, **r} for label, r in rows], "seconds": time.perf_counter() - t0}
    (out / f"results-{args.part}-la{args.la:g}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main_lab()
