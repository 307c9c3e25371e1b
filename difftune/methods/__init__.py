"""Registered methods. Importing a method file registers it (one line each)."""

from . import bk, diff, full, ia3, kind, krona, loha, lora, sara, scedit, spm  # noqa: F401  (bk, full: whole models)
from .base import METHODS, Adapter, MethodConfig, Site, get_method, register_method
from .host import AdapterHost

__all__ = ["METHODS", "Adapter", "AdapterHost", "MethodConfig", "Site", "get_method", "register_method"]
