"""difftune: customize and compress diffusion models (diffusers UNets, DiT and PixArt transformers).

The flat public API::

    import difftune as dt
    dt.inject(pipe.unet, dt.LoRAConfig(rank=4, alpha=4, target_modules=["to_q", "to_v"]), name="style")
    ...train...
    dt.save_adapter(pipe, "out/style")
    dt.load_adapter(other_pipe, "out/style", weight=0.8)
    dt.fuse(other_pipe); dt.unfuse(other_pipe); dt.delete_adapter(other_pipe, "style")

One vocabulary: ``fuse``, ``unfuse``, ``delete_adapter``. ``merge``, ``unmerge`` and ``remove`` (peft's words) are
aliases, the same function objects: ``dt.remove(pipe, merge=True)`` is ``dt.delete_adapter(pipe, merge=True)``.
"""

from __future__ import annotations

from .compress import load_compressed, load_compressed_pipeline, quantize_rtn_, save_compressed
from .errors import DifftuneError
from .interop import importer as _importer  # noqa: F401  (lets load_adapter read kohya/LyCORIS/diffusers files)
from .loading import (
    delete_adapter,
    disable_adapters,
    enable_adapters,
    fuse,
    inject,
    list_adapters,
    load_adapter,
    merge,
    remove,
    save_adapter,
    set_adapter_weights,
    trainable_parameter_count,
    unfuse,
    unmerge,
)
from .methods import METHODS, MethodConfig
from .methods.bk import BKConfig
from .methods.context import adapter_inputs
from .methods.full import FullConfig
from .methods.ia3 import IA3Config
from .methods.krona import KronAConfig
from .methods.loha import LoHaConfig
from .methods.lora import LoRAConfig
from .methods.sara import SaRAAdamW, SaRAConfig
from .methods.scedit import CSCConfig, SCEditConfig
from .methods.spm import SPMConfig
from .version import __version__


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(METHODS)


__all__ = [
    "DifftuneError",
    "BKConfig",
    "FullConfig",
    "IA3Config",
    "KronAConfig",
    "LoHaConfig",
    "LoRAConfig",
    "METHODS",
    "SaRAAdamW",
    "SaRAConfig",
    "SPMConfig",
    "SCEditConfig",
    "CSCConfig",
    "MethodConfig",
    "__version__",
    "adapter_inputs",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "fuse",
    "inject",
    "list_adapters",
    "list_methods",
    "load_adapter",
    "load_compressed",
    "load_compressed_pipeline",
    "quantize_rtn_",
    "save_adapter",
    "save_compressed",
    "set_adapter_weights",
    "trainable_parameter_count",
    "unfuse",
    # aliases (the same functions): merge = fuse, unmerge = unfuse, remove = delete_adapter
    "merge",
    "unmerge",
    "remove",
]
