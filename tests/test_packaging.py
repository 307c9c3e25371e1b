"""The wheel ships every subpackage, the pipelines/ files, the studio (apps/), the configs and the reference-model
assets."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "difftune").rglob("__init__.py")}
    assert found <= set(cfg["packages"]), found - set(cfg["packages"])
    assert cfg["package-dir"]["difftune.pipelines"] == "pipelines"
    assert cfg["package-dir"]["difftune.configs"] == "configs"
    data = cfg["package-data"]
    assert "assets/**/*" in data["difftune"] and "**/*.yaml" in data["difftune.configs"]


def test_every_apps_package_ships_as_difftune_apps():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(("difftune", *p.parent.relative_to(ROOT).parts)) for p in (ROOT / "apps").rglob("__init__.py")}
    assert found and found <= set(cfg["packages"]), found - set(cfg["packages"])
    assert cfg["package-dir"]["difftune.apps"] == "apps"


def test_the_wheel_holds_every_module_and_the_studio(tmp_path):
    """A wheel built from the sources (a copy without the reference models' weights, so it takes seconds) holds every
    module of difftune/, pipelines/ (as difftune.pipelines) and apps/ (as difftune.apps), so `difftune app` runs
    from an installed wheel, outside any checkout."""
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("difftune", "pipelines", "configs", "apps"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    build = "import sys, setuptools.build_meta as b; b.build_wheel(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(next((tmp_path / "dist").glob("difftune-*.whl"))) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {"difftune": "difftune", "pipelines": "difftune/pipelines", "apps": "difftune/apps"}
    expected = {f"{inside}/{p.relative_to(ROOT / folder).as_posix()}" for folder, inside in shipped.items()
                for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert "difftune/apps/studio/engine.py" in expected and expected <= names, sorted(expected - names)
    assert "difftune = difftune.cli:main" in entry_points


def test_difftune_app_finds_the_studio_without_touching_sys_path(monkeypatch):
    import importlib.util

    from difftune.cli.app import studio_package
    from difftune.errors import DifftuneError

    before = list(sys.path)
    studio = studio_package()  # difftune.apps.studio when installed; apps.studio from a bare checkout
    assert studio.__name__ in ("difftune.apps.studio", "apps.studio") and callable(studio.main)
    assert sys.path == before
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # neither is there
    with pytest.raises(DifftuneError, match=r"cannot find the studio \(difftune.apps.studio\): reinstall difftune"):
        studio_package()
