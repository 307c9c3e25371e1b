"""The method panels' part of a run: SPM transport and the γ it gave, SCEdit's control image and scale, KIND's class
on a text pipeline, and the control images kept by content so an infotext can name the one an image was made with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from difftune import loading
from difftune.errors import bad_value

from . import paths

if TYPE_CHECKING:
    from .models import Slot
    from .request import Request

INPUTS = "inputs"  #: where input images (control, init, mask) are kept, inside the images folder, by content
INPUT_REF = 12  #: hex digits of an input image's reference


def method_inputs(slot: Slot, req: Request) -> tuple[dict[str, Any], Image.Image | None]:
    """Per-call inputs of the method panels: SPM transport, SCEdit control image and scale."""
    from difftune.methods.spm import set_transport

    for name in slot.names("spm"):
        set_transport(slot.denoiser, name, req.transport)
    inputs: dict[str, Any] = {}
    condition = None
    if slot.kind != "dit" and req.class_label is not None and slot.names("kind"):
        # KIND on a text pipeline (PixArt): the class gate reads `class_labels`, one per prompt (the pipeline
        # expands it to the images and both guidance halves)
        inputs["class_labels"] = [int(req.class_label)]
    csc = slot.names("csc")
    if csc:
        from difftune.methods.scedit.conditions import control_inputs, extract

        if req.control is None:
            raise bad_value("control image", None, f"an image for the enabled CSC adapter(s) "
                            f"{[slot.key_of(n) for n in csc]}", "Upload one in the SCEdit panel, or disable them.")
        condition = req.control if req.extractor == "none" else extract(req.extractor, req.control)
        inputs["control"] = control_inputs(slot.pipe, {n: condition for n in csc}, req.batch)
        if req.control_scale is not None:
            # the control scale multiplies each CSC row's own weight (it used to replace it: a row at 0.3 ran
            # and was recorded at the scale's 1); the infotext records both
            rows = {slot.loaded[i.key][0]: i.weight for i in req.mix if i.key in slot.loaded}
            loading.set_adapter_weights(slot.pipe, {n: rows.get(n, 1.0) * req.control_scale for n in csc})
    return inputs, condition


def gamma_notes(slot: Slot, req: Request) -> list[str]:
    """The γ each SPM gave the prompt (and the negative prompt) in the last denoiser call."""
    from difftune.methods.verbs import model_part

    notes = []
    for name in slot.names("spm"):
        part = model_part(slot.denoiser, name)
        gamma = getattr(part, "gamma", None)
        key = slot.key_of(name)
        if gamma is None:
            notes.append(f"SPM {key}: transport off, γ = 1 on every prompt")
            continue
        n = req.batch
        guided = gamma.numel() == 2 * n
        cond = gamma[n] if guided and slot.kind != "dit" else gamma[0]
        text = f"SPM {key}: γ = {float(cond):.2f} for the prompt"
        if guided and slot.kind != "dit":
            text += f", {float(gamma[0]):.2f} for the negative prompt"
        notes.append(text)
    return notes


def save_input(out: Path, image: Image.Image) -> str:
    """Store an input image (control, init, mask) under ``out/inputs`` as ``<sha256 prefix>.png`` (atomic; once per
    content) and return that reference."""
    import hashlib
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    ref = hashlib.sha256(data).hexdigest()[:INPUT_REF]
    out.mkdir(parents=True, exist_ok=True)
    folder = paths.make_folder(out, INPUTS)
    if not (folder / f"{ref}.png").is_file():
        paths.write_file(out, folder / f"{ref}.png", lambda f: f.write(data), f"{INPUTS}/{ref}.png")
    return ref


def stored_image(out: Path, ref: object) -> Image.Image | None:
    """The stored input image ``ref`` names (`save_input`), or None when this studio does not hold it."""
    if not isinstance(ref, str) or not re.fullmatch(f"[0-9a-f]{{{INPUT_REF}}}", ref):
        return None
    path = out / INPUTS / f"{ref}.png"
    if not path.is_file():
        return None
    with Image.open(path) as img:
        return img.copy()
