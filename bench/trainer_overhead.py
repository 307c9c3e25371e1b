"""Trainer overhead: difftune's trainer vs a bare PyTorch loop on the same tiny SD UNet + LoRA, one run, side by side.

    python bench/trainer_overhead.py [--steps 60] [--batch 4] [--repeats 2]

Each variant runs in its own process (so peak RSS is its own): the tiny SD pipeline, LoRA r=4 on q/k/v/out, AdamW,
batch of 32×32 images (16×16 latents), fp32, CPU. Step time is (time for W+N steps − time for W steps) / N, so
loading and set-up cancel out (the trainer's first, untimed run warms imports). ``trainer_cached`` turns on
data.cache_latents and data.cache_text_embeddings. Reported: seconds per step, peak RSS, and ratios to the bare loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 5
VARIANTS = ("bare", "trainer", "trainer_cached")


def make_data(root: Path, n: int = 16) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a cat" if i % 2 else "a photo of a dog")
    return folder


def bare(model_dir: Path, data: Path, steps: int, batch: int) -> float:
    """A plain loop: what a user would write by hand with diffusers + difftune.inject."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DiffusionPipeline
    from PIL import Image

    import difftune as dt

    torch.manual_seed(0)
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.requires_grad_(False)
    dt.inject(pipe.unet, dt.LoRAConfig(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(data.glob("*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for f in files])
    captions = [(f.with_suffix(".txt")).read_text() for f in files]
    start = 0.0
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        idx = torch.randint(0, len(files), (batch,))
        with torch.no_grad():
            latents = pipe.vae.encode(images[idx]).latent_dist.sample() * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([captions[i] for i in idx], padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            cond = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer(model_dir: Path, data: Path, steps: int, batch: int, out: Path, cached: bool = False) -> float:
    from difftune.config import load_config
    from difftune.train import TrainConfig, main

    t0 = time.perf_counter()
    cfg = load_config(TrainConfig, None, [
        f"model.path={model_dir}", "method={name: lora, rank: 4}", f"data.path={data}", "data.resolution=32",
        f"train.max_steps={steps}", f"train.batch_size={batch}", "logging.report_to=none",
        "logging.progress_bar=false", "checkpointing.checkpointing_steps=0", f"output_dir={out}",
        f"data.cache_latents={str(cached).lower()}", f"data.cache_text_embeddings={str(cached).lower()}"])
    main(cfg)
    return time.perf_counter() - t0


def run_variant(args: argparse.Namespace) -> None:
    model_dir, data = Path(args.model), Path(args.data)
    times = {}
    cached = args.variant == "trainer_cached"
    if args.variant != "bare":  # a first run warms imports and caches; it is not timed
        trainer(model_dir, data, WARMUP, args.batch, Path(tempfile.mkdtemp()), cached)
    for steps in (WARMUP, WARMUP + args.steps) if args.variant != "bare" else (WARMUP + args.steps,):
        if args.variant == "bare":
            times[steps] = bare(model_dir, data, steps, args.batch)
        else:
            times[steps] = trainer(model_dir, data, steps, args.batch, Path(tempfile.mkdtemp()), cached)
    if args.variant == "bare":
        per_step = times[WARMUP + args.steps] / args.steps
    else:
        per_step = (times[WARMUP + args.steps] - times[WARMUP]) / args.steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": args.variant, "s_per_step": per_step, "peak_rss_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return run_variant(args)

    from difftune.testing import save_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="difftune-bench-"))
    model_dir = save_tiny_pipeline("sd", root / "sd")
    data = make_data(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:  # interleaved, so machine noise hits all
            cmd = [sys.executable, __file__, "--variant", variant, "--model", str(model_dir), "--data", str(data),
                   "--steps", str(args.steps), "--batch", str(args.batch)]
            line = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.strip()
            results[variant].append(json.loads(line.splitlines()[-1]))
    best = {v: min(r["s_per_step"] for r in rs) for v, rs in results.items()}
    peak = {v: max(r["peak_rss_mb"] for r in rs) for v, rs in results.items()}
    print(f"tiny SD UNet + LoRA r=4, batch {args.batch}, 16x16 latents, {args.steps} timed steps, "
          f"best of {args.repeats}, CPU threads {os.cpu_count()}")
    print("| variant | s/step | peak RSS (MB) |")
    print("|---|---|---|")
    for v in VARIANTS:
        print(f"| {v} | {best[v]:.4f} | {peak[v]:.0f} |")
    for v in VARIANTS[1:]:
        print(f"| {v} / bare | {best[v] / best['bare']:.2f}x | {peak[v] / peak['bare']:.2f}x |")


if __name__ == "__main__":
    main()
