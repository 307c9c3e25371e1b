"""Recall, as data (no Gradio): the values an image's infotext puts back into the studio's controls.

*Send to Generate* (an uploaded image) and a click on a history image both go through `settings`: the prompt and the
generation settings, the DiT/PixArt class, the adapters' mode (fused or not), the method panels' settings (SPM
transport; SCEdit extractor, control scale and the control image the infotext names) and the mode (img2img or
inpainting, its strength, init image and mask). The adapters' ticks and weights go back through `rows.from_mix`. A
value the infotext does not hold, or that this model does not offer (a sampler it lacks, a class outside its range),
is left out, so the control keeps what it shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from .engine import EXTRACTORS
from .models import Slot
from .modes import MODES, PIPELINES, TXT2IMG

#: the controls recall may set, in the order the UI lists them as outputs
CONTROLS = ("prompt", "negative", "steps", "guidance", "width", "height", "sampler", "seed", "randomize",
            "class_label", "fused", "transport", "extractor", "control_scale", "control", "mode", "strength", "image",
            "mask")


def _number(text: object) -> float | None:
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None  # NaN and ±inf are no setting


def settings(parsed: Mapping[str, Any], slot: Slot, stored_image: Callable[[str], Image.Image | None]
             ) -> tuple[dict[str, Any], list[str]]:
    """The controls' values from a parsed infotext (`infotext.parse_infotext`), for the model in ``slot``.

    Args:
        stored_image: the stored control image of a reference (`engine.Studio.stored_image`), or None.

    Returns:
        ``{control name: value}`` over `CONTROLS`, holding only what the infotext gives and this model accepts, and
        notes on what it names but could not be put back.
    """
    p = parsed.get("params", {}) if isinstance(parsed, Mapping) else {}
    out: dict[str, Any] = {}
    notes: list[str] = []
    if slot.kind != "dit":  # a DiT's infotext has no prompt: the (hidden) prompt box keeps its text for later
        if "prompt" in parsed:
            out["prompt"] = parsed["prompt"]
        if "negative_prompt" in parsed and (slot.kind != "flux" or not parsed["negative_prompt"]):
            out["negative"] = parsed["negative_prompt"]
        elif "negative_prompt" in parsed:  # Flux takes none (`engine.Studio.check`): the hidden box stays empty
            out["negative"] = ""
            notes.append(f"{slot.label} (Flux) takes no negative prompt; the infotext's was left out")
    # on Flux the guidance slider is the distilled guidance value (Forge's "Distilled CFG Scale", its "CFG scale" 1)
    cfg = "Distilled CFG Scale" if slot.kind == "flux" and "Distilled CFG Scale" in p else "CFG scale"
    for field, name in (("Steps", "steps"), (cfg, "guidance"), ("Seed", "seed")):
        value = _number(p.get(field, ""))
        if value is not None:
            out[name] = value
    if "seed" in out:
        out["randomize"] = False  # the image's own seed, not a new random one
    width, _, height = str(p.get("Size", "")).partition("x")
    for name, text in (("width", width), ("height", height)):
        if _number(text):
            out[name] = _number(text)
    if p.get("Sampler") in slot.samplers:
        out["sampler"] = p["Sampler"]
    elif p.get("Sampler"):
        notes.append(f"sampler {p['Sampler']!r} is not offered for {slot.label}; the sampler was left as it is")
    label = _number(p.get("Class", ""))
    if label is not None and label.is_integer() and int(label) in {i for _, i in slot.class_choices()}:
        out["class_label"] = int(label)
    elif p.get("Class"):
        notes.append(f"class {p['Class']!r} is not a class of {slot.label}; the class was left as it is")
    if p.get("Adapters mode") in ("fused", "unfused"):
        out["fused"] = p["Adapters mode"] == "fused"
    if p.get("SPM transport") in ("on", "off"):
        out["transport"] = p["SPM transport"] == "on"
    if p.get("Control extractor") in EXTRACTORS:
        out["extractor"] = p["Control extractor"]
    scale = _number(p.get("Control scale", ""))
    if scale is not None:
        out["control_scale"] = scale
    if p.get("Mode") in MODES and (p["Mode"] == TXT2IMG or slot.kind in PIPELINES):
        out["mode"] = p["Mode"]
    elif p.get("Mode"):
        notes.append(f"mode {p['Mode']!r} is not offered for {slot.label}; the mode was left as it is")
    strength = _number(p.get("Denoising strength", ""))
    if strength is not None and 0 < strength <= 1:
        out["strength"] = strength
    for field, name in (("Control image", "control"), ("Init image", "image"), ("Mask", "mask")):
        if p.get(field):
            image = stored_image(p[field])
            if image is not None:
                out[name] = image
            else:
                notes.append(f"{field.lower()} {p[field]} is not stored by this studio; upload it again")
    if "Mode" not in p and "Steps" in p:
        out["mode"] = TXT2IMG  # an infotext without a mode is text-to-image's
    return out, notes
