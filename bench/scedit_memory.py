"""SCEdit's SC-Tuner vs peft LoRA r=64 vs full fine-tuning: training memory and speed on the SD1.5 UNet, one run.

    python bench/scedit_memory.py [--latent 32] [--batches 1 4] [--steps 2] [--device cpu] [--variants ...]

The SWIFT comparison (methods.md §3(c)): SC-Tuner on all 12 skips (19,680,000 parameters) against LoRA r=64 on
q/k/v/out and the feed-forward projections (ff.net.0.proj, ff.net.2: 23,937,024), and full fine-tuning. The SD1.5
UNet architecture with random weights (memory and time do not depend on the values), ``--latent``² latents, 77×768
text states, an MSE step with AdamW. Every (variant, batch) runs in its own process, with
``MALLOC_MMAP_THRESHOLD_=131072`` so glibc returns freed tensors and the peak RSS counts live memory (as
``torch.cuda.max_memory_allocated`` does on a GPU).

Reported per batch: peak memory (CPU: the process's peak RSS; CUDA: max allocated), the training overhead (peak
minus the memory right after the model was built), and seconds per step (mean of ``--steps`` after one warm-up),
with ratios to LoRA, the comparison the paper makes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("full", "lora", "scedit")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run(variant: str, latent: int, batch: int, steps: int, device: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    import difftune as dt
    from difftune.architectures import sd15_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sd15_unet_config()).to(device)
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
    elif variant == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=64, lora_alpha=64, target_modules=LORA_TARGETS), unet)
        params = [p for p in unet.parameters() if p.requires_grad]
    elif variant == "scedit":
        dt.inject(unet, dt.SCEditConfig(), name="sc")  # freezes the UNet
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    opt = torch.optim.AdamW(params, lr=1e-5)
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
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step allocates the optimizer state and warms up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss()
    return {"variant": variant, "trainable": sum(p.numel() for p in params), "total": total, "peak": peak,
            "overhead": peak - base_mem, "step_s": sum(times) / len(times), "batch": batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one (variant, batch) in this process
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.latent, args.batch, args.steps, args.device)))
        return
    rows = []
    for batch in args.batches:
        for v in args.variants:
            cmd = [sys.executable, __file__, "--variant", v, "--batch", str(batch), "--latent", str(args.latent),
                   "--steps", str(args.steps), "--device", args.device]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"variant {v} (batch {batch}) failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done {v} batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
    gib = 1024**3
    print(f"SD1.5 UNet ({rows[0]['total']:,} params), {args.latent}x{args.latent} latents, {args.device}; "
          f"mean of {args.steps} steps after one warm-up; ratios to LoRA r=64 at the same batch")
    print("| batch | variant | trainable | peak memory | vs lora | training overhead (peak − model) | vs lora | "
          "s/step | vs lora |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((q for q in rows if q["variant"] == "lora" and q["batch"] == r["batch"]), r)
        print(f"| {r['batch']} | {r['variant']} | {r['trainable']:,} | {r['peak'] / gib:.2f} GiB | "
              f"{r['peak'] / ref['peak']:.2f}× | {r['overhead'] / gib:.2f} GiB | "
              f"{r['overhead'] / ref['overhead']:.2f}× | {r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f}× |")


if __name__ == "__main__":
    main()
