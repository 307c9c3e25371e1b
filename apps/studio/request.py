"""What one generation asks for (`Request`), what it gives (`Result`) and the bounds a request must stay in
(`Limits`); `engine.Studio.check` validates a request against them and the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .library import MixItem


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (a public studio must not be made to allocate without limit)."""

    max_size: int = 1024
    max_steps: int = 150
    max_batch: int = 8
    max_guidance: float = 30.0
    max_prompt: int = 2000


@dataclass
class Request:
    """One generation request; `Studio.check` validates it against the model and `Limits`."""

    prompt: str = ""
    negative: str = ""
    steps: int = 20
    guidance: float = 4.0
    width: int | None = None
    height: int | None = None
    sampler: str = ""
    batch: int = 1
    seed: int = 0
    randomize: bool = False
    mix: list[MixItem] = field(default_factory=list)
    fused: bool = False
    transport: bool = True  # SPM facilitated transport
    control: Image.Image | None = None  # SCEdit CSC control image
    extractor: str = "none"
    control_scale: float | None = None
    class_label: int | None = None  # class-conditional DiT
    mode: str = "txt2img"  # or "img2img", "inpaint" (SD families, SD3, Flux; modes.py)
    image: Image.Image | None = None  # the init image of img2img and inpainting
    mask: Image.Image | None = None  # inpainting: white where the image is repainted
    strength: float = 0.75  # the share of the steps that run from the noised init image


@dataclass
class Result:
    images: list[Path]
    seed: int
    infotexts: list[str]
    notes: list[str]
    condition: Image.Image | None = None
