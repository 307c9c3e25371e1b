"""Quality of the shipped reference models, judged by the shipped classifier (numbers for the README).

    python bench/reference_models.py [--models sd-mini dit-mini flow-mini] [--n 50] [--steps 25] [--guidance 1 3 4 5]

sd-mini and flow-mini: digits 0-8 prompted "a handwritten digit <word>", and the held-out trigger prompt "a handwritten
digit zxq" (intended 9, never trained). dit-mini: class labels 0-9. n samples per digit, seeds fixed; sd-mini and
dit-mini sample with DDIM, flow-mini with its Euler flow-matching scheduler.
"""

from __future__ import annotations

import argparse
import time

from difftune.eval import evaluate, generate_digits
from difftune.generation import load_pipeline
from difftune.zoo import MODELS, path
from difftune.zoo.mnist import SUBJECT_PROMPT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 4.0, 5.0])
    args = p.parse_args()
    rows = []
    for name in args.models:
        digits = list(range(10)) if name == "dit-mini" else list(range(9))
        pipe = load_pipeline(path(name))
        for g in args.guidance:
            t0 = time.perf_counter()
            images, labels = generate_digits(pipe, digits, args.n, steps=args.steps, guidance=g)
            m = evaluate(images, labels)
            rows.append((name, f"{digits[0]}-{digits[-1]}", g, m, time.perf_counter() - t0))
        if name != "dit-mini":
            images, labels = generate_digits(pipe, [9], args.n, prompt=SUBJECT_PROMPT, steps=args.steps, guidance=4.0)
            m = evaluate(images, labels)
            rows.append((name, f"'{SUBJECT_PROMPT}' (9 never trained)", 4.0, m, 0.0))
    print(f"n = {args.n} per digit, {args.steps} sampling steps")
    print("| model | prompts | guidance | accuracy | FD | FD floor (held-out real) | ink (real) | diversity (real) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, what, g, m, _ in rows:
        print(f"| {name} | {what} | {g:g} | {m['accuracy']:.1%} | {m['fd']:.1f} | {m['fd_floor']:.1f} | "
              f"{m['ink']:.3f} ({m['ink_real']:.3f}) | {m['diversity']:.1f} ({m['diversity_real']:.1f}) |")
    for name, what, _, m, _ in rows:
        if "never trained" in what:
            print(f"{name}: predicted digits for the trigger prompt:", m["predicted_counts"])


if __name__ == "__main__":
    main()
