"""BK-SDM lab on sd-mini: distil the shipped model into block-removed students on its pretraining digits (0-8),
judge them against the teacher with the shipped classifier, time them, and move a LoRA trained on the teacher onto
them.

sd-mini (2 stages, one (res, attn) pair per down stage) admits BK-Base (the outer stage loses its pair, which
diffusers builds because that stage downsamples at constant width) and BK-Small (Base without the mid block);
BK-Tiny is refused: sd-mini's innermost stage holds all of its cross-attention. Each student is judged at its
initialisation (the teacher's copied blocks, no training) and after distillation (configs/bk/sd-mini.yaml: task +
output KD + feature KD, all weights 1, EMA).

    python bench/bk_lab.py                    # ~10 min on 2 CPU cores
    python bench/bk_lab.py --steps 400 --n 20

Metrics (guidance 4, 20 DDIM steps, prompts "a handwritten digit <word>"): accuracy on digits 0-8 (n samples per
digit), FD against the real training digits (the held-out floor next to it), UNet latency at the generation batch
(2n: classifier-free guidance), and with the LoRA: subject accuracy on the trigger prompt (the held-out 9).
Writes outputs/bench/bk_lab/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402

import difftune as dt  # noqa: E402
from difftune.compress.block_removal import build_student  # noqa: E402
from difftune.compress.macs import count_parameters  # noqa: E402
from difftune.config import load_config  # noqa: E402
from difftune.eval import evaluate, generate_digits  # noqa: E402
from difftune.generation import load_pipeline  # noqa: E402
from difftune.methods.bk import transfer_adapter  # noqa: E402
from difftune.train import TrainConfig, main  # noqa: E402
from difftune.zoo import path as zoo_path  # noqa: E402
from difftune.zoo.mnist import write_pretrain_captions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def judge(pipe, n: int, steps: int) -> dict:
    t0 = time.perf_counter()
    images, labels = generate_digits(pipe, list(range(9)), n, steps=steps, guidance=4.0)
    seconds = time.perf_counter() - t0
    r = evaluate(images, labels)
    return {"accuracy": r["accuracy"], "fd": r["fd"], "fd_floor": r["fd_floor"], "generate_seconds": seconds}


@torch.no_grad()
def interleaved_latency(unets: dict[str, torch.nn.Module], batch: int, rounds: int = 30) -> dict[str, dict]:
    """UNet s/call of each model, timed in interleaved rounds (teacher, base, small, teacher, ...) so that a busy
    moment of a shared machine lands on every model alike; median and min per model."""
    x, t = torch.randn(batch, 4, 8, 8), torch.full((batch,), 500)
    ctx = {n: torch.randn(batch, 77, u.config.cross_attention_dim) for n, u in unets.items()}
    times: dict[str, list[float]] = {n: [] for n in unets}
    with torch.no_grad():
        for n, u in unets.items():
            u(x, t, encoder_hidden_states=ctx[n])  # warm-up
        for _ in range(rounds):
            for n, u in unets.items():
                t0 = time.perf_counter()
                u(x, t, encoder_hidden_states=ctx[n])
                times[n].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(v), "min": min(v)} for n, v in times.items()}


def saved_students(out: Path, plans: list[str]) -> dict[str, torch.nn.Module]:
    return {f"BK-{p.capitalize()} (distilled)": load_pipeline(out / p / "pipeline").unet.eval() for p in plans}


def print_latency(lat: dict[str, dict], batch: int) -> None:
    ref = lat["teacher"]
    print(f"\nUNet latency, batch {batch}, 8x8 latents, interleaved rounds (median, min):\n")
    print("| model | ms/call median (min) | speed-up, from the median |")
    print("|---|---|---|")
    for n, v in lat.items():
        print(f"| {n} | {v['median'] * 1e3:.1f} ({v['min'] * 1e3:.1f}) | {ref['median'] / v['median']:.2f}× |")


def main_lab() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plans", nargs="+", default=["base", "small"])
    ap.add_argument("--steps", type=int, default=200, help="distillation steps per student")
    ap.add_argument("--lora-steps", type=int, default=300, help="0: no LoRA transfer")
    ap.add_argument("--skip-teacher", action="store_true", help="do not judge the teacher (e.g. a second process)")
    ap.add_argument("--n", type=int, default=10, help="samples per digit")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--out", default="outputs/bench/bk_lab")
    ap.add_argument("--latency-only", action="store_true",
                    help="only time the teacher and the students an earlier run saved under --out, interleaved")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.latency_only:
        unets = {"teacher": load_pipeline(zoo_path("sd-mini")).unet.eval(), **saved_students(out, args.plans)}
        lat = interleaved_latency(unets, 2 * args.n)
        print_latency(lat, 2 * args.n)
        (out / "latency.json").write_text(json.dumps(lat, indent=2))
        return
    data = out / "data" / "pretrain-captions"
    if not data.exists():
        write_pretrain_captions(data)
    teacher_pipe = load_pipeline(zoo_path("sd-mini"))
    teacher = teacher_pipe.unet
    rows = [{"model": "sd-mini (teacher)", "plan": None, "steps": 0, "parameters": count_parameters(teacher),
             **({"accuracy": float("nan"), "fd": float("nan"), "fd_floor": float("nan")} if args.skip_teacher else
                judge(teacher_pipe, args.n, args.sample_steps))}]
    print(rows[-1], flush=True)
    subject, lora = {}, None
    if args.lora_steps:  # a LoRA trained on the teacher (the quickstart's: the held-out 9 as a subject)
        lora = lab.train({"name": "lora", "rank": 8, "alpha": 8.0,
                          "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
                         lab.subject_data(out / "data"), out / "lora", args.lora_steps, 2e-3)
        subject["sd-mini (teacher)"] = lab.judge_subject(lab.load(lora["adapter"]), n=20, steps=args.sample_steps)
        print("teacher + LoRA", subject, flush=True)
    transfers = {}
    for plan in args.plans:
        student = build_student(teacher, plan).eval()
        pipe = load_pipeline(zoo_path("sd-mini"))
        pipe.register_modules(unet=student)
        label = f"BK-{plan.capitalize()}"
        rows.append({"model": f"{label} at init (copied blocks)", "plan": plan, "steps": 0,
                     "parameters": count_parameters(student),
                     **judge(pipe, args.n, args.sample_steps)})
        print(rows[-1], flush=True)
        cfg = load_config(TrainConfig, REPO / "configs" / "bk" / "sd-mini.yaml", [
            f"model.path={zoo_path('sd-mini')}", f"data.path={data}", f"output_dir={out / plan}",
            f"method.plan={plan}", f"train.max_steps={args.steps}", "validation.prompts=[]",
            "logging.progress_bar=false"])
        t0 = time.perf_counter()
        result = main(cfg)
        seconds = time.perf_counter() - t0
        pipe = load_pipeline(result)
        rows.append({"model": f"{label} distilled", "plan": plan, "steps": args.steps, "train_seconds": seconds,
                     "parameters": count_parameters(pipe.unet),
                     **judge(pipe, args.n, args.sample_steps)})
        print(rows[-1], flush=True)
        if lora is None:
            continue
        transfers[label] = transfer_adapter(lora["adapter"], pipe.unet, teacher.config, plan, name="lab")
        dt.fuse(pipe)
        subject[f"{label} distilled"] = lab.judge_subject(pipe, n=20, steps=args.sample_steps)
        print(label, "+ LoRA", subject[f"{label} distilled"], len(transfers[label]["modules_kept"]), "kept",
              transfers[label]["modules_dropped"], flush=True)
    lat = interleaved_latency({"teacher": teacher.eval(), **saved_students(out, args.plans)}, 2 * args.n)
    for r in rows:  # a student's latency does not depend on its weights: the interleaved figure of its plan
        key = "teacher" if r["plan"] is None else f"BK-{r['plan'].capitalize()} (distilled)"
        r["latency"] = lat[key]["median"]
    t = rows[0]
    print(f"\nsd-mini distillation, {args.steps} steps x batch 64 per student; {args.n} samples per digit 0-8, "
          f"guidance 4, {args.sample_steps} DDIM steps; UNet latency at batch {2 * args.n}, 8x8 latents, median of 30 "
          "interleaved rounds\n")
    print("| model | UNet params | params ratio | accuracy 0-8 | FD (floor) | UNet s/call | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['parameters'] / t['parameters']:.3f} | "
              f"{r['accuracy']:.0%} | {r['fd']:.0f} ({r['fd_floor']:.0f}) | {r['latency'] * 1e3:.1f} ms | "
              f"{t['latency'] / r['latency']:.2f}× |")
    print("\n| LoRA trained on the teacher, loaded on | LoRA modules kept / dropped | subject acc. (9s) | "
          "retention 0-8 | FD of the 9s |")
    print("|---|---|---|---|---|")
    for name, s in subject.items():
        key = name.split(" distilled")[0]
        kd = (f"{len(transfers[key]['modules_kept'])} / {len(transfers[key]['modules_dropped'])}"
              if key in transfers else "all")
        print(f"| {name} | {kd} | {s['subject_accuracy']:.0%} | {s['retention']:.0%} | {s['fd']:.0f} |")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "subject": subject,
                                                  "transfers": transfers}, indent=2, default=str))


if __name__ == "__main__":
    main_lab()
