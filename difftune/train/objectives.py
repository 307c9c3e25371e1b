"""The DDPM objective's options beyond the plain loss: the scheduler the run trains and samples with
(``model.prediction_type``, ``train.zero_terminal_snr``) and the per-sample loss weights (``train.snr_gamma``,
``train.debiased_estimation``).

Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", arXiv
2305.08891): the betas are rescaled so that ᾱ_T = 0 (diffusers' ``rescale_betas_zero_snr``), the last training
timestep is pure noise as at the start of sampling, and sampling starts from the last timestep
(``timestep_spacing: trailing``). At ᾱ_T = 0 an ε-prediction tells nothing about x0, so the paper trains with
v-prediction: the option requires it. The pipeline's own scheduler is rebuilt with both settings, so the validation
grid samples with it and a saved pipeline (method ``full``) carries it; the DDPM training scheduler is built from
its config. Beside an adapter, the run writes that scheduler to ``OUTPUT_DIR/scheduler/`` (`with_scheduler`): the
base pipeline's own would sample the adapter with the wrong schedule and target.

Loss weights, per sample, as kohya's sd-scripts computes them (``library/custom_train_functions.py``), with
SNR(t) = ᾱ_t / (1 − ᾱ_t):

* Min-SNR (``snr_gamma`` γ, Hang et al. 2023): min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v.
* Debiased estimation (``debiased_estimation``, Yu et al. 2024, arXiv 2310.08442): 1 / √SNR for ε,
  1 / (SNR + 1) for v (kohya's v variant), SNR clamped to 1000 first as kohya does (only the first timesteps
  of SD's schedule exceed it).
* Both set: the two weights multiply, as kohya applies one after the other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import bad_value

#: kohya's clamp of SNR(t) in the debiased weight (SNR is largest at t = 0: ~1175 for SD's schedule)
DEBIASED_MAX_SNR = 1000.0


def configure_scheduler(cfg: Any, pipe: Any) -> None:
    """Give ``pipe.scheduler`` the run's prediction type and, with ``train.zero_terminal_snr``, rebuild it with
    rescaled betas and trailing timesteps (the training scheduler is later built from its config).

    Raises:
        DifftuneError: ``train.zero_terminal_snr`` without v-prediction, or with a scheduler class that cannot
            rescale its betas.
    """
    sched = pipe.scheduler
    if cfg.model.prediction_type:  # validation samples and a saved pipeline must use the trained parameterization
        sched.register_to_config(prediction_type=cfg.model.prediction_type)
    if not cfg.train.zero_terminal_snr:
        return
    prediction = sched.config.get("prediction_type")
    if prediction != "v_prediction":
        raise bad_value("train.zero_terminal_snr", True, f"false while the model predicts {prediction!r}",
                        "at zero terminal SNR the last timestep is pure noise, where an ε-prediction carries nothing "
                        "about the image (Lin et al. 2024, §3.2): set model.prediction_type: v_prediction")
    if "rescale_betas_zero_snr" not in inspect.signature(type(sched).__init__).parameters:
        raise bad_value("train.zero_terminal_snr", True, f"false with the pipeline's {type(sched).__name__}",
                        "that scheduler cannot rescale its betas; save the pipeline with DDIMScheduler, "
                        "DDPMScheduler or EulerDiscreteScheduler")
    pipe.scheduler = type(sched).from_config(sched.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def snr_weights(scheduler: Any, timesteps: Tensor, prediction_type: str, snr_gamma: float | None,
                debiased: bool) -> Tensor | None:
    """The per-sample loss weights (B,) for ``timesteps``, or None when neither weighting is on."""
    from diffusers.training_utils import compute_snr

    if snr_gamma is None and not debiased:
        return None
    snr = compute_snr(scheduler, timesteps)
    v = prediction_type == "v_prediction"
    weights = torch.ones_like(snr)
    if snr_gamma is not None:
        weights = weights * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v else snr)
    if debiased:
        clamped = torch.clamp(snr, max=DEBIASED_MAX_SNR)
        weights = weights * (1 / (clamped + 1) if v else 1 / torch.sqrt(clamped))
    return weights


def changes_scheduler(cfg: Any) -> bool:
    """Whether the run samples with another scheduler than its base pipeline's (prediction type, zero terminal SNR)."""
    return bool(cfg.model.prediction_type or cfg.train.zero_terminal_snr)


def with_scheduler(cfg: Any, pipe: Any, save: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """``save`` (which writes an adapter result to its path) followed, when the run changed the scheduler, by the
    scheduler's config in the folder ``scheduler`` beside it (`difftune.train.saving.save_result` moves both into
    place together). A pipeline result holds its scheduler already."""
    if not changes_scheduler(cfg) or not cfg.method_config().is_adapter:
        return save

    def save_both(path: Path) -> Path:
        written = save(path)
        pipe.scheduler.save_pretrained(str(Path(path).parent / "scheduler"))
        return written

    return save_both
