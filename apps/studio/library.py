"""The studio's adapters folder: what it lists, what it may read, and the mix bundles it writes.

Everything the app reads comes from one folder (``--adapters``, default ``outputs/``, where `difftune quickstart` and
the bench labs write). An adapter is addressed by its *key*, the POSIX path of its folder relative to that root
(``quickstart/train/adapter``); a saved mix bundle by the key of its ``.mix.json`` file. `resolve` (in `paths`) is
the only way from a key to a path: absolute keys, ``..`` and anything whose real path (symlinks followed) leaves the
root are refused, and `adapter_folder` checks the real path of each file an adapter is loaded from, so neither a
crafted API call nor a symlink planted in the folder (a folder, or a file inside a real folder) makes the app read
elsewhere. Bundles are read and written through `paths` (no symlink followed while opening), and mixes are bounded
(`MAX_MIX_BYTES`, `MAX_MIX_ITEMS`) before any per-item work.

Badges come from the adapter's header (`difftune.serialization.read_header`) and the safetensors header's shapes: no
tensor is loaded to list a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from difftune.errors import DifftuneError, bad_value
from difftune.serialization import CONFIG_NAME, WEIGHTS_NAME, parse_header_json, read_header

from .paths import check_files, clip, make_folder, open_read, public_message, read_limited, resolve, write_file

BUNDLE_SUFFIX = ".mix.json"
BUNDLE_FORMAT = "difftune-mix"
BUNDLE_VERSION = 1
MAX_DEPTH = 8  #: folder levels scanned below the root (labs write outputs/bench/<lab>/<run>/adapter)
MAX_ENTRIES = 500  #: a folder with more adapters than this is listed partially (the first ones in sorted order)
MAX_MIX_ITEMS = 64  #: adapters in one mix (the UI shows 24 rows); checked before any per-item work
MAX_MIX_BYTES = 128 * 1024  #: a mix's JSON text or bundle file (64 items with 1024-character keys fit in ~80 KB)
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


def adapter_folder(root: str | Path, key: object) -> Path:
    """The real path of the adapter folder ``key`` (`resolve`), whose weights and config files (the two the loader
    reads) also lie inside the root by their real paths."""
    path = resolve(root, key)
    if not path.is_dir() or not (path / WEIGHTS_NAME).is_file():
        raise bad_value("adapter", clip(key), f"a folder of the adapters folder holding {WEIGHTS_NAME}",
                        "Press 'refresh' to list the folder again.")
    check_files(Path(root), path, (WEIGHTS_NAME, CONFIG_NAME), str(key))
    return path


def file_hash(root: Path, path: Path, key: str) -> str:
    """The first 12 hex digits of the SHA-256 of ``path`` inside ``root`` (opened by `paths.open_read`), cached by
    (path, size, mtime)."""
    with open_read(root, path, key) as f:
        st = os.fstat(f.fileno())
        cache_key = (str(path), st.st_size, st.st_mtime_ns)
        if cache_key not in _HASHES:
            h = hashlib.sha256()
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
    """The `Entry` for ``key``; an unreadable file gives an entry with ``error`` set (no server path in it) instead
    of raising. A key leading out of the folder (`resolve`, `adapter_folder`) raises."""
    if key.endswith(BUNDLE_SUFFIX):
        path = resolve(root, key, "bundle")
        try:
            read_bundle(root, key)
            return Entry(key, "bundle", method="mix", file_bytes=path.stat().st_size,
                         sha256=file_hash(root, path, key))
        except (DifftuneError, OSError) as e:
            return Entry(key, "bundle", method="mix", error=public_message(str(e), Path(root)))
    path = adapter_folder(root, key)
    weights = path / WEIGHTS_NAME
    try:
        header = read_header(path)
        return Entry(key, "adapter", method=header["method"], base_model=header.get("base_model") or "",
                     component=header.get("component") or "", parameters=_parameters(weights),
                     file_bytes=weights.stat().st_size, sha256=file_hash(root, weights, key))
    except (DifftuneError, SafetensorError, OSError) as e:
        return Entry(key, "adapter", error=public_message(str(e), Path(root)))


def scan(root: str | Path) -> list[Entry]:
    """Every adapter folder (holding ``adapter_model.safetensors``) and ``*.mix.json`` bundle under ``root``.

    The walk never follows symlinked folders, skips hidden ones, stops ``MAX_DEPTH`` levels down and after
    ``MAX_ENTRIES`` entries; entries that lead out of the root (symlinked bundles, adapters whose files are symlinks
    out) are left out (`resolve` and `adapter_folder` refuse them).
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
        except DifftuneError:  # a symlink out of the folder (or the entry vanished): not listed at all
            continue
    return out


# -- mix bundles -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixItem:
    """One adapter of a mix: its key in the folder and its weight w (output = base + Σ w_i δ_i); ``sha256``, when
    given, is the hash the adapter was selected with (the engine refuses a file that changed since)."""

    key: str
    weight: float
    sha256: str = ""


MAX_WEIGHT = 2.0  #: the sliders' range is [-MAX_WEIGHT, MAX_WEIGHT]


def check_mix(items: Any) -> list[MixItem]:
    """A validated mix from a list of ``{"key", "weight"}`` mappings (or `MixItem`s); at most `MAX_MIX_ITEMS`,
    keys unique (a set: linear in the mix), weights in range."""
    if not isinstance(items, list):
        raise bad_value("mix", type(items).__name__, "a list of {'key': adapter key, 'weight': number}")
    if len(items) > MAX_MIX_ITEMS:
        raise bad_value("number of adapters in the mix", len(items), f"at most {MAX_MIX_ITEMS}")
    out: list[MixItem] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, MixItem):
            item = asdict(item)
        if not isinstance(item, dict) or set(item) - {"key", "weight", "sha256"} or "key" not in item:
            raise bad_value("mix item", clip(item), "a mapping {'key': adapter key, 'weight': number}")
        key, w = item["key"], item.get("weight", 1.0)
        if not isinstance(key, str):
            raise bad_value("key of a mix item", clip(key), "an adapter key (text)")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not -MAX_WEIGHT <= w <= MAX_WEIGHT:
            raise bad_value(f"weight of {clip(key)!r}", clip(w), f"a number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        digest = item.get("sha256", "")
        if not isinstance(digest, str) or not _SHA.match(digest):
            raise bad_value(f"sha256 of {clip(key)!r}", clip(digest), "the hex digest prefix the listing shows")
        if key in seen:
            raise bad_value("mix", clip(key), "each adapter once", "Give one weight per adapter.")
        seen.add(key)
        out.append(MixItem(key, float(w), digest))
    return out


def parse_mix(text: str | list | None) -> list[MixItem]:
    """A mix from its JSON text (what the UI sends, at most `MAX_MIX_BYTES`) or an already parsed list; empty text is
    the empty mix."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if isinstance(text, (str, bytes)) and len(text) > MAX_MIX_BYTES:
        raise bad_value("length of the mix (JSON text)", len(text), f"at most {MAX_MIX_BYTES:,} characters",
                        f"A mix holds at most {MAX_MIX_ITEMS} adapters.")
    data = parse_header_json(text, "mix") if isinstance(text, (str, bytes)) else text
    return check_mix(data)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def check_save_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_value("mix name", clip(name), "1-64 letters, digits, '-' or '_' (starting with a letter or digit)",
                        "e.g. 'nine-bold'")
    return name


def write_bundle(root: Path, folder: str, name: str, items: list[MixItem], fused: bool, model: str) -> str:
    """Write ``<folder>/<name>.mix.json`` under ``root``: the adapters (keys, weights, hashes) and the fused flag.

    The folder must be a real folder inside the root (`paths.make_folder`); the file is written by
    `paths.write_file` (atomic, no symlink followed).

    Returns:
        The bundle's key.
    """
    key = f"{folder}/{check_save_name(name)}{BUNDLE_SUFFIX}"
    entries = []
    for item in check_mix(items):
        path = adapter_folder(root, item.key)
        entries.append({"key": item.key, "weight": item.weight,
                        "sha256": file_hash(root, path / WEIGHTS_NAME, item.key)})
    data = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "model": model, "fused": bool(fused),
            "adapters": entries}
    text = (json.dumps(data, indent=2) + "\n").encode()
    write_file(root, make_folder(root, folder) / f"{name}{BUNDLE_SUFFIX}", lambda f: f.write(text), key)
    return key


def read_bundle(root: Path, key: str) -> dict[str, Any]:
    """A bundle's mix (``items``), ``fused`` flag and ``notes`` (adapters changed since it was saved).

    Every adapter it names must be inside the root (`adapter_folder`); a bundle cannot point the studio elsewhere.
    The file is read through `paths.read_limited` (at most `MAX_MIX_BYTES`, no symlink followed while opening).
    """
    path = resolve(root, key, "bundle")
    if not key.endswith(BUNDLE_SUFFIX) or not path.is_file():
        raise bad_value("bundle", clip(key), f"a {BUNDLE_SUFFIX} file of the adapters folder")
    data = parse_header_json(read_limited(root, path, key, MAX_MIX_BYTES, "bundle"), key)
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise bad_value("bundle", key, f"a {BUNDLE_FORMAT!r} file written by the studio")
    if data.get("format_version") != BUNDLE_VERSION:
        raise bad_value(f"{key}: format_version", clip(data.get("format_version")), str(BUNDLE_VERSION))
    if not isinstance(data.get("fused"), bool):
        raise bad_value(f"{key}: fused", clip(data.get("fused")), "true or false")
    raw = data.get("adapters")
    items = check_mix(raw)  # the count and each item's shape first: the loops below are then bounded
    notes = []
    for item, a in zip(items, raw):
        saved = a.get("sha256")
        if saved is not None and not (isinstance(saved, str) and _SHA.match(saved)):
            raise bad_value(f"{key}: sha256 of {item.key!r}", clip(saved), "the hex digest prefix the studio wrote")
        path = adapter_folder(root, item.key)
        digest = file_hash(root, path / WEIGHTS_NAME, item.key)
        if saved and digest != saved:
            notes.append(f"{item.key} changed since the mix was saved (hash {saved} → {digest})")
    # the mix as it loads now (the notes say what changed), not bound to the hashes it was saved with
    return {"items": [MixItem(i.key, i.weight) for i in items], "fused": data["fused"], "notes": notes}


_SHA = re.compile(r"^[0-9a-f]{0,64}$")
