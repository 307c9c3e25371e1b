"""One accelerate trainer for every method: ``main(cfg)`` builds, loops, checkpoints, validates and saves.

The trainer knows no method by name: it calls the hooks of the method's trainer plugin
(`difftune.methods.plugin.TrainerPlugin`: ``prepare``, ``trainable_parameters``, ``objective``, ``on_step``, ...). A
plugin whose ``prepare`` returns another module (a distillation student) trains that module, in the pipeline, with
the original as its frozen ``teacher`` (`adopt_student`).

What it builds comes from `build.py`, the losses from `loss.py`, checkpoints from `checkpoints.py`, the result's
safe save and a failed write's message from `saving.py`, the validation grid and model card from `reporting.py`;
conditioning from the pipeline family (`difftune.families`), data from `data.py` (images) / `sources.py` (data-free).

Exact resume: data order and augmentation are pure functions of (seed, epoch[, index]); noise and timesteps come
from the global RNG (accelerate's ``save_state``/``load_state``); checkpoints hold only what trains (trainable
tensors, optimizer, LR schedule, EMA: a safetensors file), never the frozen base."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import dump_yaml, to_dict
from ..errors import DifftuneError, bad_value
from ..families import Family, family_for
from ..methods.plugin import TrainerPlugin, check_trained_tensors_are_kept, plugin_for
from ..methods.verbs import refresh
from .build import build_accelerator, build_dataset, build_loader, load_training_pipeline, set_attention
from .cache import fill_caches
from .checkpoints import (
    check_finite_tensors,
    checkpoint_dirs,
    checkpoint_hooks,
    clean_leftovers,
    restore,
    save_checkpoint,
    weights_digest,
)
from .classimages import ensure_class_images
from .config import DATA_FREE_KINDS, IMAGE_KINDS, TrainConfig
from .flow import configure_family
from .hub import push_folder
from .interrupt import InterruptFlag, TrainingInterrupted
from .lock import check_unfinished, hold_output_dir, release_output_dir
from .loss import AutoencoderLoss, Frozen, StepInputs, set_latent_scale
from .objectives import configure_scheduler, with_scheduler
from .optimizers import build_optimizer, eval_mode, eval_weights, train_mode
from .reporting import flat_hparams, say, validate, write_model_card
from .saving import resume_command, save_result, saving
from .textenc import joint_plugin
from .valloss import report_validation_loss

logger = logging.getLogger("difftune.train")


@dataclass
class Run:
    """Everything one training run built; `main` passes it from setup to the loop to the final save."""

    cfg: TrainConfig
    accelerator: Any
    pipe: Any
    component: str  #: the pipeline component that trains ("unet", "transformer", "vae")
    family: Family
    plugin: TrainerPlugin
    denoiser: nn.Module  #: the trained module, unwrapped
    params: list[nn.Parameter]
    model: Any  #: what accelerate prepared (DDP-wrapped when distributed; the autoencoder loss for the VAE)
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    dataset: Any
    loader: Any
    sampler: Any
    frozen: Frozen
    progress: dict[str, Any] = field(default_factory=lambda: {"step": 0})
    warned_gradless: bool = False  #: a batch whose loss reached no trainable value was reported


def main(cfg: TrainConfig) -> Path:
    """Train ``cfg.method`` on ``cfg.model`` with ``cfg.data``; returns the saved result (adapter or pipeline).

    The output folder's lock is released however the run ends (a refusal, an error, an interrupt).

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint was saved and the exception names the command
            that resumes, or, during the final save, the save was finished first (`interrupt.py`).
        saving.SaveFailed: a write failed (a full disk); the message names the last complete checkpoint and the
            command resuming it.
    """
    try:
        return _train(cfg)
    finally:  # a no-op on the processes that hold none
        release_output_dir(cfg.output_dir)


def _train(cfg: TrainConfig) -> Path:
    """The run itself: set up, restore, train, save (`main` releases the lock that `setup` takes)."""
    run = setup(cfg)
    write_state = checkpoint_hooks(run.accelerator, run.plugin, run.denoiser, run.ema, run.progress)
    out = Path(cfg.output_dir)
    if run.accelerator.is_main_process:
        with saving(cfg, "preparing the output folder", out / "config.yaml"):
            out.mkdir(parents=True, exist_ok=True)
            clean_leftovers(out)  # under the output_dir lock taken in setup
            dump_yaml(cfg, out / "config.yaml")
        if cfg.logging.report_to != "none":
            run.accelerator.init_trackers("difftune", config=flat_hparams(to_dict(cfg)))
    resume = restore(run.accelerator, cfg)  # `latest` falls back past unreadable checkpoints, with a warning
    if resume is not None:
        run.progress["resumed"] = f"{resume.name} at step {run.progress['step']}"
        if run.accelerator.is_main_process:
            print(f"[difftune] resumed from {resume} at step {run.progress['step']}", flush=True)
    elif cfg.validation.at_start and run.accelerator.is_main_process:  # the baseline the later grids compare with
        _validate(run, 0)
    # Ctrl-C/SIGTERM: a checkpoint after the current step, or the final save finished first (interrupt.py)
    with InterruptFlag() as interrupt:
        try:
            train_loop(run, write_state, interrupt)
        except TrainingInterrupted:
            run.accelerator.end_training()
            raise
        if cfg.train.objective == "autoencode" and run.accelerator.is_main_process:
            logger.info("latent scaling_factor set to %.4f", set_latent_scale(run.denoiser, run.dataset))
        return finish(run, interrupt)


def load_frozen_parts(cfg: TrainConfig, accelerator: Any) -> tuple[Any, str, nn.Module, torch.dtype]:
    """The pipeline with every component frozen, on the device, in the weight dtype; the trained component's name,
    the module itself, and the weight dtype."""
    pipe, component, denoiser = load_training_pipeline(cfg)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module):
            if name == "vae" and weight_dtype == torch.float16 and getattr(module.config, "force_upcast", False):
                module.requires_grad_(False).to(accelerator.device)  # e.g. SDXL's VAE gives NaNs in fp16
                continue
            module.requires_grad_(False)
            # (a dtype argument, even fp32, makes diffusers warn about modules to keep in fp32)
            if weight_dtype == torch.float32:
                module.to(accelerator.device)
            else:
                module.to(accelerator.device, weight_dtype)
    return pipe, component, denoiser, weight_dtype


def setup(cfg: TrainConfig) -> Run:
    """Build the run: pipeline, plugin, trainable parameters, data, optimizer, LR schedule, EMA; seed the RNGs."""
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params

    method = cfg.method_config()
    plugin = plugin_for(method, cfg.adapter_name)
    if cfg.data.kind in DATA_FREE_KINDS and plugin.needs_images:
        raise bad_value("data.kind", cfg.data.kind, f"an image data set ({', '.join(IMAGE_KINDS)}) for method "
                        f"{method.method!r}", f"{method.method!r} trains with the standard diffusion loss, which "
                        "needs images (data.path); data-free kinds serve methods whose plugin has its own objective")
    accelerator = build_accelerator(cfg, plugin.partially_used)
    if accelerator.is_main_process:
        with saving(cfg, "preparing the output folder", cfg.output_dir):
            # one run per output folder (lock.py); a second run fails naming this one; `main` releases it
            hold_output_dir(cfg.output_dir)
            # a finished run there is refused unless overwrite/resume is asked for; overwrite drops its checkpoints
            check_unfinished(cfg.output_dir, overwrite=cfg.overwrite,
                             resuming=bool(cfg.checkpointing.resume_from_checkpoint))
    ensure_class_images(cfg, accelerator)  # DreamBooth class images sampled by the base model, when asked
    set_seed(cfg.seed)
    pipe, component, denoiser, weight_dtype = load_frozen_parts(cfg, accelerator)
    plugin.config = cfg.method_config(denoiser)  # SD3/Flux: the MMDiT default targets unless the config names some
    plugin = joint_plugin(cfg, plugin, pipe, accelerator.num_processes)  # model.train_text_encoder (textenc.py)
    family = family_for(pipe, denoiser)
    family.prepare_training()
    configure_family(cfg, family)
    configure_scheduler(cfg, pipe)  # prediction type, zero terminal SNR: the training scheduler copies it below
    set_attention(cfg, denoiser)
    trained = plugin.prepare(pipe, denoiser)
    if trained is not denoiser:
        family = adopt_student(cfg, accelerator, plugin, pipe, component, denoiser, trained, weight_dtype)
    denoiser = trained
    params = plugin.trainable_parameters(denoiser)
    if not params:
        raise DifftuneError(f"method {method.method!r} selected no trainable parameters; check its target_modules")
    check_trained_tensors_are_kept(plugin, denoiser, params)
    cast_training_params(denoiser, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()

    dataset = build_dataset(cfg, family)
    loader, sampler = build_loader(cfg, dataset, accelerator.num_processes, accelerator.process_index)
    lr = cfg.optimizer.lr if cfg.optimizer.lr is not None else plugin.default_lr()
    if cfg.optimizer.scale_lr:
        lr *= cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(cfg, plugin, params, lr)
    if accelerator.is_main_process:
        source = "optimizer.lr" if cfg.optimizer.lr is not None else f"{method.method}'s default"
        print(f"[difftune] learning rate {lr:.3e} ({source}); {sum(p.numel() for p in params):,} trainable values",
              flush=True)
    # Accelerate steps a prepared scheduler once per process per optimizer step: scale as the diffusers scripts do.
    lr_scheduler = get_scheduler(
        cfg.schedule.name, optimizer, num_warmup_steps=cfg.schedule.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.train.max_steps * accelerator.num_processes, num_cycles=cfg.schedule.num_cycles,
        power=cfg.schedule.power)
    module = AutoencoderLoss(denoiser, cfg.train.kl_weight) if cfg.train.objective == "autoencode" else denoiser
    model, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    # After prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts from the same values.
    ema = EMAModel(params, decay=cfg.train.ema_decay) if cfg.train.ema else None
    # Models were built from the same seed on every rank; from here on each rank draws its own noise and timesteps.
    set_seed(cfg.seed + accelerator.process_index)
    train_scheduler = FlowMatchEulerDiscreteScheduler if family.flow else DDPMScheduler  # a copy: never stepped
    frozen = Frozen(pipe, family, train_scheduler.from_config(pipe.scheduler.config), weight_dtype, {}, {})
    if cfg.data.cache_latents or cfg.data.cache_text_embeddings:
        fill_caches(cfg, frozen, dataset, accelerator.device)
    return Run(cfg, accelerator, pipe, component, family, plugin, denoiser, params, model, optimizer, lr_scheduler,
               ema, dataset, loader, sampler, frozen)


def adopt_student(cfg: TrainConfig, accelerator: Any, plugin: TrainerPlugin, pipe: Any, component: str,
                  teacher: nn.Module, student: nn.Module, weight_dtype: torch.dtype) -> Family:
    """``prepare`` returned ``student``: it becomes the pipeline's ``component`` (validation and ``save_trained``
    use it) and ``teacher`` the plugin's frozen teacher. Returns the conditioning family of the student."""
    if not isinstance(student, nn.Module):
        raise DifftuneError(f"the {plugin.config.method!r} trainer plugin's prepare returned "
                            f"{type(student).__name__}, not a torch module")
    teacher.requires_grad_(False).eval()
    # prepare may have moved or cast it; the teacher runs as the frozen parts do
    if weight_dtype == torch.float32:
        teacher.to(accelerator.device)
    else:
        teacher.to(accelerator.device, weight_dtype)
    plugin.teacher = teacher
    pipe.register_modules(**{component: student.to(accelerator.device)})
    family = family_for(pipe, student)
    family.prepare_training()
    configure_family(cfg, family)
    set_attention(cfg, student)
    return family


def train_loop(run: Run, write_state: Callable[[Path], None], interrupt: InterruptFlag) -> None:
    """Optimizer steps from ``run.progress["step"]`` to ``train.max_steps``, with checkpoints and validation; a
    signal caught by ``interrupt`` saves a checkpoint after the current step."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    bar = tqdm(total=cfg.train.max_steps, initial=run.progress["step"], desc="training",
               disable=not (accelerator.is_main_process and cfg.logging.progress_bar))
    run.model.train()
    train_mode(run.optimizer)  # schedule-free optimizers train on their own weight sequence (optimizers.py)
    _loop(run, write_state, interrupt, bar)
    bar.close()


def _gradless(run: Run, loss: Tensor, step: int) -> Tensor:
    """A micro-batch whose loss reaches no trainable value (e.g. class-gated trained parts, none of whose classes is
    in the batch): it contributes zero gradients instead of failing in backward (every process still runs backward,
    as DDP needs); said once per run, since data that never reaches the trained values trains nothing."""
    if not run.warned_gradless:
        run.warned_gradless = True
        say(f"warning: at step {step + 1} the loss depends on no trainable value, so that batch changes nothing "
            "(e.g. the trained parts are gated by class and the batch holds none of their classes; check that the "
            "data holds the classes being trained)")
    return loss + sum(p.reshape(-1)[:1].sum() * 0 for p in run.params)


def _loop(run: Run, write_state: Callable[[Path], None], interrupt: InterruptFlag, bar: Any) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    step = run.progress["step"]
    epoch, start = divmod(step * cfg.train.gradient_accumulation_steps, run.sampler.per_epoch)
    while step < cfg.train.max_steps:
        run.sampler.set_epoch(epoch, start)
        run.dataset.set_epoch(epoch)
        for batch in run.loader:
            with accelerator.accumulate(run.model):
                loss = step_loss(run, batch)
                if not loss.requires_grad:
                    loss = _gradless(run, loss, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(run.params, cfg.train.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step = run.progress["step"] = step + 1
            if run.ema is not None:
                run.ema.step(run.params)
            run.plugin.on_step(run.denoiser, step, cfg.train.max_steps, run.optimizer)
            logs = {"loss": loss.detach().item(), "lr": run.lr_scheduler.get_last_lr()[0]}
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=step)
            saved = cfg.checkpointing.checkpointing_steps and step % cfg.checkpointing.checkpointing_steps == 0
            if saved:
                save_checkpoint(accelerator, cfg, step, write_state)
            signum = interrupt.agreed(accelerator)
            if signum is not None:
                if not saved:
                    save_checkpoint(accelerator, cfg, step, write_state)
                bar.close()
                raise _interrupted(cfg, signum, step, accelerator.is_main_process)
            if cfg.validation.every_steps and step % cfg.validation.every_steps == 0 and step < cfg.train.max_steps:
                if accelerator.is_main_process:
                    _validate(run, step)
                accelerator.wait_for_everyone()
            if step >= cfg.train.max_steps:
                break
        epoch, start = epoch + 1, 0


def _interrupted(cfg: TrainConfig, signum: int, step: int, main_process: bool) -> TrainingInterrupted:
    """The exception for a signal after ``step``'s checkpoint was saved; prints the one line saying how to resume
    (`saving.resume_command`: the config the run wrote into its output folder, and the checkpoint just written)."""
    checkpoint = Path(cfg.output_dir) / "checkpoints" / f"checkpoint-{step}"
    command = resume_command(cfg, checkpoint)
    if main_process:
        say(f"interrupted at step {step}/{cfg.train.max_steps}; checkpoint saved to {checkpoint}; "
            f"resume with: {command}")
    return TrainingInterrupted(signum, checkpoint, command)


def _validate(run: Run, step: int, result: Path | None = None) -> Path | None:
    """The validation grid of ``step`` (main process), as a save step (`saving`)."""
    target = Path(run.cfg.output_dir) / "validation"
    with eval_weights(run.optimizer, run.denoiser), saving(run.cfg, f"writing the validation grid of step {step}",
                                                           target, result):
        report_validation_loss(run.cfg, run.accelerator, run.frozen, run.denoiser, step)
        return validate(run.cfg, run.accelerator, run.pipe, run.family, run.denoiser, step, run.frozen.weight_dtype)


def step_loss(run: Run, batch: dict[str, Any]) -> Tensor:
    """The loss of one micro-batch: the plugin's objective (or the standard loss) plus its extra term."""
    inputs = StepInputs(batch, run.model, run.denoiser, run.plugin.teacher, run.frozen, run.cfg,
                        run.accelerator.device, run.progress["step"])
    loss = run.plugin.objective(inputs)
    if loss is None:
        loss = inputs.default_loss()
    extra = run.plugin.extra_loss(run.denoiser)
    loss = loss if extra is None else loss + extra
    if not bool(torch.isfinite(loss.detach())):  # stop before a NaN/inf gradient reaches the weights
        raise DifftuneError(f"training diverged: the loss is {loss.item()} at step {run.progress['step'] + 1}; "
                            "stopped; nothing saved as the result (checkpoints written before this step are intact). "
                            "Hint: lower optimizer.lr, keep train.max_grad_norm set, or use bf16 instead of fp16")
    return loss


def finish(run: Run, interrupt: InterruptFlag) -> Path:
    """Put the EMA weights in place, report the digest, save the result, validate, write the model card.

    A signal caught by ``interrupt`` meanwhile does not stop the save (a run without checkpoints would be lost): the
    result is saved whole, the final validation grid is skipped, the model card written, then `TrainingInterrupted`
    names the result. A second signal exits at once, saying what is left."""
    cfg, accelerator, plugin, pipe = run.cfg, run.accelerator, run.plugin, run.pipe
    interrupt.action = "finishing the final save first, without the final validation grid"
    found = checkpoint_dirs(Path(cfg.output_dir))
    interrupt.abandon = "without saving the result: " + (
        f"resume from {found[-1]} with: {resume_command(cfg, found[-1])}" if found else "no checkpoint exists")
    accelerator.wait_for_everyone()
    if run.ema is not None:
        run.ema.copy_to(run.params)  # the EMA weights are the result
        refresh(run.denoiser)  # copy_to writes through .data, which adapters holding merged values cannot see
    eval_mode(run.optimizer, run.denoiser)  # schedule-free: the evaluation weights are the result
    method = plugin.config
    trained = plugin.checkpoint_tensors(run.denoiser)
    check_finite_tensors(trained, "the result")
    digest = weights_digest(trained)
    # Each rank reports its digest, so a distributed run can be checked for identical weights on every process.
    print(f"[difftune] rank {accelerator.process_index}: final trainable-weights digest {digest}", flush=True)
    out = Path(cfg.output_dir)
    result = out / ("adapter" if method.is_adapter else "pipeline")
    if not method.is_adapter:  # a saved pipeline keeps the precision it was loaded in, not the autocast dtype
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.to(torch.float32)
    if accelerator.is_main_process:
        with saving(cfg, f"saving the result {result}", result):  # whole or not at all (`save_result`)
            result = save_result(out, result.name, with_scheduler(cfg, pipe, lambda path: plugin.save_trained(
                pipe, run.denoiser, path, cfg.model.path, run.component)))  # the run's scheduler beside an adapter
        interrupt.abandon = f"(the result {result} is saved; the model card is not written)"
        skipped = interrupt.signum is not None  # the user wants to stop: the grid (minutes on a big model) can wait
        grid = None if skipped else _validate(run, run.progress["step"], result)
        with saving(cfg, "writing the model card", out / "README.md", result):
            write_model_card(cfg, result, grid, run.progress, digest)
        print(f"[difftune] saved {result}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if cfg.hub.push and accelerator.is_main_process and interrupt.signum is None:
        say(f"pushed to {cfg.hub.repo_id}: {push_folder(out, cfg.hub.repo_id, cfg.hub.private)}")
    if interrupt.signum is not None:
        if accelerator.is_main_process:
            say(f"interrupted during the final save, which was finished first: the result {result} is complete"
                + (" (the final validation grid was skipped)" if skipped else ""))
        raise TrainingInterrupted(interrupt.signum, None, None, result=result)
    return result
