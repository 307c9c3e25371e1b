"""The one exception type difftune raises for bad input, and a helper that makes messages uniform."""

from __future__ import annotations


class DifftuneError(ValueError):
    """Bad input or a state difftune cannot work with.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working. Every message names the
    field or key, the value that was given, what was expected, and a hint.
    """


def bad_value(field: str, value: object, expected: str, hint: str = "") -> DifftuneError:
    """Build a `DifftuneError` in the house format: field, value, expectation, hint."""
    msg = f"`{field}` must be {expected}, got {value!r}"
    if hint:
        msg += f". {hint}"
    return DifftuneError(msg)
