"""KIND's training-step cost against the dense DiT it factors, on dit-mini's architecture, side by side.

    python bench/kind_speed.py [--batch 64] [--rounds 5] [--learngenes 124] [--tailors 4] [--classes 5] [--clock cpu]

One step = forward + backward of the ε-prediction loss at 16×16 latents with class labels drawn from ``--classes``
classes; dense trains every weight, KIND pretrains with ``train_base`` (factors + every weight outside S). The two
models are timed in interleaved rounds (dense, KIND, dense, ...) after a warm-up step; median and min per model.
``--clock cpu`` times the process's CPU time instead of wall time (on a shared machine; see
bench/inference_overhead.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from difftune.methods.kind import KINDConfig, KINDPlugin, factored_macs
from difftune.zoo.architectures import dit_mini

S = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--learngenes", type=int, default=124)
    p.add_argument("--tailors", type=int, default=4)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = dit_mini()
    kind = copy.deepcopy(dense)
    plugin = KINDPlugin(KINDConfig(target_modules=S, learngenes=args.learngenes, tailors_per_class=args.tailors,
                                   classes=list(range(args.classes)), train_base=True), "kind")
    plugin.prepare(None, kind)
    models = {"dense": (dense, list(dense.parameters())), "kind": (kind, plugin.trainable_parameters(kind))}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(name: str) -> float:
        model, params = models[name]
        for q in params:
            q.grad = None
        t0 = clock()
        loss = F.mse_loss(model(x, timestep=t, class_labels=y).sample[:, :4], x)
        loss.backward()
        return clock() - t0

    times: dict[str, list[float]] = {name: [] for name in models}
    for name in models:
        step(name)  # warm-up
    for _ in range(args.rounds):
        for name in models:
            times[name].append(step(name))
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"dit-mini, batch {args.batch}, {args.threads} threads, {args.clock} time, {args.rounds} rounds; "
          f"KIND N_G {args.learngenes}, t {args.tailors}, {args.classes} classes")
    for name, v in times.items():
        ratio = med[name] / med["dense"]
        print(f"{name:6s} s/step median {med[name]:.3f} (min {min(v):.3f})  ratio to dense {ratio:.2f}")
    macs = factored_macs(kind, "kind")
    print(f"KIND layers per token: factored {macs['factored_macs_per_token']:,} MACs vs dense "
          f"{macs['dense_macs_per_token']:,} (the trainer's forward picks the cheaper order per call)")


if __name__ == "__main__":
    main()
