"""The one registry helper (methods, trainer plugins, replacement classes, CLI commands): duplicate and unknown names,
out-of-tree methods through the ``difftune.methods`` entry-point group, and commands registered by method packages."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import difftune as dt
from difftune.cli import COMMANDS, build_parser, command
from difftune.compress.replaced import REPLACEMENTS
from difftune.methods.base import METHODS
from difftune.methods.plugin import PLUGINS
from difftune.registry import Registry


def _distribution(root: Path, name: str, group: str, entries: dict[str, str], modules: dict[str, str]) -> Path:
    """A fake installed distribution: ``<name>-0.1.dist-info`` with its entry points, and its modules, in ``root``."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


def test_every_table_is_one_registry():
    assert all(isinstance(r, Registry) for r in (METHODS, PLUGINS, REPLACEMENTS, COMMANDS))
    assert {"lora", "sara", "csc"} <= set(METHODS) and set(PLUGINS) <= set(METHODS)


def test_a_duplicate_name_is_refused_naming_both():
    things = Registry("widget")
    first, second = type("First", (), {}), type("Second", (), {})
    assert things.register("a", first) is first
    things.register("a", first)  # the same object again (a module imported twice): nothing to do
    with pytest.raises(dt.DifftuneError, match=r"widget name 'a' is registered twice \(.*First, .*Second\)"):
        things.register("a", second)
    assert things["a"] is first
    with pytest.raises(dt.DifftuneError, match="registered twice"):
        dt.methods.register_method("lora")(type("OtherLoRA", (dt.LoRAConfig,), {}))
    assert METHODS["lora"] is dt.LoRAConfig


def test_an_unknown_name_lists_the_registered_ones():
    things = Registry("widget", field="kind", hint="Install the plugin that ships it.")
    things.register("a", 1)
    with pytest.raises(dt.DifftuneError, match=r"`kind` must be one of the registered widgets \['a'\], got 'b'\. "
                                               r"Install the plugin"):
        things.lookup("b")
    with pytest.raises(dt.DifftuneError, match=r"`method` must be one of the registered methods \[.*'lora'.*"):
        dt.methods.get_method("nope")


TOY_METHOD = """
    from dataclasses import dataclass

    from difftune.methods.base import register_method
    from difftune.methods.lora import LoRAConfig


    @register_method("toy_ep")
    @dataclass
    class ToyConfig(LoRAConfig):
        \"\"\"LoRA under another name, shipped by another distribution.\"\"\"
"""


def _run(code: str, path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_an_installed_distribution_adds_a_method_through_its_entry_point(tmp_path):
    """Nobody imports the plugin by hand: listing the methods loads it, and a fresh process loads its saved adapter
    (the lookup of the file's method loads it)."""
    dist = _distribution(tmp_path / "site", "toy-difftune-method", "difftune.methods", {"toy_ep": "toy_ep_method"},
                         {"toy_ep_method": TOY_METHOD})
    saved = _run(f"""
        import sys
        import torch
        from torch import nn
        import difftune as dt
        assert "toy_ep_method" not in sys.modules, "loaded at import: entry points must load on the first read"
        assert "toy_ep" in dt.list_methods() and "toy_ep_method" in sys.modules
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4))
        dt.inject(model, dt.METHODS["toy_ep"](rank=2, target_modules=["0"]), name="t")
        dt.save_adapter(model, {str(tmp_path / "toy")!r})
        print(dt.list_adapters(model)["t"]["method"])
    """, dist)
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert saved.stdout.strip() == "toy_ep"
    loaded = _run(f"""
        import sys
        from torch import nn
        import difftune as dt
        model = nn.Sequential(nn.Linear(4, 4))
        print(dt.load_adapter(model, {str(tmp_path / "toy")!r}), dt.list_adapters(model)["t"]["method"],
              "toy_ep_method" in sys.modules)
    """, dist)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["t", "toy_ep", "True"]


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Fake distributions for the group ``difftune.test_widgets``, on the path for this test only."""
    _distribution(tmp_path, "toy-widgets", "difftune.test_widgets",
                  {"good": "toy_good_widget", "broken": "toy_broken_widget"},
                  {"toy_good_widget": "from tests_widgets import WIDGETS\nWIDGETS.register('good', object())\n",
                   "toy_broken_widget": "raise ImportError('needs libfoo')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    widgets = Registry("widget", entry_points="difftune.test_widgets")
    module = type(sys)("tests_widgets")
    module.WIDGETS = widgets
    monkeypatch.setitem(sys.modules, "tests_widgets", module)
    yield widgets, tmp_path
    for name in ("toy_good_widget", "toy_broken_widget", "toy_silent_widget"):
        sys.modules.pop(name, None)


def test_a_broken_plugin_is_named_on_every_read(plugins):
    widgets, _ = plugins
    for _ in range(2):  # not only the first read: the registry stays refused until the plugin is fixed or removed
        with pytest.raises(dt.DifftuneError, match=r"cannot load the widget plugin entry point broken = "
                                                   r"'toy_broken_widget' of group 'difftune.test_widgets' "
                                                   r"\(distribution toy-widgets 0.1\): ImportError: needs libfoo"):
            "good" in widgets  # noqa: B015 (the read is the test)


def test_a_plugin_that_registers_nothing_under_its_name_is_refused(plugins):
    widgets, root = plugins
    entry_points = next(root.glob("*.dist-info")) / "entry_points.txt"
    entry_points.write_text("[difftune.test_widgets]\ngood = toy_good_widget\nsilent = toy_silent_widget\n")
    (root / "toy_silent_widget.py").write_text("VALUE = 1\n")
    with pytest.raises(dt.DifftuneError, match=r"entry point silent = 'toy_silent_widget'.* loaded but registered "
                                               r"no widget named 'silent'"):
        list(widgets)
    assert "good" in widgets._items  # the good one loaded before


def test_method_packages_register_their_own_commands():
    parser = build_parser()
    assert COMMANDS["import-spm"].add_arguments.__module__ == "difftune.methods.spm.cli"
    assert COMMANDS["erase"].add_arguments.__module__ == "difftune.methods.spm.cli"
    assert COMMANDS["quantize"].add_arguments.__module__ == "difftune.compress.cli"
    assert COMMANDS["distill"].add_arguments.__module__ == "difftune.compress.cli"
    listed = parser._subparsers._group_actions[0].choices
    assert list(listed)[:3] == ["inspect", "generate", "train"] and set(COMMANDS) == set(listed)


def test_a_new_command_is_one_decorator_and_a_name_is_taken_once(monkeypatch):
    build_parser()  # the built-in commands are registered (their modules imported) before the copy below
    monkeypatch.setattr(COMMANDS, "_items", dict(COMMANDS._items))  # "hello" is registered for this test only

    @command("hello", help="say hello")
    def _hello(s):
        s.add_argument("--name", default="world")
        s.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    parser = build_parser()
    assert list(parser._subparsers._group_actions[0].choices)[-1] == "hello"  # after the built-in order
    assert dt.cli.main(["hello", "--name", "you"]) == 0
    with pytest.raises(dt.DifftuneError, match="command name 'train' is registered twice"):
        command("train", help="another train")(lambda s: None)
