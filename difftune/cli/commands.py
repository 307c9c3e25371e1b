"""The command registry of the ``difftune`` CLI, and the argument formats several commands share.

A command is one decorated function that adds its arguments to its subparser and names the function that runs it
(``s.set_defaults(func=...)``); `difftune.cli.build_parser` makes a subparser for each registered command. Commands
live next to what they drive: the general ones in this package, a method's or a compression tool's own in its
package (`difftune.methods.spm.cli`, `difftune.compress.cli`); `difftune.cli.COMMAND_MODULES` lists the modules.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import bad_value
from ..registry import Registry


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help and the function that adds its arguments."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


#: The subcommands by name.
COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str):
    """Decorator registering ``add_arguments(parser)`` as subcommand ``name`` with its ``help`` line."""

    def wrap(add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        COMMANDS.register(name, Command(help, add_arguments))
        return add_arguments

    return wrap


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` → (path, weight). A suffix after the last ':' that is not a number is an error."""
    path, sep, weight = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise bad_value("--adapter", spec, "PATH or PATH:WEIGHT with a numeric weight (e.g. out/style:0.8)") from None


def parse_control_spec(spec: str) -> tuple[str, str | None, float | None]:
    """``IMAGE[:ADAPTER[:SCALE]]`` → (image path, adapter or None, scale or None)."""
    if Path(spec).exists():
        return spec, None, None
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise bad_value("--control", spec, "IMAGE, IMAGE:ADAPTER or IMAGE:ADAPTER:SCALE (e.g. edges.png:canny:0.8)")
    scale = None
    if len(parts) == 3:
        try:
            scale = float(parts[2])
        except ValueError:
            raise bad_value("--control", spec, "a numeric SCALE after the second ':'") from None
    return parts[0], (parts[1] or None) if len(parts) > 1 else None, scale
