"""Typed dataclass configs from YAML: strict keys, checked types, ``--set a.b=c`` overrides, an effective-config dump.

Every field of a config dataclass is annotated; `from_dict` walks nested dataclasses and refuses unknown keys and
values of the wrong type, naming the dotted key (``train.max_steps``), the value, the expected type and the known
keys. Only ``yaml.safe_load`` is used.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import DifftuneError
from .fileio import atomic_write

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp``; nested dataclasses are built; ints are accepted as floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = DifftuneError(f"`{key}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except DifftuneError:
                continue
        raise wrong
    if origin is Literal:
        if isinstance(value, bool) and ("no" if value is False else "yes") in args:
            return "no" if value is False else "yes"  # YAML 1.1 reads an unquoted `no` as false
        if value not in args:
            raise wrong
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong
        item = args[0] if args else Any
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise wrong
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if tp is dict:
        if not isinstance(value, Mapping):
            raise wrong
        return dict(value)
    return value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys and wrong types raise `DifftuneError`."""
    where = prefix or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise DifftuneError(f"`{where}` must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(f"`{prefix + '.' if prefix else ''}{k}`" for k in unknown)
        raise DifftuneError(f"unknown key(s) {keys}; known keys here: {sorted(fields)}")
    kwargs = {name: _convert(value, hints[name], f"{prefix + '.' if prefix else ''}{name}")
              for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DifftuneError(f"missing required key(s) {[f'{prefix}.{m}'.lstrip('.') for m in missing]}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested structure of them) as plain YAML-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to nested ``data``; values are parsed as YAML (``3`` int, ``1e-4`` float, ``[a]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DifftuneError(f"`--set` takes KEY=VALUE (e.g. train.max_steps=500), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise DifftuneError(f"`--set {key}`: the value {raw!r} is not valid YAML ({e}); quote it") from e
        if isinstance(value, str) and _looks_like_float(value):  # YAML 1.1 reads "1e-4" as a string
            value = float(value)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise DifftuneError(f"`--set {key}`: `{part}` is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return data


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c in s.lower() for c in ".e") and s.strip().lower() not in ("inf", "nan", ".inf", ".nan")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DifftuneError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DifftuneError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DifftuneError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return _floats(data)


def _floats(node: Any) -> Any:
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; users mean a float."""
    if isinstance(node, dict):
        return {k: _floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and any(c in node.lower() for c in "e"):
        return float(node)
    return node


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """``cls`` from a YAML file (optional) with ``a.b=c`` overrides applied."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def dump_yaml(obj: Any, path: str | Path) -> Path:
    """Write a config as YAML, atomically."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
