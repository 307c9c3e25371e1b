"""GPU readiness check: short training runs of LoRA, SaRA and KronA in mixed precision, with SDPA and xformers, and
the trainer under the DeepSpeed ZeRO-2 and FSDP accelerate configs. Prints peak memory, step time and the last loss
of each run (every loss must be finite); exits with status 1 when a run fails.

    python bench/gpu_check.py                   # CUDA: the whole matrix below (≤ 8 min on one H100)
    python bench/gpu_check.py --steps 5         # shorter (default 20 on CUDA, 3 on the CPU)
    python bench/gpu_check.py                   # no CUDA: the CPU subset (seconds), and what it skipped

On CUDA: {LoRA r=4, SaRA θ=2e-4, KronA (64, 8)} × {SD1.5, SDXL UNet architectures, random weights, built on the GPU}
(and SaRA with ``fused_training`` once: SD1.5, bf16, SDPA)
× {bf16, fp16} × {SDPA, xformers}, ``--steps`` steps each at batch 1 (SD1.5 64×64 latents, SDXL 128×128), as the
trainer trains: frozen weights in the autocast dtype, trainable values in fp32, fp16 with a gradient scaler. Then
``accelerate launch --num_processes 1`` of the trainer for 5 steps on a tiny SD pipeline with
configs/accelerate/deepspeed_zero2.yaml (LoRA) and configs/accelerate/fsdp.yaml (full fine-tuning). A run that would
start after ``--budget`` seconds is skipped and listed. Without CUDA: bf16 autocast with SDPA on tiny SD1.5- and
SDXL-shaped UNets (fp16, xformers, ZeRO-2 and FSDP need CUDA and are listed as skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
METHODS = ("lora", "sara", "krona")
ARCHS = ("sd15", "sdxl")
LATENT = {"sd15": 64, "sdxl": 128}
LAUNCHES = (("deepspeed_zero2", "lora"), ("fsdp", "full"))
NAME = "check"


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS so far)"


def build_unet(arch: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The architecture with random weights, frozen, in ``dtype`` (tiny shapes of the same family off CUDA)."""
    from diffusers import UNet2DConditionModel

    from difftune.architectures import sd15_unet_config, sdxl_unet_config
    from difftune.testing import tiny_sdxl_pipeline, tiny_unet

    torch.manual_seed(0)
    if device.type != "cuda":
        unet = tiny_unet(0) if arch == "sd15" else tiny_sdxl_pipeline().unet
    else:
        with torch.device(device):  # random init on the GPU: seconds for SDXL's 2.6B values
            unet = UNet2DConditionModel.from_config(sd15_unet_config() if arch == "sd15" else sdxl_unet_config())
    return unet.to(device, dtype).requires_grad_(False).train()


def unet_inputs(unet: nn.Module, latent: int, device: torch.device) -> tuple[tuple, dict, torch.Tensor]:
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, latent, latent, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(device)}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding and the 6 size/crop ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g).to(device),
                                       "time_ids": torch.tensor([[8.0 * latent] * 2 + [0.0] * 2 + [8.0 * latent] * 2],
                                                                device=device)}
    target = torch.randn(x.shape, generator=g).to(device)
    return (x.to(device), torch.tensor([500], device=device)), kwargs, target


def attach(unet: nn.Module, method: str, tiny: bool) -> torch.optim.Optimizer:
    """Inject ``method`` as the trainer does (trainable values in fp32) and return its optimizer."""
    import difftune as dt
    from difftune.methods.verbs import adapter_parameters

    if method in ("sara", "sara_fused"):  # the paper's one-line API: injects, trains Δ sparsely (unfused by default)
        return dt.SaRAAdamW(unet, threshold=2e-4 if not tiny else 2e-3, lr=1e-4, name=NAME,
                            fused_training=method == "sara_fused")
    config = (dt.LoRAConfig(rank=4, alpha=4.0) if method == "lora"
              else dt.KronAConfig(**({"a1": 8, "a2": 8} if tiny else {})))
    dt.inject(unet, config, name=NAME)
    params = adapter_parameters(unet, NAME)
    for p in params:
        p.data = p.data.float()  # as diffusers' cast_training_params: the frozen weights stay in the autocast dtype
    return torch.optim.AdamW(params, lr=1e-4)


def set_attention(unet: nn.Module, attention: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())


def train(unet: nn.Module, arch: str, method: str, dtype: torch.dtype, attention: str, steps: int,
          device: torch.device) -> dict:
    import difftune as dt

    tiny = device.type != "cuda"
    set_attention(unet, attention)
    args, kwargs, target = unet_inputs(unet, 16 if tiny else LATENT[arch], device)
    _peak_reset(device)
    opt = attach(unet, method, tiny)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    times, losses = [], []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype):
                pred = unet(*args, **kwargs).sample
            loss = F.mse_loss(pred.float(), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    finally:
        dt.remove(unet, NAME)  # restores the base weights exactly (sara_fused trained merged)
    finite = all(math.isfinite(v) for v in losses)
    return {"run": f"{arch} {method} {_dname(dtype)} {attention}", "trainable": trainable,
            "peak": _peak(device), "step_s": statistics.median(times[1:] or times), "loss": losses[-1],
            "ok": finite}


def _images(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a cat")
    return folder


def launch(accelerate_config: str, method: str, root: Path) -> dict:
    """``accelerate launch`` of the trainer (5 steps, tiny SD pipeline, bf16) under one accelerate config."""
    from difftune.testing import save_tiny_pipeline

    model = root / "sd" if (root / "sd").exists() else save_tiny_pipeline("sd", root / "sd")
    data = root / "images" if (root / "images").exists() else _images(root / "images")
    sets = [f"model.path={model}", f"data.path={data}", f"output_dir={root / accelerate_config}",
            f"method={{name: {method}}}", "train.max_steps=5", "train.mixed_precision=bf16",
            "logging.progress_bar=true", "validation.prompts=[]"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / f"{accelerate_config}.yaml"), "--num_processes", "1",
           "--main_process_port", str(port), __file__, "--worker", json.dumps(sets)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    wall = time.perf_counter() - t0
    found = re.findall(r"GPUCHECK (\{.*\})", proc.stdout)
    if proc.returncode or not found:
        return {"run": f"trainer {method} under {accelerate_config}", "ok": False,
                "error": (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()}
    result = json.loads(found[-1])
    return {"run": f"trainer {method} under {accelerate_config} (1 process; s/step counts loading and saving)",
            "trainable": result["trainable"],
            "peak": result["peak"], "step_s": result["seconds"] / 5, "loss": result["loss"],
            "ok": math.isfinite(result["loss"]), "wall_s": wall}


def worker(sets: list[str]) -> None:
    """Under ``accelerate launch``: one trainer run; prints its peak memory, time and last loss as JSON."""
    from difftune.config import load_config
    from difftune.train import TrainConfig, main

    cfg = load_config(TrainConfig, str(REPO / "configs" / "debug" / "tiny_sd.yaml"), sets)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _peak_reset(device)
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):  # the progress bar's postfix: the loss
        main(cfg)
    seconds = time.perf_counter() - t0
    text = out.getvalue()
    sys.stderr.write(text)
    losses = re.findall(r"loss=([-+0-9.eainf]+)", text)
    trained = re.findall(r"([\d,]+) trainable values", text)
    print("GPUCHECK " + json.dumps({"peak": _peak(device), "seconds": seconds,
                                    "loss": float(losses[-1]) if losses else float("nan"),
                                    "trainable": int(trained[-1].replace(",", "")) if trained else 0}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, help="steps per run (default 20 on CUDA, 3 on the CPU)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; runs that would start later are skipped")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one trainer run under accelerate launch
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sys.exit(0 if check(args.steps, args.budget) else 1)


def check(steps: int | None = None, budget: float = 450.0) -> bool:
    """Run the matrix this machine supports; print one row per run and what was skipped. True when all passed."""
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = steps or (20 if cuda else 3)
    if not cuda:
        torch.set_num_threads(1)  # tiny models: a second thread only waits on a shared machine
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.bfloat16]
    attentions, skipped = ["sdpa"], []
    if not cuda:
        skipped += ["fp16 (autocast fp16 needs CUDA)", "xformers (CUDA kernels)",
                    *(f"trainer under {c} (CUDA)" for c, _ in LAUNCHES), "full-size SD1.5/SDXL (tiny shapes on CPU)"]
    elif _importable("xformers.ops"):
        attentions.append("xformers")
    else:
        skipped.append("xformers (not installed)")
    rows = []
    for arch in ARCHS:
        for dtype in dtypes:
            if time.perf_counter() - start > budget:
                skipped.append(f"{arch} {_dname(dtype)} (past the {budget:.0f} s budget)")
                continue
            unet = build_unet(arch, device, dtype)
            for attention in attentions:
                # SaRA's fused training route once, beside the default (unfused) one: its step time on a GPU
                first = arch == ARCHS[0] and dtype == dtypes[0] and attention == "sdpa"
                for method in METHODS + (("sara_fused",) if first else ()):
                    try:
                        rows.append(train(unet, arch, method, dtype, attention, steps, device))
                    except Exception as e:  # noqa: BLE001  (a readiness check reports every failure, then goes on)
                        rows.append({"run": f"{arch} {method} {_dname(dtype)} {attention}", "ok": False,
                                     "error": repr(e)})
            del unet
            if cuda:
                torch.cuda.empty_cache()
    if cuda:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            for config, method in LAUNCHES:
                if config == "deepspeed_zero2" and not _importable("deepspeed"):
                    skipped.append("trainer under deepspeed_zero2 (deepspeed not installed)")
                elif time.perf_counter() - start > budget:
                    skipped.append(f"trainer under {config} (past the {budget:.0f} s budget)")
                else:
                    rows.append(launch(config, method, Path(tmp)))
    _report(rows, skipped, device, steps, time.perf_counter() - start)
    return all(r["ok"] for r in rows)


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001  (a broken install counts as missing, and is reported as such)
        return False
    return True


def _report(rows: list[dict], skipped: list[str], device: torch.device, steps: int, total: float) -> None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}; {steps} steps per run, step time = median after the first; "
          f"{total:.0f} s in all\n")
    print("| run | trainable | peak memory | s/step | last loss | ok |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | | | | | **failed**: {r['error'][-300:]!r} |")
        else:
            print(f"| {r['run']} | {r['trainable']:,} | {r['peak']} | {r['step_s']:.3f} | {r['loss']:.4f} | "
                  f"{'yes' if r['ok'] else '**non-finite loss**'} |")
    print("\nskipped: " + ("; ".join(skipped) if skipped else "nothing"))


if __name__ == "__main__":
    main()
