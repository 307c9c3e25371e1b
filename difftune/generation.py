"""Load a diffusers pipeline (a folder, a shipped model, a Hub id or a single-file checkpoint) and generate with it;
shared by the CLI and the app."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .basemodel import CALL_KEY, CLI_KEYS, BaseModel, load_base_pipeline, resolve_model
from .components import pipeline_kind
from .errors import bad_value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def call_defaults(pipe: Any) -> dict[str, Any]:
    """The call settings ``pipe``'s folder records (`difftune.basemodel.call_settings`, e.g. flow-mini's
    ``max_sequence_length`` 8), to pass to every call of the pipeline; {} for most pipelines."""
    config = getattr(pipe, "config", None)
    found = config.get(CALL_KEY) if config is not None else None
    return dict(found) if isinstance(found, Mapping) else {}


def load_pipeline(path: str | Path | BaseModel, device: str | None = None, dtype: torch.dtype = torch.float32, *,
                  revision: str | None = None, config: str | None = None, variant: str | None = None,
                  keys: dict[str, str] = CLI_KEYS) -> Any:
    """A diffusers pipeline, in fp32 on CPU unless told otherwise, from a local folder, a shipped model name
    (``sd-mini``), a Hub repo id (at ``revision``; the cache when ``HF_HUB_OFFLINE=1``) or a single-file checkpoint
    (with the pipeline configs of ``config``): see `difftune.basemodel.resolve_model`. Errors name the settings as
    ``keys`` does (the CLI's ``--model``, ``--revision``, ``--config`` by default)."""
    model = path if isinstance(path, BaseModel) else resolve_model(path, revision, config, variant, keys=keys)
    pipe = load_base_pipeline(model, variant=variant, dtype=dtype, keys=keys)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


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
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
) -> list[Image.Image]:
    """Images from ``pipe``: text pipelines take ``prompt`` (and ``negative_prompt``, what guidance steers away
    from), class-conditional DiT takes ``class_label``.

    ``adapter_inputs`` are per-call inputs for the loaded adapters (see `difftune.adapter_inputs`), given per prompt
    and expanded to the guidance batch as the difftune pipelines do. ``max_sequence_length`` (SD3 and Flux: T5 tokens
    per prompt) overrides what the pipeline's folder records (`call_defaults`).
    """
    if steps < 1:
        raise bad_value("steps", steps, "an integer >= 1")
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs: dict[str, Any] = {**call_defaults(pipe), "num_inference_steps": steps, "generator": generator}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    kind = pipeline_kind(pipe)
    if kind == "dit":
        if class_label is None:
            raise bad_value("class_label", class_label, "an integer class id for a class-conditional DiT pipeline")
        if negative_prompt is not None:
            raise bad_value("negative_prompt", negative_prompt, "null for a class-conditional DiT pipeline",
                            "DiT guides away from its null class; it takes no text")
        kwargs["class_labels"] = [int(class_label)] * num_images
    else:
        if prompt is None:
            raise bad_value("prompt", prompt, "a text prompt for a text-to-image pipeline")
        kwargs.update(prompt=prompt, num_images_per_prompt=num_images, height=height, width=width)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        if kind == "pixart":
            kwargs.update(use_resolution_binning=False, clean_caption=False)
    if max_sequence_length is not None:
        if kind not in ("sd3", "flux"):
            raise bad_value("max_sequence_length", max_sequence_length, "null: only SD3 and Flux pipelines take it",
                            f"this is a {kind} pipeline")
        if isinstance(max_sequence_length, bool) or not 1 <= max_sequence_length <= 512:
            raise bad_value("max_sequence_length", max_sequence_length, "an integer in 1..512 (T5 tokens per prompt)")
        kwargs["max_sequence_length"] = max_sequence_length
    from .pipeline_mixin import DifftuneAdapterMixin, call_with_adapter_inputs

    # the stock __call__ (a difftune pipeline's own would expand the inputs a second time)
    call = super(DifftuneAdapterMixin, pipe).__call__ if isinstance(pipe, DifftuneAdapterMixin) else pipe.__call__
    return list(call_with_adapter_inputs(pipe, call, (), kwargs, adapter_inputs).images)
