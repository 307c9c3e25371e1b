"""Inference overhead of every registered adapter method, unfused, against the bare denoiser: one run, interleaved.

    python bench/inference_overhead.py                       # SD1.5 UNet and DiT-XL/2 architectures, 5 rounds
    python bench/inference_overhead.py --models sd15 --rounds 9
    python bench/inference_overhead.py --quick               # tiny models, 2 rounds: a smoke run (seconds)
    python bench/inference_overhead.py --models dit-xl2 --rows loha ia3 diff fused-lora   # some rows (+ bare)

Random weights on the published configs (time does not depend on the values), batch 1, 32×32 latents (77 text tokens
for the UNet, one class label for the DiT), fp32, no gradient. Each registered adapter method gets one row (the
settings below; a method the table does not know runs with its config's defaults), plus peft's LoRA (unmerged), 8
LoRAs at once and a fused LoRA. A method that cannot adapt a model (SC-Tuner on a DiT) is listed as skipped, with why.

Time is the process's CPU time by default (``--clock cpu``), with one thread: on a shared machine, wall time also
counts the time other processes hold the cores (per-round ratios spread from 0.1× to 8× on a loaded 2-core machine),
CPU time only what the forward itself ran. Use ``--clock wall`` on an idle machine or a GPU.

Every variant is its own copy of the model sharing the base weights (only adapter tensors are new; the fused copy owns
the weights it writes into), so all fit in memory together and are timed in interleaved rounds: each round runs one
forward of every variant, in an order rotated by one each round, so every variant sees the same machine load. Reported
per variant: the median seconds per forward, and its ratio to the bare model as the median of the per-round ratios
(the variant over the bare model of the same round) with their min–max as the spread.

Writes outputs/bench/inference_overhead/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODELS = ("sd15", "dit-xl2")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Variant:
    """One timed row: a model and how to call it (the inputs adapters see come in ``inputs``)."""

    label: str
    model: nn.Module | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    changed: float = 0.0  # max |out − bare out| in the warm-up round: an adapter that does nothing is not timed


def build_model(name: str, quick: bool) -> tuple[nn.Module, tuple, dict]:
    """The bare denoiser (random weights, eval mode) and the args/kwargs of one forward."""
    from difftune.architectures import dit_xl2_config, sd15_unet_config
    from difftune.testing import tiny_dit, tiny_unet

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "sd15":
        if quick:
            model, size, width = tiny_unet(0), 16, 32
        else:
            from diffusers import UNet2DConditionModel

            model, size, width = UNet2DConditionModel.from_config(sd15_unet_config()), 32, 768
        x = torch.randn(1, 4, size, size, generator=g)
        text = torch.randn(1, 77, width, generator=g)
        return model.eval(), (x, torch.tensor([500])), {"encoder_hidden_states": text}
    if quick:
        model = tiny_dit(0)
    else:
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel.from_config(dit_xl2_config())
    size = model.config.sample_size if quick else 32
    x = torch.randn(1, model.config.in_channels, size, size, generator=g)
    return model.eval(), (x,), {"timestep": torch.tensor([500]), "class_labels": torch.tensor([3])}


def settings(model_name: str, quick: bool, latent: int) -> dict[str, tuple[str, dict[str, Any], dict[str, Any]]]:
    """Per registered method: (row label, config fields, per-call adapter inputs). Tiny models get sizes that fit."""
    classes = list(range(5))
    kind = {"learngenes": 4 if quick else 64, "tailors_per_class": 2 if quick else 8, "classes": classes,
            "init": "random", "class_embeddings": model_name != "sd15"}
    return {
        "lora": ("LoRA r=4 (q/k/v/out)", {"rank": 4, "alpha": 4.0}, {}),
        "krona": ("KronA (64, 8)" if not quick else "KronA (2, 2)", {"a1": 2, "a2": 2} if quick else {}, {}),
        "sara": ("SaRA θ = 2e-3", {"threshold": 2e-3}, {}),
        "scedit": ("SC-Tuner", {}, {}),
        "csc": ("CSC-Tuner (control image)", {}, {"control": torch.rand(1, 3, 8 * latent, 8 * latent)}),
        "spm": ("SPM (fixed γ)", {"matching": "fixed"}, {}),
        # the UNet has no class labels of its own: the class gate gets one per call
        "kind": (f"KIND (N_G {kind['learngenes']}, t {kind['tailors_per_class']}, 5 classes)", kind,
                 {"class_labels": torch.tensor([3])} if model_name == "sd15" else {}),
    }


def shared_copy(model: nn.Module, own: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """A copy of ``model`` that shares every parameter and buffer except those whose names ``own`` accepts."""
    memo = {id(t): t for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if not own(n)}
    return copy.deepcopy(model, memo)


def adapted(base: nn.Module, configs: list[tuple[str, Any]], fuse: bool = False) -> nn.Module:
    """A shared copy of ``base`` with adapters ``[(name, config)]`` injected, small random values, optionally fused."""
    import difftune as dt
    from difftune.testing import randomize_adapter

    model = shared_copy(base, own=lambda n: fuse and any(f"{t}.weight" in n for t in LORA_TARGETS))
    for i, (name, config) in enumerate(configs):
        dt.inject(model, config, name=name, weight=1.0 / len(configs))
        randomize_adapter(model, name, seed=i, std=1e-3)  # most methods start as identity: give them values
        if config.method == "sara":
            # as an adapter is used at inference, loaded from its file: M kept as positions and the dense copy
            # kept between calls (freshly injected, SaRA reads M off the base and makes its weights per call, as
            # it trains, to keep no extra memory)
            with tempfile.TemporaryDirectory() as tmp:
                dt.save_adapter(model, Path(tmp) / name, name)
                dt.remove(model, name)
                dt.load_adapter(model, Path(tmp) / name, name=name, weight=1.0 / len(configs))
    if fuse:
        dt.fuse(model)
    return model


def peft_lora(base: nn.Module) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS), shared_copy(base))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    return model


#: The rows besides one per registered adapter method (named by its registry key), for ``--rows``.
EXTRA_ROWS = ("peft-lora", "8-loras", "fused-lora")


def row_names() -> list[str]:
    """What ``--rows`` accepts: every registered adapter method, then `EXTRA_ROWS`."""
    from difftune.methods import METHODS

    return sorted(m for m, cls in METHODS.items() if cls.is_adapter) + list(EXTRA_ROWS)


def variants(model_name: str, base: nn.Module, quick: bool, latent: int,
             only: list[str] | None = None) -> list[Variant]:
    """The bare model, then each row of ``only`` (`row_names`; all when None) in the table's order."""
    from difftune.errors import DifftuneError
    from difftune.methods import METHODS
    from difftune.methods.lora import LoRAConfig

    wanted = [r for r in row_names() if only is None or r in only]
    rows = [Variant("bare model", base)]
    known = settings(model_name, quick, latent)
    for method in (r for r in wanted if r not in EXTRA_ROWS):
        label, fields, inputs = known.get(method, (f"{method} (config defaults)", {}, {}))
        try:
            rows.append(Variant(label, adapted(base, [("a", METHODS[method](**fields))]), inputs))
        except DifftuneError as e:
            rows.append(Variant(label, skipped=str(e).split(". ")[0]))
    lora = LoRAConfig(rank=4, alpha=4.0, target_modules=LORA_TARGETS)
    extra = {"peft-lora": lambda: Variant("peft LoRA r=4 (unmerged)", peft_lora(base)),
             "8-loras": lambda: Variant("8 LoRAs r=4 at once", adapted(base, [(f"l{i}", lora) for i in range(8)])),
             "fused-lora": lambda: Variant("fused LoRA r=4", adapted(base, [("a", lora)], fuse=True))}
    rows.extend(make() for name, make in extra.items() if name in wanted)
    return rows


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def forward(row: Variant, args: tuple, kwargs: dict, clock: Callable[[], float]) -> tuple[float, torch.Tensor]:
    import difftune as dt

    context = dt.adapter_inputs(**row.inputs) if row.inputs else contextlib.nullcontext()
    with context, torch.no_grad():
        t0 = clock()
        out = row.model(*args, **kwargs)
        seconds = clock() - t0
    return seconds, out.sample if hasattr(out, "sample") else out


def measure(rows: list[Variant], args: tuple, kwargs: dict, rounds: int, clock: Callable[[], float]) -> None:
    timed = [r for r in rows if r.model is not None]
    _, reference = forward(timed[0], args, kwargs, clock)
    for row in timed[1:]:  # warm-up round, and a check that each adapter changes the output
        row.changed = float((forward(row, args, kwargs, clock)[1] - reference).abs().max())
    for r in range(rounds):
        k = r % len(timed)
        for row in timed[k:] + timed[:k]:
            row.times.append(forward(row, args, kwargs, clock)[0])
    for row in timed:
        row.ratios = [t / b for t, b in zip(row.times, timed[0].times)]


def report(model_name: str, rows: list[Variant], rounds: int, threads: int, clock: str) -> list[dict[str, Any]]:
    print(f"\n{model_name}: batch 1, fp32, no grad, {threads} thread(s), {clock} time, {rounds} interleaved rounds "
          "after a warm-up\n")
    print(f"| variant | {clock} s/forward median | vs bare: median of per-round ratios (min–max) | output changed |")
    print("|---|---|---|---|")
    out = []
    for row in rows:
        if row.model is None:
            print(f"| {row.label} | skipped: {row.skipped} | | |")
            out.append({"variant": row.label, "skipped": row.skipped})
            continue
        med = statistics.median(row.ratios)
        changed = "—" if row is rows[0] else ("yes" if row.changed > 0 else "**no**")
        print(f"| {row.label} | {statistics.median(row.times):.3f} | {med:.2f}× ({min(row.ratios):.2f}–"
              f"{max(row.ratios):.2f}) | {changed} |")
        out.append({"variant": row.label, "seconds": row.times, "ratios": row.ratios, "ratio_median": med,
                    "max_output_change": row.changed})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time, or wall time")
    ap.add_argument("--quick", action="store_true", help="tiny UNet and DiT, 2 rounds: checks the bench runs")
    ap.add_argument("--rows", nargs="+", metavar="NAME",
                    help=f"time only these rows, besides the bare model: {', '.join(row_names())} (default: all)")
    ap.add_argument("--out", default="outputs/bench/inference_overhead")
    args = ap.parse_args()
    unknown = sorted(set(args.rows or ()) - set(row_names()))
    if unknown:
        ap.error(f"unknown --rows {unknown}; known: {', '.join(row_names())}")
    run(args.models, 2 if args.quick else args.rounds, args.threads, args.quick, args.out, args.clock, args.rows)


def run(models: list[str], rounds: int, threads: int, quick: bool, out: str | None,
        clock: str = "cpu", only: list[str] | None = None) -> dict[str, list[dict]]:
    """Time every variant (or the rows ``only`` names, `row_names`) on each of ``models``; returns the rows per
    model (also written under ``out``)."""
    from difftune.fileio import atomic_write

    torch.set_num_threads(threads)
    results = {}
    for name in models:
        base, call_args, call_kwargs = build_model(name, quick)
        latent = call_args[0].shape[-1]
        rows = variants(name, base, quick, latent, only)
        measure(rows, call_args, call_kwargs, rounds, CLOCKS[clock])
        results[name] = report(name, rows, rounds, threads, clock)
        del rows, base
        gc.collect()
    if out:
        payload = json.dumps({"quick": quick, "rounds": rounds, "threads": threads, "clock": clock,
                              "rows": only or "all", "results": results}, indent=2)
        atomic_write(Path(out) / "results.json", lambda tmp: Path(tmp).write_text(payload))
    return results


if __name__ == "__main__":
    main()
