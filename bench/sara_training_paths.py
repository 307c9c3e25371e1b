"""Time of fused SaRA's training paths (``fused_training=True``; SaRA trains unfused by default, see
bench/sara_memory.py) on the SD1.5 UNet, old against new, interleaved in one process.

    python bench/sara_training_paths.py [--latent 32] [--batch 1] [--rounds 5]

1. The weight gradient (forward + backward):

* ``blocks``: a stock Linear/Conv2d runs with a weight and bias that need no gradient and `WeightGrad` forms dL/dW at
  M a block of output channels at a time (the fused route's default since issue 27);
* ``dense``: autograd forms each layer's dense dL/dW and `RouteGrad` gathers it at M (the route before).

Both give the same ∂L/∂Δ up to float rounding (tests/methods/test_sara_memory.py). The route is chosen per forward, so
one model with one SaRA adapter (θ selecting 5 %, random weights) runs both, alternating, in an order that rotates
every round. Reported: the median CPU seconds of a forward + backward per route (one thread by default) and the
median of the per-round ratios blocks / dense with their min–max. Peak memory needs a process per route: compare
``python bench/sara_memory.py`` at two commits.

2. The rewrite of the fused entries that follows every optimizer step (W[M] ← W0[M] + Δ, each host's
``_write_merged`` over the whole UNet): ``one pass`` (`SaRAAdapter.rewrite`: one decode of the positions and one
write) against ``two passes`` (`restore` then `add_into`, the host's general route and the only one before). The same
values bit for bit (tests/methods/test_sara_memory.py).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    import difftune.methods.sara.adapter as sara_adapter
    from difftune.methods.sara import SaRAAdamW, threshold_for_fraction
    from difftune.methods.sara.grads import gradient_rule
    from difftune.testing import sd15_unet_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sd15_unet_config())
    opt = SaRAAdamW(unet, threshold=threshold_for_fraction(unet, 0.05), fused_training=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    cond = torch.randn(args.batch, 77, 768, generator=g)
    t = torch.full((args.batch,), 500)
    routes = {"blocks": gradient_rule, "dense": lambda layer: False}

    def step(route: str) -> float:
        sara_adapter.gradient_rule = routes[route]
        t0 = time.process_time()
        unet(x, t, encoder_hidden_states=cond).sample.pow(2).mean().backward()
        seconds = time.process_time() - t0
        opt.zero_grad(set_to_none=True)
        return seconds

    names = list(routes)
    for name in names:  # warm-up
        step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % 2:] + names[:r % 2]:
            times[name].append(step(name))
    sara_adapter.gradient_rule = gradient_rule

    from difftune.methods.sara import SaRAAdapter
    from difftune.methods.verbs import hosts

    one_pass = SaRAAdapter.rewrite

    def two_passes(self: SaRAAdapter, pname: str, param: torch.Tensor, weight: float | None) -> None:
        self.restore(pname, param)
        if weight is not None:
            self.add_into(pname, param, weight)

    writers = {"one pass": one_pass, "two passes": two_passes}
    all_hosts = [h for _, h in hosts(unet)]

    def rewrite(name: str) -> float:
        SaRAAdapter.rewrite = writers[name]
        t0 = time.process_time()
        for host in all_hosts:
            host._write_merged()
        return time.process_time() - t0

    passes: dict[str, list[float]] = {n: [] for n in writers}
    order = list(writers)
    for r in range(args.rounds + 1):
        for name in order[r % 2:] + order[:r % 2]:
            seconds = rewrite(name)
            if r:  # the first round warms up
                passes[name].append(seconds)
    SaRAAdapter.rewrite = one_pass

    ratios = [b / d for b, d in zip(times["blocks"], times["dense"])]
    print(f"SD1.5 UNet, SaRA fused (5 % selected), batch {args.batch}, {args.latent}x{args.latent} latents, "
          f"{args.threads} thread(s), CPU s of forward + backward, {args.rounds} interleaved rounds after a warm-up")
    print("| route | CPU s median | vs dense: median of per-round ratios (min–max) |")
    print("|---|---|---|")
    print(f"| dense dL/dW (`RouteGrad`) | {statistics.median(times['dense']):.2f} | 1.00× |")
    print(f"| blocks (`WeightGrad`) | {statistics.median(times['blocks']):.2f} | {statistics.median(ratios):.2f}× "
          f"({min(ratios):.2f}–{max(ratios):.2f}) |")
    ratios = [a / b for a, b in zip(passes["one pass"], passes["two passes"])]
    print(f"\nThe rewrite of the fused entries after an optimizer step (all hosts), {args.rounds} interleaved rounds")
    print("| path | CPU s median | vs two passes: median of per-round ratios (min–max) |")
    print("|---|---|---|")
    print(f"| two passes (`restore`, `add_into`) | {statistics.median(passes['two passes']):.2f} | 1.00× |")
    print(f"| one pass (`SaRAAdapter.rewrite`) | {statistics.median(passes['one pass']):.2f} | "
          f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
