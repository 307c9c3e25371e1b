"""`dt.fuse` against diffusers' `fuse_lora` for the same LoRA on the same UNet: one process, interleaved rounds.

    python bench/fuse_speed.py [--rounds 7] [--rank 4] [--threads 1] [--clock cpu|wall] [--quick]

The SD1.5 UNet architecture (random weights, fp32), one LoRA of rank ``--rank`` on to_q/to_k/to_v/to_out.0 with the
same A and B in both: difftune's (``dt.inject`` + ``dt.fuse``) and peft's through diffusers (``unet.add_adapter`` +
``unet.fuse_lora``). The two copies share every base tensor except the weights a fuse writes. Each round fuses and
unfuses both, in alternating order; reported: the median seconds of each fuse and unfuse, the ratio of the medians
and the min–max of the per-round ratios; the first fuse apart (difftune copies W0 there, for an exact unfuse, and
keeps the copy after unfusing while the weight is unchanged, so later fuses copy nothing); and how far the two fused
weights and the two unfused weights are from each other and from the original (difftune's unfuse restores it
exactly; peft's subtracts ΔW again). Time is the process's CPU time by default, as in bench/inference_overhead.py
(why: its docstring).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_overhead import CLOCKS, LORA_TARGETS, build_model, shared_copy  # noqa: E402


def _lora_pair(base: torch.nn.Module, rank: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """difftune's and diffusers/peft's LoRA with equal values, each on its own copy of the targeted weights."""
    from peft import LoraConfig

    import difftune as dt

    def own(name: str) -> bool:
        return any(f"{t}.weight" in name for t in LORA_TARGETS)

    ours, theirs = shared_copy(base, own), shared_copy(base, own)
    dt.inject(ours, dt.LoRAConfig(rank=rank, alpha=float(rank), target_modules=LORA_TARGETS), name="a")
    theirs.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" not in name:
                continue
            module, _, rest = name.partition(".lora_")  # peft: <module>.lora_A.default.weight
            mine = ours_params[f"{module}.adapters.a.lora_{rest[0]}"]
            mine.copy_(torch.randn(mine.shape, generator=g) * 1e-2)
            p.copy_(mine.view(p.shape))
    return ours, theirs


def _targeted(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if any(f"{t}.weight" in n or f"{t}.base_layer.weight" in n for t in LORA_TARGETS)}


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time, or wall time")
    ap.add_argument("--quick", action="store_true", help="the tiny UNet, 2 rounds: checks the bench runs")
    args = ap.parse_args()
    import difftune as dt

    torch.set_num_threads(args.threads)
    base, _, _ = build_model("sd15", args.quick)
    ours, theirs = _lora_pair(base, args.rank)
    original = _targeted(ours)
    steps = {
        "difftune fuse": lambda: dt.fuse(ours), "difftune unfuse": lambda: dt.unfuse(ours),
        "diffusers fuse_lora": theirs.fuse_lora, "diffusers unfuse_lora": theirs.unfuse_lora,
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    rounds = 2 if args.quick else args.rounds
    clock = CLOCKS[args.clock]
    gaps, first = {}, {}
    for r in range(rounds + 1):  # round 0 is a warm-up
        order = ["difftune", "diffusers"] if r % 2 else ["diffusers", "difftune"]
        for who in order:
            for verb in ("fuse", "unfuse"):
                key = next(k for k in steps if k.startswith(who) and k.split()[1].startswith(verb))
                t0 = clock()
                steps[key]()
                (times[key] if r else first.setdefault(key, [])).append(clock() - t0)
                if r == 1 and verb == "fuse":
                    gaps[who] = _targeted(ours if who == "difftune" else theirs)
        if r == 1:
            gaps["unfused"] = (_gap(_targeted(ours), original), _gap(_targeted(theirs), original))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nSD1.5 UNet{' (tiny)' if args.quick else ''}, LoRA r={args.rank} on {'/'.join(LORA_TARGETS)}, fp32, "
          f"{torch.get_num_threads()} thread(s), {args.clock} time, {rounds} interleaved rounds after a warm-up\n")
    print(f"| step | difftune {args.clock} s (median) | diffusers {args.clock} s (median) | difftune / diffusers: "
          "ratio of medians "
          "(per-round min–max) |")
    print("|---|---|---|---|")
    for verb, theirs_key in (("fuse", "diffusers fuse_lora"), ("unfuse", "diffusers unfuse_lora")):
        mine = times[f"difftune {verb}"]
        per_round = [a / b for a, b in zip(mine, times[theirs_key])]
        print(f"| {verb} | {med[f'difftune {verb}']:.3f} | {med[theirs_key]:.3f} | "
              f"{med[f'difftune {verb}'] / med[theirs_key]:.2f}× ({min(per_round):.2f}–{max(per_round):.2f}) |")
    cold = first["difftune fuse"][0] / first["diffusers fuse_lora"][0]
    print(f"| first fuse (difftune makes its copy of W0) | {first['difftune fuse'][0]:.3f} | "
          f"{first['diffusers fuse_lora'][0]:.3f} | {cold:.2f}× (one round) |")
    fused_gap = _gap(gaps["difftune"], gaps["diffusers"])
    print(f"\nfused weights, difftune vs diffusers: max |Δ| {fused_gap:.2e}; after one unfuse, vs the original: "
          f"difftune {gaps['unfused'][0]:.2e}, diffusers {gaps['unfused'][1]:.2e}")


if __name__ == "__main__":
    main()
