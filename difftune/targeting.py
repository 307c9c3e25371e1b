"""Which modules of a model an adapter targets.

A pattern matches a module name when it is equal to it, is a dotted suffix of it (``"to_q"`` matches
``"...attn1.to_q"``, ``"to_out.0"`` matches ``"...attn1.to_out.0"``), or, failing both, the whole name matches it as a
regular expression (``r".*attn2\\.to_[kv]"``). This is peft's ``target_modules`` rule plus full regexes.

Bounded work (issue 17): patterns come from configs and from adapter files anyone can write, and Python's backtracking
``re`` has no timeout (``(.*.*)*Z`` never returns on a 60-character name). `check_pattern` therefore admits only
regexes whose matching is provably cheap on module names, and refuses the rest before anything is compiled:

* at most ``MAX_PATTERN_LENGTH`` characters;
* only the constructs below, checked against a list of what is allowed (so syntax a newer Python adds is refused,
  not skipped): characters, classes, ``.``, anchors, groups, alternation and greedy or lazy repeats. Back-references,
  lookarounds, conditionals, atomic groups ``(?>...)`` and possessive repeats (``*+``, ``++``, ``?+``, ``{m,n}+``,
  Python >= 3.11) are refused: no module name needs them, and an atomic group hides the repeats inside it from
  a checker that does not know it (issue 29: ``(?>(.*.*)*Z)`` hung);
* no repetition inside a repeated part (``(a+)*``, ``(.*.*)*``: exponential), no alternation inside one (``(a|ab)*``);
* at most ``MAX_UNBOUNDED`` variable repeats (``*``, ``+``, ``{m,}``, ``{m,n>1}``), and two of them never adjacent:
  a literal character or a character class must stand between (``.*.*`` splits a name in n² ways; ``.*\\..*`` only
  at its dots).

With these, a match tries at most (occurrences of each separator)^``MAX_UNBOUNDED`` splits, a few thousand on real
module names. Every pattern peft or difftune documents passes; a refusal names the rule and the pattern.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .errors import DifftuneError

#: The attribute of an adapted model that holds its adapters' model-level parts (never a target).
PARTS = "difftune_parts"


def name_matches(name: str, pattern: str) -> bool:
    """True when module ``name`` is selected by ``pattern`` (equal, dotted suffix, or full regex match)."""
    if not isinstance(pattern, str):
        raise DifftuneError(f"a module pattern must be a string, got {pattern!r} ({type(pattern).__name__})")
    if name == pattern or name.endswith("." + pattern):
        return True
    return _regex(pattern).fullmatch(name) is not None


MAX_PATTERN_LENGTH = 256
MAX_UNBOUNDED = 4

try:  # Python >= 3.11
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT}
_CHARACTERS = {_sre.LITERAL, _sre.NOT_LITERAL, _sre.IN}  #: one given character: a separator between repeats
#: Everything else the parser can produce is refused; these get a name in the message.
_REFUSED = {_sre.GROUPREF: "a back-reference", _sre.GROUPREF_EXISTS: "a conditional group",
            _sre.ASSERT: "a lookaround", _sre.ASSERT_NOT: "a lookaround"}
if hasattr(_sre, "ATOMIC_GROUP"):  # Python >= 3.11
    _REFUSED[_sre.ATOMIC_GROUP] = "an atomic group '(?>...)'"
    _REFUSED[_sre.POSSESSIVE_REPEAT] = "a possessive repeat ('*+', '++', '?+', '{m,n}+')"


class _Unsafe(Exception):
    """Internal: why a pattern is refused (turned into a DifftuneError naming the pattern)."""


def check_pattern(pattern: Any, field: str = "target_modules") -> str:
    """``pattern`` if it is a name or a regex whose matching is bounded (module docstring); else a DifftuneError."""
    if not isinstance(pattern, str) or not pattern:
        raise DifftuneError(f"`{field}`: a module pattern must be a non-empty string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise DifftuneError(f"`{field}`: module pattern {pattern[:40]!r}... is {len(pattern)} characters, over the "
                            f"{MAX_PATTERN_LENGTH} allowed; list several shorter patterns instead")
    _regex(pattern)
    return pattern


def _walk(items: Any, in_repeat: bool, count: list[int]) -> bool:
    """Check a parsed (sub)pattern; returns whether it ends in a variable repeat not yet followed by a separator."""
    open_repeat = False
    for op, av in items:
        if op in _REFUSED:
            raise _Unsafe(f"it uses {_REFUSED[op]}")
        if op not in _ALLOWED:
            raise _Unsafe(f"it uses a regex construct module patterns do not support ({op})")
        if op in _REPEATS:
            lo, hi, body = av
            if in_repeat:
                raise _Unsafe("it repeats a part that itself repeats (nested quantifiers take exponential time)")
            if hi != lo:  # a variable repeat
                if open_repeat:
                    raise _Unsafe("two variable repeats are adjacent (e.g. '.*.*'); put a literal between them")
                count[0] += 1
                if count[0] > MAX_UNBOUNDED:
                    raise _Unsafe(f"it has more than {MAX_UNBOUNDED} variable repeats")
                open_repeat = True
            _walk(body, True, count)
        elif op == _sre.SUBPATTERN:
            inner = av[-1]
            if _walk(inner, in_repeat, count):
                if open_repeat and _starts_variable(inner):
                    raise _Unsafe("two variable repeats are adjacent; put a literal between them")
                open_repeat = True
            elif _has_separator(inner):
                open_repeat = False
        elif op == _sre.BRANCH:
            if in_repeat:
                raise _Unsafe("it repeats an alternation (e.g. '(a|ab)*' takes exponential time)")
            ends = [_walk(alt, in_repeat, count) for alt in av[1]]
            starts = any(_starts_variable(alt) for alt in av[1])
            if open_repeat and starts:
                raise _Unsafe("two variable repeats are adjacent; put a literal between them")
            open_repeat = any(ends) or (open_repeat and any(not _has_separator(alt) for alt in av[1]))
        elif op in _CHARACTERS:
            open_repeat = False
        # ANY and AT (anchors) neither repeat nor separate: '.*..*' is still two adjacent repeats
    return open_repeat


_ALLOWED = {*_REPEATS, *_CHARACTERS, _sre.SUBPATTERN, _sre.BRANCH, _sre.ANY, _sre.AT}


def _starts_variable(items: Any) -> bool:
    for op, av in items:
        if op in _REPEATS:
            return av[0] != av[1]
        if op == _sre.SUBPATTERN:
            return _starts_variable(av[-1])
        if op == _sre.BRANCH:
            return any(_starts_variable(alt) for alt in av[1])
        if op in _CHARACTERS:
            return False
    return False


def _has_separator(items: Any) -> bool:
    return any(op in _CHARACTERS for op, _ in items)


@functools.lru_cache(maxsize=4096)  # bounded: patterns also come from files anyone can write
def _regex(pattern: str) -> re.Pattern[str]:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise DifftuneError(f"module pattern {pattern[:40]!r}... is {len(pattern)} characters, over the "
                            f"{MAX_PATTERN_LENGTH} allowed; list several shorter patterns instead")
    try:
        _walk(_sre_parse.parse(pattern), False, [0])
    except _Unsafe as e:
        raise DifftuneError(
            f"module pattern {pattern!r} is refused: {e}. Patterns are matched against every module name, so only "
            "regexes that match in bounded time are accepted; e.g. r'.*attn2\\.to_[kv]' or a list of names"
        ) from None
    except (re.error, RecursionError, OverflowError) as e:
        raise DifftuneError(
            f"module pattern {pattern!r} is neither a module name nor a valid regular expression ({e}); "
            "escape regex characters, e.g. r'attn1\\.to_q'"
        ) from None
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
