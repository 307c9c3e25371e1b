"""The ``validation.loss`` config section (the validation loss itself: `difftune.train.valloss`) and the items of
``validation.prompts`` written as mappings (`ValidationPrompt`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import bad_value
from .checks import MAX_INFERENCE_STEPS, MAX_RESOLUTION, check_finite, check_range


@dataclass
class ValidationLossConfig:
    #: a held-out folder laid out as ``data.path`` (captions beside the images; class folders for DiT); null: off
    path: str | None = None
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])  #: fixed, each image at each
    batch_size: int = 4  #: images per forward pass

    def __post_init__(self) -> None:
        if not self.timesteps or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.timesteps):
            raise bad_value("validation.loss.timesteps", self.timesteps, "a non-empty list of integers >= 0")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad_value("validation.loss.batch_size", self.batch_size, "an integer >= 1")


@dataclass
class ValidationPrompt:
    """One ``validation.prompts`` item given as a mapping: a prompt with its own sampling settings. A null setting
    takes the section's (``validation.negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``seeds``;
    width and height: the pipeline's default size). A plain string item is a prompt with every setting null."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None  #: pixels, a multiple of 8 (the pipelines' latent grid)
    height: int | None = None
    steps: int | None = None  #: sampling steps
    guidance_scale: float | None = None
    seed: int | None = None  #: one image with this seed instead of one per ``validation.seeds``

    def check(self, key: str) -> None:
        """Refuse out-of-range settings, naming ``key``.<field> (``key`` is ``validation.prompts[i]``)."""
        check_finite(self, key)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                check_range(f"{key}.{name}", value, 8, MAX_RESOLUTION)
                if value % 8:
                    raise bad_value(f"{key}.{name}", value, "a multiple of 8",
                                    "the pipelines refuse sizes off their latent grid")
        if self.steps is not None:
            check_range(f"{key}.steps", self.steps, 1, MAX_INFERENCE_STEPS)
        if self.guidance_scale is not None:
            check_range(f"{key}.guidance_scale", self.guidance_scale, 0.0, 1000.0, "CFG scales are 1-15.")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise bad_value(f"{key}.seed", self.seed, "an integer in [0, 2**32)")


def read_prompts(items: list[Any]) -> list[str | ValidationPrompt]:
    """``validation.prompts`` with each mapping item read as a `ValidationPrompt` (unknown keys are refused, named
    ``validation.prompts[i].<key>``) and checked; strings stay strings."""
    from ..config import from_dict

    out: list[str | ValidationPrompt] = []
    for i, item in enumerate(items):
        key = f"validation.prompts[{i}]"
        if isinstance(item, dict):
            item = from_dict(ValidationPrompt, item, key)
        if isinstance(item, ValidationPrompt):
            item.check(key)
        elif not isinstance(item, str):
            raise bad_value(key, item, "a prompt string or a mapping {prompt, negative_prompt, width, height, "
                            "steps, guidance_scale, seed}")
        out.append(item)
    return out


def resolve_prompt(item: str | ValidationPrompt, v: Any) -> tuple[ValidationPrompt, list[int]]:
    """``item`` with the section ``v``'s defaults filled in, and the seeds of its images."""
    p = ValidationPrompt(item) if isinstance(item, str) else item
    p = replace(p, negative_prompt=v.negative_prompt if p.negative_prompt is None else p.negative_prompt,
                steps=p.steps or v.num_inference_steps,
                guidance_scale=v.guidance_scale if p.guidance_scale is None else p.guidance_scale)
    return p, list(v.seeds) if p.seed is None else [p.seed]
