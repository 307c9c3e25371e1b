"""The models the studio's model dropdown offers: the shipped ones (`difftune.zoo`), the pipeline folders of the
models folder (``--models``) and the diffusers pipelines in the Hugging Face Hub cache.

The list is built on the server and a switch names an entry of it by its label: the page can never make the studio
load a path it chose. Only folders holding a ``model_index.json`` are offered (diffusers pipelines); the walk never
follows symlinked folders out of the models folder and looks two levels down at most (``models/sd15``,
``models/bk/small``). A Hub-cache model is its newest snapshot (the one ``refs/main`` names when present).
"""

from __future__ import annotations

import os
from pathlib import Path

INDEX = "model_index.json"
MAX_DEPTH = 2  #: folder levels searched below the models folder
MAX_MODELS = 200  #: entries offered (the first ones in sorted order)


def _pipelines(folder: Path) -> list[Path]:
    """Pipeline folders under ``folder`` (itself excluded), at most `MAX_DEPTH` levels down, no symlink followed."""
    if not folder.is_dir():
        return []
    root = folder.resolve()
    found = []
    for here, dirs, files in os.walk(root, followlinks=False):
        rel = Path(here).relative_to(root)
        if INDEX in files and rel.parts:
            found.append(Path(here))
            dirs[:] = []  # a pipeline's own sub-folders (unet, vae, ...) hold no other pipeline
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and len(rel.parts) < MAX_DEPTH)
    return sorted(found)


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_models(cache: Path) -> dict[str, Path]:
    """``org/name`` -> the newest snapshot folder holding a pipeline, for every ``models--org--name`` of the cache."""
    out: dict[str, Path] = {}
    if not cache.is_dir():
        return out
    for repo in sorted(cache.glob("models--*")):
        snapshots = repo / "snapshots"
        ref = repo / "refs" / "main"
        named = snapshots / ref.read_text().strip() if ref.is_file() else None
        candidates = [named] if named is not None and (named / INDEX).is_file() else sorted(
            (s for s in snapshots.glob("*") if (s / INDEX).is_file()), key=lambda s: s.stat().st_mtime, reverse=True)
        if candidates:
            out[repo.name[len("models--"):].replace("--", "/")] = candidates[0]
    return out


def models(folder: str | Path | None, current: str | Path, started: str | Path | None = None,
           cache: Path | None = None) -> dict[str, Path]:
    """Label -> pipeline folder for every model offered: the shipped ones, the models ``folder``'s, the Hub cache's
    and the one the studio ``started`` with (``--model``, listed as such when none of the others is it), the model
    running now (``current``) first."""
    from difftune.zoo import MODELS
    from difftune.zoo import path as zoo_path

    entries: list[tuple[str, Path]] = [(f"{name} (shipped)", zoo_path(name)) for name in MODELS]
    if folder is not None:
        base = Path(folder).resolve()
        entries += [(f"{p.relative_to(base).as_posix()} (models folder)", p) for p in _pipelines(base)]
    entries += [(f"{repo} (Hub cache)", p) for repo, p in _hub_models(cache or hub_cache()).items()]
    out: dict[str, Path] = {}
    for label, path in entries:
        if (path / INDEX).is_file() and path.resolve() not in out.values() and len(out) < MAX_MODELS:
            out[label] = path.resolve()
    for model in (started, current):
        if model is not None and Path(model).resolve() not in out.values():
            out[f"{Path(model).resolve().name} (--model)"] = Path(model).resolve()
    here = next(label for label, path in out.items() if path == Path(current).resolve())
    return {here: out.pop(here), **out}
