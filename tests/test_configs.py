"""Every YAML under configs/ loads into its dataclass (accelerate's ClusterConfig for configs/accelerate/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from difftune.config import load_config
from difftune.train import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_loads(path):
    if path.parent.name == "accelerate":
        from accelerate.commands.config.config_args import ClusterConfig

        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.num_processes >= 1 and cfg.main_training_function == "main"
    else:
        cfg = load_config(TrainConfig, path)
        assert cfg.method_config().method == cfg.method["name"]
