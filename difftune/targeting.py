"""Which modules of a model an adapter targets.

A pattern matches a module name when it is equal to it, is a dotted suffix of it (``"to_q"`` matches
``"...attn1.to_q"``, ``"to_out.0"`` matches ``"...attn1.to_out.0"``), or, failing both, the whole name matches it as a
regular expression (``r".*attn2\\.to_[kv]"``). This is peft's ``target_modules`` rule plus full regexes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from torch import nn

from .errors import DifftuneError

#: The attribute of an adapted model that holds its adapters' model-level parts (never a target).
PARTS = "difftune_parts"


def name_matches(name: str, pattern: str) -> bool:
    """True when module ``name`` is selected by ``pattern`` (equal, dotted suffix, or full regex match)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    return _regex(pattern).fullmatch(name) is not None


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise DifftuneError(
            f"module pattern {pattern!r} is neither a module name nor a valid regular expression ({e}); "
            "escape regex characters, e.g. r'attn1\\.to_q'"
        ) from e


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(name_matches(name, p) for p in patterns)


def sample_module_names(model: nn.Module, limit: int = 12) -> list[str]:
    """A short, varied list of module names that exist in ``model``: distinct leaf names first, for error hints."""
    seen: dict[str, str] = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf.isdigit():
            leaf = ".".join(name.rsplit(".", 2)[-2:])
        seen.setdefault(leaf, name)
    return list(seen.values())[:limit]


def canonical_name(name: str) -> str:
    """``name`` with the ``base_layer`` hops of adapter hosts removed: the module's name in the unadapted model.

    Adapter files and patterns use canonical names, so they do not depend on which adapters were injected first.
    """
    return ".".join(part for part in name.split(".") if part != "base_layer")


def find_targets(
    model: nn.Module,
    target_modules: Sequence[str],
    exclude_modules: Sequence[str] = (),
    field: str = "target_modules",
) -> list[str]:
    """Names of the modules of ``model`` selected by ``target_modules`` and not by ``exclude_modules``.

    Modules that are difftune adapter hosts are matched by their own name; their inner ``base_layer`` and
    adapters are never matched again, so injecting twice targets the same places.

    Raises:
        DifftuneError: when nothing matches; the message lists some module names that do exist.
    """
    names = []
    hosts: list[str] = []
    for name, module in model.named_modules():
        # A host stands for its base_layer, and its adapters are never targets; modules nested inside the
        # base_layer (e.g. a conv inside a wrapped resnet) still are.
        if any(name == h + ".base_layer" or name.startswith(h + ".adapters") for h in hosts):
            continue
        if name == PARTS or name.startswith(PARTS + "."):
            continue
        if getattr(module, "_difftune_host", False):
            hosts.append(name)
        canon = canonical_name(name)
        if name and matches_any(canon, target_modules) and not matches_any(canon, exclude_modules):
            names.append(name)
    if not names:
        raise DifftuneError(
            f"no module of {type(model).__name__} matched `{field}`={list(target_modules)!r}"
            + (f" (after `exclude_modules`={list(exclude_modules)!r})" if exclude_modules else "")
            + f". Some module names that exist: {sample_module_names(model)}. Hint: a pattern matches a whole name, "
            "a dotted suffix of it (e.g. 'to_q', 'to_out.0'), or is a regex over the whole name."
        )
    return names
