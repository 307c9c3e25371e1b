"""SPM on the tiny SD3 and Flux pipelines: membranes on the MMDiT attention/MLP linears, trained data-free through
the SPM plugin (flow-matching on-policy sampling), and facilitated transport from the pooled CLIP embedding
(`pooled_projections`) and the prompt's words, checked by hand after loading into a fresh pipeline."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import difftune as dt
from difftune.architectures import mmdit_default_targets
from difftune.config import load_config
from difftune.methods.spm import set_transport
from difftune.methods.verbs import adapter_names, hosts, model_part
from difftune.targeting import find_targets
from difftune.testing import save_tiny_pipeline
from difftune.train import TrainConfig, main
from difftune.train.lock import release_output_dir
from difftune.train.trainer import setup, step_loss

REPO = Path(__file__).resolve().parents[2]
KINDS = ("sd3", "flux")
SETS = ("data.kind=none", "data.num_samples=2", "data.path=''", "data.label_dropout=0.0", "validation.prompts=[]",
        "method={name: spm, concepts: [cat], sampling_steps: 3, num_anchors: 2}")


@pytest.fixture(scope="module")
def mmdit(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm-mmdit")
    return {k: save_tiny_pipeline(k, root / k) for k in KINDS}


def _cfg(paths, root: Path, kind: str, *sets: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "debug" / f"tiny_{kind}.yaml",
                       [f"model.path={paths[kind]}", f"output_dir={root / 'out'}", *SETS, *sets])


@pytest.mark.parametrize("kind", KINDS)
def test_membranes_train_on_the_mmdit_linears(mmdit, tmp_path, kind):
    # the erasing term alone (method.action: erase): with anchoring the membrane starts at an equilibrium (U = 0 keeps
    # the anchors exact) and the sum need not fall step by step
    run = setup(_cfg(mmdit, tmp_path, kind, "optimizer.lr=1e-2", "method.action=erase"))
    with contextlib.ExitStack() as stack:
        stack.callback(release_output_dir, run.cfg.output_dir)
        model = run.denoiser
        adapted = sorted(n for n, host in hosts(model) if host.adapters)

        assert adapted == sorted(find_targets(model, mmdit_default_targets(model), []))  # attention + MLP linears
        batch = next(iter(run.loader))
        losses = []
        for _ in range(5):
            torch.manual_seed(0)  # the same concept, x_T, t and anchors every step: only the membrane changes
            loss = step_loss(run, batch)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_transport_follows_the_pooled_clip_embedding_and_the_words(mmdit, tmp_path, kind):
    from diffusers import DiffusionPipeline

    result = main(_cfg(mmdit, tmp_path, kind, "train.max_steps=2", "optimizer.lr=1e-2"))
    pipe = DiffusionPipeline.from_pretrained(mmdit[kind])
    name = dt.load_adapter(pipe, result)
    model = pipe.transformer
    part = model_part(model, name)
    assert name in adapter_names(model) and part.key == "pooled_projections"

    def pooled(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            if kind == "sd3":
                return pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                          max_sequence_length=16)[2]
            return pipe.encode_prompt(prompt, None, max_sequence_length=16)[1]

    # E(c) stored by the trainer: the pooled CLIP embedding of the concept, (1 concept, 1, P)
    torch.testing.assert_close(part.spm_concept_embeds, pooled("cat")[None], atol=1e-6, rtol=0)
    prompts = ["a cat", "a red car"]
    e = torch.cat([pooled(p) for p in prompts])
    by_hand = torch.maximum(F.cosine_similarity(e, pooled("cat"), dim=-1).clamp(0, 1),
                            torch.tensor([1.0, 0.0]))  # the word "cat" is in the first prompt only
    # the transformer called as the pipeline calls it, with the prompts given per call
    b = len(prompts)
    g = torch.Generator().manual_seed(0)
    states = torch.randn(b, 4, model.config.joint_attention_dim, generator=g)
    kwargs = {"encoder_hidden_states": states, "pooled_projections": e}
    if kind == "flux":
        kwargs.update(hidden_states=torch.randn(b, 16, 64, generator=g), img_ids=torch.zeros(16, 3),
                      txt_ids=torch.zeros(4, 3), guidance=torch.full((b,), 3.5), timestep=torch.full((b,), 0.5))
    else:
        kwargs.update(hidden_states=torch.randn(b, 16, 4, 4, generator=g), timestep=torch.full((b,), 500.0))
    with torch.no_grad(), dt.adapter_inputs(prompt=prompts):
        out = model(**kwargs).sample
    torch.testing.assert_close(part.gamma, by_hand, atol=1e-6, rtol=0)
    assert 0 < by_hand[1] < 1  # the car is let through partly, by its pooled embedding's cosine alone
    # γ scales the membrane per item: the output is base + γ_i · δ_i
    with torch.no_grad():
        dt.disable_adapters(model, name)
        base = model(**kwargs).sample
        dt.enable_adapters(model, name)
        set_transport(model, name, False)  # γ = 1 for every item
        full = model(**kwargs).sample
    for i in range(b):  # per item: base + γ_i (full − base) up to float rounding (δ is not linear through blocks)
        assert (out[i] - base[i]).abs().max() > 0 if by_hand[i] > 0 else torch.equal(out[i], base[i])
    torch.testing.assert_close(out[0], full[0], atol=1e-6, rtol=0)  # γ = 1 for "a cat"
