"""SaRA memory and speed vs full fine-tuning, masked dense selective fine-tuning and LoRA: one run, side by side.

    python bench/sara_memory.py [--latent 16] [--batch 1] [--fraction 0.05] [--steps 3] [--device cpu]

The SD1.5 UNet architecture (859.5M parameters) with random weights, batch ``--batch``, ``--latent``² latents,
77×768 text states, an MSE step with AdamW. Random weights are not distributed like trained ones, so θ is the |W|
quantile that selects ``--fraction`` of all parameters. Variants, each in its own process so the peak is its own:

* ``full``: every parameter trains (torch AdamW).
* ``masked``: the same selection as SaRA trained the obvious way: dense gradients and AdamW state for every
  parameter, gradients outside the mask zeroed (the official code's non-UB path).
* ``lora``: peft LoRA on q/k/v/out with the rank that gives about the same trainable count as SaRA.
* ``sara``: `difftune.SaRAAdamW(unet, threshold=θ)`, defaults (nuclear-norm term on, λ = 5e-3: one SVD per step).
* ``sara_no_rank``: the same with λ = 0, to show what the SVD costs.
* ``sara_fused``: the defaults with ``fused_training=True`` (Δ written into the weights; W0[M] and the positions kept).

Each process runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc hands freed tensors back to the system: without
it, the peak RSS also counts freed memory the allocator kept (it inflated SaRA's set-up by ~0.7 GiB in one trial);
``torch.cuda.max_memory_allocated`` counts live tensors only, and this makes the CPU figure comparable.

Reported: peak memory (CPU: the process's peak RSS; CUDA: ``torch.cuda.max_memory_allocated``), the same minus the
memory held right after the model was built (the training overhead), and seconds per step (mean of ``--steps``
after one warm-up step), with ratios to full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("full", "masked", "lora", "sara", "sara_no_rank", "sara_fused")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run(variant: str, latent: int, fraction: float, steps: int, device: str, batch: int = 1) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from difftune.methods.sara import SaRAAdamW, threshold_for_fraction
    from difftune.testing import sd15_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sd15_unet_config()).to(device)
    theta = threshold_for_fraction(unet, fraction)
    total = sum(p.numel() for p in unet.parameters())
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = _current_rss()

    if variant == "full":
        params = list(unet.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5)
        masks = None
    elif variant == "masked":
        params = list(unet.parameters())
        masks = [p.detach().abs() < theta for p in params]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)  # no decay: unselected entries must not move
    elif variant == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        per_rank = sum(m.in_features + m.out_features for n, m in unet.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
        rank = max(1, round(fraction * total / per_rank))
        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        masks = None
    elif variant in ("sara", "sara_no_rank", "sara_fused"):
        opt = SaRAAdamW(unet, threshold=theta, **({"rank_weight": 0.0} if variant == "sara_no_rank" else {}),
                        fused_training=variant == "sara_fused")
        params = [p for g in opt.param_groups for p in g["params"]]
        masks = None
    else:
        raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    trainable = sum(int(m.sum()) for m in masks) if masks is not None else sum(p.numel() for p in params)

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    cond = torch.randn(batch, 77, 768, generator=g).to(device)
    target = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.full((batch,), 500, device=device)
    times = []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=cond).sample, target)
        loss.backward()
        if masks is not None:
            for p, m in zip(params, masks):
                p.grad.mul_(m)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step allocates the optimizer state and warms up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss()
    return {"variant": variant, "theta": theta, "trainable": trainable, "total": total, "peak": peak,
            "overhead": peak - base_mem, "step_s": sum(times) / len(times), "device": device, "latent": latent,
            "batch": batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.latent, args.fraction, args.steps, args.device, args.batch)))
        return
    rows = []
    for v in args.variants:
        cmd = [sys.executable, __file__, "--variant", v, "--latent", str(args.latent), "--batch", str(args.batch),
               "--fraction", str(args.fraction), "--steps", str(args.steps), "--device", args.device]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"variant {v} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {v}: {rows[-1]}", file=sys.stderr, flush=True)
    full = next((r for r in rows if r["variant"] == "full"), rows[0])  # the reference row (first when no full)
    gib = 1024**3
    print(f"SD1.5 UNet ({full['total']:,} params), batch {args.batch}, {args.latent}x{args.latent} latents, "
          f"{args.device}; reference row: {full['variant']}; "
          f"θ = {full['theta']:.3e} selects {args.fraction:.0%}; mean of {args.steps} steps after one warm-up")
    ref = "vs " + full["variant"]
    print(f"| variant | trainable | peak memory | {ref} | training overhead (peak − model) | {ref} | s/step | {ref} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['peak'] / gib:.2f} GiB | {r['peak'] / full['peak']:.2f}× | "
              f"{r['overhead'] / gib:.2f} GiB | {r['overhead'] / full['overhead']:.2f}× | {r['step_s']:.2f} | "
              f"{r['step_s'] / full['step_s']:.2f}× |")


if __name__ == "__main__":
    main()
