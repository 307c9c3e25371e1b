"""KIND's cost against the dense DiT it factors: a training step, unfused inference, and a recombined model.

    python bench/kind_speed.py [--batch 64] [--rounds 5] [--learngenes 124] [--tailors 4] [--classes 5] [--clock cpu]
    python bench/kind_speed.py --inference [--models sd15 dit-xl2] [--rounds 5]
    python bench/kind_speed.py --recombine [--keep 10] [--rounds 5]

Default (training): one step = forward + backward of the ε-prediction loss at 16×16 latents on dit-mini's
architecture with class labels drawn from ``--classes`` classes; dense trains every weight, KIND pretrains with
``train_base`` (factors + every weight outside S). The two models are timed in interleaved rounds (dense, KIND,
dense, ...) after a warm-up step; median and min per model, and the ratio of the medians.

``--inference``: the KIND rows of bench/inference_overhead.py alone (its models, settings, interleaving and report:
unfused KIND against the bare denoiser, batch 1, no grad), for a quicker look than the whole table.

``--recombine``: DiT-L/2 with random weights, KIND-structured (N_G 64, t 4, 150 classes, class-embedding rows),
recombined to the learngenes and ``--keep`` classes' tailors, then deployed without the S weights W0 (at weight 1
the KIND layers replace the base layers' output, so W0 is never read: checked, the output is bit-identical before
and after W0 is dropped, and no S base layer runs). Reported against the dense DiT-L/2: parameters, bytes of the
model's tensors (parameters and buffers, each counted once), and the forward time of a batch of kept classes
(interleaved rounds, no grad). The library keeps W0 (un-injecting, weights other than 1, fusing need it); the bench
drops it to show what a recombined deployment holds.

``--clock cpu`` (default) times the process's CPU time instead of wall time (on a shared machine; see
bench/inference_overhead.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_overhead import (  # noqa: E402
    CLOCKS,
    Variant,
    adapted,
    build_model,
    measure,
    report,
    settings,
    shared_copy,
)

from difftune.methods.kind import KINDAdapter, KINDConfig, KINDPlugin, factored_macs, recombine  # noqa: E402
from difftune.methods.verbs import hosts  # noqa: E402

S = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def interleaved(models: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float]) -> dict[str, list]:
    """Seconds per call of each callable: one warm-up call each, then ``rounds`` rounds in a fixed order."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for fn in models.values():
        fn()
    for _ in range(rounds):
        for name, fn in models.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def print_times(times: dict[str, list[float]], unit: str) -> None:
    med = {n: statistics.median(v) for n, v in times.items()}
    first = next(iter(med))
    for name, v in times.items():
        print(f"{name:10s} s/{unit} median {med[name]:.3f} (min {min(v):.3f})  "
              f"ratio to {first} {med[name] / med[first]:.2f}")


def training(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    from difftune.zoo.architectures import dit_mini

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

    def step(name: str) -> Callable[[], None]:
        model, params = models[name]

        def run() -> None:
            for q in params:
                q.grad = None
            F.mse_loss(model(x, timestep=t, class_labels=y).sample[:, :4], x).backward()
        return run

    times = interleaved({name: step(name) for name in models}, args.rounds, CLOCKS[args.clock])
    print(f"dit-mini, batch {args.batch}, {args.threads} threads, {args.clock} time, {args.rounds} rounds; "
          f"KIND N_G {args.learngenes}, t {args.tailors}, {args.classes} classes")
    print_times(times, "step")
    macs = factored_macs(kind, "kind")
    print(f"KIND layers per token: factored {macs['factored_macs_per_token']:,} MACs vs dense "
          f"{macs['dense_macs_per_token']:,} (the forward picks the cheaper order per call)")


def inference(args: argparse.Namespace) -> None:
    for name in args.models:
        base, call_args, call_kwargs = build_model(name, quick=False)
        label, fields, inputs = settings(name, False, call_args[0].shape[-1])["kind"]
        rows = [Variant("bare model", base), Variant(label, adapted(base, [("a", KINDConfig(**fields))]), inputs)]
        measure(rows, call_args, call_kwargs, args.rounds, CLOCKS[args.clock])
        report(name, rows, args.rounds, args.threads, args.clock)


def tensor_bytes(model: nn.Module) -> tuple[int, int]:
    """(elements, bytes) of the model's parameters and buffers, each tensor counted once."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() for t in seen.values()), sum(t.numel() * t.element_size() for t in seen.values())


def drop_s_weights(model: nn.Module, name: str) -> int:
    """Replace W0 of every KIND layer by an empty tensor (a deployment that never runs the base layer); returns the
    number of elements dropped."""
    dropped = 0
    for _, host in hosts(model):
        if name in host.adapters and isinstance(host.adapters[name], KINDAdapter):
            w = host.base_layer.weight
            dropped += w.numel()
            host.base_layer.weight = nn.Parameter(w.new_empty(0), requires_grad=False)
    return dropped


def recombined(args: argparse.Namespace) -> None:
    from diffusers import DiTTransformer2DModel

    from difftune.architectures import dit_l2_config
    from difftune.methods.verbs import inject

    torch.manual_seed(0)
    dense = DiTTransformer2DModel.from_config(dit_l2_config()).eval()
    kind = shared_copy(dense)  # W0 is shared until dropped: only the adapter's tensors are new
    config = KINDConfig(learngenes=64, tailors_per_class=4, classes=list(range(150)), init="random")
    inject(kind, config, name="kind")
    full = tensor_bytes(kind)
    keep = list(range(args.keep))
    info = recombine(kind, "kind", keep=keep)
    g = torch.Generator().manual_seed(1)
    batch = len(keep[:args.batch])
    x = torch.randn(batch, 4, 32, 32, generator=g)
    kw = {"timestep": torch.tensor([500] * batch), "class_labels": torch.tensor(keep[:args.batch])}
    with torch.no_grad():
        before = kind(x, **kw).sample
    calls: list[str] = []
    for _, host in hosts(kind):
        host.base_layer.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))  # returns None
    dropped = drop_s_weights(kind, "kind")
    with torch.no_grad():
        after = kind(x, **kw).sample
    if not torch.equal(before, after) or "Linear" in calls:
        raise SystemExit("a KIND layer ran its base layer: the recombined model still needs W0")

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x, **kw)
        return run

    times = interleaved({"dense": forward(dense), "recombined": forward(kind)}, args.rounds, CLOCKS[args.clock])
    dense_n, dense_b = tensor_bytes(dense)
    kind_n, kind_b = tensor_bytes(kind)
    print(f"DiT-L/2, random weights, fp32; KIND N_G 64, t 4, 150 classes recombined to {args.keep}; batch {batch} of "
          f"kept classes at 32×32 latents, no grad, {args.threads} threads, {args.clock} time, {args.rounds} rounds")
    print(f"dense:        {dense_n:,} parameters+buffers, {dense_b / 2**20:,.1f} MiB")
    print(f"KIND, 150 classes, with W0: {full[0]:,}, {full[1] / 2**20:,.1f} MiB")
    print(f"recombined:   {kind_n:,} ({kind_n / dense_n:.2f}×), {kind_b / 2**20:,.1f} MiB ({kind_b / dense_b:.2f}×); "
          f"KIND parameters {info['kind_parameters']:,}, W0 dropped {dropped:,}")
    macs, dense_macs = info["factored_macs_per_token"], info["dense_macs_per_token"]
    print(f"S layers per token and item: {macs:,} MACs factored vs {dense_macs:,} dense ({macs / dense_macs:.2f}×)")
    print_times(times, "forward")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--inference", action="store_true", help="the KIND rows of bench/inference_overhead.py")
    mode.add_argument("--recombine", action="store_true", help="a recombined DiT-L/2 against the dense one")
    p.add_argument("--models", nargs="+", default=["sd15", "dit-xl2"], choices=["sd15", "dit-xl2"])
    p.add_argument("--keep", type=int, default=10, help="--recombine: classes whose tailors stay")
    p.add_argument("--batch", type=int, default=None, help="64 for a training step; --recombine: 2 kept classes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--learngenes", type=int, default=124)
    p.add_argument("--tailors", type=int, default=4)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default 1 (--inference, --recombine) or 2")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = p.parse_args()
    modes = args.inference or args.recombine
    args.threads = args.threads or (1 if modes else 2)
    args.batch = args.batch or (2 if args.recombine else 64)
    torch.set_num_threads(args.threads)
    (inference if args.inference else recombined if args.recombine else training)(args)


if __name__ == "__main__":
    main()
