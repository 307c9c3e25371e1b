"""Typed dataclass configs from YAML: strict keys, checked types, ``--set a.b=c`` overrides, an effective-config dump.

Every field of a config dataclass is annotated; `from_dict` walks nested dataclasses and refuses unknown keys and
values of the wrong type, naming the dotted key (``train.max_steps``), the value, the expected type and the known
keys. Only PyYAML's safe loader is used, hardened (`_StrictLoader`): a config is at most ``MAX_CONFIG_BYTES`` of UTF-8,
nested at most ``MAX_DEPTH`` deep, with string keys, no duplicate keys (YAML says last wins; a typo'd copy of a key
would silently override the first) and no anchors/aliases (an ~800-byte alias bomb expands to gigabytes). Integers
are at most ``MAX_INT_DIGITS`` digits when read (a 4,301-digit one made PyYAML raise Python's own ValueError) and fit
in 64 bits when checked against an ``int`` field: no setting counts beyond that.
Non-finite numbers (``.nan``, ``.inf``) are refused for every float field: no training hyperparameter means them
(``null`` turns options off). Every problem is a `DifftuneError`.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import DifftuneError
from .fileio import atomic_write

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20  #: 1 MiB; real configs are a few hundred bytes
MAX_DEPTH = 32  #: nesting of mappings/lists; the deepest real config is 3
MAX_INT_DIGITS = 40  #: far past any 64-bit setting, far below Python's 4,300-digit conversion limit


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases, non-string and duplicate keys, and deep nesting, as it composes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise DifftuneError(f"YAML aliases (*{event.anchor}) are not allowed in a config{_where(event)}; "
                                "write the value out")
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise DifftuneError(f"YAML anchors (&{event.anchor}) are not allowed in a config{_where(event)}; "
                                "write each value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise DifftuneError(f"the config nests deeper than {MAX_DEPTH} levels{_where(event)}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise DifftuneError(f"YAML merge keys (<<) are not allowed in a config{_where(key_node)}")
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise DifftuneError(f"config keys must be strings, got {key!r} ({type(key).__name__})"
                                    f"{_where(key_node)}; quote it")
            if key in seen:
                raise DifftuneError(f"duplicate key {key!r}{_where(key_node)} (first{_where(seen[key])}); YAML would "
                                    "silently keep only the last one: remove one of them")
            seen[key] = key_node
        where = self._paths.get(id(node), "")
        for key_node, value_node in node.value:  # the dotted key of each value, for errors raised while building it
            self._paths[id(value_node)] = f"{where}.{key_node.value}" if where else str(key_node.value)
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node: Any, deep: bool = False) -> Any:
        where = self._paths.get(id(node), "")
        for i, item in enumerate(node.value):
            self._paths[id(item)] = f"{where}[{i}]"
        return super().construct_sequence(node, deep=deep)

    @property
    def _paths(self) -> dict[int, str]:
        if "_key_paths" not in self.__dict__:
            self._key_paths: dict[int, str] = {}
        return self._key_paths

    def construct_yaml_int(self, node: Any) -> int:
        digits = len(str(node.value).replace("_", "").lstrip("+-"))  # hex digits too (0xfff...: no limit in int())
        if digits > MAX_INT_DIGITS:
            key = self._paths.get(id(node))
            raise DifftuneError(f"{f'`{key}`: ' if key else ''}an integer of {digits:,} digits{_where(node)}; no "
                                f"setting takes more than {MAX_INT_DIGITS} (64-bit numbers have at most 20)")
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _where(mark_holder: Any) -> str:
    mark = getattr(mark_holder, "start_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def parse_yaml(text: str, source: str = "config") -> Any:
    """``text`` parsed with the strict loader; a `DifftuneError` naming ``source`` for anything malformed."""
    if len(text) > MAX_CONFIG_BYTES:
        raise DifftuneError(f"{source} is {len(text):,} characters, over the {MAX_CONFIG_BYTES:,} a config may have")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except DifftuneError as e:
        raise DifftuneError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise DifftuneError(f"{source} is not valid YAML: {e}") from e
    except (RecursionError, MemoryError) as e:  # guards beyond MAX_DEPTH (flow collections nest in the parser)
        raise DifftuneError(f"{source} is nested too deeply or too large to parse ({type(e).__name__})") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _non_finite(key: str, value: float) -> DifftuneError:
    return DifftuneError(f"`{key}` must be a finite number, got {value!r}; no setting means NaN or infinity "
                         "(null turns an optional setting off)")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp``; nested dataclasses are built; ints are accepted as floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = DifftuneError(f"`{key}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            raise _non_finite(key, value)
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
        if not all(isinstance(k, str) for k in value):
            raise DifftuneError(f"`{key}`: keys must be strings, got {[k for k in value if not isinstance(k, str)]!r}")
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        if not -(2**63) <= value < 2**63:
            raise DifftuneError(f"`{key}` must be a 64-bit integer, got one of {len(str(abs(value))):,} digits; no "
                                "setting counts that far")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            raise wrong from None
        if not math.isfinite(value):
            raise _non_finite(key, value)
        return value
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
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise DifftuneError(f"`{where}`: keys must be strings, got {odd[:5]!r}; quote them")
    # a key that is a Python keyword (optimizer.class) is the field with a trailing underscore (class_)
    data = {f"{k}_" if keyword.iskeyword(k) else k: v for k, v in data.items()}
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
        return {f.name.removesuffix("_") if keyword.iskeyword(f.name.removesuffix("_")) else f.name:
                to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
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
        if not isinstance(item, str):
            raise DifftuneError(f"`--set` takes KEY=VALUE strings, got {item!r}")
        try:
            value = parse_yaml(raw, f"`--set {key}`") if raw.strip() else ""
        except DifftuneError as e:
            raise DifftuneError(f"{e}; quote the value") from e
        if isinstance(value, str) and _looks_like_float(value):  # YAML 1.1 reads "1e-4" as a string
            value = float(value)
        elif isinstance(value, (dict, list)):  # also inside `--set method={name: krona, scale: 1e-2}`
            value = _floats(value)
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
    """A YAML config file as a dict (see the module docstring for what is refused)."""
    p = Path(path)
    if not p.is_file():
        raise DifftuneError(f"config file {str(path)!r} does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise DifftuneError(f"config file {str(path)!r} is {p.stat().st_size:,} bytes, over the {MAX_CONFIG_BYTES:,} "
                            "a config may have; is it the right file?")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DifftuneError(f"config file {str(path)!r} is not UTF-8 text ({e}); save it as UTF-8") from None
    data = parse_yaml(text, str(path))
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
