"""The studio's adapters folder: what it lists, what it may read, and the mix bundles it writes.

Everything the app reads comes from one folder (``--adapters``, default ``outputs/``, where `difftune quickstart` and
the bench labs write). An adapter is addressed by its *key*, the POSIX path of its folder relative to that root
(``quickstart/train/adapter``); a saved mix bundle by the key of its ``.mix.json`` file. `resolve` is the only way
from a key to a path: absolute keys, ``..`` and anything whose real path (symlinks followed) leaves the root are
refused, so neither a crafted API call nor a symlink planted in the folder can make the app read elsewhere.

Badges come from the adapter's header (`difftune.serialization.read_header`) and the safetensors header's shapes: no
tensor is loaded to list a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import SafetensorError, safe_open

from difftune.errors import DifftuneError, bad_value
from difftune.fileio import atomic_write
from difftune.serialization import WEIGHTS_NAME, parse_header_json, read_header

BUNDLE_SUFFIX = ".mix.json"
BUNDLE_FORMAT = "difftune-mix"
BUNDLE_VERSION = 1
MAX_DEPTH = 8  #: folder levels scanned below the root (labs write outputs/bench/<lab>/<run>/adapter)
MAX_ENTRIES = 500  #: a folder with more adapters than this is listed partially (the first ones in sorted order)
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256; files are hashed once


@dataclass(frozen=True)
class Entry:
    """One adapter (or mix bundle) of the folder, with the badges the studio shows.

    Attributes:
        key: POSIX path relative to the root; what the UI, the API and bundles use.
        kind: "adapter" or "bundle".
        method: the adapter's method (lora, sara, krona, scedit, csc, spm, ...), or "mix" for a bundle.
        base_model: the base model recorded in the file ("" when not recorded).
        component: the pipeline component it adapts ("" for the denoiser or not recorded).
        parameters: trained values (from the safetensors shapes), 0 for a bundle.
        file_bytes: size on disk.
        sha256: the first 12 hex digits of the weights file's SHA-256 (A1111's "Lora hashes" use such a prefix).
        error: why the entry cannot be used ("" when it can); such entries are listed, never loaded.
    """

    key: str
    kind: str
    method: str = ""
    base_model: str = ""
    component: str = ""
    parameters: int = 0
    file_bytes: int = 0
    sha256: str = ""
    error: str = ""

    def badges(self) -> str:
        """The one-line summary a row shows: method · base · size."""
        if self.error:
            return f"⚠ unusable: {self.error}"
        if self.kind == "bundle":
            return f"mix bundle · {human_bytes(self.file_bytes)}"
        base = Path(self.base_model).name if self.base_model else "base not recorded"
        comp = f" · {self.component}" if self.component and self.component not in ("unet", "transformer") else ""
        return (f"{self.method} · base {base}{comp} · {human_count(self.parameters)} params · "
                f"{human_bytes(self.file_bytes)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "badges": self.badges()}


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve(root: str | Path, key: object, what: str = "adapter") -> Path:
    """The real path of ``key`` inside ``root``; a `DifftuneError` for anything that would leave it.

    Refused: non-strings, empty or absolute keys, ``..`` parts, backslashes and NUL, and keys whose path, once
    symlinks are followed, is not inside the root's real path.
    """
    root_real = Path(root).resolve()
    if not isinstance(key, str) or not key or len(key) > 1024 or "\x00" in key or "\\" in key:
        raise bad_value(what, key, "the key of an entry of the adapters folder (a relative path)")
    parts = PurePosixPath(key)
    if parts.is_absolute() or ".." in parts.parts or key.startswith("~"):
        raise bad_value(what, key, f"a path inside the adapters folder {str(root_real)!r}",
                        "Absolute paths and '..' are refused: the studio reads only its adapters folder.")
    real = (root_real / Path(*parts.parts)).resolve()
    if not _inside(real, root_real):
        raise bad_value(what, key, f"a path inside the adapters folder {str(root_real)!r}",
                        f"It resolves to {str(real)!r} (a symlink out of the folder); the studio refuses it.")
    if not real.exists():
        raise bad_value(what, key, "an entry of the adapters folder", "Press 'refresh' to list the folder again.")
    return real


def file_hash(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256, cached by (path, size, mtime)."""
    st = path.stat()
    cache_key = (str(path), st.st_size, st.st_mtime_ns)
    if cache_key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[cache_key] = h.hexdigest()[:12]
    return _HASHES[cache_key]


def _parameters(weights: Path) -> int:
    """Trained values in a safetensors file, from its header's shapes (no tensor is read)."""
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            sl = f.get_slice(k)
            if sl.get_dtype().startswith(("F", "BF")):  # F16/F32/F64/BF16: learned values, not masks or indices
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
    return total


def describe(root: Path, key: str) -> Entry:
    """The `Entry` for ``key``; an unreadable file gives an entry with ``error`` set instead of raising."""
    path = resolve(root, key)
    if key.endswith(BUNDLE_SUFFIX):
        try:
            read_bundle(root, key)
            return Entry(key, "bundle", method="mix", file_bytes=path.stat().st_size, sha256=file_hash(path))
        except DifftuneError as e:
            return Entry(key, "bundle", method="mix", error=str(e))
    weights = path / WEIGHTS_NAME
    try:
        header = read_header(path)
        return Entry(key, "adapter", method=header["method"], base_model=header.get("base_model") or "",
                     component=header.get("component") or "", parameters=_parameters(weights),
                     file_bytes=weights.stat().st_size, sha256=file_hash(weights))
    except (DifftuneError, SafetensorError, OSError) as e:
        return Entry(key, "adapter", error=str(e))


def scan(root: str | Path) -> list[Entry]:
    """Every adapter folder (holding ``adapter_model.safetensors``) and ``*.mix.json`` bundle under ``root``.

    The walk never follows symlinked folders, skips hidden ones, stops ``MAX_DEPTH`` levels down and after
    ``MAX_ENTRIES`` entries; symlinked files pointing out of the root are left out (`resolve` would refuse them).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    root_real = root.resolve()
    keys: list[str] = []
    for here, dirs, files in os.walk(root_real, followlinks=False):
        rel = Path(here).relative_to(root_real)
        depth = len(rel.parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < MAX_DEPTH)
        if WEIGHTS_NAME in files and rel.parts:
            keys.append(rel.as_posix())
        keys += [(rel / f).as_posix() for f in sorted(files) if f.endswith(BUNDLE_SUFFIX)]
        if len(keys) >= MAX_ENTRIES:
            break
    out = []
    for key in sorted(keys)[:MAX_ENTRIES]:
        try:
            out.append(describe(root_real, key))
        except DifftuneError:  # a symlink out of the folder: not listed at all
            continue
    return out


# -- mix bundles -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixItem:
    """One adapter of a mix: its key in the folder and its weight w (output = base + Σ w_i δ_i)."""

    key: str
    weight: float


MAX_WEIGHT = 2.0  #: the sliders' range is [-MAX_WEIGHT, MAX_WEIGHT]


def check_mix(items: Any) -> list[MixItem]:
    """A validated mix from a list of ``{"key", "weight"}`` mappings (or `MixItem`s); keys unique, weights in range."""
    if not isinstance(items, list):
        raise bad_value("mix", type(items).__name__, "a list of {'key': adapter key, 'weight': number}")
    out: list[MixItem] = []
    for item in items:
        if isinstance(item, MixItem):
            item = asdict(item)
        if not isinstance(item, dict) or set(item) - {"key", "weight", "sha256"} or "key" not in item:
            raise bad_value("mix item", item, "a mapping {'key': adapter key, 'weight': number}")
        w = item.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not -MAX_WEIGHT <= w <= MAX_WEIGHT:
            raise bad_value(f"weight of {item['key']!r}", w, f"a number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        if not isinstance(item["key"], str) or any(m.key == item["key"] for m in out):
            raise bad_value("mix", item["key"], "each adapter once", "Give one weight per adapter.")
        out.append(MixItem(item["key"], float(w)))
    return out


def parse_mix(text: str | list | None) -> list[MixItem]:
    """A mix from its JSON text (what the UI sends) or an already parsed list; empty text is the empty mix."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    data = parse_header_json(text, "mix") if isinstance(text, str) else text
    return check_mix(data)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def check_save_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_value("mix name", name, "1-64 letters, digits, '-' or '_' (starting with a letter or digit)",
                        "e.g. 'nine-bold'")
    return name


def write_bundle(root: Path, folder: str, name: str, items: list[MixItem], fused: bool, model: str) -> str:
    """Write ``<folder>/<name>.mix.json`` under ``root``: the adapters (keys, weights, hashes) and the fused flag.

    Returns:
        The bundle's key.
    """
    key = f"{folder}/{check_save_name(name)}{BUNDLE_SUFFIX}"
    entries = []
    for item in items:
        path = resolve(root, item.key)
        entries.append({"key": item.key, "weight": item.weight, "sha256": file_hash(path / WEIGHTS_NAME)})
    data = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "model": model, "fused": bool(fused),
            "adapters": entries}
    target = Path(root).resolve() / folder / f"{name}{BUNDLE_SUFFIX}"
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    return key


def read_bundle(root: Path, key: str) -> dict[str, Any]:
    """A bundle's mix (``items``), ``fused`` flag and ``notes`` (adapters changed since it was saved).

    Every adapter it names must be inside the root (`resolve`); a bundle cannot point the studio elsewhere.
    """
    path = resolve(root, key, "bundle")
    if not key.endswith(BUNDLE_SUFFIX) or not path.is_file():
        raise bad_value("bundle", key, f"a {BUNDLE_SUFFIX} file of the adapters folder")
    if path.stat().st_size > 1 << 20:
        raise bad_value("bundle", key, "a mix file under 1 MB")
    data = parse_header_json(path.read_bytes(), key)
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise bad_value("bundle", key, f"a {BUNDLE_FORMAT!r} file written by the studio")
    if data.get("format_version") != BUNDLE_VERSION:
        raise bad_value(f"{key}: format_version", data.get("format_version"), str(BUNDLE_VERSION))
    if not isinstance(data.get("fused"), bool):
        raise bad_value(f"{key}: fused", data.get("fused"), "true or false")
    raw = data.get("adapters")
    items = check_mix([{k: v for k, v in a.items() if k != "sha256"} if isinstance(a, dict) else a
                       for a in raw] if isinstance(raw, list) else raw)
    notes = []
    for item, a in zip(items, raw):
        path = resolve(root, item.key)
        if a.get("sha256") and file_hash(path / WEIGHTS_NAME) != a["sha256"]:
            notes.append(f"{item.key} changed since the mix was saved (hash {a['sha256']} → "
                         f"{file_hash(path / WEIGHTS_NAME)})")
    return {"items": items, "fused": data["fused"], "notes": notes}
