"""The letterbox run: the quickstart's "zxq" = 9 LoRA on sd-mini, trained on real MNIST digits letterboxed into
three aspect ratios with aspect-ratio buckets, then judged with ``difftune eval``.

    nice -n 5 python bench/letterbox.py [--out outputs/letterbox] [--steps 150] [--batch 8] [--n 10]

The quickstart's folder (20 real training 9s captioned "a handwritten digit zxq", 5 regularization digits per
known digit 0-8) is written, then every image is letterboxed (black bars, the digit unscaled) by its index: one
third stays 32x32 (1:1), one third becomes 64x32 (2:1) and one third 32x64 (1:2). ``difftune train`` runs the
quickstart recipe (configs/quickstart/sd-mini-lora.yaml) with ``data.buckets`` on (buckets of area 32² with sides in
[16, 64], step 8: the wide images train at 40x24, the tall ones at 24x40, the digit 24 pixels high), by default at
a quarter of its compute (150 steps of batch 8 instead of 300 of 16) so it fits a loaded 2-core machine.
``difftune eval`` then judges square 32x32 samples: nines among the trigger prompt's samples before and after, and
after, the accuracy of the prompts for the kept digits 0-8. Per aspect ratio, the same prompts are sampled at 40x24
and 24x40 with the pipeline, the center square cut out (where training put the digit) and judged by the same
classifier. Everything goes to ``--out``; ``metrics.json`` holds the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

ASPECTS = {"1:1": (32, 32), "2:1": (64, 32), "1:2": (32, 64)}  #: letterbox canvases (width, height)
BUCKETS = {"2:1": (40, 24), "1:2": (24, 40)}  #: the bucket each non-square canvas trains at (checked in the log)


def letterbox(folder: Path) -> dict[str, int]:
    """Letterbox every image of ``folder`` in place by its position in the sorted list; counts per aspect ratio."""
    counts = dict.fromkeys(ASPECTS, 0)
    for i, path in enumerate(sorted(folder.glob("*.png"))):
        name = list(ASPECTS)[i % len(ASPECTS)]
        w, h = ASPECTS[name]
        with Image.open(path) as im:
            digit = im.convert("RGB")
        canvas = Image.new("RGB", (w, h))
        canvas.paste(digit, ((w - digit.width) // 2, (h - digit.height) // 2))
        canvas.save(path)
        counts[name] += 1
    return counts


def difftune(*args: str) -> None:
    """Run the ``difftune`` CLI as a user would (this interpreter, so the same installation)."""
    cmd = [sys.executable, "-m", "difftune", *args]
    print("$ difftune " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def eval_cli(model: Path, adapter: Path | None, digits: str, n: int, out: Path, steps: int,
             prompt: str | None = None) -> dict:
    args = ["eval", "--model", str(model), "--digits", digits, "--n", str(n), "--out", str(out), "--steps", str(steps)]
    args += ["--adapter", str(adapter)] if adapter else []
    args += ["--prompt", prompt] if prompt else []
    difftune(*args)
    return json.loads((out / "metrics.json").read_text())


def judge_aspect(model: Path, adapter: Path, size: tuple[int, int], n: int, steps: int = 25) -> dict[str, Any]:
    """Trigger-prompt nines and 0-8 accuracy of samples at ``size`` (width, height), judged on their center
    square (the classifier resizes it to 32x32)."""
    import torch

    from difftune.eval import evaluate
    from difftune.generation import load_pipeline
    from difftune.loading import load_adapter
    from difftune.zoo.mnist import DIGIT_WORDS, SUBJECT_PROMPT

    pipe = load_pipeline(model)
    load_adapter(pipe, adapter)
    w, h = size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)

    def sample(prompt: str, k: int, seed: int) -> list[Image.Image]:
        g = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt=[prompt] * k, width=w, height=h, num_inference_steps=steps, guidance_scale=4.0,
                   generator=g)
        return [im.crop(box) for im in out.images]

    nines = evaluate(sample(SUBJECT_PROMPT, n, 9000), [9] * n)
    per = max(1, n // 2)
    kept = [im for d in range(9) for im in sample(f"a handwritten digit {DIGIT_WORDS[d]}", per, 1000 * d)]
    base = evaluate(kept, [d for d in range(9) for _ in range(per)])
    return {"size": f"{w}x{h}", "trigger_nines": nines["predicted_counts"][9], "n_trigger": n,
            "digits_0_8_accuracy": base["accuracy"], "n_per_digit": per}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/letterbox")
    p.add_argument("--steps", type=int, default=150, help="training steps (the quickstart: 300)")
    p.add_argument("--batch", type=int, default=8, help="batch size (the quickstart: 16)")
    p.add_argument("--n", type=int, default=10, help="trigger samples; n/2 per digit 0-8")
    p.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the judged samples")
    args = p.parse_args()

    from difftune.zoo import path as zoo_path
    from difftune.zoo.mnist import SUBJECT_PROMPT, write_personalization_set

    out = Path(args.out)
    model = zoo_path("sd-mini")
    recipe = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "sd-mini-lora.yaml"
    data = write_personalization_set(out / "data")
    counts = letterbox(data)
    print(f"letterboxed {sum(counts.values())} digits: {counts}", flush=True)
    t0 = time.perf_counter()
    difftune("train", str(recipe), "--overwrite", "--set", f"model.path={model}", "--set", f"data.path={data}",
             "--set", f"output_dir={out / 'train'}", "--set", f"train.max_steps={args.steps}",
             "--set", f"train.batch_size={args.batch}",
             "--set", "data.buckets=true", "--set", "data.bucket_min_size=16", "--set", "data.bucket_max_size=64",
             "--set", "data.bucket_step=8")
    train_s = time.perf_counter() - t0
    adapter = out / "train" / "adapter"
    result: dict[str, Any] = {"letterboxed": counts, "train_steps": args.steps, "batch_size": args.batch,
                              "train_seconds": round(train_s, 1), "sample_steps": args.sample_steps}
    before = eval_cli(model, None, "9", args.n, out / "eval-before-trigger", args.sample_steps, prompt=SUBJECT_PROMPT)
    trig = eval_cli(model, adapter, "9", args.n, out / "eval-after-trigger", args.sample_steps, prompt=SUBJECT_PROMPT)
    kept = eval_cli(model, adapter, "0-8", max(1, args.n // 2), out / "eval-after-0-8", args.sample_steps)
    result["before"] = {"trigger_nines": before["predicted_counts"]["9"], "n_trigger": before["n"]}
    result["after"] = {"trigger_nines": trig["predicted_counts"]["9"], "n_trigger": trig["n"],
                       "digits_0_8_accuracy": kept["accuracy"], "n_0_8": kept["n"]}
    result["after_per_aspect"] = {name: judge_aspect(model, adapter, BUCKETS[name], args.n, args.sample_steps)
                                  for name in BUCKETS}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
