"""KIND (reconstructed) lab: pretrain a dit-mini-size DiT with KIND structure on digits 0–4, then learn 5–9.

    nice -n 10 python bench/kind_lab.py [--pretrain-steps 600] [--transfer-steps 300] [--n 20] [--batch 64]

Data: the shipped MNIST split (400 training digits per class), encoded once with dit-mini's trained VAE. A direct
ε-prediction loop (AdamW, constant lr, batch ``--batch``, label dropout 0.1 to the null class 1000) stands in for
the trainer to stay within a CPU budget of minutes. Two models are pretrained on 0–4 for the same steps from the
same random dense DiT: one with KIND layers on S = {q, k, v, o, MLP in, MLP out} (N_G = 124 learngenes + 4 tailors
per class, SVD-initialised from the random dense weights; embedders/adaLN/final layer train too), one dense.
Then 5–9 are learned by:

(a) KIND: fresh tailor groups (4 per class, with each class's own class-embedding row) on frozen learngenes, old
    tailors reused and frozen (`KINDPlugin`, loading the saved pretrained adapter through ``source``); (b) LoRA (rank
    20, about the same trainable count) on the dense pretrained DiT, plus the new classes' rows of its class-embedding
    tables (without them a new class keeps its never-trained random row: ``--no-lora-rows`` shows that); (c) full
    fine-tuning of the dense pretrained DiT; (d) a dense DiT from scratch. Then (a) is recombined: learngenes + the
    5–9 tailors only, its parameters and factored MACs, and a check that its images for 5–9 equal (a)'s.

Judge: the shipped digit classifier (`difftune.eval.evaluate`): accuracy and FD of ``--n`` samples per new digit,
retention = accuracy on 0–4 after transfer. Everything is seeded; figures on a shared, loaded CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import difftune as dt
from difftune import zoo
from difftune.eval import evaluate, generate_digits
from difftune.methods.kind import KINDConfig, KINDPlugin, kind_adapters, recombine
from difftune.methods.lora import LoRAConfig
from difftune.methods.verbs import adapter_parameters
from difftune.serialization import save_adapter_file
from difftune.zoo.architectures import dit_mini
from difftune.zoo.mnist import split, to_rgb32

OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
NULL = 1000
S = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def latents(vae, digits: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split("train", digits)
    imgs = torch.stack([torch.from_numpy(np.asarray(to_rgb32(d))).permute(2, 0, 1) for d in x]).float() / 127.5 - 1
    with torch.no_grad():
        z = torch.cat([vae.encode(imgs[i:i + 200]).latent_dist.mean for i in range(0, len(imgs), 200)])
    return z * vae.config.scaling_factor, torch.from_numpy(y)


def train(model, params, data, steps: int, lr: float, batch: int, seed: int) -> float:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    z, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(z), (batch,), generator=g)
        x0, labels = z[idx], y[idx].clone()
        labels[torch.rand(batch, generator=g) < 0.1] = NULL  # label dropout for CFG
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = model(sched.add_noise(x0, noise, t), timestep=t, class_labels=labels).sample[:, :4]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def class_rows(model, classes: tuple[int, ...]) -> list[torch.nn.Parameter]:
    """The class-embedding tables of ``model``, trainable only in the rows of ``classes`` (a gradient mask)."""
    tables = [m.weight for n, m in model.named_modules() if n.endswith("class_embedder.embedding_table")]
    for w in tables:
        keep = torch.zeros(w.shape[0], 1)
        keep[list(classes)] = 1.0
        w.requires_grad_(True)
        w.register_hook(lambda g, keep=keep: g * keep)
    return tables


def judge(pipe, model, n: int) -> dict:
    pipe.transformer = model
    out = {}
    for part, digits in (("new", NEW), ("old", OLD)):
        images, labels = generate_digits(pipe, digits, n, steps=25, guidance=4.0)
        m = evaluate(images, labels)
        out[part] = {"accuracy": m["accuracy"], "fd": m["fd"], "fd_floor": m["fd_floor"]}
    return out


def fresh(seed: int):
    torch.manual_seed(seed)
    return dit_mini()


def transfer_kind(kind_model, src: Path, args, record, lr: float):
    """(a) KIND: new tailors (and class rows) for 5–9 on frozen learngenes, through the saved pretrained adapter."""
    a = copy.deepcopy(kind_model)
    dt.delete_adapter(a, "kind")
    cfg = KINDConfig(target_modules=S, learngenes=args.learngenes, tailors_per_class=args.tailors,
                     classes=list(OLD + NEW), source=str(src), reuse_classes=list(OLD), train_learngenes=False)
    plug = KINDPlugin(cfg, "kind")
    plug.prepare(None, a)
    params = plug.trainable_parameters(a)
    record("(a) KIND new tailors, frozen learngenes", a, sum(q.numel() for q in params), lr,
           train(a, params, args.new, args.transfer_steps, lr, args.batch, 2))
    return a


def recombined(pipe, a) -> dict:
    """Learngenes + the 5–9 tailors (and rows) only: parameters, factored MACs, and its 5–9 images against (a)'s."""
    small = copy.deepcopy(a)
    full_params = sum(q.numel() for _, ad in kind_adapters(small, "kind", rows=True) for q in ad.parameters())
    out = {"kind_parameters_before": full_params, **recombine(small, "kind", list(NEW))}
    images = []
    with torch.no_grad():
        for model in (a, small):
            pipe.transformer = model
            images.append(pipe(class_labels=list(NEW), num_inference_steps=5, output_type="np",
                               generator=torch.Generator().manual_seed(0)).images)
    out["max_image_difference"] = float(np.abs(images[0] - images[1]).max())
    return out


def transfer_lora(dense, args, record, lr: float) -> None:
    """(b) LoRA on the dense pretrained DiT (+ the new classes' embedding rows)."""
    b = copy.deepcopy(dense)
    dt.inject(b, LoRAConfig(target_modules=S, rank=args.lora_rank, alpha=float(args.lora_rank)), name="lora")
    params = adapter_parameters(b, "lora")
    tables = [] if args.no_lora_rows else class_rows(b, NEW)
    n_rows = sum(len(NEW) * w.shape[1] for w in tables)
    label = f"(b) LoRA r={args.lora_rank} on dense" + ("" if args.no_lora_rows else " + new class rows")
    record(label, b, sum(q.numel() for q in params) + n_rows, lr,
           train(b, params + tables, args.new, args.transfer_steps, lr, args.batch, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n", type=int, default=20, help="samples per digit for the judge")
    p.add_argument("--learngenes", type=int, default=124)
    p.add_argument("--tailors", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=20)
    p.add_argument("--judge-pretrained", action="store_true", help="also judge both pretrained models on 0-9")
    p.add_argument("--no-lora-rows", action="store_true", help="(b) without the new classes' embedding rows")
    p.add_argument("--adapter-lr", type=float, nargs="+", default=[1e-3],
                   help="learning rate(s) of (a) and (b); several give a row pair each")
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="load the two pretrained models an earlier run saved in --out instead of pretraining")
    p.add_argument("--out", type=Path, default=Path("outputs/bench/kind_lab"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    pipe = zoo.load("dit-mini")
    old, new = latents(pipe.vae, OLD), latents(pipe.vae, NEW)
    args.new = new
    rows, log = [], {"args": {k: str(v) for k, v in vars(args).items()}}

    # -- pretraining on 0–4: KIND-structured and dense, same init and data
    kind_cfg = KINDConfig(target_modules=S, learngenes=args.learngenes, tailors_per_class=args.tailors,
                          classes=list(OLD), train_base=True)
    kind_model = fresh(0)
    plugin = KINDPlugin(kind_cfg, "kind")
    plugin.prepare(None, kind_model)
    dense = fresh(0)
    saved = {k: args.out / f"pretrained-{k}.safetensors" for k in ("kind", "dense")}
    if args.reuse_pretrained:  # both pretrained models of an earlier run with the same settings, whole
        for model, key in ((kind_model, "kind"), (dense, "dense")):
            model.load_state_dict(load_file(saved[key]))
    else:
        params = plugin.trainable_parameters(kind_model)
        log["pretrain_kind_s"] = train(kind_model, params, old, args.pretrain_steps, 1e-3, args.batch, 1)
        log["pretrain_dense_s"] = train(dense, list(dense.parameters()), old, args.pretrain_steps, 1e-3, args.batch, 1)
        for model, key in ((kind_model, "kind"), (dense, "dense")):
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, saved[key])
    src = save_adapter_file(kind_model, args.out / "kind-pretrained", name="kind")
    if args.judge_pretrained:
        log["pretrained_kind"] = judge(pipe, kind_model, args.n)
        log["pretrained_dense"] = judge(pipe, dense, args.n)

    def record(label: str, model, trainable: int, lr: float, secs: float) -> None:
        scores = judge(pipe, model, args.n)
        rows.append({"method": label, "trainable": trainable, "lr": lr, "train_s": round(secs, 1), **scores})
        print(json.dumps(rows[-1]), flush=True)

    for i, lr in enumerate(args.adapter_lr):  # (a) and (b) at each learning rate, same data and seeds
        a = transfer_kind(kind_model, src, args, record, lr)
        if i == 0:
            log["recombined"] = recombined(pipe, a)
            print("recombined", json.dumps(log["recombined"]), flush=True)
        transfer_lora(dense, args, record, lr)
    # (c) full fine-tuning of the dense pretrained DiT
    c = copy.deepcopy(dense)
    params = list(c.parameters())
    record("(c) full fine-tuning", c, sum(q.numel() for q in params), 3e-4,
           train(c, params, new, args.transfer_steps, 3e-4, args.batch, 2))
    # (d) from scratch on 5–9 only
    d = fresh(0)
    params = list(d.parameters())
    record("(d) from scratch", d, sum(q.numel() for q in params), 1e-3,
           train(d, params, new, args.transfer_steps, 1e-3, args.batch, 2))
    log["rows"] = rows
    log["kind_layers"] = len(kind_adapters(a, "kind"))
    print("recombined", json.dumps(log["recombined"]))
    (args.out / "results.json").write_text(json.dumps(log, indent=2))
    print("| method | trainable | lr | new acc | new FD | old acc (retention) | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} | {r['lr']:g} | {r['new']['accuracy']:.1%} | "
              f"{r['new']['fd']:.1f} | {r['old']['accuracy']:.1%} | {r['train_s']} |")
    for k in ("pretrained_kind", "pretrained_dense"):
        if k in log:
            print(k, json.dumps(log[k]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
