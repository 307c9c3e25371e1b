"""The σ shift of flow-matching training (`difftune.train.flow`): ``train.flow_shift`` (SD3's static shift with any
s) and ``train.dynamic_shift`` (Flux's resolution-dependent shift, as the scheduler applies it at inference), both
by hand through the trainer's own draw, at two latent sizes and in bucketed batches; refused settings; exact
resume with the dynamic shift on and the settings recorded in the saved config and model card."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from mmdit_runs import REPO, setup_run, tiny_mmdit_cfg

import difftune as dt
from difftune.config import load_config
from difftune.families import flow_mu
from difftune.train import TrainConfig, main
from difftune.train import flow as flow_module
from difftune.train.config import TrainLoopConfig
from difftune.train.flow import draw_sigmas
from difftune.train.loss import StepInputs

N = 1000
#: the tiny pipelines' scheduler settings (difftune.zoo.tiny_mmdit; the defaults of diffusers' Flux scheduler)
BASE_SHIFT, MAX_SHIFT, BASE_LEN, MAX_LEN = 0.5, 1.15, 256, 4096


def _mu(tokens: int) -> float:
    """`calculate_shift` by hand: μ linear in the image tokens from BASE_SHIFT at BASE_LEN to MAX_SHIFT at MAX_LEN."""
    return BASE_SHIFT + (MAX_SHIFT - BASE_SHIFT) / (MAX_LEN - BASE_LEN) * (tokens - BASE_LEN)


def _static(s: float, sigma0: torch.Tensor) -> torch.Tensor:
    return s * sigma0 / (1 + (s - 1) * sigma0)


def _draw(mmdit, root, kind: str, *sets: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """σ of one draw of the trainer's loss path (`StepInputs.draw`) on the first batch, from seed 3, and the latents'
    shape. Every run draws the same u: the shift consumes no random numbers."""
    with setup_run(tiny_mmdit_cfg(mmdit, root, kind, "data.label_dropout=0", *sets)) as run:
        batch = next(iter(run.loader))
        torch.manual_seed(3)
        d = StepInputs(batch, run.model, run.denoiser, None, run.frozen, run.cfg, run.accelerator.device, 0).draw()
        sigma = d.timesteps / N
        torch.testing.assert_close(d.noisy, (1 - sigma.view(-1, 1, 1, 1)) * d.latents + sigma.view(-1, 1, 1, 1)
                                   * d.noise, atol=1e-5, rtol=0)  # x_t is made at the shifted σ
        return sigma, tuple(d.noisy.shape)


def _on_grid(sigma0: torch.Tensor) -> bool:
    """σ₀ lies on the unshifted table (N − i) / N."""
    return bool(((sigma0 * N - (sigma0 * N).round()).abs() < 1e-3).all())


def test_static_shift_override_by_hand(mmdit, tmp_path):
    """SD3 (scheduler shift 3): flow_shift 1 gives the unshifted σ₀, null the scheduler's 3σ₀/(1 + 2σ₀), 5 gives
    5σ₀/(1 + 4σ₀); Flux (its table unshifted: the dynamic shift is the scheduler's) takes a static shift too."""
    sd3 = {s: _draw(mmdit, tmp_path / str(s), "sd3", *([f"train.flow_shift={s}"] if s else []))[0]
           for s in (None, 1.0, 5.0)}
    sigma0 = sd3[1.0]
    assert _on_grid(sigma0) and not torch.allclose(sd3[None], sigma0)  # the override reached the trainer's draw
    torch.testing.assert_close(sd3[None], _static(3.0, sigma0), atol=1e-6, rtol=0)
    torch.testing.assert_close(sd3[5.0], _static(5.0, sigma0), atol=1e-6, rtol=0)
    flux0, _ = _draw(mmdit, tmp_path / "f0", "flux")
    flux3, _ = _draw(mmdit, tmp_path / "f3", "flux", "train.flow_shift=3")
    assert _on_grid(flux0)
    torch.testing.assert_close(flux3, _static(3.0, flux0), atol=1e-6, rtol=0)


def test_dynamic_shift_by_hand_at_two_latent_sizes(mmdit, tmp_path):
    """σ = e^μ / (e^μ + 1/σ₀ − 1) with μ from the batch's packed tokens (h/2 · w/2): 64 tokens (μ 0.47) at 32 px,
    1024 (μ 0.63) at 128 px; at σ₀ = 0.5 these give σ 0.615 and 0.652, far apart at the test's tolerance."""
    for res in (32, 128):
        sigma0, shape = _draw(mmdit, tmp_path / f"{res}-0", "flux", f"data.resolution={res}")
        sigma, _ = _draw(mmdit, tmp_path / f"{res}-d", "flux", f"data.resolution={res}", "train.dynamic_shift=true")
        tokens = (shape[2] // 2) * (shape[3] // 2)
        assert tokens == (res // 4) ** 2  # the tiny VAE's scale factor is 2
        assert _on_grid(sigma0) and not torch.allclose(sigma, sigma0)
        m = math.exp(_mu(tokens))
        torch.testing.assert_close(sigma, m / (m + 1 / sigma0 - 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_dynamic_shift_uses_the_schedulers_time_shift(shift_type):
    """The scheduler's own time_shift: exponential e^μ / (e^μ + 1/σ₀ − 1) or linear μ / (μ + 1/σ₀ − 1), as its
    ``time_shift_type`` says; an SD3 scheduler (no dynamic shifting in its config) uses its μ settings too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, time_shift_type=shift_type)
    train = TrainLoopConfig(dynamic_shift=True)
    torch.manual_seed(0)
    timesteps, sigmas = draw_sigmas(sched, train, "uniform", 512, image_seq_len=1024)
    torch.manual_seed(0)
    sigma0 = 1 - torch.floor(torch.rand(512) * N) / N
    mu = _mu(1024)
    assert flow_mu(sched.config, 1024) == pytest.approx(mu, rel=1e-12)
    scale = math.exp(mu) if shift_type == "exponential" else mu
    torch.testing.assert_close(sigmas, scale / (scale + 1 / sigma0 - 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(timesteps, N * sigmas, atol=1e-3, rtol=0)
    # flow_shift equal to the scheduler's own shift: its table, computed with the same operations
    torch.manual_seed(0)
    _, table = draw_sigmas(sched, TrainLoopConfig(), "uniform", 512)
    torch.manual_seed(0)
    _, same = draw_sigmas(sched, TrainLoopConfig(flow_shift=3.0), "uniform", 512)
    assert torch.equal(table, same)


def test_dynamic_shift_needs_the_schedulers_mu_settings():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(base_shift=None)
    with pytest.raises(dt.DifftuneError, match="base_shift"):
        draw_sigmas(sched, TrainLoopConfig(dynamic_shift=True), "uniform", 2, image_seq_len=256)


@pytest.mark.parametrize("sets,key", [
    (["train.flow_shift=0"], "train.flow_shift"), (["train.flow_shift=-2"], "train.flow_shift"),
    (["train.flow_shift=101"], "train.flow_shift"), (["train.flow_shift=.inf"], "train.flow_shift"),
    (["train.flow_shift=2", "train.dynamic_shift=true"], "train.flow_shift"),
    (["train.dynamic_shift=2"], "train.dynamic_shift"), (["train.flow_shift=fast"], "train.flow_shift")])
def test_bad_shift_settings_are_refused(mmdit, tmp_path, sets, key):
    with pytest.raises(dt.DifftuneError, match=rf"`{key}`"):
        tiny_mmdit_cfg(mmdit, tmp_path, "flux", *sets)


@pytest.mark.parametrize("setting", ["train.flow_shift=3", "train.dynamic_shift=true"])
def test_shift_settings_are_refused_for_ddpm_pipelines(tiny, tmp_path, setting):
    cfg = load_config(TrainConfig, REPO / "configs" / "debug" / "tiny_sd.yaml", [
        f"model.path={tiny['sd']}", f"data.path={tiny['captions']}", f"output_dir={tmp_path / 'out'}", setting])
    key = setting.split("=")[0]
    with pytest.raises(dt.DifftuneError, match=rf"`{key}` must be null for StableDiffusionPipeline.*flow-matching"):
        main(cfg)


def test_resume_is_bit_exact_with_dynamic_shift_on_bucketed_batches(mmdit, tmp_path, write_photos, stop_and_resume,
                                                                     monkeypatch):
    """Photos of three shapes in buckets: batches of different latent sizes, each shifted at its own μ; a run
    stopped at step 2 and resumed gives the same adapter. The settings are in config.yaml and the model card."""
    photos = write_photos(tmp_path / "photos", [(64, 32), (32, 64), (40, 40)] * 2, ["a cat", "a dog"])
    tokens = []
    draw = flow_module.draw_sigmas
    monkeypatch.setattr(flow_module, "draw_sigmas", lambda *a, **k: tokens.append(a[4]) or draw(*a, **k))
    sets = ["train.dynamic_shift=true", "train.max_steps=4", "checkpointing.checkpointing_steps=2",
            "data.buckets=true", "data.bucket_min_size=16", "data.bucket_max_size=64", "data.bucket_step=8"]

    def make(out, *more):
        return tiny_mmdit_cfg({**mmdit, "captions": photos}, out.parent, "flux", *sets, *more)

    stop_and_resume(make, 2)
    assert len(set(tokens)) > 1, tokens  # several latent sizes, hence several μ
    saved = yaml.safe_load((tmp_path / "b" / "out" / "config.yaml").read_text())
    assert saved["train"]["dynamic_shift"] is True and saved["train"]["flow_shift"] is None
    assert "dynamic_shift: true" in (tmp_path / "b" / "out" / "README.md").read_text()
