"""Range and shape checks shared by the training config sections (`config.py`, `dataconfig.py`)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from ..errors import bad_value


def check_finite(obj: Any, section: str) -> None:
    """Refuse NaN/inf in every float field of config dataclass ``obj`` (a comparison such as ``lr <= 0`` lets NaN
    through; a NaN ``max_grad_norm`` or ``noise_offset`` trains a NaN adapter). Also covers ``list[float]`` fields."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if "float" not in str(hints.get(f.name)):
            continue
        value = getattr(obj, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise bad_value(f"{section}.{f.name}", value, "a finite number",
                                "no setting means NaN or infinity; null turns an optional setting off")


def check_range(key: str, value: int | float, low: float, high: float, hint: str = "") -> None:
    """Refuse ``value`` outside [low, high], naming ``key``."""
    if not low <= value <= high:
        kind = "a number" if isinstance(low, float) or isinstance(high, float) else "an integer"
        raise bad_value(key, value, f"{kind} in [{low:_}, {high:_}]", hint)


def check_name(key: str, value: str | None, pattern: re.Pattern[str], expected: str, hint: str = "") -> None:
    """Refuse a string that does not match ``pattern`` (a name that becomes part of a file name or attribute)."""
    if value is not None and not pattern.fullmatch(value):
        raise bad_value(key, value, expected, hint)


#: a diffusers weight variant (``fp16``, ``non_ema``): it becomes part of file names, so never a path
VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
#: a pipeline component (``unet``, ``transformer``, ``vae``): an attribute name
COMPONENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: a caption file suffix (``.txt``, ``.caption``, ``.tags.txt``)
SUFFIX = re.compile(r"(\.[A-Za-z0-9_-]+)+")
MAX_RESOLUTION = 4096  #: SDXL trains at 1024; one 4096² image is 200 MB as float32
MAX_STEPS = 10**9
MAX_BATCH = 4096  #: per process
MAX_INFERENCE_STEPS = 1000  #: the schedulers' training timesteps: no sampler takes more steps

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
