"""Base models the way users name them, resolved in one place for training, ``difftune generate``/``eval``/``app``
and `load_pipeline`.

A name is, in this order:

1. a local diffusers pipeline folder (``model_index.json`` inside);
2. a single-file checkpoint in the original Stable Diffusion (LDM) layout, ``.safetensors`` (or a ``.ckpt`` that is
   safetensors inside: pickle files can run code when read, so they are refused), loaded through diffusers'
   ``from_single_file`` with the pipeline configs of ``config`` (a folder or Hub id; by default the reference repo
   of the architecture diffusers recognises in the file);
3. a shipped reference model's name (``sd-mini``, ``dit-mini``: difftune/assets);
4. a Hugging Face Hub repo id (``org/name``, with a ``revision``), resolved through huggingface_hub's cache: with
   ``HF_HUB_OFFLINE=1`` a cached snapshot is used and a missing one is an error that says so; online, diffusers'
   ``DiffusionPipeline.download`` fetches only the files the pipeline (and ``variant``) needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DifftuneError, bad_value

#: The shipped reference models (difftune.zoo), found by name from any working directory.
ASSETS = Path(__file__).resolve().parent / "assets"
MODELS = ("sd-mini", "dit-mini", "flow-mini")
#: File suffixes taken as single-file checkpoints.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: The names errors give the four settings: the training config's keys, and the CLI's flags (`CLI_KEYS`).
MODEL_KEYS = {"path": "model.path", "revision": "model.revision", "config": "model.config", "variant": "model.variant"}
CLI_KEYS = {"path": "--model", "revision": "--revision", "config": "--config", "variant": "--variant"}


@dataclass(frozen=True)
class BaseModel:
    """Where a base model's files are.

    ``name`` is what the user wrote (recorded as the adapter's base and in the model card); ``folder`` is the
    diffusers pipeline folder, or for a single-file checkpoint ``file``, the folder holding its pipeline configs.
    """

    name: str
    folder: Path
    file: Path | None = None
    repo_id: str | None = None  #: the Hub repo id the files came from, when they did
    revision: str | None = None


def hub_repo_id(name: str) -> str | None:
    """``name`` if it names a Hub repo (``org/name``) rather than a local path or a shipped model, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name in MODELS or name.count("/") != 1 or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def resolve_model(name: str | os.PathLike, revision: str | None = None, config: str | None = None,
                  variant: str | None = None, *, keys: dict[str, str] = MODEL_KEYS) -> BaseModel:
    """Find the base model ``name`` names (see the module docstring). ``revision`` applies to a Hub id, ``config``
    to a single-file checkpoint, ``variant`` (weight file names such as ``fp16``) to what is downloaded; errors name
    the settings as ``keys`` does."""
    key, config_key = keys["path"], keys["config"]

    text = str(name) if isinstance(name, os.PathLike) else name
    if not isinstance(text, str) or not text.strip():
        raise bad_value(key, name, "a pipeline folder, a .safetensors checkpoint, a shipped model or a Hub repo id",
                        f"e.g. sd-mini, or stabilityai/stable-diffusion-xl-base-1.0 (shipped: {', '.join(MODELS)})")
    path = Path(text).expanduser()
    repo_id = hub_repo_id(text)
    if revision is not None and repo_id is None:
        raise bad_value(keys["revision"], revision, f"left out: {key} {text!r} is not a Hub repo id",
                        "a revision (branch, tag or commit) selects a version of a Hub repo")
    single = path.suffix in SINGLE_FILE_SUFFIXES and not path.is_dir()
    if config is not None and not single:
        raise bad_value(config_key, config, f"left out: {key} {text!r} is not a single-file checkpoint",
                        "the configs are needed only to load an original (LDM) .safetensors checkpoint")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise bad_value(key, text, "a diffusers pipeline folder (with model_index.json)",
                            f"{path} has none; save a pipeline with pipe.save_pretrained(folder), or name its "
                            ".safetensors checkpoint file")
        return BaseModel(text, path)
    if single or path.is_file():
        if variant is not None:
            raise bad_value(keys["variant"], variant, "left out with a single-file checkpoint",
                            "a variant selects weight files inside a pipeline folder or Hub repo")
        return _single_file(text, path, config, keys)
    if text in MODELS:
        return BaseModel(text, ASSETS / text)
    if repo_id is None:
        raise bad_value(key, text, "an existing pipeline folder or checkpoint file, a shipped model "
                        f"({', '.join(MODELS)}) or a Hub repo id 'org/name'",
                        f"no file or folder {path} exists (relative to {Path.cwd()}); Hub models are named with "
                        "their organisation, e.g. stabilityai/stable-diffusion-xl-base-1.0")
    return BaseModel(text, _hub_folder(repo_id, revision, variant, key), repo_id=repo_id, revision=revision)


def _hub_folder(repo_id: str, revision: str | None, variant: str | None, key: str) -> Path:
    """The cached snapshot folder of ``repo_id`` (downloaded first when online)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if constants.HF_HUB_OFFLINE:
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError:
            raise DifftuneError(
                f"`{key}` names the Hub repo {where}, which is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it (nor is there a local "
                f"folder {repo_id} under {Path.cwd()}). Hint: download it once "
                f"online (`hf download {repo_id}`), point HF_HUB_CACHE at the cache that holds it, or name a local "
                "folder") from None
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id, revision=revision, variant=variant))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise DifftuneError(f"`{key}`: the Hub repo {where} could not be fetched ({type(e).__name__}: {e}). Hint: "
                            "check the id and revision, log in (`hf auth login`) for gated or private repos, or set "
                            "HF_HUB_OFFLINE=1 to use the cache only") from e


def _single_file(text: str, path: Path, config: str | None, keys: dict[str, str]) -> BaseModel:
    key, config_key = keys["path"], keys["config"]
    if not path.is_file():
        raise bad_value(key, text, "an existing checkpoint file", f"no file {path} (relative to {Path.cwd()})")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise bad_value(key, text, f"a single-file checkpoint ending in {' or '.join(SINGLE_FILE_SUFFIXES)}, "
                        "or a pipeline folder")
    shapes = _safetensors_shapes(path, key)
    if config is None:
        config = _default_config(path, shapes, config_key)
    configs = resolve_model(config, keys={**keys, "path": config_key})
    if configs.file is not None:
        raise bad_value(config_key, config, "a pipeline folder or Hub repo id holding model_index.json")
    return BaseModel(text, configs.folder, file=path)


def _safetensors_shapes(path: Path, key: str) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from the file's safetensors header (no tensor is read); a pickle file is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except (SafetensorError, OSError) as e:
        pickle = path.suffix == ".ckpt"
        raise DifftuneError(
            f"`{key}` {str(path)!r} is not a safetensors file ({e})"
            + (". difftune does not load pickle checkpoints: unpickling can run arbitrary code. Hint: take the "
               ".safetensors release of this model, or convert the .ckpt once in a sandbox you trust"
               if pickle else ". Hint: the file is damaged or not a checkpoint")) from None


def _default_config(path: Path, shapes: dict[str, tuple[int, ...]], config_key: str) -> str:
    """The Hub repo of the architecture diffusers recognises in the checkpoint's tensor names and shapes."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}  # the shapes, without the data
    try:
        kind = infer_diffusers_model_type(meta)
    except (KeyError, IndexError, ValueError) as e:
        raise bad_value(config_key, None, f"set: the architecture of {str(path)!r} was not recognised ({e})",
                        "name the pipeline folder or Hub repo whose configs match the checkpoint") from None
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]


@contextlib.contextmanager
def _as_safetensors(path: Path) -> Iterator[Path]:
    """``path`` under a ``.safetensors`` name: diffusers picks its reader by the suffix, and would unpickle a .ckpt
    even when it is safetensors inside (checked by `_safetensors_shapes`)."""
    if path.suffix == ".safetensors":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="difftune-ckpt-") as tmp:
        link = Path(tmp) / (path.stem + ".safetensors")
        link.symlink_to(path.resolve())
        yield link


def absent_components(folder: str | Path) -> dict[str, None]:
    """The components a saved pipeline's model_index.json records as absent (``[null, null]``), each as None.

    diffusers writes a component that was None that way, but loads the folder only when such a component is optional
    for its pipeline class or passed: an SD3 pipeline without T5 (``text_encoder_3=None``, flow-mini) is loaded with
    ``text_encoder_3=None, tokenizer_3=None``, as diffusers documents for dropping T5.
    """
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # from_pretrained reports what is wrong with the folder
    if not isinstance(index, dict):
        return {}
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}


#: the key of model_index.json where a pipeline folder records settings its calls need (`call_settings`)
CALL_KEY = "_difftune_call"
#: the settings it may record, with their types
CALL_SETTINGS: dict[str, type] = {"max_sequence_length": int}


def call_settings(folder: str | Path) -> dict[str, Any]:
    """The call settings a pipeline folder records (`CALL_KEY` in model_index.json): what its model was trained with
    and must be sampled with, e.g. the T5 length of an SD3 pipeline without T5 (flow-mini: 8), whose transformer
    reads as many zero tokens as ``max_sequence_length`` says (the pipeline's default, 256, is not what it learned).

    diffusers keeps private keys of model_index.json when it saves a pipeline's config but does not load them back;
    `load_base_pipeline` does."""
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # from_pretrained reports what is wrong with the folder
    found = index.get(CALL_KEY) if isinstance(index, dict) else None
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise bad_value(f"{CALL_KEY} in {path}", found, f"a mapping of call settings ({', '.join(CALL_SETTINGS)})")
    for k, v in found.items():
        want = CALL_SETTINGS.get(k)
        if want is None or isinstance(v, bool) or not isinstance(v, want) or (want is int and v < 1):
            raise bad_value(f"{CALL_KEY}.{k} in {path}", v, "one of: " + ", ".join(
                f"{name} ({t.__name__} >= 1)" for name, t in CALL_SETTINGS.items()),
                "the file was edited by hand or written by a newer difftune; remove the entry to use the "
                "pipeline's own defaults")
    return dict(found)


def load_base_pipeline(model: BaseModel, variant: str | None = None, dtype: torch.dtype = torch.float32,
                       *, keys: dict[str, str] = MODEL_KEYS) -> Any:
    """The diffusers pipeline of ``model`` (see `resolve_model`), on the CPU; its ``name_or_path`` is ``model.name``
    so that adapters saved from it record the name the user gave (a Hub id, not the cache folder)."""
    key = keys["path"]
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if model.file is None:
        pipe = DiffusionPipeline.from_pretrained(str(model.folder), variant=variant, dtype=dtype,
                                                 **absent_components(model.folder))
    else:
        index = json.loads((model.folder / "model_index.json").read_text())
        cls = getattr(diffusers, str(index.get("_class_name")), None)
        if cls is None or not hasattr(cls, "from_single_file"):
            raise bad_value(key, model.name, "a pipeline folder or Hub id: diffusers cannot load "
                            f"{index.get('_class_name')} from a single file")
        try:
            with _as_safetensors(model.file) as file:
                pipe = cls.from_single_file(str(file), config=str(model.folder), torch_dtype=dtype,
                                            local_files_only=True)
        except (KeyError, RuntimeError, ValueError, OSError, SingleFileComponentError) as e:
            raise DifftuneError(
                f"`{key}` {model.name!r} could not be loaded with the configs of {str(model.folder)!r} "
                f"({type(e).__name__}: {str(e)[:300]}). Hint: {keys['config']} must name the pipeline the "
                "checkpoint was made from (same architecture and sizes)") from e
    pipe.register_to_config(_name_or_path=model.name)
    recorded = call_settings(model.folder)
    if recorded:
        pipe.register_to_config(**{CALL_KEY: recorded})  # saved again by save_pretrained, read by call_defaults
    return pipe
