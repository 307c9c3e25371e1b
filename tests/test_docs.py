"""README.md and docs/ cannot go stale silently: every command they show is checked by the parser that would run it,
the cheap ones are run, and every link, repository path and Python name they use resolves.

The rules (the functions live in docs_check.py):
- ``difftune ...`` / ``python -m difftune ...``: parsed by the CLI's own parser (`difftune.cli.build_parser`); a
  ``train`` command's config exists and loads with its ``--set`` overrides through the project's config loader
  (unknown keys and wrong types fail); files it names inside the repository exist. ``inspect`` / ``distill plan`` /
  ``quantize --dry-run`` on an ``--architecture`` (no weights) run: the first grouped number of the command's
  ``#`` comment and every line of an output block shown right after it must be in what it prints.
- ``accelerate launch ...``: accelerate's own launch parser; the ``--config_file`` loads; ``-m difftune.train CFG
  --set ...`` is checked as a train command.
- ``python bench/X.py ...``: the script exists and its own argparse parser accepts the flags (the script runs up
  to its ``parse_args`` call and no further).
- ``make X``: a target of the Makefile. ``pip install``: the clone's extras exist in pyproject.toml, or a declared
  dependency.
A synopsis (``difftune eval --model DIR [--adapter PATH[:W]]``) or an inline fragment (``difftune export --format
kohya``) is held to its flags: each exists and a value that follows it is one the parser accepts.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
from docs_check import (
    DOCS,
    INLINE,
    PREFIXES,
    REPO_DIRS,
    ROOT,
    Command,
    check_command,
    cli_parser,
    extract,
    inline_spans,
    split_blocks,
    split_comment,
    subcommands,
)

COMMANDS = [c for doc in DOCS for c in extract(doc)]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def resolve(dotted: str) -> object:
    """The object a dotted name names, importing submodules on the way; raises if any part is missing."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], 2):
        obj = getattr(obj, name) if hasattr(obj, name) else importlib.import_module(".".join(parts[:i]))
    return obj


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of ``doc``'s headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    _, prose = split_blocks(doc.read_text())
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#+\s+(.*)$", prose, re.M):
        s = slug(heading)
        found.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return found


def snippets() -> list[tuple[str, str]]:
    """(where, code): Python blocks, and inline spans that are difftune imports or dotted names (``dt.fuse``)."""
    found = []
    for doc in DOCS:
        blocks, prose = split_blocks(doc.read_text())
        where = str(doc.relative_to(ROOT))
        found += [(f"{where}:{b.start}", "\n".join(b.lines)) for b in blocks if b.lang == "python"]
        for line, span in inline_spans(prose):
            if re.fullmatch(r"(from difftune[\w.]* import [\w, ]+|import difftune[\w.]*)", span):
                found.append((f"{where}:{line}", span))
            elif m := re.match(r"(dt|difftune)(\.\w+)+", span):
                found.append((f"{where}:{line}", f"import difftune\nimport difftune as dt\n{m.group()}"))
    return found


def check_snippet(where: str, code: str) -> None:
    """The snippet parses; its difftune imports, and the dotted names it reads from difftune modules, exist."""
    tree = ast.parse(code)
    modules = {}  # local name -> the difftune module bound to it
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(a.name, a.asname) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(f"{node.module}.{a.name}", None) for a in node.names]
        else:
            continue
        for name, asname in names:
            if name.startswith("difftune"):
                try:
                    resolve(name)
                except (AttributeError, ImportError) as e:
                    raise AssertionError(f"{where}: {name}: {e}") from None
                if isinstance(node, ast.Import):
                    modules[asname or name.split(".")[0]] = name if asname else name.split(".")[0]
    for node in ast.walk(tree):
        name = ast.unparse(node) if isinstance(node, ast.Attribute) else ""
        root = name.split(".")[0]
        if root in modules and re.fullmatch(r"[\w.]+", name):
            try:
                resolve(modules[root] + name[len(root):])
            except (AttributeError, ImportError) as e:
                raise AssertionError(f"{where}: {name}: {e}") from None


def check_links(doc: Path) -> None:
    """Relative links (with their #anchors) and inline repository paths (`configs/x.yaml`) point at what exists."""
    _, prose = split_blocks(doc.read_text())
    for target in LINK.findall(INLINE.sub("", prose)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc}: the link {target} points at nothing"
        assert not anchor or anchor in anchors(dest), f"{doc}: the link {target}: no such heading in {dest.name}"
    for line, span in inline_spans(prose):
        if span.startswith(REPO_DIRS) and re.fullmatch(r"[\w./-]+", span):
            assert (ROOT / span).exists(), f"{doc}:{line}: {span} does not exist in the repository"


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: f"{c.doc.relative_to(ROOT)}:{c.line}")
def test_command(cmd):
    check_command(cmd)


def test_commands_of_every_kind_are_found():
    assert {p for p in PREFIXES for c in COMMANDS if c.text.startswith(p)} == set(PREFIXES)
    shown = {c.text for c in COMMANDS if c.output is not None}
    assert {"difftune distill plan --architecture sd15", "difftune quantize --architecture dit-xl2 --preset 2bit "
            "--dry-run"} <= shown  # their output blocks are compared with what they print


def test_readme_is_short_and_states_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split("\n")) <= 300
    ci = [x for x in (ROOT / ".ci" / "run").read_text().split("\n") if x and not x.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"]
    assert "make test" in {c.text for c in COMMANDS if c.doc.name == "README.md" and not c.inline}


def test_readme_lists_every_cli_command():
    shown = [shlex.split(c.text)[1:] for c in COMMANDS if c.doc.name == "README.md" and c.text.startswith("difftune ")]
    for name, sub in subcommands(cli_parser()).items():
        for path in [[name, nested] for nested in subcommands(sub)] or [[name]]:
            assert any(argv[:len(path)] == path for argv in shown), f"the README's CLI list lacks difftune {path}"


SNIPPETS = snippets()


@pytest.mark.parametrize(("where", "code"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_python_snippet(where, code):
    check_snippet(where, code)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_links_and_paths_resolve(doc):
    check_links(doc)


STALE = [  # (command, what the failure names)
    ("difftune inspect --method lora --rnak 8 --architecture sd15", "unrecognized arguments: --rnak"),
    ("difftune quantize --architecture dit-xl2 --preset 5bit --dry-run", "invalid choice: '5bit'"),
    ("difftune nosuchcommand --out x", "invalid choice: 'nosuchcommand'"),
    ("difftune train configs/lora/sd15.yaml --set method.rnak=8", "rnak"),  # an unknown config key
    ("difftune train configs/lora/sd15.yaml --set train.max_steps=many", "max_steps"),  # a wrong type
    ("difftune train configs/lora/nope.yaml", "nope.yaml"),
    ("difftune inspect --method lora --architecture sd15   # 797,185 trainable parameters", "797,185"),
    ("difftune inspect --method nosuch --architecture sd15", "nosuch"),  # parses, fails when run
    ("python bench/sara_memory.py --latent 16 --stpes 3", "unrecognized arguments: --stpes"),
    ("python bench/spm_lab.py --part erase|forget --la 10", "invalid choice: 'forget'"),  # one stale alternative
    ("python bench/nosuch_lab.py", "nosuch_lab.py does not exist"),
    ("accelerate launch --config_file configs/accelerate/single_gpu.yaml -m difftune.train configs/lora/sd15.yaml "
     "--set train.max_stpes=5", "max_stpes"),
    ("accelerate launch --confg_file configs/accelerate/single_gpu.yaml -m difftune.train configs/lora/sd15.yaml",
     "confg_file"),
    ("accelerate launch --config_file configs/accelerate/nope.yaml -m difftune.train configs/lora/sd15.yaml",
     "nope.yaml"),
    ("python -m difftune.nosuch", "no module difftune.nosuch"),
    ("make nosuchtarget", "no Makefile target"),
    ('pip install -e ".[nosuchextra]"', "nosuchextra"),
    ("pip install nosuchpackage", "not a dependency"),
]


@pytest.mark.parametrize(("text", "reason"), STALE, ids=[t for t, _ in STALE])
def test_the_checker_catches_stale_commands(text, reason):
    cmd, comment = split_comment(text)
    with pytest.raises(AssertionError, match=re.escape(reason)):
        check_command(Command(ROOT / "README.md", 0, cmd, comment))


def test_the_checker_catches_a_stale_output_and_a_stale_synopsis():
    stale_output = "base           579,384,965   0.674        223.8 G   0.661"  # one parameter too many
    cmd = Command(ROOT / "README.md", 0, "difftune distill plan --architecture sd15", output=stale_output)
    with pytest.raises(AssertionError, match="output shown differs"):
        check_command(cmd)
    for stale, reason in (("difftune export --fromat kohya", "--fromat is not an option"),
                          ("difftune export --format kohyaa", "invalid choice: 'kohyaa'"),
                          ("difftune export PATH --format kohyaa --out FILE", "kohyaa: not in"),
                          ("difftune eval --model DIR [--digist 0-8]", "--digist is not an option"),
                          ("difftune eval --model DIR [--n many]", "--n many")):
        with pytest.raises(AssertionError, match=re.escape(reason)):
            check_command(Command(ROOT / "README.md", 0, stale, inline=True))
    check_command(Command(ROOT / "README.md", 0, "difftune export --format kohya", inline=True))  # a fragment
    with pytest.raises(AssertionError, match="arguments are required"):  # in a code block, a command is complete
        check_command(Command(ROOT / "README.md", 0, "difftune export --format kohya"))


def test_the_checker_catches_a_stale_snippet_and_link(tmp_path):
    for stale in ("import difftune as dt\ndt.methods.nosuch.f(1)", "from difftune.methods import nosuch",
                  "import difftune.nosuch", "import difftune.compress as dc\ndc.nosuch"):
        with pytest.raises(AssertionError, match="nosuch"):
            check_snippet("x", stale)
    check_snippet("x", "import difftune as dt\nfrom diffusers import nosuch\npipe.nosuch()")  # not difftune's
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [ok](page.md#a-title) `configs/lora/sd15.yaml`\n")
    check_links(page)
    for stale in ("[gone](nosuch.md)", "[gone](#nosuch)", "`configs/lora/nosuch.yaml`"):
        page.write_text(f"# A title\n\n{stale}\n")
        with pytest.raises(AssertionError, match="nosuch"):
            check_links(page)
