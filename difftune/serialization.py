"""The one adapter format every method saves to.

A folder::

    my_adapter/
      adapter_config.json          {"format": "difftune-adapter", "method": "lora", "config": {...}, ...}
      adapter_model.safetensors    "<module name>.<prefixed tensor>" -> tensor; the same JSON in its metadata

The JSON is repeated in the safetensors metadata (key ``difftune``) so the single file stands alone: either the
folder or the ``.safetensors`` file can be loaded. Writes are atomic (temp file + rename); only safetensors and JSON
are ever read, never pickle.

Hostile files (issue 17): everything read is bounded and checked before the model is touched. The JSON header is at
most ``MAX_HEADER_BYTES`` of UTF-8, nested at most ``MAX_JSON_DEPTH``, without NaN/Infinity/overflowing numbers; every
header field has its type checked (`read_header`); patterns in the config must pass `targeting.check_pattern`; the
method's `MethodConfig.check_saved` compares the header's sizes (LoRA's rank) with the saved tensors' shapes before
`inject` allocates anything. A method without `check_saved` is still covered: `inject` runs under
`adapter_checks.AllocationGuard`, which refuses any single tensor allocation larger than the file's tensors plus the
largest base tensor, before it happens (a header claiming rank 10⁶ fails in microseconds, not after 3 GB). The
safetensors header is bounded before it is parsed, tensors must have a dtype difftune writes, saved values must be
finite and sane, and once loaded no layer may change by more than `adapter_checks.MAX_GAIN` times its size (issue 29:
finite but huge values loaded cleanly and gave NaN outputs). Any failure is a `DifftuneError` and leaves the model as
it was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapter_checks import AllocationGuard, check_dtype, check_loaded, check_safetensors_header, check_values
from .components import component_of_model
from .errors import DifftuneError
from .fileio import atomic_write
from .methods.base import check_adapter_name, check_weight, get_method
from .methods.verbs import (
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
MAX_HEADER_BYTES = 1 << 20  #: real headers are ~1 KB
MAX_JSON_DEPTH = 32


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise DifftuneError(f"the header holds the number {text[:40]}, beyond float range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:  # JSON keeps the last silently; a header with two `method`s is damaged or forged
            raise DifftuneError(f"the header repeats the key {k!r}")
        seen[k] = v
    return seen


def _refuse_constant(name: str) -> None:
    raise DifftuneError(f"the header holds {name}; difftune writes only finite numbers")


def _depth(node: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (a recursive walk would itself overflow on hostile input)."""
    stack, deepest = [(node, 1)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def metadata_header(weights: Path, missing_hint: str) -> Any:
    """The JSON difftune stores in a safetensors file's metadata (key ``difftune``), parsed with `parse_header_json`.

    A file that cannot be read, or has no such key (``missing_hint`` says what it probably is), is a `DifftuneError`.
    """
    check_safetensors_header(weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DifftuneError(f"{weights} is not a readable safetensors file ({e}); it may be truncated") from e
    if METADATA_KEY not in meta:
        raise DifftuneError(f"{weights} has no difftune metadata (key {METADATA_KEY!r}); {missing_hint}")
    return parse_header_json(meta[METADATA_KEY], f"{weights} (difftune metadata)")


def parse_header_json(raw: str | bytes, where: str) -> Any:
    """A difftune file's JSON header (adapters, compressed models), bounded: size, UTF-8, depth, finite numbers, unique
    keys; a DifftuneError naming ``where`` otherwise."""
    if len(raw) > MAX_HEADER_BYTES:
        raise DifftuneError(f"{where}: the header is {len(raw):,} bytes, over {MAX_HEADER_BYTES:,} allowed")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DifftuneError(f"{where}: the header is not UTF-8 ({e}); save the file again") from None
    # A nesting bomb ([[[[...) overflows the C parser's recursion; count brackets first, cheaply.
    if raw.count("[") + raw.count("{") > MAX_JSON_DEPTH and _bracket_depth(raw) > MAX_JSON_DEPTH:
        raise DifftuneError(f"{where}: the header nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        header = json.loads(raw, parse_float=_finite_float, parse_constant=_refuse_constant,
                            object_pairs_hook=_unique_keys)
    except DifftuneError as e:
        raise DifftuneError(f"{where}: {e}; save the file again") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise DifftuneError(f"{where} is not valid JSON ({type(e).__name__}: {e}); save the file again") from None
    if _depth(header, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise DifftuneError(f"{where}: the header nests deeper than {MAX_JSON_DEPTH} levels")
    return header


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_header_fields(header: dict[str, Any], path: Any) -> None:
    """Every field difftune reads has the type it writes; a hostile or hand-edited header fails here, by name."""
    def wrong(key: str, expected: str) -> DifftuneError:
        return DifftuneError(f"{path}: header field `{key}` must be {expected}, got {header.get(key)!r:.80}; "
                             "the file is damaged or was not written by difftune")

    if not isinstance(header.get("method"), str) or not header["method"]:
        raise wrong("method", "a method name (string)")
    for key in ("name", "base_model", "component", "difftune_version"):
        if header.get(key) is not None and not isinstance(header[key], str):
            raise wrong(key, "a string")
    if not isinstance(header.get("config", {}), dict):
        raise wrong("config", "a mapping of the method's fields")
    fp = header.get("target_fingerprint")
    if fp is not None and not (isinstance(fp, dict) and isinstance(fp.get("sha256", ""), str) and
                               isinstance(fp.get("modules", 0), int) and not isinstance(fp.get("modules"), bool)):
        raise wrong("target_fingerprint", "a mapping {modules: int, sha256: str}")


def save_adapter_file(
    model: nn.Module, path: str | Path, name: str = "default", base_model: str = "", component: str = ""
) -> Path:
    """Save adapter ``name`` of ``model`` as a folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``component``: the pipeline component ``model`` is; when not given, taken from the model's class
    (`components.component_of_model`: ``unet`` / ``transformer``), so that an adapter saved from a bare SD3/Flux
    transformer exports under ``transformer.`` keys rather than the ``unet.`` an unrecorded component defaults to.

    Returns:
        The folder.
    """
    config = get_config(model, name)
    component = component or component_of_model(model)
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
        if cfg_file.stat().st_size > MAX_HEADER_BYTES:
            raise DifftuneError(f"{cfg_file} is {cfg_file.stat().st_size:,} bytes, over the {MAX_HEADER_BYTES:,} an "
                                "adapter header may have")
        header = parse_header_json(cfg_file.read_bytes(), str(cfg_file))
    else:
        header = metadata_header(weights, "it was not written by difftune. Hint: LoRA files from diffusers/kohya "
                                          "load with pipe.load_lora_weights().")
    if not isinstance(header, dict) or header.get("format") != FORMAT or "method" not in header:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise DifftuneError(f"{path} is not a difftune adapter (header format {got!r}, expected {FORMAT!r})")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DifftuneError(f"{path}: `format_version` must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DifftuneError(
            f"{path} uses adapter format version {header['format_version']}, newer than this difftune "
            f"({__version__}, format {FORMAT_VERSION}); upgrade difftune"
        )
    _check_header_fields(header, path)
    return header


def config_from_header(header: dict[str, Any], path: Any) -> Any:
    """The method config a header describes; a malformed value is a DifftuneError naming the file."""
    cls = get_method(header["method"])
    try:
        return cls.from_dict(header.get("config", {}))
    except DifftuneError as e:
        raise DifftuneError(f"{path}: the saved {header['method']} config is invalid: {e}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as e:  # a value of a type the method never wrote
        raise DifftuneError(f"{path}: the saved {header['method']} config is invalid ({type(e).__name__}: {e}); the "
                            "file is damaged or was not written by difftune") from None


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    weights = _weights_path(path)
    check_safetensors_header(weights)
    try:
        out = {}
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[key] = f.get_tensor(key)
                check_dtype(key, out[key], weights)
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
    config = config_from_header(header, path)
    name = check_adapter_name(name if name is not None else header.get("name") or "default")
    if name in adapter_names(model):
        raise DifftuneError(f"an adapter named {name!r} is already loaded; pass another `name` or delete it first")
    tensors = read_tensors(path)
    base = header.get("base_model") or "unknown base"
    # Before anything is allocated: the header's sizes must agree with the saved tensors (a header claiming
    # rank 10⁶ over rank-4 tensors would otherwise allocate gigabytes in inject), and the values must be finite.
    try:
        config.check_saved(tensors)
    except DifftuneError as e:
        raise DifftuneError(f"adapter {str(path)!r}: its header does not match its tensors: {e}") from None
    except (IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:  # tensors of shapes it never writes
        raise DifftuneError(f"adapter {str(path)!r}: its tensors are malformed ({type(e).__name__}: {e}); the file "
                            "is damaged") from None
    check_values(tensors, config, path)
    limit = sum(t.numel() for t in tensors.values()) + max((p.numel() for p in model.parameters()), default=0) + 4096
    try:
        with AllocationGuard(limit, path):
            inject(model, config, name=name, weight=weight, freeze_base=False)
    except DifftuneError as e:
        raise DifftuneError(f"adapter {str(path)!r} (made for {base}) does not fit this model: {e}") from e
    try:
        _copy_in(model, name, tensors, path, base, header.get("target_fingerprint"))
        check_loaded(model, name, path)  # what the values do: no layer's change may be non-finite or huge
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
            except (IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:  # tensors it never writes
                raise DifftuneError(f"adapter {str(path)!r}: its tensors for {module!r} are malformed "
                                    f"({type(e).__name__}: {e}); the file is damaged") from None
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
