"""The one adapter format every method saves to.

A folder::

    my_adapter/
      adapter_config.json          {"format": "difftune-adapter", "method": "lora", "config": {...}, ...}
      adapter_model.safetensors    "<module name>.<prefixed tensor>" -> tensor; the same JSON in its metadata

The JSON is repeated in the safetensors metadata (key ``difftune``) so the single file stands alone: either the
folder or the ``.safetensors`` file can be loaded. Writes are atomic (temp file + rename); only safetensors and JSON
are ever read, never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import DifftuneError
from .fileio import atomic_write
from .methods.base import check_adapter_name, check_weight, get_method
from .methods.model import (
    MODEL_KEY,
    adapter_names,
    adapter_state_dict,
    adapter_tensors,
    get_config,
    hosts,
    inject,
    model_part,
    remove,
    target_fingerprint,
)
from .targeting import canonical_name
from .version import __version__

FORMAT = "difftune-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_KEY = "difftune"


def save_adapter_file(
    model: nn.Module, path: str | Path, name: str = "default", base_model: str = "", component: str = ""
) -> Path:
    """Save adapter ``name`` of ``model`` as a folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Returns:
        The folder.
    """
    config = get_config(model, name)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "difftune_version": __version__,
        "method": config.method,
        "name": name,
        "base_model": base_model,
        "component": component,
        "target_fingerprint": target_fingerprint(model, name),
        "config": config.to_dict(),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
    if any(t.is_meta for t in tensors.values()):
        raise DifftuneError(f"adapter {name!r} lives on the meta device (no values); move the model to a real device")
    folder = Path(path)
    if folder.suffix == ".safetensors":
        raise DifftuneError(f"`path` is a folder to create, got a file name {str(path)!r}; drop the '.safetensors'")
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(header, indent=2, sort_keys=True)
    metadata = {"format": "pt", METADATA_KEY: text}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return folder


def _weights_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise DifftuneError(
            f"no adapter at {str(path)!r}: expected a folder holding {WEIGHTS_NAME} (written by save_adapter) "
            "or a .safetensors file"
        )
    return p


def read_header(path: str | Path) -> dict[str, Any]:
    """The adapter's JSON header (from ``adapter_config.json`` when present, else the safetensors metadata)."""
    weights = _weights_path(path)
    cfg_file = weights.parent / CONFIG_NAME
    if Path(path).is_dir() and cfg_file.is_file():
        try:
            header = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise DifftuneError(f"{cfg_file} is not valid JSON ({e}); re-save the adapter") from e
    else:
        try:
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise DifftuneError(f"{weights} is not a readable safetensors file ({e}); it may be truncated") from e
        if METADATA_KEY not in meta:
            raise DifftuneError(
                f"{weights} has no difftune metadata (key {METADATA_KEY!r}); it was not written by difftune. "
                "Hint: LoRA files from diffusers/kohya load with pipe.load_lora_weights()."
            )
        try:
            header = json.loads(meta[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise DifftuneError(f"{weights}: its difftune metadata is not JSON ({e}); re-save the adapter") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT or "method" not in header:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise DifftuneError(f"{path} is not a difftune adapter (header format {got!r}, expected {FORMAT!r})")
    version = header.get("format_version", 0)
    if not isinstance(version, int):
        raise DifftuneError(f"{path}: `format_version` must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DifftuneError(
            f"{path} uses adapter format version {header['format_version']}, newer than this difftune "
            f"({__version__}, format {FORMAT_VERSION}); upgrade difftune"
        )
    return header


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    weights = _weights_path(path)
    try:
        out = {}
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[key] = f.get_tensor(key)
        return out
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DifftuneError(f"{weights} could not be read as safetensors ({e}); it is corrupt or truncated") from e


def load_adapter_file(
    model: nn.Module, path: str | Path, name: str | None = None, weight: float = 1.0
) -> str:
    """Inject the adapter saved at ``path`` into ``model`` and load its tensors.

    Every saved key must map to a module of ``model`` with the same shape, and the targeted modules must have
    the fingerprint recorded at save time; otherwise nothing is changed and a `DifftuneError` lists the first
    mismatches.

    Returns:
        The adapter's name in ``model``.
    """
    weight = check_weight(weight)
    header = read_header(path)
    config = get_method(header["method"]).from_dict(header.get("config", {}))
    name = check_adapter_name(name if name is not None else header.get("name") or "default")
    if name in adapter_names(model):
        raise DifftuneError(f"an adapter named {name!r} is already loaded; pass another `name` or delete it first")
    tensors = read_tensors(path)
    base = header.get("base_model") or "unknown base"
    try:
        inject(model, config, name=name, weight=weight, freeze_base=False)
    except DifftuneError as e:
        raise DifftuneError(f"adapter {str(path)!r} (made for {base}) does not fit this model: {e}") from e
    try:
        _copy_in(model, name, tensors, path, base, header.get("target_fingerprint"))
    except BaseException:
        remove(model, name)
        raise
    return name


def _copy_in(model: nn.Module, name: str, tensors: dict[str, Tensor], path: Any, base: str, fingerprint: Any) -> None:
    for host_name, host in hosts(model):
        if name in host.adapters:
            module = canonical_name(host_name)
            adapter = host.adapters[name]
            local = {k[len(module) + 1:]: v for k, v in tensors.items()
                     if k.startswith(module + ".") and k[len(module) + 1:].startswith(adapter.prefix)}
            try:
                adapter.adopt(local, host.base_layer)
            except DifftuneError as e:
                raise DifftuneError(f"adapter {str(path)!r} (made for {base}) does not fit {module!r}: {e}") from e
    part = model_part(model, name)
    if part is not None and hasattr(part, "adopt"):
        part.adopt({k[len(MODEL_KEY) + 1:]: v for k, v in tensors.items() if k.startswith(MODEL_KEY + ".")})
    live = adapter_tensors(model, name)
    if any(v.is_meta for v in live.values()):
        raise DifftuneError("the model is on the meta device, so adapter values cannot be loaded into it; "
                            "materialize it first (e.g. model.to_empty(device='cpu') and load its weights)")
    problems = [f"unexpected key {k!r}" for k in tensors if k not in live]
    problems += [f"missing key {k!r}" for k in live if k not in tensors]
    problems += [
        f"{k!r}: saved {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
        for k, v in live.items() if k in tensors and tensors[k].shape != v.shape
    ]
    problems += [
        f"{k!r}: saved dtype {tensors[k].dtype}, model {v.dtype}"
        for k, v in live.items() if k in tensors and tensors[k].is_floating_point() != v.is_floating_point()
    ]
    if problems:
        raise DifftuneError(
            f"adapter {str(path)!r} (made for {base}) does not match this model in {len(problems)} place(s), first: "
            f"{problems[:5]}. Hint: was it trained on a different base model or component?"
        )
    if fingerprint and fingerprint != target_fingerprint(model, name):
        raise DifftuneError(
            f"adapter {str(path)!r} was made for a base whose targeted layers differ from this model's "
            f"(saved fingerprint {fingerprint}, this model {target_fingerprint(model, name)}); base: {base}"
        )
    with torch.no_grad():
        for k, v in live.items():
            v.copy_(tensors[k].to(dtype=v.dtype, device=v.device))


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Summary of a saved adapter: method, base, component, parameter count, size, dtypes, config."""
    header = read_header(path)
    tensors = read_tensors(path)
    return {
        "method": header["method"],
        "name": header.get("name"),
        "base_model": header.get("base_model") or None,
        "component": header.get("component") or None,
        "difftune_version": header.get("difftune_version"),
        "modules": header.get("target_fingerprint", {}).get("modules"),
        **_describe(header["method"], tensors),
        "tensors": len(tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "file_bytes": _weights_path(path).stat().st_size,
        "config": header.get("config", {}),
    }


def _describe(method: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    try:
        cls = get_method(method)
    except DifftuneError:  # an unknown method can still be inspected; count every floating value
        return {"parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point())}
    return cls.describe(tensors)
