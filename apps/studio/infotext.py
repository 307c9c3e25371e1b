"""A1111-style "infotext": the generation parameters stored in a PNG's ``parameters`` text chunk.

The layout every A1111 reader (Civitai, Fooocus, ComfyUI savers, DiffusionToolkit) expects::

    a handwritten digit zxq <adapter:quickstart/train/adapter:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 4.0, Seed: 123, Size: 32x32, Model hash: 1a2b3c4d5e, Model: sd-mini, ...

Line 1 (and any lines up to the ``Negative prompt:`` line) is the prompt, here followed by one tag per enabled
adapter: a plain LoRA as A1111's own ``<lora:KEY:WEIGHT>`` with its hash in ``Lora hashes`` (so A1111, Civitai and
other readers of that convention recognise it), every other method as ``<adapter:KEY:WEIGHT>`` with its hash in
``Adapter hashes``; the last line is comma-separated ``Key: value`` pairs, values with commas in double quotes
(``Adapter hashes: "a: 1234, b: 5678"``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from difftune.errors import bad_value

PARAMETERS = "parameters"
_PAIR = re.compile(r'\s*([\w][\w \-/+().]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
#: ``<adapter:key:w>`` and A1111's ``<lora:name:w>`` (whose optional further ``:args`` are read past, not used)
_ADAPTER = re.compile(r"<(adapter|lora):([^:>]+):(-?(?:\d+(?:\.\d*)?|\.\d+))(?::[^>]*)?>")
LORA = "lora"  #: the method written as A1111's ``<lora:...>`` tag
MAX_TEXT = 64 * 1024  #: longer parameters chunks are refused (A1111's are well under 2 KB)


def _quote(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def format_infotext(prompt: str, negative: str, params: Mapping[str, Any],
                    adapters: Sequence[tuple[str, float, str]] = (), loras: Collection[str] = ()) -> str:
    """The infotext for one image.

    Args:
        prompt: the prompt as typed.
        negative: the negative prompt ("" leaves the line out).
        params: ``{"Steps": 20, "Sampler": "DDIM", ...}`` in the order they should appear.
        adapters: (key, weight, hash) of each enabled adapter.
        loras: the keys of ``adapters`` that are plain LoRAs (written as ``<lora:key:w>``, hashes in ``Lora hashes``).
    """
    tags = " ".join(f"<{LORA if key in loras else 'adapter'}:{key}:{weight:g}>" for key, weight, _ in adapters)
    lines = [f"{prompt} {tags}".strip() if tags else prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = dict(params)
    for field, wanted in (("Lora hashes", True), ("Adapter hashes", False)):
        listed = [f"{key}: {h}" for key, _, h in adapters if (key in loras) == wanted]
        if listed:
            pairs[field] = ", ".join(listed)
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in pairs.items() if v is not None and v != ""))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """The fields of an infotext: ``prompt`` (without the adapter tags), ``negative_prompt``, ``params`` (the
    ``Key: value`` pairs, quotes removed) and ``adapters`` ([{key, weight, hash, method}], in the prompt's order;
    ``method`` is "lora" for a ``<lora:...>`` tag, "" for an ``<adapter:...>`` one)."""
    if not isinstance(text, str):
        raise bad_value("parameters", type(text).__name__, "the text of a PNG 'parameters' chunk")
    if len(text) > MAX_TEXT:
        raise bad_value("parameters", f"{len(text):,} characters", f"at most {MAX_TEXT:,}")
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    last = lines[-1] if lines else ""
    found = _PAIR.findall(last)
    if len(found) >= 3:  # A1111's rule: the last line is parameters only with a few pairs (DiT: no prompt line)
        for k, v in found:
            params[k.strip()] = json.loads(v) if v.startswith('"') and v.endswith('"') and len(v) > 1 else v.strip()
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    hashes: dict[tuple[str, str], str] = {}
    for tag, field in (("adapter", "Adapter hashes"), (LORA, "Lora hashes")):
        for part in params.get(field, "").split(","):
            key, sep, h = part.strip().rpartition(": ")
            if sep:
                hashes[tag, key] = h
    adapters = [{"key": k, "weight": float(w), "hash": hashes.get((tag, k), ""), "method": LORA if tag == LORA else ""}
                for tag, k, w in _ADAPTER.findall(prompt)]
    return {"prompt": _ADAPTER.sub("", prompt).strip(), "negative_prompt": "\n".join(negative_lines).strip(),
            "params": params, "adapters": adapters}


def save_png(image: Image.Image, path: str | Path, infotext: str) -> Path:
    """Save ``image`` as PNG with ``infotext`` in its ``parameters`` tEXt chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS, infotext)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | Path) -> str:
    """The ``parameters`` text of an image file; "" when it has none."""
    try:
        with Image.open(path) as img:
            text = img.info.get(PARAMETERS) or getattr(img, "text", {}).get(PARAMETERS, "")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's "cannot identify image file" and truncated chunks
        raise bad_value("image", Path(path).name, "a PNG (or another image PIL can read)", str(e)) from None
    return text if isinstance(text, str) else ""
