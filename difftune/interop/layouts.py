"""The less common ways files spell a module's update, rewritten into the plain forms `updates.read_file` reads.

* **Tucker cores** (LyCORIS ``use_tucker`` on convolutions): LoHa ``hada_t1``/``hada_t2``, LoKr ``lokr_t2`` and LoCon
  ``lora_mid.weight``. A Tucker core t (r, r, k, k) between the factors a (r, d_out) and b (r, d_in) builds
  W[p, q, ·] = Σ_ij t[i, j, ·] a[i, p] b[j, q] (LyCORIS's ``rebuild_tucker``). Contracting t with b first,
  M[i, (q, ·)] = Σ_j t[i, j, ·] b[j, q], gives W = aᵀ M: a rank-r product again. So a Tucker LoCon is a LoRA with
  down = M, a Tucker LoHa a plain LoHa with W1b = M1 and W2b = M2 (W1a = aᵀ), and a Tucker LoKr's w2 is rebuilt
  densely (the Kronecker factor B). Same ΔW up to fp32 rounding; the scale stays α / r (r = the core's size).
* **ComfyUI's generic keys** ``diffusion_model.<LDM module path>.<part>`` (`path_groups`): module paths with dots,
  parts in any of the spellings ComfyUI accepts for them (kohya ``lora_down.weight``, peft ``lora_A.weight``,
  diffusers ``lora.down.weight``), read as kohya parts.
* **diffusers ≤ 0.20 attention processors** (`attn_procs_key`): ``<attention>.processor.to_q_lora.down.weight``
  (``unet.save_attn_procs``, with or without the ``unet.`` lead) and the text encoder's
  ``self_attn.to_q_lora.down.weight`` / ``mlp.fc1.lora_linear_layer.down.weight``, renamed to peft's
  ``<module>.lora_A.weight`` on the module they adapt (``to_out_lora`` → ``to_out.0``; ``out_proj`` in CLIP).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..errors import DifftuneError
from .ldm import LDM_PREFIX

#: The part names of a ``diffusion_model.`` key (another spelling → kohya's), longest first so that
#: ``x.lora_down.weight`` is never read as module ``x.lora_down`` with part ``weight``.
_PATH_SPELLINGS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                   "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"}


def path_groups(tensors: dict[str, Tensor], parts: set[str]) -> dict[str, dict[str, Tensor]]:
    """``{"diffusion_model.<path>.<part>": v}`` → ``{"diffusion_model.<path>": {kohya part: v}}``.

    Args:
        tensors: keys that all start with ``diffusion_model.``.
        parts: the kohya/LyCORIS part names known to the reader (``lora_down.weight``, ``hada_w1_a``, ``diff``, ...).

    Raises:
        DifftuneError: a key ends in no known part (listed).
    """
    known = sorted({*parts, *_PATH_SPELLINGS}, key=len, reverse=True)
    groups: dict[str, dict[str, Tensor]] = {}
    odd = []
    for key, value in tensors.items():
        part = next((p for p in known if key.endswith("." + p) and len(key) > len(LDM_PREFIX) + len(p) + 1), None)
        if part is None:
            odd.append(key)
            continue
        groups.setdefault(key[: -len(part) - 1], {})[_PATH_SPELLINGS.get(part, part)] = value
    if odd:
        raise DifftuneError(f"{len(odd)} key(s) are no '{LDM_PREFIX}<module>.<part>' adapter keys (parts such as "
                            f"lora_down.weight, lora_A.weight, hada_w1_a, lokr_w1, diff, w_norm), e.g. {odd[:3]}")
    return groups


_ATTN_PROCS = re.compile(r"^(?P<module>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)"
                         r"\.weight$")
_LINEAR_LAYER = re.compile(r"^(?P<module>.+)\.lora_linear_layer\.(?P<part>down|up)\.weight$")
_CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def is_attn_procs_key(key: str) -> bool:
    """Whether ``key`` is a diffusers ≤ 0.20 attention-processor (or ``lora_linear_layer``) LoRA key."""
    return bool(_ATTN_PROCS.match(key) or _LINEAR_LAYER.match(key))


def attn_procs_key(key: str) -> str:
    """An attention-processor LoRA key as peft names it (``....attn1.to_q.lora_A.weight``); other keys unchanged.

    A CLIP attention (``...self_attn.to_q_lora...``) maps onto ``q_proj``/``k_proj``/``v_proj``/``out_proj``, a UNet
    attention onto ``to_q``/``to_k``/``to_v``/``to_out.0``, as diffusers' own conversion does.
    """
    side = {"down": "lora_A", "up": "lora_B"}
    match = _ATTN_PROCS.match(key)
    if match:
        module, proj = match["module"], match["proj"]
        if module.endswith("self_attn"):
            proj = _CLIP_PROJ[proj]
        elif proj == "to_out":
            proj = "to_out.0"
        return f"{module}.{proj}.{side[match['part']]}.weight"
    match = _LINEAR_LAYER.match(key)
    if match:
        return f"{match['module']}.{side[match['part']]}.weight"
    return key


def _contract(core: Tensor, b: Tensor, key: str, what: str) -> Tensor:
    """M (r, d_in, k, k), M[i, q, ·] = Σ_j core[i, j, ·] b[j, q], for a core (r, r, k, k) and b (r, d_in[, 1, 1])."""
    b = b.float().flatten(1)
    if core.dim() < 3 or core.shape[0] != core.shape[1] or core.shape[1] != b.shape[0]:
        raise DifftuneError(f"{key}: a Tucker core {what} of shape {tuple(core.shape)} does not fit its factor of "
                            f"shape {tuple(b.shape)}; LyCORIS writes (r, r, k, k) cores with (r, d) factors")
    return torch.einsum("ij...,jq->iq...", core.float(), b)


def untucker(key: str, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """``parts`` with any Tucker core folded into its factors (module docstring); parts without one as they are."""
    parts = dict(parts)
    if "lora_mid.weight" in parts:  # LoCon: up (d_out, r, 1, 1) ∘ mid (r, r, k, k) ∘ down (r, d_in, 1, 1)
        if "lora_down.weight" not in parts:
            raise DifftuneError(f"{key}: a Tucker LoCon (lora_mid.weight) needs lora_down.weight and lora_up.weight")
        parts["lora_down.weight"] = _contract(parts.pop("lora_mid.weight"), parts["lora_down.weight"], key,
                                              "lora_mid.weight")
    if "hada_t1" in parts or "hada_t2" in parts:
        need = {"hada_t1", "hada_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if need - set(parts):
            raise DifftuneError(f"{key}: a Tucker LoHa needs {sorted(need)}; missing {sorted(need - set(parts))}")
        for i in ("1", "2"):  # W_i = a_iᵀ (t_i ×_j b_i): a plain LoHa with a_iᵀ (d_out, r) and M_i (r, d_in·k·k)
            m = _contract(parts.pop(f"hada_t{i}"), parts[f"hada_w{i}_b"], key, f"hada_t{i}")
            parts[f"hada_w{i}_a"] = parts[f"hada_w{i}_a"].float().T
            parts[f"hada_w{i}_b"] = m.flatten(1)
    if "lokr_t2" in parts:
        if {"lokr_w2_a", "lokr_w2_b"} - set(parts):
            raise DifftuneError(f"{key}: a Tucker LoKr (lokr_t2) needs lokr_w2_a and lokr_w2_b")
        w2a, w2b = parts.pop("lokr_w2_a").float(), parts.pop("lokr_w2_b")
        m = _contract(parts.pop("lokr_t2"), w2b, key, "lokr_t2")  # (r, b2, k, k)
        # α / r (r = the core's size, as ComfyUI and LyCORIS's module) goes into the rebuilt w2; alpha is dropped, so
        # a low-rank w1 (same r) is not scaled again
        alpha = float(parts.pop("alpha", torch.tensor(0.0)))
        scale = (alpha or m.shape[0]) / m.shape[0]
        parts["lokr_w2"] = torch.einsum("ip,iq...->pq...", w2a, m) * scale  # (b1, b2, k, k)
    return parts
