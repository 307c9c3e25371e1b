"""A module's weight update in the forms files store it, and the reading of other tools' files into them.

Every format difftune exchanges stores, per module, one of four shapes of the same thing, ΔW:

* `LowRank`: ΔW = s · U D (kohya ``lora_down``/``lora_up``/``alpha``, LyCORIS LoCon, diffusers/peft ``lora_A``/
  ``lora_B``), or with a DoRA magnitude m (kohya/LyCORIS ``dora_scale``, peft ``lora_magnitude_vector``)
  ΔW = m ⊙ (W0 + s U D) / ‖W0 + s U D‖_c − W0, which needs the base weight W0.
* `Hadamard`: ΔW = s · (W1a W1b) ⊙ (W2a W2b) (LyCORIS LoHa ``hada_w{1,2}_{a,b}``; exactly a rank-r² `LowRank`,
  `loha_as_low_rank`).
* `Kron`: ΔW = W1 ⊗ W2 (LyCORIS LoKr).
* `Dense`: ΔW itself, per parameter (LyCORIS "full" ``diff``/``diff_b``, norm ``w_norm``/``b_norm``).

`read_file` turns a kohya/LyCORIS or diffusers/peft ``.safetensors`` into ``{component: {module key: update}}``
and refuses, by name, every key it does not understand (nothing is dropped silently). Module keys stay as the file
spells them (kohya names or diffusers paths); `difftune.interop.importer` maps them onto a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import DifftuneError, bad_value
from .kohya import KOHYA_COMPONENTS, group_by_module, read_safetensors
from .layouts import attn_procs_key, is_attn_procs_key, path_groups, untucker
from .ldm import LDM_COMPONENT, LDM_PREFIX

#: Components whose name leads a diffusers/peft key (``unet.down_blocks...lora_A.weight``).
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "prior")
LORA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
DENSE_PARTS = {"diff": "weight", "diff_b": "bias", "w_norm": "weight", "b_norm": "bias"}
#: Parts we recognise but cannot represent, and why (the error names them instead of calling them unknown).
#: (Tucker cores, ``hada_t1``/``hada_t2``/``lokr_t2``/``lora_mid.weight``, are folded into plain forms by
#: `layouts.untucker`.)
TUCKER_PARTS = {"hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight"}
REFUSED_PARTS = {"lokr_t1": "a Tucker core on LoKr's w1 (LyCORIS never writes one)", "scalar": "LyCORIS use_scalar",
                 "oft_blocks": "OFT", "oft_diag": "OFT", "weight": "a whole replaced weight (not a difference)"}
#: Every part name a kohya/LyCORIS module's keys may end in.
KOHYA_PARTS = LORA_PARTS | LOHA_PARTS | LOKR_PARTS | TUCKER_PARTS | set(DENSE_PARTS) | set(REFUSED_PARTS)


@dataclass
class LowRank:
    """ΔW = scale · up @ down (reshaped to the layer): down (r, d_in[, k, k]), up (d_out, r[, 1, 1]).

    ``alpha``/``rslora`` record how the file stated the scale (α / r, or α / √r), so an import can keep the same
    config and reproduce the scale bit for bit; None where the scale came from elsewhere (LoHa, an SVD).
    ``magnitude`` (d_out,) makes it DoRA; its ΔW then depends on W0 and `delta` refuses (see `comparable`).
    """

    down: Tensor
    up: Tensor
    scale: float
    alpha: float | None = None
    rslora: bool = False
    magnitude: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def low_rank(self) -> Tensor:
        """s · U D in fp32, reshaped to the layer."""
        d, u = self.down.float(), self.up.float()
        return (u.flatten(1) @ d.flatten(1)).view(u.shape[0], *d.shape[1:]) * self.scale

    def delta(self) -> dict[str, Tensor]:
        if self.magnitude is not None:
            raise DifftuneError("a DoRA module's ΔW depends on the base weights; load it into its model to get ΔW")
        return {"weight": self.low_rank()}


@dataclass
class Hadamard:
    """ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b): w1a, w2a (d_out, r), w1b, w2b (r, d_in·k·k) (LyCORIS LoHa).

    ``alpha`` is the file's (None: α = r); the layer's shape comes from the model it is loaded into.
    """

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    scale: float
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    def delta(self) -> dict[str, Tensor]:
        w1 = self.w1a.float() @ self.w1b.float()
        return {"weight": w1 * (self.w2a.float() @ self.w2b.float()) * self.scale}  # (d_out, d_in·k·k)

    def as_low_rank(self) -> LowRank:
        """The exactly equal LoRA of rank r² (`loha_as_low_rank`)."""
        return loha_as_low_rank({"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a,
                                 "hada_w2_b": self.w2b, "alpha": torch.tensor(self.alpha or self.rank)}, "LoHa")


@dataclass
class Kron:
    """ΔW = kron(w1, w2): w1 (a1, a2), w2 (b1, b2[, k, k]) (LyCORIS's convention: the kernel is in w2)."""

    w1: Tensor
    w2: Tensor

    def delta(self) -> dict[str, Tensor]:
        a, b = self.w1.float(), self.w2.float()
        return {"weight": torch.kron(a.view(*a.shape, *[1] * (b.dim() - 2)), b)}


@dataclass
class Dense:
    """Δ of each parameter as is (``weight``, ``bias``); ``norm`` marks a GroupNorm/LayerNorm (LyCORIS w_norm)."""

    params: dict[str, Tensor] = field(default_factory=dict)
    norm: bool = False

    def delta(self) -> dict[str, Tensor]:
        return {k: v.float() for k, v in self.params.items()}


Update = LowRank | Hadamard | Kron | Dense


def comparable(update: Update) -> dict[str, Tensor]:
    """What two equal updates agree on: ΔW, or for DoRA (whose ΔW needs W0) s·U D and m, which fix ΔW for every W0."""
    if isinstance(update, LowRank) and update.magnitude is not None:
        return {"weight": update.low_rank(), "magnitude": update.magnitude.float().flatten()}
    return update.delta()


def max_error(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max |a − b| over the parameters of two deltas (a parameter missing on one side counts as 0 there)."""
    worst = 0.0
    for key in set(a) | set(b):
        x = a.get(key)
        y = b.get(key)
        x = torch.zeros_like(y) if x is None else x.float()
        y = torch.zeros_like(x) if y is None else y.float().reshape(x.shape)
        worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return worst


def low_rank_approximation(dw: Tensor, rank: int) -> tuple[LowRank, float]:
    """The best rank-``rank`` `LowRank` of ΔW (truncated SVD, Eckart–Young) and its max abs reconstruction error.

    ΔW is flattened to (d_out, d_in·k·k); U_r √Σ_r becomes ``up`` and √Σ_r V_rᵀ ``down``, scale 1 (alpha = rank).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad_value("rank", rank, "an integer >= 1", "the rank of the LoRA approximation, e.g. --rank 16")
    w = dw.float()
    flat = w.reshape(w.shape[0], -1)  # (d_out, d_in·k·k)
    r = min(rank, *flat.shape)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    root = s[:r].sqrt()
    up = u[:, :r] * root  # (d_out, r)
    down = root[:, None] * vh[:r]  # (r, d_in·k·k)
    if w.dim() == 4:
        up, down = up[:, :, None, None], down.reshape(r, *w.shape[1:])
    approx = LowRank(down.contiguous(), up.contiguous(), 1.0)
    return approx, float((approx.delta()["weight"] - w).abs().max())


def loha_as_low_rank(parts: dict[str, Tensor], key: str) -> LowRank:
    """LoHa's ΔW = (α/r)·(W1a W1b) ⊙ (W2a W2b) as an exactly equal LoRA of rank r².

    (A B) ⊙ (C D) = Σ_ij (a_i ⊙ c_j)(b_i ⊙ d_j)ᵀ over the columns a, c of A, C and rows b, d of B, D: the LoRA's up
    has the r² columns a_i ⊙ c_j and its down the r² rows b_i ⊙ d_j (a Khatri–Rao product), so no new method is
    needed for LoHa and the result combines with every other adapter as a plain LoRA.
    """
    missing = sorted({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - set(parts))
    if missing:
        raise DifftuneError(f"{key}: a LoHa module needs hada_w1_a/b and hada_w2_a/b; missing {missing}")
    w1a, w1b = parts["hada_w1_a"].float(), parts["hada_w1_b"].float()  # (d_out, r), (r, d_in·k·k)
    w2a, w2b = parts["hada_w2_a"].float(), parts["hada_w2_b"].float()
    if w1a.dim() != 2 or w2a.dim() != 2 or w1b.dim() != 2 or w2b.dim() != 2 or w1a.shape[0] != w2a.shape[0] \
            or w1b.shape[1] != w2b.shape[1] or w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
        raise DifftuneError(f"{key}: LoHa factors of shapes {[tuple(t.shape) for t in (w1a, w1b, w2a, w2b)]} do not "
                            "form (d_out, r) (r, d_in) pairs of one layer")
    r = w1b.shape[0]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)  # (d_out, r1·r2)
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])  # (r1·r2, d_in·k·k)
    return LowRank(down, up, _alpha_scale(parts, r))


def _alpha_scale(parts: dict[str, Tensor], rank: int) -> float:
    """α / r, with kohya's convention that a missing (or zero) alpha means α = r."""
    alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
    if not math.isfinite(alpha):
        raise DifftuneError(f"alpha {alpha} is not a finite number")
    return (alpha if alpha != 0 else rank) / rank


def _kohya_update(key: str, parts: dict[str, Tensor]) -> Update:
    names = set(parts)
    refused = sorted(REFUSED_PARTS[p] for p in names if p in REFUSED_PARTS)
    if refused:
        raise DifftuneError(f"{key}: {', '.join(sorted(set(refused)))} has no difftune representation; "
                            "LoRA/LoCon (DoRA included), LoHa, LoKr and full (diff) modules import")
    parts = untucker(key, parts)
    names = set(parts)
    if names <= LORA_PARTS and {"lora_down.weight", "lora_up.weight"} <= names:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        r = int(down.shape[0])
        scale = _alpha_scale(parts, r)
        magnitude = _dora_scale(key, parts["dora_scale"], int(up.shape[0])) if "dora_scale" in parts else None
        return LowRank(down, up, scale, alpha=scale * r if "alpha" not in parts else float(parts["alpha"]) or r,
                       magnitude=magnitude)
    if "dora_scale" in names:
        raise DifftuneError(f"{key}: a DoRA magnitude (dora_scale) on a LoHa/LoKr module (LyCORIS's weight "
                            "decomposition of another algorithm) has no difftune representation; LoRA/LoCon DoRA "
                            "imports")
    if names <= LOHA_PARTS and "hada_w1_a" in names:
        return _hadamard(key, parts)
    if names <= LOKR_PARTS and any(p.startswith("lokr_w1") for p in names):
        return _lokr(key, parts)
    if names and names <= set(DENSE_PARTS):
        norm = bool(names & {"w_norm", "b_norm"})
        if norm and names & {"diff", "diff_b"}:
            raise DifftuneError(f"{key}: mixes a full-module diff with norm w_norm/b_norm parts")
        return Dense({DENSE_PARTS[p]: v for p, v in parts.items()}, norm=norm)
    raise DifftuneError(f"{key}: parts {sorted(names)} are no LoRA (lora_down/lora_up/alpha), LoHa (hada_*), LoKr "
                        "(lokr_*) or full (diff/diff_b, w_norm/b_norm) module")


def _hadamard(key: str, parts: dict[str, Tensor]) -> Hadamard:
    """A LoHa module, its factors checked (`loha_as_low_rank` checks the same) and α/r applied as LyCORIS does."""
    lora = loha_as_low_rank(parts, key)  # validates the four factors; its scale is α / r
    if parts["hada_w1_a"].shape[1] != parts["hada_w2_a"].shape[1]:
        raise DifftuneError(f"{key}: LoHa factors of ranks {parts['hada_w1_a'].shape[1]} and "
                            f"{parts['hada_w2_a'].shape[1]}; LyCORIS writes one rank for both products")
    alpha = lora.scale * int(parts["hada_w1_b"].shape[0])
    return Hadamard(*(parts[p] for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")), lora.scale,
                    alpha=alpha)


def _dora_scale(key: str, value: Tensor, d_out: int) -> Tensor:
    """A kohya/LyCORIS ``dora_scale`` as m (d_out,): LyCORIS writes (d_out, 1[, 1, 1]) (its default ``wd_on_out``),
    diffusers' kohya converter peft's flat (d_out,). A (1, d_in...) scale (``wd_on_out=False``: the norm of each
    input column) is another decomposition, refused."""
    if value.numel() == d_out and (value.dim() == 1 or value.shape[0] == d_out):
        return value.reshape(d_out)
    raise DifftuneError(f"{key}: dora_scale of shape {tuple(value.shape)} is no magnitude per output channel (d_out = "
                        f"{d_out}); LyCORIS's wd_on_out=False (a norm per input channel) has no difftune "
                        "representation")


def _lokr(key: str, parts: dict[str, Tensor]) -> Kron:
    """W1 ⊗ W2 with low-rank factors multiplied out and α/dim applied (LyCORIS: only when a factor is low-rank)."""
    w1 = parts.get("lokr_w1")
    if w1 is None and {"lokr_w1_a", "lokr_w1_b"} <= set(parts):
        w1 = parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    w2 = parts.get("lokr_w2")
    if w2 is None and {"lokr_w2_a", "lokr_w2_b"} <= set(parts):
        w2 = parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float()  # (b1, b2·k·k): reshaped by the importer
    if w1 is None or w2 is None or w1.dim() != 2:
        raise DifftuneError(f"{key}: needs lokr_w1 (or lokr_w1_a + lokr_w1_b) and lokr_w2 (or lokr_w2_a + lokr_w2_b)")
    rank_part = parts.get("lokr_w1_a", parts.get("lokr_w2_a"))
    scale = 1.0 if rank_part is None else _alpha_scale(parts, int(rank_part.shape[1]))
    return Kron(w1.float() * scale, w2.float())


def file_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


#: diffusers/peft key endings → the part they hold (diffusers' own converter writes ``lora.down``/``lora.up``).
DIFFUSERS_PARTS = {".lora_A.weight": "lora_A.weight", ".lora_B.weight": "lora_B.weight",
                   ".lora.down.weight": "lora_A.weight", ".lora.up.weight": "lora_B.weight", ".alpha": "alpha",
                   ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"}


def detect_format(keys: list[str]) -> str:
    """"diffusers" (``lora_A``/``lora_B`` keys, peft's names, diffusers' ``lora.down``/``lora.up`` or its old
    attention-processor keys) or "kohya" (``<prefix>_<module>.<part>`` keys, and ComfyUI's generic
    ``diffusion_model.<LDM path>.<part>``, whatever the part's spelling)."""
    keys = [k for k in keys if not k.startswith(LDM_PREFIX)]
    if any(".lora_A." in k or ".lora_B." in k or k.endswith((".lora.down.weight", ".lora.up.weight"))
           or is_attn_procs_key(k) for k in keys):
        return "diffusers"
    return "kohya"


def read_file(path: str | Path) -> tuple[str, dict[str, dict[str, Update]]]:
    """The format and ``{component: {module key: update}}`` of a kohya/LyCORIS or diffusers/peft file.

    The component is "" where the key names none (a bare peft file, a kohya prefix such as ``lycoris_``): the
    denoiser of whatever it is loaded into. kohya's ``lora_unet`` is "unet".

    kohya keys keep their kohya module name (``lora_unet_...``, resolved against a model later); diffusers keys
    become module paths relative to their component. A key of no known kind is an error listing such keys.
    """
    tensors = read_safetensors(path, "a LoRA/LyCORIS .safetensors file")
    if not tensors:
        raise DifftuneError(f"{str(path)!r} holds no tensors")
    fmt = detect_format(list(tensors))
    if fmt == "diffusers":
        return fmt, _read_diffusers(tensors, _lora_config(path), path)
    out: dict[str, dict[str, Update]] = {}
    generic = {k: v for k, v in tensors.items() if k.startswith(LDM_PREFIX)}  # ComfyUI's, module paths with dots
    groups = {**group_by_module({k: v for k, v in tensors.items() if k not in generic}),
              **path_groups(generic, KOHYA_PARTS)}
    for key, parts in groups.items():
        component = LDM_COMPONENT if key.startswith(LDM_PREFIX) else \
            next((c for p, c in KOHYA_COMPONENTS.items() if key.startswith(p + "_")), "")
        out.setdefault(component, {})[key] = _kohya_update(key, parts)
    return fmt, out


def _lora_config(path: str | Path) -> dict:
    """The LoraConfig a diffusers/peft file states: diffusers' ``lora_adapter_metadata`` (keys ``<component>.<field>``)
    or, for peft's ``save_pretrained`` (``adapter_model.safetensors`` beside an ``adapter_config.json`` of
    ``peft_type`` LORA), that JSON; {} when the file states none."""
    meta = file_metadata(path)
    if "lora_adapter_metadata" in meta:
        try:
            config = json.loads(meta["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise DifftuneError(f"{str(path)!r}: its lora_adapter_metadata is not JSON ({e})") from None
        return config if isinstance(config, dict) else {}
    sibling = Path(path).with_name("adapter_config.json")
    if sibling.is_file():
        try:
            config = json.loads(sibling.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DifftuneError(f"{str(sibling)!r} beside {str(path)!r} is not JSON ({e})") from None
        if isinstance(config, dict) and config.get("peft_type") == "LORA":
            return config
    return {}


def _read_diffusers(tensors: dict[str, Tensor], config: dict, path: object) -> dict[str, dict[str, Update]]:
    """diffusers ``save_lora_weights`` / peft ``adapter_model.safetensors`` LoRA (and DoRA) files."""
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    odd = []
    for key, value in tensors.items():
        k = attn_procs_key(key.removeprefix("base_model.model."))  # diffusers ≤ 0.20's keys → peft's
        for ending, part in DIFFUSERS_PARTS.items():
            if k.endswith(ending):
                module = k[: -len(ending)]
                head, _, rest = module.partition(".")
                component, module = (head, rest) if head in DIFFUSERS_COMPONENTS and rest else ("", module)
                groups.setdefault((component, module), {})[part] = value
                break
        else:
            odd.append(key)
    if odd:
        raise DifftuneError(f"{len(odd)} key(s) of {str(path)!r} are no diffusers/peft LoRA keys "
                            f"(<component>.<module>.lora_A.weight / lora_B.weight / lora_magnitude_vector), "
                            f"e.g. {odd[:3]}")
    out: dict[str, dict[str, Update]] = {}
    for (component, module), parts in groups.items():
        if {"lora_A.weight", "lora_B.weight"} - set(parts):
            raise DifftuneError(f"{str(path)!r}: {component + '.' if component else ''}{module} has only "
                                f"{sorted(parts)}; a LoRA module needs lora_A.weight and lora_B.weight")
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        r = int(down.shape[0])
        cfg = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")} \
            if component else config
        for unsupported in ("rank_pattern", "alpha_pattern"):
            if cfg.get(unsupported):
                raise DifftuneError(f"{str(path)!r}: per-module `{unsupported}` in lora_adapter_metadata is not "
                                    "supported; convert the file to kohya format first")
        magnitude = parts.get("magnitude")
        if magnitude is not None:  # peft's shapes: (d_out,), or (1, d_out, 1, 1) for a conv
            if magnitude.numel() != up.shape[0]:
                raise DifftuneError(f"{str(path)!r}: {module}: lora_magnitude_vector of shape "
                                    f"{tuple(magnitude.shape)} for {up.shape[0]} output channels")
            magnitude = magnitude.reshape(-1)
        if "alpha" in parts:
            scale = _alpha_scale(parts, r)
            update = LowRank(down, up, scale, alpha=float(parts["alpha"]) or r, magnitude=magnitude)
        elif "lora_alpha" in cfg:  # diffusers' metadata: LoraConfig kwargs (scale α/r, α/√r with use_rslora)
            alpha, rslora = float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
            update = LowRank(down, up, alpha / (math.sqrt(r) if rslora else r), alpha=alpha, rslora=rslora,
                             magnitude=magnitude)
        else:  # what diffusers applies to a file without alphas
            update = LowRank(down, up, 1.0, alpha=float(r), magnitude=magnitude)
        out.setdefault(component, {})[module] = update
    return out
