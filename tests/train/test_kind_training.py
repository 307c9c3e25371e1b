"""KIND through the trainer: pretraining with KIND structure (the base trains too) saves the trained base next to the
adapter, resumes exactly, and a transfer run on that output trains only the fresh tailor groups."""

from __future__ import annotations

import subprocess

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import difftune as dt
from difftune.config import load_config
from difftune.train import TrainConfig, main

KIND = "{name: kind, learngenes: 2, tailors_per_class: 1, classes: [0, 3]"


def _cfg(tiny, root, method, *extra):
    return load_config(TrainConfig, "configs/debug/tiny_dit.yaml", [
        f"model.path={tiny['dit']}", f"data.path={tiny['classes']}", f"output_dir={root / 'out'}",
        f"method={method}", "optimizer.lr=1e-2", "validation.class_labels=[]", *extra])


def _digits(pipe) -> torch.Tensor:
    return pipe(class_labels=[0, 3], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_pretrain_saves_the_trained_base_resumes_and_transfers(tiny, tmp_path):
    pretrain = KIND + ", train_base: true}"
    sets = ("train.max_steps=4", "checkpointing.checkpointing_steps=2")
    full = main(_cfg(tiny, tmp_path / "a", pretrain, *sets))
    out = tmp_path / "a" / "out"
    # the base trained (embedders, adaLN, final layer) and is saved as a pipeline the adapter belongs on
    base = DiffusionPipeline.from_pretrained(tiny["dit"]).transformer.state_dict()
    trained = DiffusionPipeline.from_pretrained(out / "pipeline").transformer.state_dict()
    assert not torch.equal(base["proj_out_2.weight"], trained["proj_out_2.weight"])
    assert torch.equal(base["transformer_blocks.0.attn1.to_q.weight"],
                       trained["transformer_blocks.0.attn1.to_q.weight"])  # W0 of S is replaced, not trained
    # the checkpoint holds the trained base too, so the resumed run ends bit-identical (adapter and base)
    checkpoint = load_file(out / "checkpoints" / "checkpoint-2" / "trainable.safetensors")
    assert any(k.startswith("base.") for k in checkpoint)
    resumed_dir = tmp_path / "b" / "out" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(out / "checkpoints" / "checkpoint-2"), str(resumed_dir)], check=True)
    torch.manual_seed(5)
    resumed = main(_cfg(tiny, tmp_path / "b", pretrain, *sets, "checkpointing.resume_from_checkpoint=latest"))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = DiffusionPipeline.from_pretrained(tmp_path / "b" / "out" / "pipeline").transformer.state_dict()
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    # the saved pair is the pretrained model: the adapter on its pipeline generates
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    dt.load_adapter(pipe, full, name="kind")
    assert _digits(pipe).std() > 0

    # transfer: class 3's tailors fresh on frozen learngenes, class 0's reused (frozen), from the saved pair
    transfer = (f"{{name: kind, learngenes: 2, tailors_per_class: 1, classes: [0, 3], reuse_classes: [0], "
                f"source: '{full}', train_learngenes: false}}")
    moved = main(_cfg(tiny, tmp_path / "c", transfer, "train.max_steps=2", f"model.path={out / 'pipeline'}"))
    src, dst = dt.serialization.read_tensors(full), dt.serialization.read_tensors(moved)
    frozen = [k for k in dst if ".kind_g" in k or k.endswith(".0")]
    assert frozen and all(torch.equal(src[k], dst[k]) for k in frozen)
    fresh = [k for k in dst if k.endswith(".3") and "kind_tS" in k]
    assert fresh and any(dst[k].abs().max() > 0 for k in fresh)  # fresh σ starts at 0: it trained


def test_a_batch_that_reaches_no_trained_value_changes_nothing_and_is_reported(tiny, tmp_path, capsys):
    # only class 0 in the data, and class 0's tailors are frozen: no batch reaches the fresh class-5 group
    first = main(_cfg(tiny, tmp_path / "a", KIND + "}", "train.max_steps=1"))
    transfer = (f"{{name: kind, learngenes: 2, tailors_per_class: 1, classes: [0, 5], reuse_classes: [0], "
                f"source: '{first}', train_learngenes: false}}")
    zero_only = tmp_path / "zero"
    zero_only.mkdir()
    subprocess.run(["cp", "-r", str(tiny["classes"] / "0"), str(zero_only)], check=True)
    moved = main(_cfg(tiny, tmp_path / "b", transfer, "train.max_steps=2", f"data.path={zero_only}",
                      "data.label_dropout=0.0"))
    assert "the loss depends on no trainable value" in capsys.readouterr().out
    assert all(v.abs().max() == 0 for k, v in dt.serialization.read_tensors(moved).items() if k.endswith("kind_tS.5"))
