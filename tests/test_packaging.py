"""The wheel ships every subpackage, the pipelines/ files, the configs and the reference-model assets."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "difftune").rglob("__init__.py")}
    assert found <= set(cfg["packages"]), found - set(cfg["packages"])
    assert cfg["package-dir"]["difftune.pipelines"] == "pipelines"
    assert cfg["package-dir"]["difftune.configs"] == "configs"
    data = cfg["package-data"]
    assert "assets/**/*" in data["difftune"] and "**/*.yaml" in data["difftune.configs"]
