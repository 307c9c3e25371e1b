"""Which tools read the files `difftune export` writes, and what a file will lose in one of them.

=============  ============================================================  ==========================================
format         read by                                                       partly
=============  ============================================================  ==========================================
``kohya``      ComfyUI, A1111/Forge, kohya sd-scripts, lycoris-lora,         diffusers skips a text encoder's attention
               diffusers (``load_lora_weights``)                             keys
``kohya-ldm``  ComfyUI, A1111/Forge, kohya's SDXL scripts (LDM UNet names),  diffusers' SD1.x/2.x pipelines: not at
               diffusers' SDXL pipelines                                     all (no LDM block map)
``diffusers``  diffusers (``load_lora_weights``), peft                       ComfyUI: see below
``loha``       ComfyUI, A1111/Forge, lycoris-lora
``lokr``       ComfyUI, A1111/Forge, lycoris-lora (its own splits only)
``diff``       ComfyUI, A1111/Forge, lycoris-lora
=============  ============================================================  ==========================================

``--format comfyui`` is the format ComfyUI reads completely and exactly for the method (`resolve_format`): kohya for
LoRA/DoRA/SPM, loha for LoHa, lokr for KronA, diff for the others (SaRA, (IA)³, diff).

ComfyUI and a diffusers-format file (its ``comfy/lora.py``, and an outside check that loaded our exports with it):
ComfyUI looks up diffusers UNet attention projections only under the old attention-processor names
(``...attn1.processor.to_q``), so ``unet.<...>.to_q.lora_A.weight`` keys are skipped (an SPM: 64 of 192 modules
loaded); text-encoder keys only as ``text_encoder.text_model.encoder.layers.<i>...``, which a transformers ≥ 5 CLIP's
paths lack (0 of 72); it ignores ``lora_adapter_metadata``, so the modules it does load get scale 1 instead of α/r,
and ``lora_magnitude_vector`` (DoRA). It only logs "lora key not loaded". `comfyui_losses` says which of these apply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import bad_value

#: Who reads each format completely (what `difftune export` prints after writing one).
READERS = {
    "kohya": "ComfyUI, A1111/Forge, kohya sd-scripts, lycoris-lora and diffusers (pipe.load_lora_weights)",
    "kohya-ldm": "ComfyUI, A1111/Forge and kohya sd-scripts (LDM UNet names, as its SDXL scripts write them); "
                 "diffusers' SDXL pipelines",
    "diffusers": "diffusers (pipe.load_lora_weights) and peft; ComfyUI only in part",
    "loha": "ComfyUI, A1111/Forge and lycoris-lora",
    "lokr": "ComfyUI, A1111/Forge and lycoris-lora (LyCORIS's own Kronecker splits)",
    "diff": "ComfyUI, A1111/Forge and lycoris-lora",
}
#: What ``--format comfyui`` writes for each method (the rest: ``diff``, exact for every weight-space method).
COMFYUI = {"lora": "kohya", "spm": "kohya", "loha": "loha", "krona": "lokr"}


def resolve_format(format: str, methods: Iterable[str]) -> str:
    """``format`` itself, or for ``"comfyui"`` the format ComfyUI reads best for the adapters' ``methods``: their
    common entry of `COMFYUI` (kohya when LoRA and SPM mix), else ``diff``."""
    if format != "comfyui":
        return format
    formats = {COMFYUI.get(m, "diff") for m in methods}
    return formats.pop() if len(formats) == 1 else "diff"


def comfyui_losses(components: dict[str, dict[str, Any]]) -> list[str]:
    """What ComfyUI will not load, or load wrongly, from a diffusers-format file (module docstring).

    Args:
        components: {component: {module path: its `LowRank`}} as written.

    Returns:
        One phrase per problem (empty: ComfyUI reads the file as we do).
    """
    out = []
    total = sum(len(m) for m in components.values())
    attention = [m for c, mods in components.items() if not c.startswith("text_encoder") for m in mods if ".to_" in m]
    if attention:
        out.append(f"it skips the {len(attention)} UNet attention projections (e.g. {attention[0]}; it reads those "
                   "only under diffusers' old attention-processor names)")
    text = [m for c, mods in components.items() if c.startswith("text_encoder") for m in mods
            if not m.startswith("text_model.")]
    if text:
        out.append(f"it skips the {len(text)} text-encoder modules (it reads only transformers 4's "
                   "text_encoder.text_model.encoder.layers.* names)")
    loaded = [u for c, mods in components.items() for m, u in mods.items() if m not in attention and m not in text]
    scaled = sorted({round(u.scale, 6) for u in loaded if u.scale != 1.0})
    if scaled:
        out.append(f"it ignores lora_adapter_metadata, so the modules it loads get scale 1 instead of α/r = "
                   f"{', '.join(map(str, scaled[:3]))}")
    if any(u.magnitude is not None for u in loaded):
        out.append("it ignores lora_magnitude_vector, so DoRA modules load as plain LoRA")
    if out:
        out[0] = f"ComfyUI loads {total - len(attention) - len(text)} of the file's {total} modules: " + out[0]
    return out


def export_warnings(format: str, components: dict[str, dict[str, Any]], keys: list[str],
                    base: str | Path | None = None) -> list[str]:
    """Why a file just written as ``format`` will not load completely in a tool `READERS` names for it, each with the
    format to use instead (empty: it loads everywhere listed).

    Args:
        format: the format written (``kohya-ldm``, not ``kohya``, for LDM names).
        components: {component: {module path: update}} as written.
        keys: the file's tensor names.
        base: the base pipeline folder (for kohya-ldm: only diffusers' SDXL pipelines map LDM names).
    """
    out = []
    if format in ("kohya", "kohya-ldm") and any(c.startswith("text_encoder") for c in components):
        out.append("the text-encoder part of this kohya file loads in ComfyUI, A1111/Forge, kohya and lycoris-lora, "
                   "but not with diffusers' pipe.load_lora_weights (it cannot read kohya-named text-encoder "
                   "attention keys); for diffusers and peft write it with --format diffusers")
    if format == "kohya" and any(k.startswith("lora_unet_joint_blocks_") for k in keys):
        out.append("this SD3 file in SAI's names (lora_unet_joint_blocks_*) loads in ComfyUI and kohya sd-scripts, "
                   "but diffusers' StableDiffusion3Pipeline.load_lora_weights reads only diffusers' names and loads "
                   "nothing from it; for diffusers and peft write it with --format diffusers")
    if format == "diffusers":
        losses = comfyui_losses(components)
        if losses:
            out.append(f"this diffusers-format file does not load fully in ComfyUI: {'; '.join(losses)}. For "
                       "ComfyUI/A1111/Forge export --format comfyui")
    if format == "kohya-ldm" and any(not c.startswith("text_encoder") for c in components):
        problems = diffusers_ldm_problems(keys) if _sdxl_pipeline(base) else [
            "only its SDXL pipelines map LDM UNet names (StableDiffusionPipeline.load_lora_weights finds none of "
            "the modules and fails)"]
        if problems:
            out.append(f"diffusers cannot read this LDM-named file: {'; '.join(problems)}. For diffusers export "
                       "--format kohya or --format diffusers")
    return out


def _sdxl_pipeline(base: str | Path | None) -> bool:
    """Whether ``base`` is a diffusers SDXL pipeline folder (its loader applies the UNet config's LDM block map)."""
    index = Path(base) / "model_index.json" if base else None
    if index is None or not index.is_file():
        return False
    return str(json.loads(index.read_text()).get("_class_name", "")).startswith("StableDiffusionXL")


_LATE = re.compile(r"^lora_unet_(input|output)_blocks_1[01]_")
_EARLY = re.compile(r"^lora_unet_(input|output)_blocks_1_")


def diffusers_ldm_problems(keys: Iterable[str]) -> list[str]:
    """Why diffusers' kohya converter (its ``_maybe_map_sgm_blocks_to_diffusers``) cannot read LDM-named UNet
    ``keys`` of an SD1.x/2.x file: it finds block i's keys by substring, so block 1 takes blocks 10 and 11 and fails
    (KeyError); and it puts output_blocks.2.1.conv (an UpBlock2D's upsampler) on a module that does not exist."""
    keys = list(keys)
    out = []
    if any(_LATE.match(k) for k in keys) and any(_EARLY.match(k) for k in keys):
        out.append("it reads input_blocks_10/11 (and output_blocks_10/11) as part of block 1 and fails")
    if any(k.startswith("lora_unet_output_blocks_2_1_conv") for k in keys):
        out.append("it puts output_blocks_2_1_conv on up_blocks.0.attentions.2.conv, which does not exist")
    return out


def ldm_module_names(header: dict[str, Any], model: str | Path | None, component: str,
                     modules: Iterable[str]) -> dict[str, str]:
    """{module path: LDM path} for ``--format kohya-ldm``, from the structure of the adapter's UNet (its base
    pipeline's config, built on the meta device: no weights read).

    Raises:
        DifftuneError: no local base pipeline folder, the denoiser is no ``UNet2DConditionModel``, or a module has
            no LDM name.
    """
    from ..architectures import denoiser_on_meta
    from .ldm import is_ldm_unet, ldm_blocks, to_ldm

    base = model or header.get("base_model") or ""
    if not base or not (Path(base) / "model_index.json").is_file():
        raise bad_value("model", str(model) if model else None, "the adapter's local base pipeline folder",
                        f"--format kohya-ldm names modules by the UNet's LDM blocks, read from its config (recorded "
                        f"base: {header.get('base_model')!r}); pass --model")
    _, unet = denoiser_on_meta(base, component or None)
    if not is_ldm_unet(unet):
        raise bad_value("format", "kohya-ldm", "kohya for a denoiser other than a UNet2DConditionModel",
                        f"LDM names describe Stable Diffusion UNets; this one is a {type(unet).__name__}")
    blocks = ldm_blocks(unet)
    out = {}
    for m in modules:
        ldm = to_ldm(m, blocks)
        if ldm is None:
            raise bad_value("format", "kohya-ldm", "kohya for an adapter on a module LDM has no name for",
                            f"module {m!r} has no LDM name")
        out[m] = ldm
    return out
