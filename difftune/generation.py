"""Load a diffusers pipeline from a local folder and generate with it; shared by the CLI and the app."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .components import pipeline_kind
from .errors import DifftuneError, bad_value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(path: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """``DiffusionPipeline.from_pretrained`` on a local folder, in fp32 on CPU unless told otherwise."""
    from diffusers import DiffusionPipeline

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise DifftuneError(
            f"`--model` {str(path)!r} is not a diffusers pipeline folder (no model_index.json). Hint: pass a folder "
            "written by pipe.save_pretrained(); difftune loads local folders only"
        )
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, **absent_components(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def absent_components(folder: str | Path) -> dict[str, None]:
    """The components a saved pipeline's model_index.json records as absent (``[null, null]``), each as None.

    diffusers writes a component that was None that way, but loads the folder only when such a component is optional
    for its pipeline class or passed: an SD3 pipeline without T5 (``text_encoder_3=None``, flow-mini) is loaded with
    ``text_encoder_3=None, tokenizer_3=None``, as diffusers documents for dropping T5.
    """
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # from_pretrained reports what is wrong with the folder
    if not isinstance(index, dict):
        return {}
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}


def generate(
    pipe: Any,
    prompt: str | None = None,
    class_label: int | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images: int = 1,
    adapter_inputs: Mapping[str, Any] | None = None,
) -> list[Image.Image]:
    """Images from ``pipe``: text pipelines take ``prompt``, class-conditional DiT takes ``class_label``.

    ``adapter_inputs`` are per-call inputs for the loaded adapters (see `difftune.adapter_inputs`), given per prompt
    and expanded to the guidance batch as the difftune pipelines do.
    """
    if steps < 1:
        raise bad_value("steps", steps, "an integer >= 1")
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": generator}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    kind = pipeline_kind(pipe)
    if kind == "dit":
        if class_label is None:
            raise bad_value("class_label", class_label, "an integer class id for a class-conditional DiT pipeline")
        kwargs["class_labels"] = [int(class_label)] * num_images
    else:
        if prompt is None:
            raise bad_value("prompt", prompt, "a text prompt for a text-to-image pipeline")
        kwargs.update(prompt=prompt, num_images_per_prompt=num_images, height=height, width=width)
        if kind == "pixart":
            kwargs.update(use_resolution_binning=False, clean_caption=False)
    from .pipeline_mixin import DifftuneAdapterMixin, call_with_adapter_inputs

    # the stock __call__ (a difftune pipeline's own would expand the inputs a second time)
    call = super(DifftuneAdapterMixin, pipe).__call__ if isinstance(pipe, DifftuneAdapterMixin) else pipe.__call__
    return list(call_with_adapter_inputs(pipe, call, (), kwargs, adapter_inputs).images)
