"""The compressed-model format: a diffusers model whose modules are partly replaced by compact classes.

A folder::

    my_model/
      compressed_config.json   {"format": "difftune-compressed", "model_class": ..., "model_config": {...},
                                "modules": {"<name>": {"class": "rtn_linear", "args": {...}}}, "quant_method": ...}
      model.safetensors        every tensor of the compressed model's state dict (FP tensors of the modules that
                               were kept, packed tensors of the replaced ones); the same JSON in its metadata

The loader builds the model class from its config on the meta device, swaps in the replaced modules built from
their arguments, checks every key, shape and dtype of the file against that skeleton, and only then assigns the
tensors. The FP weights of the original model are never needed, so a quantized denoiser loads into a pipeline
(`load_compressed_pipeline`) without diffusers reading its FP weights. Only safetensors and JSON are read.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..components import denoiser_name
from ..errors import DifftuneError, bad_value
from ..fileio import atomic_write
from ..version import __version__
from .replaced import ReplacedModule, get_replacement, replaced_modules

FORMAT = "difftune-compressed"
FORMAT_VERSION = 1
CONFIG_NAME = "compressed_config.json"
WEIGHTS_NAME = "model.safetensors"
METADATA_KEY = "difftune"
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state dict (numel × element size of every saved tensor); exact on the meta device."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _model_class(name: object) -> type:
    import diffusers
    from diffusers import ModelMixin

    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise bad_value("model_class", name, "the name of a diffusers model class (e.g. 'DiTTransformer2DModel')",
                        f"This diffusers ({diffusers.__version__}) has no such model; was the file written with a "
                        "newer one?")
    return cls


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_compressed(model: nn.Module, folder: str | Path, base_model: str = "") -> Path:
    """Save a compressed diffusers model (one with `ReplacedModule`s swapped in) to ``folder``.

    Args:
        model: a diffusers model (e.g. ``DiTTransformer2DModel``) after a quantizer such as `quantize_rtn_`; it must
            hold real tensors (not meta) and no difftune adapters (save those with ``save_adapter``).
        folder: the folder to create or overwrite (``compressed_config.json`` + ``model.safetensors``).
        base_model: where the FP model came from, recorded for reference.

    Returns:
        The folder.

    Raises:
        DifftuneError: not a diffusers model, no replaced modules, adapters present, meta or tied tensors, floating
            tensors of mixed dtypes outside the replaced modules, or a replaced module that cannot be rebuilt from
            its own arguments.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "to_json_string"):
        raise bad_value("model", type(model).__name__, "a diffusers model (a ModelMixin with a config)")
    import diffusers

    cls = type(model)
    if getattr(diffusers, cls.__name__, None) is not cls:
        raise bad_value("model", cls.__name__, "an instance of a model class diffusers exports (e.g. "
                        "DiTTransformer2DModel)", "The loader rebuilds the class by its name from diffusers.")
    if not isinstance(base_model, str):
        raise bad_value("base_model", base_model, "a string (a path or hub id, or '')")
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        raise DifftuneError(f"`folder` is a folder to create, got a file name {str(folder)!r}; drop '.safetensors'")
    adapted = [n for n, m in model.named_modules() if getattr(m, "_difftune_host", False)]
    if adapted:
        raise DifftuneError(f"the model carries difftune adapters (e.g. on {adapted[:3]}); save them with "
                            "save_adapter() and remove them before save_compressed()")
    replaced = replaced_modules(model)
    if not replaced:
        raise DifftuneError(f"{type(model).__name__} has no replaced (compressed) modules; compress it first, e.g. "
                            "difftune.compress.quantize_rtn_(model, bits=4, target_modules=[...])")
    nested = [a for a, b in itertools.permutations(replaced, 2) if a.startswith(b + ".")]
    if nested:
        raise DifftuneError(f"replaced modules {nested[:3]} sit inside other replaced modules; that cannot be rebuilt")
    modules = {name: {"class": m.replacement, "args": _checked_args(name, m)} for name, m in replaced.items()}
    tensors = _tensors_to_save(model, replaced)
    kept = {t.dtype for k, t in tensors.items() if t.is_floating_point() and not _under(k, replaced)}
    if len(kept) > 1:
        raise DifftuneError(f"the tensors outside the replaced modules have several floating dtypes "
                            f"{sorted(map(_dtype_name, kept))}; cast the model to one dtype (model.to(dtype)) first")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "difftune_version": __version__,
        "quant_method": "+".join(sorted({m.method for m in replaced.values()})),
        "base_model": base_model,
        "model_class": cls.__name__,
        "model_config": json.loads(model.to_json_string()),
        "dtype": _dtype_name(next(iter(kept))) if kept else "float32",
        "modules": modules,
    }
    text = json.dumps(header, indent=2, sort_keys=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt",
                                                                                       METADATA_KEY: text}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return folder


def _under(key: str, prefixes: Mapping[str, Any]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def _checked_args(name: str, module: ReplacedModule) -> dict[str, Any]:
    """The module's constructor args, after proving they rebuild its exact state dict (what the loader will do)."""
    args = module.replacement_args()
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DifftuneError(f"{module.describe()} at {name!r}: replacement_args() {args!r} are not JSON values ({e}); "
                            "a bug in the replacement class") from e
    with torch.device("meta"):
        shell = type(module).from_args(args, where=name)
    live, rebuilt = module.state_dict(), shell.state_dict()
    diff = [k for k in live.keys() | rebuilt.keys() if k not in live or k not in rebuilt
            or live[k].shape != rebuilt[k].shape or live[k].dtype != rebuilt[k].dtype]
    if diff:
        raise DifftuneError(f"{module.describe()} at {name!r} cannot be rebuilt from its arguments {args}: tensors "
                            f"{sorted(diff)[:5]} differ in name, shape or dtype (a bug in the replacement class)")
    return args


def _tensors_to_save(model: nn.Module, replaced: Mapping[str, ReplacedModule]) -> dict[str, Tensor]:
    state = model.state_dict()
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise DifftuneError(f"the model has tensors on the meta device (no values), e.g. {meta[:3]}; "
                            "compress a model with real weights")
    seen: dict[tuple[Any, int], str] = {}
    for k, t in state.items():
        ptr = (t.device, t.untyped_storage().data_ptr())
        if t.numel() and ptr in seen:  # safetensors cannot store two names for one storage
            raise DifftuneError(f"tensors {seen[ptr]!r} and {k!r} share memory (tied weights); the compressed format "
                                "stores each tensor once and cannot restore the tie")
        seen[ptr] = k
    return {k: t.detach().to("cpu").contiguous() for k, t in state.items()}


def _weights_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise DifftuneError(f"no compressed model at {str(path)!r}: expected a folder holding {WEIGHTS_NAME} (written "
                            "by save_compressed) or that .safetensors file")
    return p


def _parse_json(text: str, where: str) -> Any:
    from ..serialization import parse_header_json  # the adapters' bounded parser (size, depth, NaN, repeated keys)

    return parse_header_json(text, where)


def read_compressed_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a compressed model (folder or its ``model.safetensors``), validated.

    Raises:
        DifftuneError: missing or unreadable files, JSON and safetensors metadata that disagree, another format, a
            newer format version, or fields of the wrong type.
    """
    weights = _weights_path(path)
    from ..serialization import metadata_header

    header = metadata_header(weights, "it was not written by save_compressed")
    cfg_file = weights.parent / CONFIG_NAME
    if cfg_file.is_file():
        on_disk = _parse_json(cfg_file.read_text(), str(cfg_file))
        if on_disk != header:
            raise DifftuneError(f"{cfg_file} and the metadata of {weights} disagree; one of them was edited or "
                                "replaced. Save the model again")
    _check_header(header, str(path))
    return header


def _check_header(header: Any, where: str) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise DifftuneError(f"{where} is not a difftune compressed model (format {got!r}, expected {FORMAT!r})")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad_value(f"{where}: format_version", version, "an integer")
    if version > FORMAT_VERSION:
        raise DifftuneError(f"{where} uses compressed format version {version}, newer than this difftune's "
                            f"({__version__}, format {FORMAT_VERSION}); upgrade difftune")
    for field, kind in (("model_class", str), ("model_config", dict), ("modules", dict), ("dtype", str)):
        if not isinstance(header.get(field), kind):
            raise bad_value(f"{where}: {field}", header.get(field), f"a {kind.__name__}")
    if header["dtype"] not in _FLOAT_DTYPES:
        raise bad_value(f"{where}: dtype", header["dtype"], f"one of {sorted(_FLOAT_DTYPES)}")
    for name, spec in header["modules"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str) or not isinstance(spec.get("args"),
                                                                                                 dict):
            raise bad_value(f"{where}: modules[{name!r}]", spec, 'an object {"class": <registry key>, "args": {...}}')


def _read_tensors(weights: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(weights), framework="pt") as f:
            # Copied into fresh (64-byte aligned) memory: tensors left in the file's buffer are unaligned, and CPU
            # matmuls then take other kernels whose sums differ in the last bit from the model that was saved.
            return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DifftuneError(f"{weights} could not be read as safetensors ({e}); it is corrupt or truncated") from e


def _skeleton(header: dict[str, Any]) -> nn.Module:
    """The model with its replaced modules swapped in, every parameter on the meta device (buffers that the model
    computes itself, such as DiT's position table, are real: they are not in the file)."""
    from accelerate import init_empty_weights

    cls = _model_class(header["model_class"])
    classes = {name: get_replacement(spec["class"]) for name, spec in header["modules"].items()}
    try:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(header["model_config"])
    except (TypeError, ValueError) as e:
        raise DifftuneError(f"`model_config` does not build a {cls.__name__} ({e}); the file is corrupt or was "
                            "written by another diffusers") from e
    if header["dtype"] != "float32":  # from_config builds in fp32; a model saved in another dtype is cast first
        model.to(_FLOAT_DTYPES[header["dtype"]])
    for name in sorted(classes):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            parent.get_submodule(child)
        except AttributeError as e:
            raise DifftuneError(f"replaced module {name!r} does not exist in {cls.__name__} built from the saved "
                                "config; the file's `modules` and `model_config` disagree") from e
        with init_empty_weights(include_buffers=False):
            module = classes[name].from_args(header["modules"][name]["args"], where=name)
        setattr(parent, child, module)
    return model


def _check_tensors(model: nn.Module, tensors: Mapping[str, Tensor], where: str) -> None:
    expected = model.state_dict(keep_vars=True)
    problems = [f"unexpected key {k!r} (no such tensor in the model)" for k in tensors if k not in expected]
    problems += [f"missing key {k!r} (expected shape {tuple(v.shape)}, dtype {_dtype_name(v.dtype)})"
                 for k, v in expected.items() if k not in tensors]
    for k, v in expected.items():
        if k in tensors and (tensors[k].shape != v.shape or tensors[k].dtype != v.dtype):
            problems.append(f"{k!r}: the file has shape {tuple(tensors[k].shape)} dtype "
                            f"{_dtype_name(tensors[k].dtype)}, expected shape {tuple(v.shape)} dtype "
                            f"{_dtype_name(v.dtype)}")
    if problems:
        raise DifftuneError(f"{where} does not match the model its header describes in {len(problems)} place(s), "
                            f"first: {problems[:5]}. The file is corrupt or was edited; save the model again")


def load_compressed(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a model written by `save_compressed`, without any FP weights of the original model.

    Every key, shape and dtype in the file is checked against the model its header describes before any tensor is
    assigned; on failure nothing is returned (there is no partially loaded model to clean up).

    Args:
        path: the folder (or its ``model.safetensors``).
        device: where the model goes (default CPU).
        dtype: cast the floating-point tensors to this dtype after loading (default: as saved).

    Returns:
        The diffusers model, in eval mode.

    Raises:
        DifftuneError: an unreadable or corrupt file, another format or a newer version, an unknown model or
            replacement class, bad constructor arguments, or a missing/unexpected key or a wrong shape or dtype.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise bad_value("dtype", dtype, "a floating torch.dtype (e.g. torch.float16) or None")
    header = read_compressed_header(path)
    weights = _weights_path(path)
    model = _skeleton(header)
    tensors = _read_tensors(weights)
    _check_tensors(model, tensors, str(weights))
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [k for k, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # a replacement class whose __init__ leaves non-persistent state unset: a bug, not bad input
        raise DifftuneError(f"after loading, tensors {left[:5]} have no values; the replaced modules' classes must "
                            "create every tensor that is not saved")
    model.register_to_config(_name_or_path=str(path))
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_compressed_pipeline(
    base: str | Path, compressed: str | Path, component: str | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """A diffusers pipeline from the local folder ``base`` with its denoiser (or ``component``) taken from a
    compressed model; diffusers never reads that component's FP weights (they may be absent from ``base``).

    Args:
        base: a diffusers pipeline folder (``model_index.json`` and the other components).
        compressed: what `save_compressed` wrote for that component.
        component: the pipeline component to replace (default: the denoiser, ``unet`` else ``transformer``).
        device: where the pipeline goes (default CPU).
        dtype: the floating dtype of every component (default: float32 for the others, as saved for the
            compressed one).

    Returns:
        The pipeline, e.g. a ``DiTPipeline``.

    Raises:
        DifftuneError: ``base`` is not a pipeline folder, has no such component, or expects another model class.
    """
    from diffusers import DiffusionPipeline

    index_file = Path(base) / "model_index.json"
    if not index_file.is_file():
        raise DifftuneError(f"`base` {str(base)!r} is not a diffusers pipeline folder (no model_index.json); pass a "
                            "folder written by pipe.save_pretrained()")
    index = _parse_json(index_file.read_text(), str(index_file))
    if not isinstance(index, dict):
        raise bad_value(str(index_file), type(index).__name__, "a JSON object of pipeline components")
    slots = {k: v for k, v in index.items() if isinstance(v, list) and len(v) == 2 and not k.startswith("_")}
    name = component or denoiser_name(slots)
    if name not in slots:
        raise bad_value("component", name, f"one of the components of {str(base)!r}: {sorted(slots)}")
    header = read_compressed_header(compressed)
    if slots[name][1] != header["model_class"]:
        raise DifftuneError(f"the pipeline's {name!r} is a {slots[name][1]} but {str(compressed)!r} holds a "
                            f"{header['model_class']}; pass the matching `component` or base pipeline")
    model = load_compressed(compressed, device=device, dtype=dtype)
    kwargs: dict[str, Any] = {name: model}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return DiffusionPipeline.from_pretrained(str(base), **kwargs).to(device)
