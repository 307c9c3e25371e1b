"""What test_docs.py checks in README.md and docs/, as plain functions: find the commands a page shows, and check
each with the parser that would run it (see test_docs.py for the rules).

A command is a line of a fenced code block (continuations joined, its ``#`` comment kept apart) or an inline code
span that starts with one of `PREFIXES`. A placeholder token (``...``, ``…``, an upper-case name such as ``DIR``) or
an optional ``[--flag]`` makes it a synopsis, and an inline span that leaves out a required argument is a fragment
(``difftune export --format kohya``): those are held to `check_flags` instead of a full parse.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import runpy
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PREFIXES = ("difftune ", "python -m difftune", "accelerate launch", "python bench/", "make ", "pip install")
REPO_DIRS = ("apps/", "bench/", "configs/", "difftune/", "docs/", "pipelines/", "tests/")  # a path here must exist
PLACEHOLDERS = ("...", "…")
FENCE = re.compile(r"^\s*```(\S*)")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
GROUPED_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+")


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    text: str
    comment: str = ""
    inline: bool = False
    output: str | None = None  # an output block shown right after the command

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {self.text}"


@dataclass(frozen=True)
class Block:
    lang: str
    start: int  # line of the opening fence (1-based)
    end: int  # line of the closing fence
    lines: tuple[str, ...]


def split_blocks(text: str) -> tuple[list[Block], str]:
    """The fenced blocks, and the text outside them (blocks blanked, so line numbers stay)."""
    blocks, prose, current = [], [], None
    for i, line in enumerate(text.split("\n"), 1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = (fence.group(1), i, [])
        elif current is not None and line.strip() == "```":
            blocks.append(Block(current[0], current[1], i, tuple(current[2])))
            current = None
        elif current is not None:
            current[2].append(line)
        prose.append("" if current is not None or fence else line)
    return blocks, "\n".join(prose)


def split_comment(line: str) -> tuple[str, str]:
    """``cmd  # comment`` → (cmd, comment); a ``#`` inside quotes or inside a word belongs to the command."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def inline_spans(prose: str) -> list[tuple[int, str]]:
    """(line, text) of every inline code span; a span may wrap onto the next line."""
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in INLINE.finditer(prose)]


def _output(block: Block | None, after: int) -> str | None:
    """A plain block that starts within two lines of ``after`` and holds no command is that command's output."""
    if block is None or block.lang or block.start - after > 2 or any(x.startswith(PREFIXES) for x in block.lines):
        return None
    return "\n".join(block.lines)


def extract(doc: Path) -> list[Command]:
    """Every command ``doc`` shows."""
    blocks, prose = split_blocks(doc.read_text())
    found = []
    for n, block in enumerate(blocks):
        if block.lang == "python":
            continue
        cmds, logical, start = [], "", 0
        for i, line in enumerate(block.lines, block.start + 1):
            start = start or i
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            text, comment = split_comment(" ".join((logical + line).split()))
            if text.startswith(PREFIXES):
                cmds.append((start, text, comment))
            logical, start = "", 0
        output = _output(blocks[n + 1] if n + 1 < len(blocks) else None, block.end) if len(cmds) == 1 else None
        found += [Command(doc, start, text, comment, output=output) for start, text, comment in cmds]
    for line, span in inline_spans(prose):
        span = span.replace("\\|", "|")  # a `|` escaped inside a table
        if span.startswith(PREFIXES):
            after = next((b for b in blocks if b.start > line), None)
            found.append(Command(doc, line, span, inline=True, output=_output(after, line)))
    return found


def expand(cmd: Command) -> list[list[str]]:
    """The command's argument lists: a token ``a|b|c`` (alternatives, in a table) gives one list per alternative."""
    tokens = shlex.split(cmd.text)
    for i, tok in enumerate(tokens):
        if "|" in tok:
            return [tokens[:i] + [alt] + tokens[i + 1:] for alt in tok.split("|")]
    return [tokens]


def is_placeholder(token: str) -> bool:
    """``...``, ``…`` or an upper-case name (``DIR``, ``COMMAND``) stands for the reader's own value."""
    return token in PLACEHOLDERS or re.fullmatch(r"[A-Z][A-Z_]*", token) is not None


def is_synopsis(tokens: list[str]) -> bool:
    return any(is_placeholder(t) or t.startswith("[") for t in tokens)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # argparse keeps them only here
    return dict(subs[0].choices) if subs else {}


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that reads the options of ``argv`` (``difftune distill plan ...`` → the ``plan`` parser)."""
    for tok in argv:
        subs = subcommands(parser)
        if not subs or tok.startswith("-") or is_placeholder(tok):
            break
        assert tok in subs, f"{' '.join(argv)}\n  {tok!r} is not a command of {parser.prog!r}"
        parser = subs[tok]
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    """``parser.parse_args(argv)``; what the parser refuses is an AssertionError quoting its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0:  # --help
            return argparse.Namespace(help=True)
        raise AssertionError(f"{where}\n  rejected by its parser: {err.getvalue().strip()}") from None


def check_flags(parser: argparse.ArgumentParser, tokens: list[str], where: str) -> None:
    """Every ``--flag`` of a synopsis or fragment exists, and a value that follows it is one the parser accepts."""
    for i, tok in enumerate(tokens):
        flag, _, value = tok.strip("[]").partition("=")
        if not flag.startswith("-") or flag == "-":
            continue
        action = parser._option_string_actions.get(flag)  # argparse's table of the parser's option strings
        assert action is not None, f"{where}\n  {flag} is not an option of {parser.prog!r}"
        value = value or (tokens[i + 1].strip("[]") if action.nargs != 0 and i + 1 < len(tokens) else "")
        if not value or value.startswith("-") or is_placeholder(value):
            continue
        assert action.choices is None or value in action.choices, f"{where}\n  {flag} {value}: not in {action.choices}"
        if callable(action.type):
            try:
                action.type(value)
            except (TypeError, ValueError) as e:
                raise AssertionError(f"{where}\n  {flag} {value}: {e}") from None


def check_args(parser: argparse.ArgumentParser, argv: list[str], cmd: Command) -> argparse.Namespace | None:
    """The parsed arguments; None for a synopsis or an inline fragment, which get `check_flags` instead."""
    if not is_synopsis(argv):
        try:
            return parse(parser, argv, cmd.where)
        except AssertionError as e:
            if not (cmd.inline and "arguments are required" in str(e)):
                raise
    check_flags(_subparser(parser, argv), argv, cmd.where)
    return None


def check_paths(tokens: list[str], where: str) -> None:
    """A file named inside the repository (``configs/...``, ``--model=difftune/assets/...``) exists."""
    for tok in tokens:
        path = tok.partition("=")[2] if tok.startswith("-") else tok
        if path.startswith(REPO_DIRS):
            assert (ROOT / path).exists(), f"{where}\n  {path} does not exist in the repository"


def cli_parser() -> argparse.ArgumentParser:
    from difftune.cli import build_parser

    return build_parser()


def check_difftune(argv: list[str], cmd: Command) -> None:
    args = check_args(cli_parser(), argv, cmd)
    if args is None or getattr(args, "help", False):
        return
    if args.command == "train" and not is_placeholder(args.config):
        from difftune.config import load_config
        from difftune.errors import DifftuneError
        from difftune.train import TrainConfig

        overrides = [*(args.set or []), *(["overwrite=true"] if args.overwrite else [])]  # as cmd_train adds it
        # `key=...` stands for the reader's own value (and a bare `...` is YAML's end-of-document marker)
        overrides = [f"{k}=placeholder" if is_placeholder(v) else f"{k}={v}"
                     for k, _, v in (o.partition("=") for o in overrides)]
        try:
            load_config(TrainConfig, ROOT / args.config, overrides)
        except DifftuneError as e:
            raise AssertionError(f"{cmd.where}\n  the config does not load: {e}") from None
    if cheap(args):
        check_run(argv, cmd)


def cheap(args: argparse.Namespace) -> bool:
    """Commands that run in about a second on the meta device: no weights, no download."""
    if not getattr(args, "architecture", None) or getattr(args, "model", None):
        return False
    return (args.command == "inspect" and bool(args.method) and not args.path) or args.command == "distill" or (
        args.command == "quantize" and args.dry_run)


_PRINTED: dict[tuple[str, ...], str] = {}


def run_cli(argv: list[str]) -> str:
    """What ``difftune ARGV`` prints (in-process; cached, several pages show the same command)."""
    from difftune.cli import main

    if tuple(argv) not in _PRINTED:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        assert rc == 0, f"difftune {' '.join(argv)}: exit status {rc}: {err.getvalue().strip()}"
        _PRINTED[tuple(argv)] = out.getvalue()
    return _PRINTED[tuple(argv)]


def check_run(argv: list[str], cmd: Command) -> None:
    """The command runs; its comment's first grouped number and the output block shown after it are printed."""
    printed = run_cli(argv)
    number = GROUPED_NUMBER.search(cmd.comment)
    assert number is None or number.group() in printed, f"{cmd.where}\n  {number.group()} is not in:\n{printed}"
    actual = {" ".join(line.split()) for line in printed.split("\n")}
    missing = [s for s in (" ".join(x.split()) for x in (cmd.output or "").split("\n")) if s and s not in actual]
    assert not missing, f"{cmd.where}\n  the output shown differs: {missing}\n  printed:\n{printed}"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


_BENCH_PARSERS: dict[Path, argparse.ArgumentParser] = {}


def bench_parser(script: Path) -> argparse.ArgumentParser:
    """The script's own parser: it runs as ``__main__`` until it calls ``parse_args``, which hands the parser back
    instead of parsing (nothing of the benchmark runs). The interpreter state it touched is restored."""
    if script not in _BENCH_PARSERS:
        def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
            raise _Captured(self)

        path, argv, env, modules = sys.path[:], sys.argv[:], dict(os.environ), set(sys.modules)
        parse_args = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture
        sys.argv = [str(script)]
        sys.path.insert(0, str(script.parent))  # as `python bench/x.py` puts the script's folder first
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Captured as c:
            _BENCH_PARSERS[script] = c.parser
        finally:
            argparse.ArgumentParser.parse_args = parse_args
            sys.path[:], sys.argv[:] = path, argv
            os.environ.clear()
            os.environ.update(env)
            for name in set(sys.modules) - modules:  # the bench's own helpers (lab, fuzz_common), not packages
                if str(script.parent) in str(getattr(sys.modules[name], "__file__", "")):
                    del sys.modules[name]
        assert script in _BENCH_PARSERS, f"{script} never parsed its arguments"
    return _BENCH_PARSERS[script]


def check_accelerate(argv: list[str], cmd: Command) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    args = check_args(launch_command_parser(), argv, cmd)
    config = args.config_file if args else next((argv[i + 1] for i, t in enumerate(argv[:-1])
                                                  if t == "--config_file"), None)
    if config and not is_placeholder(config):
        ClusterConfig.from_yaml_file(str(ROOT / config))
    if args is not None:
        assert args.module and args.training_script == "difftune.train", f"{cmd.where}\n  not -m difftune.train"
        check_difftune(["train", *args.training_script_args], cmd)


def check_pip(argv: list[str], cmd: Command) -> None:
    """``pip install`` of the clone with extras pyproject.toml declares, or of a declared dependency."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for arg in argv:
        if arg in ("-e", "--editable", "-U", "--upgrade"):
            continue
        assert not arg.startswith("-"), f"{cmd.where}\n  unexpected pip option {arg}"
        if arg.startswith("."):
            path, _, extras = arg.partition("[")
            assert path == ".", f"{cmd.where}\n  install from the clone's root"
            unknown = set(re.findall(r"[\w-]+", extras)) - set(project["optional-dependencies"])
            assert not unknown, f"{cmd.where}\n  no extras {unknown} in pyproject.toml"
        else:
            declared = {Requirement(r).name for r in project["dependencies"]}
            assert Requirement(arg).name in declared, f"{cmd.where}\n  {arg}: not a dependency in pyproject.toml"


def check_command(cmd: Command) -> None:
    """Raise AssertionError, naming the page, line and command, if ``cmd`` is stale."""
    for tokens in expand(cmd):
        check_paths(tokens, cmd.where)
        if tokens[0] == "difftune":
            check_difftune(tokens[1:], cmd)
        elif tokens[:2] == ["python", "-m"]:
            module, rest = tokens[2], tokens[3:]
            if module in ("difftune", "difftune.train"):
                check_difftune(rest if module == "difftune" else ["train", *rest], cmd)
            else:
                assert importlib.util.find_spec(module) is not None, f"{cmd.where}\n  no module {module}"
        elif tokens[0] == "python":
            script = ROOT / tokens[1]
            assert script.is_file(), f"{cmd.where}\n  {tokens[1]} does not exist"
            check_args(bench_parser(script), tokens[2:], cmd)
        elif tokens[:2] == ["accelerate", "launch"]:
            check_accelerate(tokens[2:], cmd)
        elif tokens[0] == "make":
            targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
            assert set(tokens[1:]) <= targets, f"{cmd.where}\n  no Makefile target {set(tokens[1:]) - targets}"
        elif tokens[:2] == ["pip", "install"]:
            check_pip(tokens[2:], cmd)
        else:
            raise AssertionError(f"{cmd.where}\n  no check for this command")
