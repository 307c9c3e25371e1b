"""VQ4DiT calibration: candidate assignments with softmax ratios, calibrated without data along the FP model's own
sampling trajectory (the paper and its deviations are in `vq4dit.py`'s docstring).

A standalone loop rather than a trainer plugin, because calibration is not the trainer's loop: each outer iteration
draws classes (prompts) and noise, runs the FP teacher's CFG sampling trajectory (SD3/Flux: `vq4dit_flow`), and
takes one optimizer step at every timestep on the teacher's latent x_t (both models see the same x_t; the student
never drives the trajectory), with freezing after each step. The trainer draws independent (x_0, t) pairs from data
and has no notion of a trajectory.

Per quantized Linear (shapes: N = d_out·d_in/d sub-vectors, n candidates)::

    cand (N, n) int64     the n nearest codewords (eq. 5), fixed
    z    (N, n)           ratio logits, r = softmax(z) (eq. 6)
    frozen (N,) bool      rows whose max r passed the threshold use one-hot r
    ŵ = Σ_j r_j C[cand_j] (N, d) → (d_out, d_in); a layer that is `hard` uses C[cand[argmax r]]
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..components import pipeline_kind
from ..errors import DifftuneError, bad_value
from .kmeans import nearest
from .vq4dit import VQ4DiTConfig, VQLinear, block_linears, kmeans_codebook, quantize_kmeans_, swap_module
from .vq4dit_flow import FlowTrajectory


class VQCalibLinear(nn.Module):
    """A Linear during calibration: codebook, candidates, ratio logits, bias (see the module docstring)."""

    def __init__(self, linear: nn.Linear, codebook: Tensor, config: VQ4DiTConfig) -> None:
        super().__init__()
        self.in_features, self.out_features, self.d = linear.in_features, linear.out_features, config.d
        w = linear.weight.detach().float().reshape(-1, config.d)  # (N, d)
        cand, dist2 = nearest(w, codebook, config.candidates, config.chunk)  # (N, n)
        if config.ratio_init == "distance":  # code: z_i = log(d_n / d_i), z_n = 0, so r_i ∝ 1/d_i (Euclidean)
            dist = dist2.sqrt().clamp(min=1e-12)
            z = torch.log(dist[:, -1:] / dist)
        else:  # paper: uniform 1/n
            z = torch.zeros_like(dist2)
        self.register_buffer("cand", cand)
        self.register_buffer("frozen", torch.zeros(w.shape[0], dtype=torch.bool, device=w.device))
        self.register_buffer("slot", torch.zeros(w.shape[0], dtype=torch.int64, device=w.device))  # frozen choice
        self.logits = nn.Parameter(z)
        self.codebook = nn.Parameter(codebook.float().clone(), requires_grad=config.codebook == "joint")
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        self.hard = False

    def ratios(self) -> Tensor:
        """r (N, n): softmax of the logits, one-hot on the slot chosen when a row was frozen."""
        r = self.logits.softmax(dim=1)
        onehot = nn.functional.one_hot(self.slot, r.shape[1]).to(r.dtype)
        return torch.where(self.frozen[:, None], onehot, r)

    def choice(self) -> Tensor:
        """The selected codeword of every sub-vector: cand[argmax r] (the frozen slot for frozen rows), (N,)."""
        slot = torch.where(self.frozen, self.slot, self.logits.argmax(dim=1))
        return self.cand.gather(1, slot[:, None])[:, 0]

    def weight_hat(self) -> Tensor:
        if self.hard:
            w = self.codebook[self.choice()]  # (N, d)
        else:
            w = (self.ratios()[..., None] * self.codebook[self.cand]).sum(dim=1)  # (N, n, d) → (N, d)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight_hat().to(x.dtype), b)

    def regularizer(self, form: str) -> Tensor:
        if self.hard:
            return self.logits.new_zeros(())
        r = self.ratios()
        if form == "eq9":  # Σ_n (1 − |2r − 1|) averaged over the N sub-vectors
            return (1 - (2 * r - 1).abs()).sum(dim=1).mean()
        live = r[~self.frozen]  # code: n · mean(r(1 − r)) over unfrozen rows
        return live.shape[1] * (live * (1 - live)).mean() if live.numel() else r.new_zeros(())

    @torch.no_grad()
    def freeze_step(self, threshold: float, layer_freeze: float, codebook_schedule: str) -> None:
        if self.hard:
            return
        r = self.logits.softmax(dim=1)
        top, arg = r.max(dim=1)
        new = ~self.frozen & (top > threshold)
        self.slot[new], self.frozen[new] = arg[new], True
        if self.frozen.float().mean() >= layer_freeze:
            # the whole layer switches to hard codes (the rest take their argmax); code: only now its codebook trains
            rest = ~self.frozen
            self.slot[rest], self.frozen[rest], self.hard = arg[rest], True, True
            if codebook_schedule == "after_freeze":
                self.codebook.requires_grad_(True)

    def to_vq_linear(self, dtype: torch.dtype) -> VQLinear:
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        return VQLinear.from_codes(self.codebook.detach().to(dtype), self.choice(), bias, self.in_features)


def _conditioning(pipe: Any, config: VQ4DiTConfig, gen: torch.Generator, device: torch.device
                  ) -> tuple[dict[str, Any], int]:
    """The denoiser's keyword inputs for one trajectory (conditional then unconditional halves), and the batch."""
    model = pipe.transformer
    kind = pipeline_kind(pipe)
    if kind == "dit":
        classes = config.class_labels or list(range(model.config.num_embeds_ada_norm))
        pick = torch.randint(len(classes), (config.batch,), generator=gen)
        labels = torch.tensor([classes[i] for i in pick.tolist()], device=device)
        if config.guidance > 1:  # DiTPipeline's null class is 1000
            labels = torch.cat([labels, torch.full_like(labels, 1000)])
        return {"class_labels": labels}, config.batch
    if kind == "pixart":
        if not config.prompts:
            raise bad_value("prompts", config.prompts, "a list of prompts for PixArt calibration",
                            "PixArt is text-conditioned: give prompts whose style the calibration should cover.")
        pick = torch.randint(len(config.prompts), (config.batch,), generator=gen).tolist()
        with torch.no_grad():  # the text encoder is not calibrated; its graph must not join the loss
            pos, pos_mask, neg, neg_mask = pipe.encode_prompt([config.prompts[i] for i in pick],
                                                              do_classifier_free_guidance=config.guidance > 1,
                                                              device=device, clean_caption=False)
        if config.guidance > 1:
            pos, pos_mask = torch.cat([pos, neg]), torch.cat([pos_mask, neg_mask])
        return {"encoder_hidden_states": pos, "encoder_attention_mask": pos_mask,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}, config.batch
    raise bad_value("pipe", type(pipe).__name__, "a DiT, PixArt-α, SD3 or Flux pipeline")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block in order (Flux: the joint blocks, then the single-stream blocks)."""
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


class _BlockTaps:
    """Forward hooks capturing every block's output (and, for the teacher, its input hidden states)."""

    def __init__(self, blocks: list[nn.Module], feed: list[Tensor] | None = None) -> None:
        self.outputs: list[Tensor] = []
        self.inputs: list[Tensor] = []
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i, feed), with_kwargs=True))
            # MMDiT blocks return (context, image): the image stream is compared
            self.handles.append(block.register_forward_hook(
                lambda m, a, out: self.outputs.append(out[-1] if isinstance(out, tuple) else out)))

    def _pre(self, i: int, feed: list[Tensor] | None) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs.append(hidden)
            if feed is None:
                return None
            # "teacher" block inputs: the quantized block i sees the FP block i's input
            return ((feed[i],) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": feed[i]})
        return hook

    def clear(self) -> None:
        self.outputs, self.inputs = [], []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def prepare_student(teacher: nn.Module, config: VQ4DiTConfig, log: Callable[[str], None] = print
                    ) -> tuple[nn.Module, dict[str, VQCalibLinear]]:
    """A copy of ``teacher`` whose selected Linears are `VQCalibLinear`s with k-means codebooks."""
    student = copy.deepcopy(teacher).float()
    student.requires_grad_(False)
    names = block_linears(student, config.target_modules, config.exclude_modules)
    layers: dict[str, VQCalibLinear] = {}
    start = time.perf_counter()
    for i, name in enumerate(names):
        linear = student.get_submodule(name)
        codebook, _ = kmeans_codebook(linear, config.k, config.d, config.kmeans_iters, config.seed + i, config.chunk)
        layers[name] = VQCalibLinear(linear, codebook, config)
        swap_module(student, name, layers[name])
    log(f"k-means: {len(names)} layers, k={config.k}, d={config.d}, {time.perf_counter() - start:.1f} s")
    return student, layers


def calibrate(pipe: Any, student: nn.Module, layers: dict[str, VQCalibLinear], config: VQ4DiTConfig,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Zero-data calibration of ``student`` against ``pipe.transformer`` along its own sampling trajectories."""
    teacher, scheduler = pipe.transformer, copy.deepcopy(pipe.scheduler)
    device = next(teacher.parameters()).device
    gen = torch.Generator("cpu").manual_seed(config.seed)
    groups = [{"params": [m.logits for m in layers.values()], "lr": config.lr_ratio},
              {"params": [m.codebook for m in layers.values()], "lr": config.lr_codebook},
              {"params": [m.bias for m in layers.values() if m.bias is not None], "lr": config.lr_bias}]
    opt = torch.optim.RMSprop([g for g in groups if g["params"]], alpha=0.9)
    flow = pipeline_kind(pipe) in ("sd3", "flux")  # SD3/Flux: their flow-matching sampler (`vq4dit_flow`)
    teacher_taps = _BlockTaps(_blocks(teacher))
    feed: list[Tensor] | None = [] if config.block_inputs == "teacher" else None
    student_taps = _BlockTaps(_blocks(student), feed)
    history, start = [], time.perf_counter()
    try:
        for it in range(config.iterations):
            if flow:
                traj = FlowTrajectory(pipe, config, gen, device)
                timesteps = traj.timesteps
            else:
                cond, b = _conditioning(pipe, config, gen, device)
                channels, size = teacher.config.in_channels, teacher.config.sample_size
                x = torch.randn(b, channels, size, size, generator=gen).to(device)
                scheduler.set_timesteps(config.steps)
                timesteps = scheduler.timesteps
            best, losses = float("inf"), []
            for t in timesteps:
                if flow:
                    args, kwargs = (), traj.model_kwargs(t)
                else:
                    inp = torch.cat([x, x]) if config.guidance > 1 else x
                    inp = scheduler.scale_model_input(inp, t)
                    args, kwargs = (inp,), {"timestep": t.reshape(1).to(device).expand(inp.shape[0]), **cond}
                teacher_taps.clear(), student_taps.clear()
                with torch.no_grad():
                    pred = teacher(*args, **kwargs, return_dict=False)[0]
                if feed is not None:
                    feed[:] = [h.detach() for h in teacher_taps.inputs]
                student(*args, **kwargs, return_dict=False)
                l_d = torch.stack([(s.float() - f.detach().float()).square().mean()
                                   for s, f in zip(student_taps.outputs, teacher_taps.outputs, strict=True)]).mean()
                l_r = torch.stack([m.regularizer(config.regularizer) for m in layers.values()]).sum()
                # eq9: always; code ("gated"): only when L_r rose above its lowest value in this trajectory
                if config.regularizer == "eq9" or l_r.item() > best:
                    loss = l_d + config.lambda_r * l_r
                else:
                    best, loss = l_r.item(), l_d
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for m in layers.values():
                    m.freeze_step(config.freeze_threshold, config.layer_freeze, config.codebook)
                losses.append(l_d.item())
                if flow:
                    traj.advance(pred, t)
                else:
                    x = _teacher_step(scheduler, pred, t, x, channels, config.guidance)
            frozen = sum(int(m.frozen.sum()) for m in layers.values()) / sum(m.frozen.numel() for m in layers.values())
            hard = sum(m.hard for m in layers.values())
            history.append({"iteration": it, "block_mse": sum(losses) / len(losses), "frozen": frozen, "hard": hard})
            log(f"iteration {it + 1}/{config.iterations}: block MSE {history[-1]['block_mse']:.3e}, "
                f"frozen {frozen:.1%}, hard layers {hard}/{len(layers)}")
    finally:
        teacher_taps.remove(), student_taps.remove()
    return {"history": history, "seconds": time.perf_counter() - start}


def _teacher_step(scheduler: Any, pred: Tensor, t: Tensor, x: Tensor, channels: int, guidance: float) -> Tensor:
    """The FP trajectory's next latent, as DiTPipeline/PixArt compute it (CFG on ε; learned σ dropped)."""
    eps = pred[:, :channels]
    if guidance > 1:
        cond, uncond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
    return scheduler.step(eps, t, x).prev_sample


def quantize_vq4dit(pipe: Any, config: VQ4DiTConfig, log: Callable[[str], None] = print) -> tuple[nn.Module,
                                                                                                    dict[str, Any]]:
    """VQ4DiT on ``pipe.transformer`` (DiT, PixArt-α, SD3, Flux): k-means codebooks, candidates, zero-data
    calibration (SD3/Flux along their flow-matching sampler, `vq4dit_flow`).

    Args:
        pipe: the FP pipeline (its transformer is the teacher and is not changed).
        config: the settings; ``config.iterations = 0`` keeps the initial candidate ratios (no calibration).
        log: progress messages.

    Returns:
        (the quantized transformer with `VQLinear`s, in the teacher's dtype; stats: seconds for k-means and
        calibration, per-iteration block MSE and frozen share).

    Raises:
        DifftuneError: not a DiT/PixArt/SD3/Flux pipeline, a text-conditioned one without prompts, or shapes k/d
            do not fit.
    """
    if not isinstance(config, VQ4DiTConfig):
        raise bad_value("config", type(config).__name__, "a VQ4DiTConfig")
    teacher = getattr(pipe, "transformer", None)
    if teacher is None or not hasattr(teacher, "transformer_blocks"):
        raise DifftuneError(f"{type(pipe).__name__} has no DiT/PixArt transformer; VQ4DiT quantizes DiT and "
                            "PixArt-α pipelines")
    if pipeline_kind(pipe) in ("sd3", "flux") and config.block_inputs == "teacher":  # before the (slow) k-means
        raise bad_value("block_inputs", "teacher", "'student' on SD3/Flux",
                        "an MMDiT block takes two streams; feeding it the FP block's input is implemented for DiT "
                        "and PixArt blocks only")
    dtype = next(teacher.parameters()).dtype
    start = time.perf_counter()
    student, layers = prepare_student(teacher, config, log)
    kmeans_s = time.perf_counter() - start
    stats = calibrate(pipe, student, layers, config, log) if config.iterations else {"history": [], "seconds": 0.0}
    for name, layer in layers.items():
        vq = layer.to_vq_linear(dtype)
        vq.module_name = name
        swap_module(student, name, vq)
    if dtype != torch.float32:
        student.to(dtype)
    student.requires_grad_(False)
    return student.eval(), {"kmeans_seconds": kmeans_s, "calibration_seconds": stats["seconds"], **stats}


#: What ``difftune quantize --method`` accepts.
QUANTIZERS = ("vq4dit", "kmeans", "rtn")


def quantize_pipeline_folder(model: str | Path, out: str | Path, method: str, config: VQ4DiTConfig,
                             log: Callable[[str], None] = print) -> Path:
    """Quantize the transformer of the local DiT/PixArt/SD3/Flux pipeline folder ``model`` and write it to ``out``
    (`save_compressed`, plus ``quantize_report.json`` with the settings and timings); load it back with
    ``load_compressed_pipeline(model, out)``.

    ``method``: ``vq4dit`` (calibrated), ``kmeans`` (k-means codebooks, nearest codeword) or ``rtn`` (per-channel
    round-to-nearest at the preset's bits, over the same Linears).
    """
    from ..fileio import atomic_write
    from ..generation import load_pipeline
    from .format import save_compressed
    from .rtn import quantize_rtn_

    if method not in QUANTIZERS:
        raise bad_value("method", method, f"one of {QUANTIZERS}")
    pipe = load_pipeline(str(model))
    if getattr(pipe, "transformer", None) is None:
        raise DifftuneError(f"{str(model)!r} holds a {type(pipe).__name__}; quantize works on DiT and PixArt-α "
                            "pipelines (a `transformer` component)")
    start = time.perf_counter()
    stats: dict[str, Any] = {}
    if method == "vq4dit":
        quantized, stats = quantize_vq4dit(pipe, config, log)
    elif method == "kmeans":
        quantized = pipe.transformer
        quantize_kmeans_(quantized, config)
    else:
        quantized = pipe.transformer
        quantize_rtn_(quantized, int(config.preset[0]), config.target_modules, config.exclude_modules)
    seconds = time.perf_counter() - start
    folder = save_compressed(quantized, out, base_model=str(model))
    report = {"method": method, "config": config.to_dict(), "seconds": seconds, **stats}
    atomic_write(folder / "quantize_report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    log(f"{method} {config.preset}: {seconds:.1f} s; wrote {folder}")
    return folder
