"""Registered methods. Importing a method file registers it (one line each)."""

from . import full, krona, lora, sara, scedit, spm  # noqa: F401
from . import bk  # noqa: F401  (block removal + distillation; a training-only method like full)
from .base import METHODS, Adapter, MethodConfig, Site, get_method, register_method
from .host import AdapterHost

__all__ = ["METHODS", "Adapter", "AdapterHost", "MethodConfig", "Site", "get_method", "register_method"]
