"""Registered methods. Importing a method file registers it (one line each); an installed distribution adds its own
through the ``difftune.methods`` entry-point group (`difftune.registry`).

The contract every method is written against lives here too: `base` (config, registry, `Adapter`), `host` (the layer
wrapper), `context` (per-call inputs), `verbs` (inject, merge, remove, weights on a model) and `plugin` (the trainer
plugin base class and what an objective receives)."""

from . import bk, diff, full, ia3, kind, krona, loha, lora, sara, scedit, spm  # noqa: F401  (bk, full: whole models)
from .base import METHODS, Adapter, MethodConfig, Site, get_method, register_method
from .host import AdapterHost
from .plugin import PLUGINS, TrainerPlugin, TrainingStep, register_plugin

__all__ = ["METHODS", "PLUGINS", "Adapter", "AdapterHost", "MethodConfig", "Site", "TrainerPlugin", "TrainingStep",
           "get_method", "register_method", "register_plugin"]
