"""VQ4DiT lab on the shipped dit-mini (class-conditional DiT on real MNIST 0–9), judged by the shipped classifier.

Settings, each quantizing every Linear of the 6 transformer blocks (7 per block; embedders and the final layer FP):
FP, RTN 2/3-bit (per-channel round-to-nearest), k-means only 2/3-bit (k-means codebook, nearest codeword),
VQ4DiT 2/3-bit (candidates + zero-data calibration, ``VQ4DiTConfig()``: the official code's choices with codebooks
and biases calibrated jointly at lr 1e-3), with ``--official`` VQ4DiT 2/3-bit with the official code's schedule
exactly, and with ``--paper`` VQ4DiT 2-bit with the paper's choices. Every quantized model is written with
`save_compressed` and read back with `load_compressed_pipeline` before sampling, so the scores are those of the files.

Scores (``difftune.eval.evaluate``): accuracy (samples classified as the class asked for), FD in the classifier's
feature space against the real training digits (fd_floor: as many held-out real digits). Sizes: the compressed
file, and the blocks' quantized Linears counted like the paper (`size_report`). Wall time: k-means + calibration.

Memory (``--memory``): peak RSS of k-means on a DiT-XL/2 adaLN-size layer (6912 × 1152, 2M sub-vectors at d=4).

    python bench/vq_lab.py                 # writes outputs/bench/vq_lab/results.json and prints the table
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from difftune.compress import load_compressed_pipeline, quantize_rtn_, replaced_modules, save_compressed, tensor_bytes
from difftune.compress.vq4dit import BLOCK_EXCLUDE, BLOCK_TARGETS, VQ4DiTConfig, quantize_kmeans_, size_report
from difftune.compress.vq4dit_calib import quantize_vq4dit
from difftune.eval import evaluate, generate_digits
from difftune.zoo import path as zoo_path

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def judge(pipe: Any, n: int, steps: int, guidance: float) -> dict[str, Any]:
    images, labels = generate_digits(pipe, list(range(10)), n, steps=steps, guidance=guidance)
    m = evaluate(images, labels)
    return {"accuracy": m["accuracy"], "fd": m["fd"], "fd_floor": m["fd_floor"]}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from diffusers import DiTPipeline

    base = zoo_path("dit-mini")
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    fp_pipe = DiTPipeline.from_pretrained(str(base))
    fp_pipe.set_progress_bar_config(disable=True)
    fp_file = (base / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    fp_blocks = size_report(fp_pipe.transformer, 256, 4)["fp32_bytes"]
    rows.append({"setting": "FP32", "file_bytes": fp_file, "blocks_bytes": fp_blocks, "seconds": 0.0,
                 **judge(fp_pipe, args.n, args.steps, args.guidance)})
    print(rows[-1], flush=True)
    settings: list[tuple[str, str, dict[str, Any]]] = []
    for bits in (2, 3):
        settings.append((f"RTN {bits}-bit", "rtn", {"bits": bits}))
    for preset in ("2bit", "3bit"):
        settings.append((f"k-means only {preset[0]}-bit", "kmeans", {"preset": preset}))
        settings.append((f"VQ4DiT {preset[0]}-bit", "vq4dit", {"preset": preset}))
    if args.official:
        for preset in ("2bit", "3bit"):
            settings.append((f"VQ4DiT {preset[0]}-bit (official code schedule)", "official", {"preset": preset}))
    if args.paper:
        settings.append(("VQ4DiT 2-bit (paper variant)", "paper", {"preset": "2bit"}))
    for label, kind, opts in settings:
        if args.only and not any(s in label for s in args.only):
            continue
        pipe = DiTPipeline.from_pretrained(str(base))
        start = time.perf_counter()
        calib: dict[str, Any] = {}
        if kind == "rtn":
            model = pipe.transformer
            quantize_rtn_(model, opts["bits"], list(BLOCK_TARGETS), list(BLOCK_EXCLUDE))
        else:
            common = {"iterations": args.iterations, "steps": args.calib_steps, "batch": args.batch,
                      "class_labels": list(range(10)), "guidance": args.guidance, "seed": 0,
                      "kmeans_iters": args.kmeans_iters}
            if args.lr_codebook is not None:
                common |= {"lr_codebook": args.lr_codebook, "lr_bias": args.lr_codebook}
            make = {"paper": VQ4DiTConfig.paper, "official": VQ4DiTConfig.official}.get(kind, VQ4DiTConfig)
            cfg = make(**opts, **common)
            if kind == "kmeans":
                model = pipe.transformer
                quantize_kmeans_(model, cfg)
            else:
                model, calib = quantize_vq4dit(pipe, cfg, log=lambda s: print("  " + s, flush=True))
        seconds = time.perf_counter() - start
        folder = save_compressed(model, out / label.replace(" ", "_").replace("(", "").replace(")", ""))
        loaded = load_compressed_pipeline(base, folder)
        loaded.set_progress_bar_config(disable=True)
        blocks = sum(tensor_bytes(m) for m in replaced_modules(model).values())  # as stored
        row = {"setting": label, "file_bytes": (folder / "model.safetensors").stat().st_size, "blocks_bytes": blocks,
               "seconds": seconds, "kmeans_seconds": calib.get("kmeans_seconds"),
               "calibration_seconds": calib.get("calibration_seconds"),
               "final_block_mse": calib["history"][-1]["block_mse"] if calib.get("history") else None,
               **judge(loaded, args.n, args.steps, args.guidance)}
        rows.append(row)
        print(row, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | accuracy | FD | blocks' linears as stored | file | quantize wall time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = "—" if not r["seconds"] else f"{r['seconds']:.1f} s"
        if r.get("calibration_seconds"):
            t += f" (k-means {r['kmeans_seconds']:.1f} s + calibration {r['calibration_seconds']:.1f} s)"
        lines.append(f"| {r['setting']} | {r['accuracy']:.1%} | {r['fd']:.1f} | {r['blocks_bytes'] / MiB:.3f} MiB | "
                     f"{r['file_bytes'] / 1e6:.2f} MB | {t} |")
    return "\n".join(lines)


def memory(chunk: int) -> None:
    """Peak RSS of k-means on a DiT-XL/2 adaLN-size weight (random), a few Lloyd iterations."""
    from difftune.compress.kmeans import kmeans

    w = torch.randn(6912, 1152)
    x = w.reshape(-1, 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    kmeans(x, 256, iters=3, chunk=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"k-means k=256 d=4 on 6912x1152 ({x.shape[0]:,} sub-vectors), chunk {chunk}, 3 Lloyd iterations: "
          f"{time.perf_counter() - start:.1f} s; peak RSS {peak / MiB:.0f} MiB, {(peak - before) / MiB:.0f} MiB above "
          f"the weight (distance temporaries 2 x {chunk * 256 * 4 / MiB:.0f} MiB; unchunked "
          f"(N, k, d) would be {x.shape[0] * 256 * 4 * 4 / 2**30:.1f} GiB)")


def speed(out: Path, repeats: int = 3) -> None:
    """Sampling time of FP vs the saved VQ4DiT 2-bit model decoded once vs decoded on every call (min of repeats)."""
    from diffusers import DiTPipeline

    from difftune.compress import set_decode_mode

    base = zoo_path("dit-mini")
    pipes = {"FP32": DiTPipeline.from_pretrained(str(base))}
    for mode in ("decode once", "on the fly"):
        pipes[mode] = load_compressed_pipeline(base, out / "VQ4DiT_2-bit")
        set_decode_mode(pipes[mode].transformer, mode == "decode once")
    best = dict.fromkeys(pipes, float("inf"))
    for _ in range(repeats):
        for name, pipe in pipes.items():
            pipe.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            with torch.no_grad():
                pipe(class_labels=list(range(10)), num_inference_steps=25, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(0), output_type="np")
            best[name] = min(best[name], time.perf_counter() - start)
    for name, pipe in pipes.items():
        held = sum(m._cache[1].numel() * 4 for m in pipe.transformer.modules() if getattr(m, "_cache", None))
        print(f"{name}: {best[name]:.2f} s for 10 images x 25 steps (CFG); decoded weights held {held / MiB:.2f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10, help="samples per digit")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps when sampling for the scores")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--iterations", type=int, default=30, help="VQ4DiT calibration trajectories")
    p.add_argument("--calib-steps", type=int, default=25, help="timesteps per calibration trajectory")
    p.add_argument("--batch", type=int, default=4, help="classes per calibration trajectory")
    p.add_argument("--kmeans-iters", type=int, default=20, help="Lloyd iterations (paper 100; fewer on 2 CPUs)")
    p.add_argument("--lr-codebook", type=float, default=None,
                   help="codebook and bias learning rate for every VQ4DiT row (default: each config's own)")
    p.add_argument("--official", action="store_true", help="also VQ4DiT 2/3-bit with the official code's schedule")
    p.add_argument("--paper", action="store_true", help="also VQ4DiT 2-bit with the paper's choices")
    p.add_argument("--only", nargs="*", help="run only settings whose label contains one of these")
    p.add_argument("--memory", action="store_true", help="only the k-means peak-memory measurement")
    p.add_argument("--speed", action="store_true", help="only sampling speed: FP vs decode-once vs on-the-fly "
                                                        "(needs the VQ4DiT 2-bit model a full run wrote)")
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "vq_lab"))
    args = p.parse_args()
    if args.memory:
        memory(args.chunk)
        return
    if args.speed:
        speed(Path(args.out))
        return
    rows = run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
