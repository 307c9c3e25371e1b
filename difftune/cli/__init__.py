"""``difftune`` command line: it parses arguments and dispatches; the work happens in the library.

Commands come from the modules in `COMMAND_MODULES`, each registering its own with `commands.command`: the general
groups in this package (`adapters`: inspect, export, import, import-krona; `generate`: generate, eval; `train`;
`examples`: zoo, quickstart, demo; `app`) and the commands of a method or a compression tool in its own package. A
new one is a module with ``@command(...)`` functions plus its line in `COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import DifftuneError
from ..version import __version__
from .commands import COMMANDS, command, parse_adapter_spec, parse_control_spec

__all__ = ["COMMANDS", "COMMAND_MODULES", "build_parser", "command", "main", "parse_adapter_spec",
           "parse_control_spec"]

#: The modules that register commands (imported when the parser is built).
COMMAND_MODULES = ("difftune.cli.adapters", "difftune.cli.generate", "difftune.cli.train", "difftune.cli.examples",
                   "difftune.cli.app", "difftune.methods.spm.cli", "difftune.compress.cli")

#: The order of ``difftune --help``; commands not listed here follow, in registration order.
ORDER = ("inspect", "generate", "train", "eval", "zoo", "quickstart", "demo", "app", "export", "import", "import-spm",
         "erase", "import-krona", "quantize", "distill")


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    p = argparse.ArgumentParser(prog="difftune", description="Customize and compress diffusion models.")
    p.add_argument("--version", action="version", version=f"difftune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in sorted(COMMANDS, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        cmd = COMMANDS[name]
        cmd.add_arguments(sub.add_parser(name, help=cmd.help))
    return p


class _DropTorchvisionNotice:
    """transformers announces, once per image-processor class it imports, that torchvision is absent and it falls
    back to PIL; difftune never uses those processors, so the notice is noise on every command."""

    def filter(self, record: object) -> bool:
        return "requires torchvision" not in str(getattr(record, "msg", ""))


def quiet_dependencies() -> None:
    """Silence the dependencies' notices that say nothing about the user's command (CLI entry points only)."""
    import logging
    import os

    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())
    # the per-file "Loading weights" bars of local folders (transformers reads this when imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DifftuneError as e:
        print(f"difftune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop (which saves a checkpoint first): stop without a traceback
        print("\ndifftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
