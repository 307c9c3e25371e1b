"""BK-SDM: block-removed, knowledge-distilled denoisers (Kim, Song, Castells, Choi; ECCV 2024, arXiv 2305.15798).

Idea: remove whole blocks from a pretrained UNet (`difftune.compress.block_removal`: base / small / tiny or a user
plan; for DiT, PixArt, SD3 and Flux transformers, kept block lists per stack or ``half``; the student is a stock
diffusers model initialised from the teacher's kept blocks), then retrain the student with the teacher as a guide.
Not an adapter: like ``full``, the result is a whole model (a diffusers pipeline whose denoiser is the student),
loadable with the denoiser class's ``from_pretrained``.

Loss per batch, with one shared x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε (x0: (B, C, h, w) latents):

    L = λ_task ‖ε_S(x_t) - ε‖² + λ_out ‖ε_S(x_t) - ε_T(x_t)‖² + λ_feat Σ_l ‖F_S^l - F_T^l‖²

each ‖·‖² a mean over its elements (the target is the velocity for v-prediction models; SD3 and Flux draw x_t by
flow matching and the task term is their weighted flow loss, the output term compares velocities). F^l are the
outputs of the paper's blocks (`block_removal.feature_pairs`): every kept down and up stage; for tiny, the teacher's
``down_blocks.2.attentions.1.proj_out`` ↔ the student's ``down_blocks.2.attentions.0.proj_out``; for transformers
the end of each kept block's span (SD3/Flux: the image stream). The paper's λ are all 1 (its ``λ_OutKD``,
``λ_FeatKD``; the task term has weight 1).

Deliberate differences from the official ``kd_train_text_to_image.py``:

* features are captured by forward hooks on the *module objects* of the unwrapped teacher and student, found once
  in ``prepare``; the official code looks modules up by name in the wrapped model, which broke under DDP
  (BK-SDM issue #10: the ``module.`` prefix). Names never enter the training step here, so DDP/FSDP wrapping cannot
  break it.
* hooks only record during the objective's own forward passes (validation and checkpoint recomputation record
  nothing, so no tensors are kept alive between steps).
* ``train.snr_gamma`` weights only the task term; both KD terms stay (SSD-1B's script silently drops them then).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compress.block_removal import build_student, feature_output_index, feature_pairs, load_plan, teacher_to_student
from ..errors import DifftuneError, bad_value
from .base import Adapter, MethodConfig, Site, register_method
from .plugin import TrainerPlugin, register_plugin
from .verbs import adapter_tensors, inject, remove


@register_method("bk")
@dataclass
class BKConfig(MethodConfig):
    """Distil the denoiser into a block-removed student.

    Attributes:
        plan: ``base``, ``small``, ``tiny`` (UNets; BK-SDM-Base/Small/Tiny), ``half`` (transformers), or a YAML
            file or mapping of `RemovalPlan` fields (UNet stages/pairs/mid block/transformer depth; DiT/PixArt/SD3
            ``blocks`` or ``drop_every``, Flux also ``single_blocks`` or ``single_drop_every``).
        lambda_task: weight of the denoising loss of the student (the paper's L_task weight, 1).
        lambda_out: λ_OutKD, weight of the output distillation ‖ε_S - ε_T‖² (paper: 1).
        lambda_feat: λ_FeatKD, weight of the summed feature distillation Σ_l ‖F_S^l - F_T^l‖² (paper: 1).
    """

    target_modules: list[str] = field(default_factory=lambda: [".*"])  # unused: the whole student trains
    plan: str | dict[str, Any] = "small"
    lambda_task: float = 1.0
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    is_adapter = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_types()
        for name in ("lambda_task", "lambda_out", "lambda_feat"):
            if getattr(self, name) < 0:
                raise bad_value(name, getattr(self, name), "a weight ≥ 0", "the paper uses 1.0 for every term")
        load_plan(self.plan)  # a misspelled plan or a missing file fails when the config is read

    def make_adapter(self, base_layer: nn.Module, site: Site) -> Adapter | None:
        return None


class FeatureTap:
    """Forward hooks on (teacher, student) module pairs that record their outputs while `recording` is on.

    ``index``: the element of a tuple output that is recorded (0: a UNet stage's hidden state before its skips;
    1: an SD3/Flux block's image stream, after its context stream; `block_removal.feature_output_index`)."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]], index: int = 0) -> None:
        self.pairs = pairs
        self.index = index
        self.recording = False
        self.outputs: dict[int, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook) for pair in pairs for m in pair]

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.recording:  # tuple outputs: down blocks return their skips too, MMDiT blocks both streams
            self.outputs[id(module)] = output if isinstance(output, Tensor) else output[self.index]

    def loss(self) -> Tensor:
        """Σ_l MSE(F_S^l, F_T^l) over the pairs recorded since the last `clear`."""
        terms = [F.mse_loss(self.outputs[id(s)].float(), self.outputs[id(t)].detach().float())
                 for t, s in self.pairs]
        return torch.stack(terms).sum()

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@register_plugin("bk")
class BKPlugin(TrainerPlugin):
    """Builds the student from the teacher, trains all of it with task + output KD + feature KD, saves it."""

    config: BKConfig

    def default_lr(self) -> float:
        return 5e-5  # the paper's constant learning rate (batch 256)

    def prepare(self, pipe: Any, model: nn.Module) -> nn.Module:
        student = build_student(model, self.config.plan)
        pairs = feature_pairs(model.config, self.config.plan)
        self.tap = FeatureTap([(model.get_submodule(t), student.get_submodule(s)) for t, s in pairs],
                              feature_output_index(model.config))
        self.last_terms: dict[str, float] = {}
        return student.requires_grad_(True)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.parameters())

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        return dict(model.named_parameters())

    def objective(self, step: Any) -> Tensor:
        d = step.draw()  # one x_t for teacher and student, as in the paper
        self.tap.clear()
        self.tap.recording = True
        try:
            with torch.no_grad():
                eps_t = step.predict(step.teacher, d.noisy, d.timesteps, d.kwargs)
            eps_s = step.predict(step.model, d.noisy, d.timesteps, d.kwargs)
        finally:
            self.tap.recording = False
        task = step.loss(eps_s, d)
        out = F.mse_loss(eps_s, eps_t.float())
        feat = self.tap.loss()
        self.tap.clear()
        self.last_terms = {"task": task.item(), "out_kd": out.item(), "feat_kd": feat.item()}
        c = self.config
        return c.lambda_task * task + c.lambda_out * out + c.lambda_feat * feat

    def saved_tensors(self, model: nn.Module) -> list[Tensor]:
        return list(model.parameters())  # the student pipeline is saved whole

    def save_trained(self, pipe: Any, model: nn.Module, path: Path, base_model: str, component: str) -> Path:
        """The pipeline with the student as its denoiser, in diffusers format (stock classes and configs)."""
        pipe.save_pretrained(str(path))
        return Path(path)


def transfer_adapter(path: str | Path, student: nn.Module, teacher_config: Any, plan: str | dict[str, Any],
                     name: str | None = None, weight: float = 1.0) -> dict[str, Any]:
    """Load an adapter trained on the teacher onto its block-removed student, where the layers still exist.

    Keys are renamed by the plan's remap (e.g. BK-Base: teacher ``up_blocks.1.attentions.2`` is the student's
    ``up_blocks.1.attentions.1``), the parts on removed blocks are dropped, and the rest loads unchanged. The
    teacher's fingerprint is not checked (the student's layers are the teacher's, retrained). Model-level parts
    (SCEdit hint encoders and the like) are refused: their positions are tied to the teacher's blocks.

    Args:
        path: the adapter (folder or ``.safetensors``) saved on the teacher.
        student: the student denoiser (e.g. ``pipe.unet`` of a BK-distilled pipeline).
        teacher_config: the teacher denoiser's ``config``; plan: the plan the student was built with.

    Returns:
        ``{"name", "modules_kept", "modules_dropped"}``: the adapter's name and the teacher module names kept/dropped.
    """
    from ..serialization import MODEL_KEY, config_from_header, read_header, read_tensors

    header = read_header(path)
    config = config_from_header(header, path)
    tensors = read_tensors(path)
    if any(k.startswith(MODEL_KEY + ".") for k in tensors):
        raise DifftuneError(f"adapter {str(path)!r} has model-level parts ({config.method}); they are tied to the "
                            "teacher's block layout and cannot be transferred to a block-removed student")
    name = name or header.get("name") or "default"
    inject(student, config, name=name, weight=weight, freeze_base=False)
    live = adapter_tensors(student, name)
    rename = teacher_to_student(teacher_config, plan)
    mapped, kept, dropped = {}, set(), set()
    for key, value in tensors.items():
        module = key[: key.rindex(".")]
        new = rename(key)
        if new is not None and new in live:
            mapped[new] = value
            kept.add(module)
        else:
            dropped.add(module)
    missing = sorted(set(live) - set(mapped))
    if missing:
        remove(student, name)
        raise DifftuneError(f"adapter {str(path)!r} has nothing for {len(missing)} of the student's adapted "
                            f"tensors (first: {missing[:3]}); was it trained on this student's teacher, with this "
                            "plan?")
    with torch.no_grad():
        for key, value in mapped.items():
            live[key].copy_(value.to(dtype=live[key].dtype, device=live[key].device))
    return {"name": name, "modules_kept": sorted(kept), "modules_dropped": sorted(dropped)}
