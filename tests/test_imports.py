"""The package has no import cycle (not even one hidden behind a function-level import), and every module imports
on its own, first, in a fresh interpreter. The layers hold: no method module imports the trainer, no production
module imports the test fixtures, no private name crosses packages, and no file is over 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# apps/ ships as difftune.apps; in a checkout (the tests' working directory) it imports as `apps`
ROOTS = {"difftune": REPO / "difftune", "difftune.pipelines": REPO / "pipelines", "apps": REPO / "apps"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(mods: dict[str, Path], module: str) -> list[tuple[str, str | None]]:
    """(source module, imported name or None) of every import statement anywhere in ``module`` (``if
    TYPE_CHECKING:`` and function bodies included), relative imports resolved."""
    path = mods[module]
    here = _package(module, path).split(".")
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            out += [(".".join(base + ([node.module] if node.module else [])), a.name) for a in node.names]
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body (``from pkg import sub`` counts as ``pkg.sub``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module in mods:
        for source, name in _imports(mods, module):
            sub = f"{source}.{name}"
            if name is not None and sub in mods:
                graph[module].add(sub)
            elif source in mods:
                graph[module].add(source)
    return graph


def private_imports() -> list[tuple[str, str, str]]:
    """(importer, source, name) for every ``from source import _name`` of one package module from another: a name
    another module needs is public (dunders such as ``__version__`` are not private)."""
    mods = _modules()
    return [(module, source, name) for module in mods for source, name in _imports(mods, module)
            if name and name.startswith("_") and not name.startswith("__") and source in mods and source != module]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_edges_and_cycles():
    graph = import_graph()
    assert "difftune.methods.verbs" in graph["difftune.serialization"]  # a `from .methods.verbs import ...`
    assert "difftune.methods.context" in graph["difftune.generation"] | graph["difftune.pipeline_mixin"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'difftune' or m.startswith('difftune.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_method_module_imports_the_trainer():
    """The trainer imports the methods (their plugins, `methods/plugin.py`), never the other way round; an import
    only for type checking counts too."""
    graph = import_graph()
    upward = {m: sorted(t for t in targets if t == "difftune.train" or t.startswith("difftune.train."))
              for m, targets in graph.items() if m.startswith("difftune.methods")}
    assert not {m: t for m, t in upward.items() if t}


def test_no_production_module_imports_the_test_fixtures():
    graph = import_graph()
    assert sorted(m for m, targets in graph.items() if "difftune.testing" in targets and m != "difftune.testing") == []


def test_no_private_name_crosses_modules():
    assert private_imports() == []


def test_no_file_over_400_lines():
    """Files say what they hold: past ~400 lines a module holds two things (style rule 1)."""
    long = {str(p.relative_to(REPO)): n for root in (REPO / "difftune", REPO / "apps") for p in root.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
