"""Interop on the SD1.5 UNet architecture, the loaders' own code: what issue 16 found broken, measured again.

    python bench/interop_sd15.py [--rank 8] [--out outputs/bench/interop_sd15]

A difftune LoRA (rank ``--rank``, α = r/2, random factors) on the attention projections, proj_in/out, FF and the
ResNet convs of a random-weight SD1.5 UNet is saved, exported with ``difftune export`` to kohya and to diffusers
format, and loaded back by the loaders people use:

* diffusers: ``UNet2DConditionModel.load_lora_adapter`` (what ``pipe.load_lora_weights`` calls for the UNet) on the
  diffusers file *and* on the kohya file (diffusers converts kohya keys itself); modules patched and the UNet output
  against difftune's own adapter at weight 1 (same input, 32×32 latents);
* lycoris-lora: ``create_lycoris_from_weights`` on the kohya and the full-ΔW (``diff``) files: modules created and
  the max |ΔW_lycoris − ΔW_ours|;
* difftune's importer: ``load_adapter`` of the kohya file: modules and output.

Figures are what this run measured; nothing is assumed. ComfyUI and A1111 are not installable here and not run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import UNet2DConditionModel  # noqa: E402

import difftune as dt  # noqa: E402
from difftune.architectures import sd15_unet_config  # noqa: E402
from difftune.interop.export import export_adapter  # noqa: E402
from difftune.methods.verbs import hosts  # noqa: E402
from difftune.testing import randomize_adapter  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g))


@torch.no_grad()
def _out(unet) -> torch.Tensor:
    x, t, c = _inputs()
    return unet(x, t, encoder_hidden_states=c).sample


def _peft_modules(unet) -> int:
    return sum(1 for m in unet.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("outputs/bench/interop_sd15"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(sd15_unet_config()).eval()  # random weights, real shapes
    ours = copy.deepcopy(base)
    dt.inject(ours, dt.LoRAConfig(rank=args.rank, alpha=args.rank / 2, target_modules=TARGETS), name="style")
    randomize_adapter(ours, "style", seed=1, std=0.05)
    n_ours = sum(1 for _, h in hosts(ours) if "style" in h.adapters)
    folder = dt.save_adapter(ours, args.out / "style", name="style", base_model="sd15-random")
    reference, plain = _out(ours), _out(base)
    scale = float((reference - plain).abs().max())
    rows, log = [], {"rank": args.rank, "difftune_modules": n_ours, "adapter_effect_max_abs": scale}

    def row(loader: str, file: str, modules: int, err: float, what: str) -> None:
        rows.append({"loader": loader, "file": file, "modules": modules, "error": err, "what": what})
        print(json.dumps(rows[-1]), flush=True)

    reports = {}
    for fmt in ("kohya", "diffusers", "diff"):
        t0 = time.perf_counter()
        reports[fmt] = export_adapter(folder, args.out / f"style-{fmt}.safetensors", fmt)
        log[f"export_{fmt}"] = {"modules": reports[fmt].modules, "max_error": reports[fmt].max_error,
                                "seconds": round(time.perf_counter() - t0, 1)}
    # lycoris-lora's loader
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    LycorisNetwork.LORA_PREFIX = "lora_unet"  # its default names modules "lycoris_<path>"
    deltas = {n: h.adapters["style"].delta_params(h.base_params()) for n, h in hosts(ours) if "style" in h.adapters}
    for fmt in ("kohya", "diff"):
        network, _ = create_lycoris_from_weights(1.0, str(reports[fmt].path), base)
        modules = {m.lora_name: m for m in network.loras}
        worst = 0.0
        with torch.no_grad():
            for name, d in deltas.items():
                w, b = modules[f"lora_unet_{name.replace('.', '_')}"].get_diff_weight()
                worst = max(worst, float((w.reshape(d["weight"].shape) - d["weight"]).abs().max()))
        row("lycoris-lora create_lycoris_from_weights", fmt, len(modules), worst, "max abs(ΔW_lycoris − ΔW_ours)")
        del network, modules
        gc.collect()
    # diffusers' own loader, the two calls pipe.load_lora_weights makes for the UNet, on both files
    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(base)  # one copy for every foreign loader (SD1.5 in fp32 is 3.4 GB)
    for fmt in ("diffusers", "kohya"):
        sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(reports[fmt].path), return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(sd, network_alphas=alphas, unet=unet, adapter_name="style",
                                                    metadata=meta)
        out = _out(unet)
        log[f"diffusers_{fmt}_effect"] = float((out - plain).abs().max())  # the LoRA did change the output
        row("diffusers load_lora_weights (UNet part)", fmt, _peft_modules(unet),
            float((out - reference).abs().max()), "max abs(UNet output − difftune's)")
        unet.delete_adapters("style")
    del unet
    gc.collect()
    # difftune's importer on the kohya file
    unet = base
    dt.load_adapter(unet, reports["kohya"].path, name="imported")
    n = sum(1 for _, h in hosts(unet) if "imported" in h.adapters)
    row("difftune load_adapter", "kohya", n, float((_out(unet) - reference).abs().max()),
        "max abs(UNet output − difftune's)")
    log["rows"] = rows
    (args.out / "results.json").write_text(json.dumps(log, indent=2))
    print(f"difftune LoRA: {n_ours} modules, rank {args.rank}; its effect on the UNet output: max {scale:.3e} "
          f"(with diffusers' loader: {log['diffusers_diffusers_effect']:.3e} / {log['diffusers_kohya_effect']:.3e})")
    print("exports: " + ", ".join(f"{k} {v['modules']} modules (max ΔW error {v['max_error']:.1e})"
                                   for k, v in ((f, log[f"export_{f}"]) for f in ("kohya", "diffusers", "diff"))))
    print("| loader | file | modules loaded | error | of |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['file']} | {r['modules']} / {n_ours} | {r['error']:.1e} | {r['what']} |")


if __name__ == "__main__":
    main()
