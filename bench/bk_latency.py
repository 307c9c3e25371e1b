"""BK-SDM latency: one UNet step of the teacher and of each block-removed student, side by side, with the ratios.

Random weights on the published configs (latency does not depend on the values), batch 1 (as the paper generates),
77 text tokens, no gradient. All models are built first and timed in interleaved rounds, so that each sees the
same machine load. Per-stage times (hooks on the top-level blocks) show where the time goes, which is what explains
the gap between the MAC ratio and the latency ratio.

    python bench/bk_latency.py                          # SD1.5 at 512 px on the CPU
    python bench/bk_latency.py --device cuda --dtype float16 --repeats 20

Writes outputs/bench/bk_latency/results.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from difftune.architectures import ARCHITECTURES, build_architecture
from difftune.compress.block_removal import build_student
from difftune.compress.macs import count_parameters, unet_macs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_times(unet: torch.nn.Module, device: torch.device) -> tuple[dict[str, float], list]:
    """Wall time spent in each top-level block (accumulated over the timed calls)."""
    spent: dict[str, float] = {}
    start: dict[str, float] = {}
    handles = []
    stages = [(f"down{i}", b) for i, b in enumerate(unet.down_blocks)] + [(f"up{j}", b) for j, b in
                                                                           enumerate(unet.up_blocks)]
    if unet.mid_block is not None:
        stages.append(("mid", unet.mid_block))
    for name, block in stages:
        def pre(m, a, name=name):
            _sync(device)
            start[name] = time.perf_counter()

        def post(m, a, o, name=name):
            _sync(device)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start[name]

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return spent, handles


def time_unet(unet: torch.nn.Module, resolution: int, device: torch.device, dtype: torch.dtype, warmup: int,
              repeats: int) -> dict:
    cfg = unet.config
    size = resolution // 8
    x = torch.randn(1, cfg.in_channels, size, size, device=device, dtype=dtype)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        for _ in range(warmup):
            unet(x, t, encoder_hidden_states=ctx)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            _sync(device)
            times.append(time.perf_counter() - t0)
        spent, handles = stage_times(unet, device)
        for _ in range(max(1, repeats // 2)):
            unet(x, t, encoder_hidden_states=ctx)
        for h in handles:
            h.remove()
    total = sum(spent.values())
    # median and min: on a shared machine the fastest call is the least disturbed one
    return {"seconds": sorted(times)[len(times) // 2], "min_seconds": min(times), "all_seconds": times,
            "stage_share": {k: v / total for k, v in spent.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--architecture", default="sd15", choices=[a for a in ARCHITECTURES if a.startswith("sd")])
    ap.add_argument("--plans", nargs="+", default=["base", "small", "tiny"])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench/bk_latency")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    meta_teacher = build_architecture(args.architecture)
    models, rows = {}, []
    for plan in [None, *args.plans]:
        meta = meta_teacher if plan is None else build_student(meta_teacher, plan)
        torch.manual_seed(0)
        models[plan or "teacher"] = type(meta).from_config(meta.config).to(device, dtype).eval()  # random weights
        rows.append({"model": plan or "teacher", "parameters": count_parameters(meta),
                     "macs": unet_macs(meta, args.resolution), "all_seconds": []})
    # interleaved rounds: on a shared machine every model sees the same load (timing them one after the other let
    # a busy minute land on one model only)
    size = args.resolution // 8
    with torch.no_grad():
        for r in range(args.warmup + args.repeats):
            for row in rows:
                unet = models[row["model"]]
                x = torch.randn(1, unet.config.in_channels, size, size, device=device, dtype=dtype)
                ctx = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
                _sync(device)
                t0 = time.perf_counter()
                unet(x, torch.tensor([500], device=device), encoder_hidden_states=ctx)
                _sync(device)
                if r >= args.warmup:
                    row["all_seconds"].append(time.perf_counter() - t0)
    for row in rows:
        times = row["all_seconds"]
        row.update(seconds=sorted(times)[len(times) // 2], min_seconds=min(times),
                   stage_share=time_unet(models[row["model"]], args.resolution, device, dtype, 0, 1)["stage_share"])
        print(f"{row['model']}: {row['seconds']:.3f} s/step  {json.dumps(times)}", flush=True)
    del models
    gc.collect()
    t0 = rows[0]
    print(f"\n{args.architecture} UNet, batch 1, {args.resolution} px, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} after {args.warmup} warm-up\n")
    print("| model | parameters | params ratio | GMACs | MACs ratio | s/step median (min) | latency ratio median "
          "(min) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['parameters'] / t0['parameters']:.3f} | "
              f"{r['macs'] / 1e9:.1f} | {r['macs'] / t0['macs']:.3f} | {r['seconds']:.2f} ({r['min_seconds']:.2f}) | "
              f"{r['seconds'] / t0['seconds']:.3f} ({r['min_seconds'] / t0['min_seconds']:.3f}) |")
    print(f"\nshare of block time per stage (down0 at {args.resolution // 8}×{args.resolution // 8} latents):")
    for r in rows:
        print(f"  {r['model']}: " + ", ".join(f"{k} {v:.0%}" for k, v in r["stage_share"].items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
