"""The losses: the denoising loss (latents, conditioning, noise, Min-SNR) and the autoencoder loss, and
`StepInputs`, what a trainer plugin's ``objective`` receives: the batch, the modules and the pieces of the default
loss as helpers (``draw``, ``noised``, ``prompt_kwargs``, ``predict``, ``loss``, ``default_loss``).

Every random draw comes from the global torch RNG, in a fixed order per batch, which accelerate's checkpoints save
and restore: a resumed run draws the same latents, noise and timesteps as the uninterrupted one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DifftuneError, bad_value
from ..families import Family
from ..methods.plugin import Noised
from .config import TrainConfig
from .masks import latent_mask
from .objectives import snr_weights


@dataclass
class Frozen:
    """The parts that do not train, and what they cache."""

    pipe: Any
    family: Family
    noise_scheduler: Any
    weight_dtype: torch.dtype
    text_cache: dict[str, dict[str, Tensor]]
    latent_cache: dict[tuple[str, int, int], tuple[Tensor, Tensor]]  #: `latent_keys` -> posterior mean, std


@torch.no_grad()
def encode_posterior(vae: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE posterior's mean and std for ``pixels`` (B, 3, H, W): float32, contiguous, on the VAE's device."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    # contiguous: the encoder's output may be channels-last (it is on CPU), and randn_like follows the layout
    return dist.mean.float().contiguous(), dist.std.float().contiguous()


def _latents(frozen: Frozen, pixels: Tensor, keys: list[tuple[str, int, int]] | None) -> Tensor:
    vae = frozen.pipe.vae
    if keys is None:
        mean, std = encode_posterior(vae, pixels)
    else:
        missing = [k for k in keys if k not in frozen.latent_cache]
        if missing:
            raise DifftuneError(f"no cached latents for {missing[:3]}: the cache is filled before training "
                                "(difftune.train.cache.fill_caches) for every item of the data set")
        mean = torch.stack([frozen.latent_cache[k][0] for k in keys]).to(pixels.device)
        std = torch.stack([frozen.latent_cache[k][1] for k in keys]).to(pixels.device)
    # A fresh sample of the posterior every step, as diffusers does. Drawn with an explicit shape, never
    # randn_like: the same step must draw the same numbers from a cached and from a freshly encoded posterior.
    latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def latent_keys(batch: dict[str, Any], prefix: str) -> list[tuple[str, int, int]]:
    """The latent cache's keys of the batch's images (``prefix="class_"``: DreamBooth's class images): (prefix,
    item index, 1 if the item was flipped else 0); with ``data.random_flip`` both orientations are cached."""
    flipped = batch.get(f"{prefix}flipped", torch.zeros(len(batch["index"]), dtype=torch.bool))
    return [(prefix, int(i), int(f)) for i, f in zip(batch["index"], flipped)]


def _captions(frozen: Frozen, captions: list[str], device: torch.device, cache: bool) -> dict[str, Tensor]:
    fam = frozen.family
    if cache and any(p.requires_grad for enc in fam.encoders for p in enc.parameters()):
        raise bad_value("data.cache_text_embeddings", True, "false while a text encoder trains",
                        "cached embeddings would freeze the text encoder's output (model.component: text_encoder)")
    if not cache:
        return fam.encode(captions, device)
    # Captions not cached before training (a plugin's own prompts) are encoded one at a time, so a cached value is
    # a function of its caption only, never of which captions happened to be missing together.
    for c in sorted({c for c in captions if c not in frozen.text_cache}):
        frozen.text_cache[c] = {k: v[0].cpu() for k, v in fam.encode([c], device).items()}
    keys = frozen.text_cache[captions[0]]
    return {k: torch.stack([frozen.text_cache[c][k] for c in captions]).to(device) for k in keys}


def _condition(frozen: Frozen, batch: dict[str, Any], prefix: str, drop: Tensor, device: torch.device,
               cache: bool) -> dict[str, Tensor]:
    fam = frozen.family
    if fam.conditioning == "class":
        labels = batch["class_label"].to(device)
        return {"class_labels": torch.where(drop.to(device), fam.null_labels(labels), labels)}
    captions = ["" if d else c for c, d in zip(batch[f"{prefix}caption"], drop.tolist())]
    return _captions(frozen, captions, device, cache)


@dataclass
class StepInputs:
    """What a trainer plugin's ``objective`` gets for one micro-batch (see `TrainerPlugin.objective`); it implements
    `difftune.methods.plugin.TrainingStep`, the interface methods see.

    Randomness: draw only from the global torch RNG (``torch.randn``, ``torch.randint``, ... on ``device``), as the
    helpers do. accelerate checkpoints that RNG on every process, so a resumed run draws what the uninterrupted one
    drew; a fresh ``torch.Generator`` or an unseeded library RNG would break exact resume. Draw with explicit
    shapes (``torch.randn(x.shape, ...)``): ``randn_like`` follows the memory layout of its argument, which can
    differ between runs (a cached tensor is contiguous, a VAE output on CPU is channels-last).

    Attributes:
        batch: the collated batch: ``pixel_values``/``caption``/``class_label``/``index`` for image data,
            ``caption`` and ``index`` for ``data.kind: prompts``, ``index`` only for ``data.kind: none``.
        model: the trained module as accelerate prepared it (DDP-wrapped when distributed, autocast under mixed
            precision). Call it for the pass that needs gradients, once per micro-batch.
        denoiser: the same module unwrapped: for passes without gradients (under ``torch.no_grad()``), for
            `difftune.methods.verbs.disable`/``enable``, for hooks.
        teacher: the original denoiser when the plugin's ``prepare`` returned another module (frozen, eval mode,
            on the device, in the weight dtype), else None.
        frozen: the parts that do not train (pipeline, family, noise scheduler, weight dtype, caches).
        config: the run's `TrainConfig`.
        device: the process's device.
        global_step: optimizer steps finished before this micro-batch (0 at the start, the checkpoint's step after a
            resume).
    """

    batch: dict[str, Any]
    model: nn.Module
    denoiser: nn.Module
    teacher: nn.Module | None
    frozen: Frozen
    config: TrainConfig
    device: torch.device
    global_step: int

    @property
    def pipe(self) -> Any:
        """The pipeline; its denoiser component is the trained module."""
        return self.frozen.pipe

    @property
    def family(self) -> Family:
        """How the pipeline conditions its denoiser (``conditioning``: "text" or "class")."""
        return self.frozen.family

    @property
    def noise_scheduler(self) -> Any:
        """The training scheduler: DDPM (``add_noise``, ``config.num_train_timesteps``, ...), for SD3/Flux a
        `FlowMatchEulerDiscreteScheduler` (``sigmas``, ``timesteps``)."""
        return self.frozen.noise_scheduler

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen weights (the mixed-precision dtype, else float32)."""
        return self.frozen.weight_dtype

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """(B, C, h, w) of latents at ``data.resolution``, for objectives that sample their own x_T."""
        pipe = self.pipe
        size = self.config.data.resolution // pipe.vae_scale_factor
        return (batch_size, int(pipe.vae.config.latent_channels), size, size)

    def draw(self, prefix: str = "") -> Noised:
        """The standard inputs for the batch's images (``prefix="class_"``: the DreamBooth class images): a
        posterior sample x0, label dropout, the conditioning, then ε, t and x_t, drawn in the default loss's order.

        Raises:
            DifftuneError: the batch has no images (a data-free ``data.kind``).
        """
        key = f"{prefix}pixel_values"
        if key not in self.batch:
            raise DifftuneError(f"this batch has no images (`{key}`; data.kind is {self.config.data.kind!r}): a "
                                "data-free objective must make its own inputs (see StepInputs.noised)")
        pixels = self.batch[key].to(self.device)
        keys = latent_keys(self.batch, prefix) if self.config.data.cache_latents else None
        latents = _latents(self.frozen, pixels, keys)
        drop = torch.rand(latents.shape[0]) < self.config.data.label_dropout
        cond = _condition(self.frozen, self.batch, prefix, drop, self.device, self.config.data.cache_text_embeddings)
        geometry = None
        if f"{prefix}original_size" in self.batch:  # each image's true size and crop (SDXL's time_ids)
            geometry = (self.batch[f"{prefix}original_size"], self.batch[f"{prefix}crop_top_left"])
        noised = self.noised(latents, self.family.denoiser_kwargs(cond, latents, geometry))
        noised.mask = latent_mask(self.batch, latents) if prefix == "" else None
        return noised

    def noised(self, latents: Tensor, kwargs: dict[str, Any]) -> Noised:
        """Noise given x0 ``latents`` as the default loss does: ε (plus the noise offset), t uniform, x_t; for SD3 and
        Flux the flow-matching draw (`difftune.train.flow`: σ from train.timestep_density, velocity target)."""
        sched, cfg = self.noise_scheduler, self.config
        if self.family.flow:
            from .flow import flow_noised

            return flow_noised(sched, cfg.train, self.family, latents, kwargs)  # type: ignore[arg-type]
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # layout-free, as in _latents
        if cfg.train.noise_offset:
            noise = noise + cfg.train.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                                 device=latents.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return Noised(latents, noise, t, noisy, target, kwargs)

    @property
    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction": what the denoiser predicts in training ("flow" for SD3/Flux: ε − x0)."""
        if self.family.flow:
            return "flow"
        return self.config.model.prediction_type or self.noise_scheduler.config.prediction_type

    def prompt_kwargs(self, captions: list[str], latents: Tensor) -> dict[str, Any]:
        """The denoiser's conditioning for ``captions`` (text families) at the shape of ``latents``; cached when
        ``data.cache_text_embeddings`` is on."""
        if self.family.conditioning != "text":
            raise DifftuneError(f"{type(self.pipe).__name__} is class-conditional: it has no prompts")
        cond = _captions(self.frozen, list(captions), self.device, self.config.data.cache_text_embeddings)
        return self.family.denoiser_kwargs(cond, latents)

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """``model``'s output for x_t (float32), with the learned-variance half of DiT/PixArt outputs dropped.

        Works for `model`, `denoiser`, `teacher` or any denoiser with the same call signature; under mixed
        precision the call runs in autocast (the prepared ``model`` does so by itself).
        """
        on = self.weight_dtype != torch.float32
        if getattr(model, "module", model) is self.denoiser and self.denoiser is not self.family.denoiser:
            model = self.family.denoiser  # a trained text encoder: the frozen denoiser predicts, gradients reach it
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=on):
            if self.family.flow:  # SD3/Flux: the family calls its transformer (Flux packs latents, takes σ)
                return self.family.predict(model, noisy, timesteps, kwargs).float()  # type: ignore[attr-defined]
            if "timestep" in _forward_params(model):
                out = model(noisy, timestep=timesteps, **kwargs)
            else:
                out = model(noisy, timesteps, **kwargs)
        pred = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        if pred.shape[1] == 2 * noisy.shape[1]:  # learned-variance models (DiT, PixArt): the mean half trains
            pred = pred[:, : noisy.shape[1]]
        return pred.float()

    def loss(self, pred: Tensor, noised: Noised) -> Tensor:
        """The default loss of prediction ``pred`` on ``noised``: MSE to the target, weighted per sample by Min-SNR
        (``train.snr_gamma``) and/or debiased estimation (``train.debiased_estimation``; `objectives.snr_weights`);
        flow matching: weighted by train.loss_weighting."""
        if self.family.flow:
            from .flow import flow_loss

            return flow_loss(pred, noised, self.config.train.loss_weighting,
                             int(self.noise_scheduler.config.num_train_timesteps))
        train = self.config.train
        weights = snr_weights(self.noise_scheduler, noised.timesteps, self.prediction_type, train.snr_gamma,
                              train.debiased_estimation)
        if weights is None and noised.mask is None:
            return F.mse_loss(pred.float(), noised.target.float())
        err = F.mse_loss(pred.float(), noised.target.float(), reduction="none")
        if noised.mask is not None:  # data.masks: masked latents add nothing (kohya's masked_loss: a plain mean)
            err = err * noised.mask
        if weights is None:
            return err.mean()
        per_sample = err.mean(dim=(1, 2, 3))
        return (per_sample * weights).mean()

    def default_loss(self) -> Tensor:
        """The trainer's standard loss on this batch: the autoencoder loss (``train.objective: autoencode``), else
        the denoising loss (plus the weighted prior-preservation part for DreamBooth)."""
        if self.config.train.objective == "autoencode":
            return self.model(self.batch["pixel_values"].to(self.device))
        parts = [("", 1.0)]
        if "class_pixel_values" in self.batch:
            parts.append(("class_", self.config.data.prior_loss_weight))
        total = torch.zeros((), device=self.device)
        for prefix, weight in parts:
            d = self.draw(prefix)
            total = total + weight * self.loss(self.predict(self.model, d.noisy, d.timesteps, d.kwargs), d)
        return total


class AutoencoderLoss(nn.Module):
    """L1 + MSE reconstruction + kl_weight · KL for training the VAE; a module so DDP sees one forward."""

    def __init__(self, vae: nn.Module, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: Tensor) -> Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(rec, pixels) + F.mse_loss(rec, pixels) + self.kl_weight * posterior.kl().mean()


@torch.no_grad()
def set_latent_scale(vae: nn.Module, dataset: Any, n: int = 512) -> float:
    """scaling_factor = 1 / std of the latents over (up to) ``n`` training images, as SD's 0.18215 was chosen."""
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(min(n, len(dataset)))])
    latents = torch.cat([vae.encode(pixels[i:i + 64].to(vae.device, vae.dtype)).latent_dist.sample()
                         for i in range(0, len(pixels), 64)])
    scale = float(1.0 / latents.float().std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def _forward_params(module: nn.Module) -> set[str]:
    base = getattr(module, "module", module)  # DDP-wrapped
    return set(inspect.signature(base.forward).parameters)

