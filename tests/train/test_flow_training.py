"""Flow-matching training of the tiny SD3 and Flux pipelines: the velocity target and σ by hand, loss weighting,
Flux's packed input and guidance value, LoRA learning on a fixed batch, exact resume, and refused DDPM settings."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
from mmdit_runs import setup_run, tiny_mmdit_cfg
from safetensors.torch import load_file

import difftune as dt
from difftune.testing import tiny_flux_pipeline
from difftune.train import main
from difftune.train.flow import draw_sigmas, flow_loss
from difftune.train.loss import StepInputs
from difftune.train.trainer import step_loss

KINDS = ("sd3", "flux")


def _inputs(run, batch) -> StepInputs:
    return StepInputs(batch, run.model, run.denoiser, None, run.frozen, run.cfg, run.accelerator.device, 0)


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): each 2×2 patch's channels, row-major over patches (Flux's layout)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


@pytest.mark.parametrize("kind", KINDS)
def test_velocity_target_and_loss_by_hand(mmdit, tmp_path, kind):
    """x_t = (1 − σ) x0 + σ ε, target ε − x0, and the loss is the MSE of the transformer's own output to it, with
    the transformer called by hand as its pipeline calls it (Flux: packed patches, σ as the timestep, ids)."""
    with setup_run(tiny_mmdit_cfg(mmdit, tmp_path, kind, "data.label_dropout=0", "train.guidance_scale=2.0")) as run:
        batch = next(iter(run.loader))
        torch.manual_seed(3)
        inputs = _inputs(run, batch)
        d = inputs.draw()
        sigma = (d.timesteps / 1000).view(-1, 1, 1, 1)
        assert d.timesteps.dtype == torch.float32 and ((sigma > 0) & (sigma <= 1)).all()
        torch.testing.assert_close(d.noisy, (1 - sigma) * d.latents + sigma * d.noise, atol=1e-5, rtol=0)
        assert torch.equal(d.target, d.noise - d.latents)
        with torch.no_grad():
            loss = inputs.loss(inputs.predict(run.denoiser, d.noisy, d.timesteps, d.kwargs), d)
            model, kw = run.denoiser, d.kwargs
            if kind == "sd3":
                out = model(hidden_states=d.noisy, timestep=d.timesteps, pooled_projections=kw["pooled_projections"],
                            encoder_hidden_states=kw["encoder_hidden_states"]).sample
            else:
                b, c, h, w = d.noisy.shape
                ids = torch.stack(torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij"), -1)
                img_ids = torch.cat([torch.zeros(h * w // 4, 1), ids.reshape(-1, 2).float()], 1)
                assert torch.equal(kw["img_ids"], img_ids) and not kw["txt_ids"].any()
                assert torch.equal(kw["guidance"], torch.full((b,), 2.0))
                packed = model(hidden_states=_pack(d.noisy), timestep=d.timesteps / 1000, img_ids=img_ids,
                               txt_ids=kw["txt_ids"], guidance=kw["guidance"],
                               pooled_projections=kw["pooled_projections"],
                               encoder_hidden_states=kw["encoder_hidden_states"]).sample
                out = packed.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
                assert torch.equal(_pack(out), packed)  # the unpacking by hand inverts the packing
        torch.testing.assert_close(loss, ((out - (d.noise - d.latents)) ** 2).mean(), atol=1e-6, rtol=1e-5)


def test_sigmas_follow_the_density_and_the_shifted_schedule(mmdit, tmp_path):
    # SD3: σ = shift·s / (1 + (shift − 1)·s) at s = 1 − i/N, i = floor(u·N), u = sigmoid(N(0, 1)) (logit_normal)
    with setup_run(tiny_mmdit_cfg(mmdit, tmp_path, "sd3")) as run:
        sched, train = run.frozen.noise_scheduler, run.cfg.train
        assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler" and sched.config.shift == 3.0
        torch.manual_seed(0)
        timesteps, sigmas = draw_sigmas(sched, train, "logit_normal", 64)
        torch.manual_seed(0)
        u = torch.sigmoid(torch.randn(64))
        s = 1 - torch.floor(u * 1000) / 1000
        torch.testing.assert_close(sigmas, 3 * s / (1 + 2 * s), atol=1e-5, rtol=0)
        torch.testing.assert_close(timesteps, 1000 * sigmas, atol=1e-3, rtol=0)
        torch.manual_seed(0)
        _, uniform = draw_sigmas(sched, train, "uniform", 4096)
        _, mode = draw_sigmas(sched, train, "mode", 4096)
        # the mode density (scale 1.29) puts more samples at mid σ than uniform u; both stay in the table
        mid = lambda x: ((x > 0.4) & (x < 0.9)).float().mean()  # noqa: E731
        assert mid(mode) > mid(uniform) + 0.05 and mode.max() <= 1 and mode.min() > 0


def test_loss_weightings_by_hand():
    from difftune.methods.plugin import Noised

    t = torch.tensor([250.0, 800.0])
    pred, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    noised = Noised(target, target, t, target, target, {})
    per = torch.tensor([1.0, 4.0])
    s = t / 1000
    assert math.isclose(flow_loss(pred, noised, "none", 1000).item(), per.mean().item(), rel_tol=1e-6)
    assert math.isclose(flow_loss(pred, noised, "sigma_sqrt", 1000).item(), (per / s**2).mean().item(), rel_tol=1e-6)
    cosmap = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    assert math.isclose(flow_loss(pred, noised, "cosmap", 1000).item(), (per * cosmap).mean().item(), rel_tol=1e-6)


def test_flux_guidance_embedding_is_fed_and_matters(mmdit, tmp_path):
    with setup_run(tiny_mmdit_cfg(mmdit, tmp_path, "flux", "train.guidance_scale=4.5", "data.label_dropout=0")) as run:
        seen = []
        hook = run.denoiser.time_text_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
        batch = next(iter(run.loader))
        losses = []
        for scale in (4.5, 1.0):
            run.family.guidance_scale = scale
            torch.manual_seed(0)
            with torch.no_grad():
                losses.append(step_loss(run, batch).item())
        hook.remove()
        # the embedder gets the value times 1000 as the pipeline passes it (guidance embeds like a timestep)
        assert [g.tolist() for g in seen] == [[4500.0] * 2, [1000.0] * 2]
        assert losses[0] != losses[1]
    schnell = tiny_flux_pipeline(guidance=False)
    from difftune.families import family_for

    fam = family_for(schnell, schnell.transformer)
    cond = {"encoder_hidden_states": torch.zeros(1, 4, 32), "pooled_projections": torch.zeros(1, 32)}
    kw = fam.denoiser_kwargs(cond, torch.zeros(1, 16, 4, 4))
    assert kw["guidance"] is None


@pytest.mark.parametrize("kind,shift", [("sd3", None), ("flux", None), ("sd3", "train.flow_shift=1.5"),
                                        ("flux", "train.dynamic_shift=true")])
def test_lora_loss_decreases_on_a_fixed_batch(mmdit, tmp_path, kind, shift):
    sets = ["optimizer.lr=3e-2", "data.label_dropout=0", *([shift] if shift else [])]
    with setup_run(tiny_mmdit_cfg(mmdit, tmp_path, kind, *sets)) as run:
        batch = next(iter(run.loader))
        losses = []
        for _ in range(8):
            torch.manual_seed(0)  # the same x0, ε and σ every step: only the adapter changes
            loss = step_loss(run, batch)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # measured: 4.15 → 3.87 (SD3), in 8 steps from ΔW = 0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("kind,cache", [("sd3", False), ("flux", False), ("flux", True)])
def test_resume_is_bit_exact(mmdit, tmp_path, kind, cache):
    flag = str(cache).lower()  # cached: the T5/CLIP embeddings and VAE posteriors computed once before training
    sets = ["train.max_steps=4", "checkpointing.checkpointing_steps=2", "method.dropout=0.1",
            f"data.cache_text_embeddings={flag}", f"data.cache_latents={flag}", "train.loss_weighting=cosmap"]
    full = main(tiny_mmdit_cfg(mmdit, tmp_path / "a", kind, *sets))
    (tmp_path / "b" / "out" / "checkpoints").mkdir(parents=True)
    src = tmp_path / "a" / "out" / "checkpoints" / "checkpoint-2"
    subprocess.run(["cp", "-r", str(src), str(tmp_path / "b" / "out" / "checkpoints")], check=True)
    torch.manual_seed(1234)
    resumed = main(tiny_mmdit_cfg(mmdit, tmp_path / "b", kind, *sets, "checkpointing.resume_from_checkpoint=latest"))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = main(tiny_mmdit_cfg(mmdit, tmp_path / "c", kind, *sets[:-1], "train.loss_weighting=none"))
    assert not all(torch.equal(a[k], v) for k, v in load_file(other / "adapter_model.safetensors").items())


@pytest.mark.parametrize("setting", ["train.snr_gamma=5", "train.noise_offset=0.1", "model.prediction_type=epsilon",
                                     "train.zero_terminal_snr=true", "train.debiased_estimation=true"])
def test_ddpm_settings_are_refused(mmdit, tmp_path, setting):
    with pytest.raises(dt.DifftuneError, match=rf"`{setting.split('=')[0]}`.*flow-matching"):
        main(tiny_mmdit_cfg(mmdit, tmp_path, "sd3", setting))


def test_bad_flow_settings(mmdit, tmp_path):
    with pytest.raises(dt.DifftuneError, match="`train.timestep_density`"):
        tiny_mmdit_cfg(mmdit, tmp_path, "sd3", "train.timestep_density=gauss")
    with pytest.raises(dt.DifftuneError, match="`train.max_sequence_length`"):
        tiny_mmdit_cfg(mmdit, tmp_path, "sd3", "train.max_sequence_length=0")
    with pytest.raises(dt.DifftuneError, match="`train.logit_std`"):
        tiny_mmdit_cfg(mmdit, tmp_path, "sd3", "train.logit_std=0")
