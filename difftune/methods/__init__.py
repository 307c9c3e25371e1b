"""Registered methods. Importing a method file registers it (one line each)."""

from . import full, krona, lora, sara  # noqa: F401
from .base import METHODS, Adapter, AdapterHost, MethodConfig, get_method, register_method

__all__ = ["METHODS", "Adapter", "AdapterHost", "MethodConfig", "get_method", "register_method"]
