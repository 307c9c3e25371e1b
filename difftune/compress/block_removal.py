"""Block removal (BK-SDM): smaller denoisers that stay stock diffusers models, initialised from the teacher.

Kim, Song, Castells, Choi, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion" (ECCV 2024,
arXiv 2305.15798). The student is the teacher's architecture with whole blocks removed, built by diffusers itself
from an edited ``config.json`` (no custom class), and initialised by copying the kept blocks' weights.

UNet plans (SD1.x naming: down = [CA320, CA640, CA1280, D1280], ``layers_per_block`` L = 2 (res, attn) pairs per down
stage, L + 1 per up stage, mid = res-attn-res):

* **base**: one pair fewer in every stage: down stages keep their first L - 1 pairs, up stages their first L - 1 and
  their last (the paper keeps up pairs 0 and 2 of 3: the last pair takes the same skip as in the teacher, so the
  shapes line up). Beyond SD (L = 1, e.g. sd-mini): a stage keeps one pair unless diffusers can build it with none
  (it downsamples and keeps its width); then it keeps none.
* **small**: base without the mid block (``mid_block_type: null``).
* **tiny**: small without the innermost down stage and the matching up stage; the new innermost down stage has no
  downsampler. Student ``up_blocks.j`` takes teacher ``up_blocks.j + 1``.

A `RemovalPlan` says the same per stage, so a user plan (a YAML file) may keep any pairs, any number of outer stages,
and fewer transformer layers per attention (KOALA/SSD-1B-style depth reduction; kept: the first n of each stack).
For transformers (DiT, PixArt, SD3, Flux; `difftune.compress.transformer_removal`), a plan keeps a list of blocks
per stack (``transformer_blocks``; Flux's ``single_transformer_blocks`` too) or drops every k-th one; the named plan
``half`` drops every second block of every stack.

Weight remap (`student_sources`): every student key comes from one teacher key of the same shape; a plan whose
student has a key with no source or another shape is an error naming the key. The sizes of teacher and students
(parameters, MACs as thop counts them) are in `difftune.compress.macs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import DifftuneError, bad_value
from .transformer_removal import (
    feature_output_index,
    sd3_context_rows,
    stack_moves,
    transformer_feature_pairs,
    transformer_student_config,
)

__all__ = ["NAMED_PLANS", "TRANSFORMER_PLANS", "RemovalPlan", "build_student", "feature_output_index",
           "feature_pairs", "is_unet_config", "load_plan", "student_config", "student_sources", "teacher_to_student"]

NAMED_PLANS = ("base", "small", "tiny")
#: Named plans for transformer denoisers (DiT, PixArt, SD3, Flux).
TRANSFORMER_PLANS = ("half",)


@dataclass
class RemovalPlan:
    """What a student keeps of its teacher. UNet fields are ignored for transformers and vice versa.

    Attributes:
        name: a label (``base``, ``small``, ``tiny`` or the user's).
        stages: outer down/up stages kept (None: all); the innermost ones are removed.
        down_keep: per kept down stage, the teacher (res, attn) pair indices kept, in order (None: by `pairs`).
        up_keep: per kept up stage, the teacher pair indices kept; there must be one more than in the matching down
            stage (diffusers builds L + 1 up pairs for L down pairs). None: the first ``len(down)`` and the last
            (for an emptied down stage: the first, which reads the previous stage's width).
        pairs: pairs removed from every down stage when the keep lists are not given (base: 1).
        mid_block: keep the mid block.
        transformer_layers: per kept down stage, transformer layers kept in each attention (None: all; the first n).
        blocks: transformer (DiT/PixArt) or MMDiT joint ``transformer_blocks`` indices kept (None: see
            `drop_every`; on SD3/Flux, when both are None, all joint blocks are kept).
        drop_every: drop every k-th transformer block (k-1, 2k-1, ...); used when `blocks` is None.
        single_blocks: Flux's ``single_transformer_blocks`` indices kept (None: see `single_drop_every`, else all).
        single_drop_every: drop every k-th single block of Flux; ignored on models without single blocks (so one
            plan such as ``half`` fits every transformer).
    """

    name: str = "custom"
    stages: int | None = None
    down_keep: list[list[int]] | None = None
    up_keep: list[list[int]] | None = None
    pairs: int = 0
    mid_block: bool = True
    transformer_layers: list[int] | None = None
    blocks: list[int] | None = None
    drop_every: int | None = None
    single_blocks: list[int] | None = None
    single_drop_every: int | None = None

    @classmethod
    def named(cls, name: str) -> RemovalPlan:
        """One of the paper's plans: ``base``, ``small`` or ``tiny``; or ``half`` for transformers (every second
        block of every stack dropped)."""
        if name == "half":
            return cls(name="half", drop_every=2, single_drop_every=2)
        if name == "base":
            return cls(name="base", pairs=1)
        if name == "small":
            return cls(name="small", pairs=1, mid_block=False)
        if name == "tiny":
            return cls(name="tiny", pairs=1, mid_block=False, stages=-1)
        raise bad_value("plan", name, f"one of {list(NAMED_PLANS + TRANSFORMER_PLANS)} or a path to a YAML plan",
                        "e.g. plan: small (BK-SDM-Small: one pair fewer per stage and no mid block)")


def load_plan(plan: str | dict[str, Any] | RemovalPlan) -> RemovalPlan:
    """A plan from a name (``base``/``small``/``tiny``/``half``), a YAML file, an inline YAML mapping such as
    ``"{drop_every: 3}"``, a mapping, or a `RemovalPlan`."""
    if isinstance(plan, RemovalPlan):
        return plan
    if isinstance(plan, str) and plan in NAMED_PLANS + TRANSFORMER_PLANS:
        return RemovalPlan.named(plan)
    if isinstance(plan, str) and plan.lstrip().startswith("{"):
        try:
            plan = yaml.safe_load(plan)
        except yaml.YAMLError as e:
            raise bad_value("plan", plan, "an inline YAML mapping of RemovalPlan fields",
                            "e.g. '{drop_every: 3}'") from e
    elif isinstance(plan, str):
        path = Path(plan)
        if not path.is_file():
            raise bad_value("plan", plan, f"one of {list(NAMED_PLANS + TRANSFORMER_PLANS)}, an existing YAML file "
                            "or an inline mapping", "a plan file holds RemovalPlan fields, e.g. `stages: 3` and "
                            "`mid_block: false` (UNet) or `blocks: [0, 1, 5]` (transformer)")
        plan = yaml.safe_load(path.read_text()) or {}
    if not isinstance(plan, dict):
        raise bad_value("plan", plan, "a mapping of RemovalPlan fields")
    known = set(RemovalPlan.__dataclass_fields__)
    unknown = sorted(set(plan) - known)
    if unknown:
        raise DifftuneError(f"unknown removal-plan key(s) {unknown}; known: {sorted(known)}")
    return RemovalPlan(**plan)


# ------------------------------------------------------------------------------------------------------- UNet


def is_unet_config(config: dict[str, Any]) -> bool:
    """Whether a denoiser ``config`` (as a dict) is a UNet's (it has down blocks), not a transformer's."""
    return "down_block_types" in config


def _per_stage(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@dataclass
class _UNetLayout:
    """The resolved plan for one teacher UNet: which teacher pieces each student piece comes from."""

    stages: int
    down_keep: list[list[int]]
    up_keep: list[list[int]]
    tlayers: list[int] | None
    mid: bool
    up_offset: int = field(default=0)


def _may_be_empty(cfg: dict[str, Any], i: int, stages: int) -> bool:
    """diffusers builds a down stage with no (res, attn) pair when it downsamples and keeps its width."""
    widths = list(cfg["block_out_channels"])
    return i < stages - 1 and widths[max(i - 1, 0)] == widths[i]


def _unet_layout(teacher: dict[str, Any], plan: RemovalPlan) -> _UNetLayout:
    n = len(teacher["down_block_types"])
    stages = n if plan.stages is None else (n + plan.stages if plan.stages < 0 else plan.stages)
    if not 1 <= stages <= n:
        raise bad_value("plan.stages", plan.stages, f"1..{n} kept stages (or -k to remove the k innermost)")
    lpb = _per_stage(teacher["layers_per_block"], n)
    if plan.down_keep is not None:
        down = [list(k) for k in plan.down_keep]
    else:
        down = [list(range(max(lpb[i] - plan.pairs, 0 if _may_be_empty(teacher, i, stages) else 1)))
                for i in range(stages)]
    if len(down) != stages:
        raise bad_value("plan.down_keep", down, f"{stages} lists of pair indices (one per kept stage)")
    for i, keep in enumerate(down):
        if keep and (max(keep) >= lpb[i] or min(keep) < 0):
            raise bad_value(f"plan.down_keep[{i}]", keep, f"pair indices in 0..{lpb[i] - 1}")
        if not keep and not _may_be_empty(teacher, i, stages):
            raise bad_value(f"plan.down_keep[{i}]", keep, "at least one pair",
                            "a stage can lose all its pairs only when it downsamples and keeps its width")
    # up stage j of the student is teacher up stage j + offset; it mirrors down stage stages - 1 - j
    offset = n - stages
    if plan.up_keep is not None:
        up = [list(k) for k in plan.up_keep]
    else:
        # the first n and the last; an up stage mirroring an emptied down stage keeps its first pair, the one that
        # reads the previous stage's width (with equal widths its skip has the same shape as the last pair's)
        up = [list(range(len(down[stages - 1 - j]))) + [lpb[n - 1 - j - offset]] if down[stages - 1 - j] else [0]
              for j in range(stages)]
    for j, keep in enumerate(up):
        want = len(down[stages - 1 - j]) + 1
        if len(keep) != want or max(keep) > lpb[n - 1 - j - offset] or min(keep) < 0:
            raise bad_value(f"plan.up_keep[{j}]", keep, f"{want} pair indices in 0..{lpb[n - 1 - j - offset]}",
                            "diffusers builds one more up pair than down pairs per stage")
    tl = None
    if plan.transformer_layers is not None:
        tl = list(plan.transformer_layers)
        full = _per_stage(teacher.get("transformer_layers_per_block", 1), n)
        if len(tl) != stages or any(not 1 <= t <= full[i] for i, t in enumerate(tl)):
            raise bad_value("plan.transformer_layers", tl, f"{stages} counts, each 1..the teacher's {full[:stages]}")
    attn = [i for i in range(stages) if down[i] and "CrossAttn" in teacher["down_block_types"][i]]
    if not attn and not (plan.mid_block and teacher.get("mid_block_type", "x") is not None):
        raise bad_value("plan", plan.name, "a student that keeps at least one cross-attention stage",
                        f"this one keeps down stages {teacher['down_block_types'][:stages]} with pairs "
                        f"{[len(k) for k in down]} and no mid block: it could not read the prompt. (On SD1.x the "
                        "stage tiny removes has no attention; on a two-stage UNet such as sd-mini it holds them all.)")
    return _UNetLayout(stages, down, up, tl, plan.mid_block and teacher.get("mid_block_type", "x") is not None,
                       offset)


def student_config(teacher: dict[str, Any], plan: str | dict[str, Any] | RemovalPlan) -> dict[str, Any]:
    """The student's diffusers config: the teacher's ``config`` with the plan's removals applied."""
    plan = load_plan(plan)
    cfg = {k: v for k, v in dict(teacher).items() if not k.startswith("_")}
    if not is_unet_config(cfg):
        return transformer_student_config(cfg, plan)
    lay = _unet_layout(cfg, plan)
    s, n = lay.stages, len(cfg["down_block_types"])
    for key in ("down_block_types", "block_out_channels"):
        cfg[key] = list(cfg[key])[:s]
    cfg["up_block_types"] = list(cfg["up_block_types"])[n - s:]
    for key in ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention"):
        if isinstance(cfg.get(key), (list, tuple)):
            cfg[key] = list(cfg[key])[:s]
    cfg["layers_per_block"] = [len(k) for k in lay.down_keep]
    if len(set(cfg["layers_per_block"])) == 1:
        cfg["layers_per_block"] = cfg["layers_per_block"][0]
    if lay.tlayers is not None:
        cfg["transformer_layers_per_block"] = lay.tlayers
    elif isinstance(cfg.get("transformer_layers_per_block"), (list, tuple)):
        cfg["transformer_layers_per_block"] = list(cfg["transformer_layers_per_block"])[:s]
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise bad_value("teacher reverse_transformer_layers_per_block", cfg["reverse_transformer_layers_per_block"],
                        "None (an asymmetric teacher is not supported by the named plans)")
    if not lay.mid:
        cfg["mid_block_type"] = None
    return cfg


def _stage_sources(lay: _UNetLayout, tcfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(student prefix, teacher prefix) for every block piece that moves; everything else keeps its name."""
    pairs = []
    for i, keep in enumerate(lay.down_keep):
        for k, t in enumerate(keep):
            pairs += [(f"down_blocks.{i}.resnets.{k}.", f"down_blocks.{i}.resnets.{t}."),
                      (f"down_blocks.{i}.attentions.{k}.", f"down_blocks.{i}.attentions.{t}.")]
        pairs.append((f"down_blocks.{i}.downsamplers.", f"down_blocks.{i}.downsamplers."))
    for j, keep in enumerate(lay.up_keep):
        tj = j + lay.up_offset
        for k, t in enumerate(keep):
            pairs += [(f"up_blocks.{j}.resnets.{k}.", f"up_blocks.{tj}.resnets.{t}."),
                      (f"up_blocks.{j}.attentions.{k}.", f"up_blocks.{tj}.attentions.{t}.")]
        pairs.append((f"up_blocks.{j}.upsamplers.", f"up_blocks.{tj}.upsamplers."))
    return pairs


def student_sources(teacher_cfg: dict[str, Any], student_keys: list[str],
                    plan: str | dict[str, Any] | RemovalPlan) -> dict[str, str]:
    """Student state-dict key → teacher key (the paper's remap; the rest keep their names)."""
    plan = load_plan(plan)
    if is_unet_config(teacher_cfg):
        moves = _stage_sources(_unet_layout(dict(teacher_cfg), plan), dict(teacher_cfg))
    else:
        moves = stack_moves(dict(teacher_cfg), plan)[0]
    out = {}
    for key in student_keys:
        src = key
        for s, t in moves:
            if key.startswith(s):
                src = t + key[len(s):]
                break
        out[key] = src
    return out


def teacher_to_student(teacher_cfg: dict[str, Any], plan: str | dict[str, Any] | RemovalPlan):
    """A function mapping a teacher key (``module.path.tensor``) to the student's name for it, or None when the
    plan removed that module (a removed pair, the mid block, an inner stage, a dropped transformer block)."""
    plan = load_plan(plan)
    cfg = dict(teacher_cfg)
    if is_unet_config(cfg):
        lay = _unet_layout(cfg, plan)
        moves = [(t, s) for s, t in _stage_sources(lay, cfg)]
        # every kept piece of a stage is in `moves`; anything else in a stage was removed
        removed = re.compile(r"^(down_blocks|up_blocks)\.\d+\." + ("" if lay.mid else r"|^mid_block\."))
    else:
        pairs, removed = stack_moves(cfg, plan)
        moves = [(t, s) for s, t in pairs]

    def rename(key: str) -> str | None:
        for t, s in moves:
            if key.startswith(t):
                return s + key[len(t):]
        return None if removed.match(key) else key

    return rename


def build_student(teacher: nn.Module, plan: str | dict[str, Any] | RemovalPlan) -> nn.Module:
    """The student as the teacher's own diffusers class, from `student_config`, with the teacher's kept weights.

    Works on the meta device too (then nothing is copied). The student is float32 unless the teacher is on meta.

    Raises:
        DifftuneError: a student tensor has no teacher source of the same shape (a user plan that does not fit).
    """
    cfg = student_config(teacher.config, plan)
    on_meta = any(p.is_meta for p in teacher.parameters())
    with torch.device("meta") if on_meta else torch.random.fork_rng(devices=[]):
        student = type(teacher).from_config(cfg)
    if on_meta:
        return student
    tstate = teacher.state_dict()
    sstate = student.state_dict()
    sources = student_sources(teacher.config, list(sstate), plan)
    values, bad = {}, []
    for k, want in sstate.items():
        src = tstate.get(sources[k])
        if src is not None and src.shape != want.shape:  # SD3's last joint block from one that was not last
            src = sd3_context_rows(dict(teacher.config), k, src, want.shape)
        if src is None or src.shape != want.shape:
            bad.append(f"{k} ← {sources[k]}")
        else:
            values[k] = src.detach().float().clone()
    if bad:
        raise DifftuneError(f"the plan's student has {len(bad)} tensor(s) without a teacher source of the same shape, "
                            f"first: {bad[:3]}; check down_keep/up_keep against the teacher's blocks")
    student.load_state_dict(values)
    return student.to(next(teacher.parameters()).device)


# ----------------------------------------------------------------------------------------------- feature KD


def feature_pairs(teacher_cfg: dict[str, Any], plan: str | dict[str, Any] | RemovalPlan) -> list[tuple[str, str]]:
    """(teacher module, student module) whose outputs the feature loss matches (the paper's block outputs).

    UNet: the output of every kept down and up stage; where the student's stage lost its downsampler (tiny), the
    paper's choice: the last attention's ``proj_out`` (else the last resnet) of the teacher's stage ↔ the student's.
    The mid block is never distilled. Transformers: per stack, student block j ↔ the teacher block just before the
    next kept one (the end of the span that j replaces); MMDiT blocks are compared on their image stream
    (`feature_output_index`).
    """
    plan = load_plan(plan)
    cfg = dict(teacher_cfg)
    if not is_unet_config(cfg):
        return transformer_feature_pairs(cfg, plan)
    lay = _unet_layout(cfg, plan)
    n = len(cfg["down_block_types"])
    lpb = _per_stage(cfg["layers_per_block"], n)
    out = []
    for i, keep in enumerate(lay.down_keep):
        if i == lay.stages - 1 and i < n - 1:  # the teacher's stage ends in a downsampler the student lacks
            part = "attentions" if "CrossAttn" in cfg["down_block_types"][i] else "resnets"
            tail = ".proj_out" if part == "attentions" else ""
            out.append((f"down_blocks.{i}.{part}.{lpb[i] - 1}{tail}", f"down_blocks.{i}.{part}.{len(keep) - 1}{tail}"))
        else:
            out.append((f"down_blocks.{i}", f"down_blocks.{i}"))
    out += [(f"up_blocks.{j + lay.up_offset}", f"up_blocks.{j}") for j in range(lay.stages)]
    return out
