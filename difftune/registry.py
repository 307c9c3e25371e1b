"""The one registry helper behind every "look it up by name" table: methods, trainer plugins, compressed-module
classes and CLI commands.

A `Registry` maps names to objects. Registering a second object under a taken name is an error that names both;
looking up an unknown name is a `DifftuneError` that lists the registered names. A registry may also read an
entry-point group (`importlib.metadata`): each entry point of an installed distribution is imported the first time the
registry is read (listed, looked up, tested with ``in``), so an out-of-tree package adds to it without anyone
importing it by hand. Methods use the group ``difftune.methods``::

    # pyproject.toml of the package that ships the method
    [project.entry-points."difftune.methods"]
    my_method = "my_package.my_method"      # a module whose @register_method("my_method") runs on import

A broken entry point (it fails to import, or registers nothing under its own name) makes every read of the registry
raise a `DifftuneError` naming the entry point and its distribution, until it is fixed or uninstalled.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TypeVar

from .errors import DifftuneError, bad_value

T = TypeVar("T")


def _label(obj: object) -> str:
    name = getattr(obj, "__qualname__", None)
    return f"{obj.__module__}.{name}" if name and getattr(obj, "__module__", None) else repr(obj)


class Registry(MutableMapping[str, T]):
    """Name → registered object, in registration order.

    Reads (``[name]``, ``in``, iteration, ``len``, `lookup`) load the entry points first; `register` does not, so a
    module imported by an entry point can register while the registry is being loaded. ``del registry[name]``
    unregisters (tests do, after registering a toy).

    Args:
        kind: what is registered, singular, for messages (``"method"``).
        plural: its plural (default ``kind + "s"``).
        field: the name of the looked-up value in `lookup`'s error (default ``kind``), e.g. the file's ``class`` key.
        hint: the last sentence of `lookup`'s error.
        entry_points: an entry-point group to load on the first read, or None.
    """

    def __init__(self, kind: str, plural: str | None = None, field: str | None = None, hint: str = "",
                 entry_points: str | None = None) -> None:
        self.kind, self.plural, self.field, self.hint = kind, plural or f"{kind}s", field or kind, hint
        self.group = entry_points
        self._items: dict[str, T] = {}
        self._loaded = entry_points is None

    def register(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name`` and return it; registering the same object again is a no-op."""
        if not isinstance(name, str) or not name:
            raise bad_value(f"{self.kind} name", name, "a non-empty string")
        old = self._items.get(name)
        if old is not None and old is not obj:
            raise DifftuneError(f"{self.kind} name {name!r} is registered twice ({_label(old)}, {_label(obj)}); "
                                "each name must be unique: rename one of them")
        self._items[name] = obj
        return obj

    def lookup(self, name: object) -> T:
        """The object registered as ``name``; a `DifftuneError` listing the registered names otherwise."""
        if not isinstance(name, str) or name not in self:
            raise bad_value(self.field, name, f"one of the registered {self.plural} {sorted(self)}", self.hint)
        return self._items[name]

    def load_entry_points(self) -> None:
        """Import every entry point of the group not loaded yet (the first read does it by itself)."""
        if self._loaded:
            return
        from importlib.metadata import entry_points

        # Marked first: an entry point's module may read the registry while it registers (no recursion).
        self._loaded = True
        for ep in entry_points(group=self.group):
            where = f"entry point {ep.name} = {ep.value!r} of group {self.group!r}"
            if ep.dist is not None:
                where += f" (distribution {ep.dist.name} {ep.dist.version})"
            try:
                ep.load()
            except Exception as e:  # whatever the plugin raised: say which plugin, keep the cause
                self._loaded = False  # every read raises until the plugin is fixed or uninstalled
                raise DifftuneError(f"cannot load the {self.kind} plugin {where}: {type(e).__name__}: {e}. Fix or "
                                    "uninstall that package.") from e
            if ep.name not in self._items:
                self._loaded = False
                raise DifftuneError(f"the {self.kind} plugin {where} loaded but registered no {self.kind} named "
                                    f"{ep.name!r}; the entry point's name must be the name it registers")

    def __getitem__(self, name: str) -> T:
        self.load_entry_points()
        return self._items[name]

    def __setitem__(self, name: str, obj: T) -> None:
        self.register(name, obj)

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __contains__(self, name: object) -> bool:
        self.load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self.load_entry_points()
        return iter(list(self._items))

    def __len__(self) -> int:
        self.load_entry_points()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"
