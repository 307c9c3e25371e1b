"""What ``difftune inspect`` reports: a saved adapter's summary (`inspect_adapter`), and how many parameters a method
would train on a model, without training (``difftune inspect --method``).

Published architectures (`difftune.architectures`: SD 1.5/2.1, SDXL, DiT-B/2, L/2, XL/2, PixArt-α) are built on the
meta device (no memory, no download), so a config can be sized for them on any machine. Methods that select weights
by value (SaRA) need the real weights: pass a local pipeline folder instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .architectures import ARCHITECTURES as _REGISTRY
from .architectures import (
    build_architecture,  # noqa: F401 (kept importable from here, where it used to live)
    with_mmdit_targets,
)
from .components import denoiser_name
from .errors import DifftuneError, bad_value
from .methods.base import MethodConfig, get_method
from .methods.verbs import adapter_parameters, hosts, inject
from .serialization import WEIGHTS_NAME, read_header, read_tensors

#: Names ``--architecture`` accepts (see `difftune.architectures`).
ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)


def load_denoiser(path: str | Path, component: str | None = None) -> nn.Module:
    """The denoiser (``unet``/``transformer``, or ``component``) of a local diffusers pipeline folder, fp32 on CPU."""
    from .generation import load_pipeline

    pipe = load_pipeline(path, device="cpu")
    names = [k for k, v in pipe.components.items() if isinstance(v, nn.Module)]
    if component is None:
        component = denoiser_name(names)
    if component not in names:
        raise bad_value("--component", component, f"one of the pipeline's model components {names}")
    return getattr(pipe, component)


def count_trainable(config: MethodConfig, model: nn.Module) -> dict[str, Any]:
    """Inject ``config`` into ``model`` and report adapted modules, trainable parameters and their share."""
    total = sum(p.numel() for p in model.parameters())
    inject(model, config, name="count")
    trainable = sum(p.numel() for p in adapter_parameters(model, "count"))
    modules = sum(1 for _, h in hosts(model) if "count" in h.adapters)
    return {"method": config.method, "modules": modules, "parameters": trainable, "base_parameters": total,
            "fraction": trainable / total if total else 0.0}


def method_config(name: str, fields: dict[str, Any], model: nn.Module | None = None) -> MethodConfig:
    """Method ``name``'s config from ``fields``. On an SD3/Flux transformer (``model``), a method whose default
    targets are the attention projections (LoRA, LoHa, KronA) targets the MMDiT defaults instead
    (`difftune.architectures.mmdit_default_targets`) unless ``fields`` names ``target_modules``."""
    cls = get_method(name)
    if not cls.is_adapter:
        raise DifftuneError(f"method {name!r} adds no adapter; nothing to count")
    fields = with_mmdit_targets(cls, fields, model)
    return cls.from_dict(fields)


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Summary of a saved adapter: method, base, component, parameter count, size, dtypes, config."""
    header = read_header(path)
    tensors = read_tensors(path)
    fingerprint = header.get("target_fingerprint") or {}
    return {
        "method": header["method"],
        "name": header.get("name"),
        "base_model": header.get("base_model") or None,
        "component": header.get("component") or None,
        "difftune_version": header.get("difftune_version"),
        "modules": fingerprint.get("modules"),
        **_describe(header["method"], tensors),
        "tensors": len(tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "file_bytes": (Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)).stat().st_size,
        "config": header.get("config", {}),
    }


def _describe(method: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    try:
        cls = get_method(method)
    except DifftuneError:  # an unknown method can still be inspected; count every floating value
        return {"parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point())}
    try:
        return cls.describe(tensors)
    except (IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:  # shapes the method never saves
        raise DifftuneError(f"the saved {method} tensors are malformed ({type(e).__name__}: {e}); the file is "
                            "damaged or was not written by difftune") from None
