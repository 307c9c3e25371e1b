"""Fixtures for the studio: a tiny SD pipeline and an adapters folder holding one adapter of each kind of method."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_adapters(model_dir: Path, root: Path) -> dict[str, str]:
    """Save randomized adapters trained on nothing (the plumbing, not quality) under ``root``; returns their keys.

    ``style`` (LoRA) and ``subject`` (KronA) are weight-space, ``erase`` an SPM, ``edges`` a CSC-Tuner (control
    image), ``dit`` a LoRA made for another model (a DiT), which must be refused.
    """
    import difftune as dt
    from difftune.generation import load_pipeline
    from difftune.methods.spm import encode_concepts
    from difftune.testing import randomize_adapter, save_tiny_pipeline

    pipe = load_pipeline(model_dir)
    specs = {
        "labs/style": dt.LoRAConfig(rank=2, alpha=2),
        "quickstart/train/subject": dt.KronAConfig(a1=4, a2=4),
        "labs/erase": dt.SPMConfig(concepts=["cat"]),
        "labs/edges": dt.CSCConfig(pre_hint_channels=8),
    }
    for i, (key, config) in enumerate(specs.items()):
        name = key.rsplit("/", 1)[-1]
        dt.inject(pipe, config, name=name)
        randomize_adapter(pipe.unet, name, seed=i, std=0.3)
        if name == "erase":
            encode_concepts(pipe, name)
        dt.save_adapter(pipe, root / key, name=name, base_model=str(model_dir))
        dt.delete_adapter(pipe, name)
    dit = load_pipeline(save_tiny_pipeline("dit", root.parent / "dit-model"))
    dt.inject(dit, dt.LoRAConfig(rank=2, alpha=2), name="dit")
    randomize_adapter(dit.transformer, "dit", std=0.3)
    dt.save_adapter(dit, root / "other" / "dit", name="dit")
    return {k.rsplit("/", 1)[-1]: k for k in specs} | {"dit": "other/dit"}


@pytest.fixture(scope="session")
def studio_files(tmp_path_factory, sd_dir):
    """(model dir, adapters root, keys, compressed model dir): everything the studio tests read."""
    import difftune as dt
    from difftune.generation import load_pipeline

    base = tmp_path_factory.mktemp("studio")
    root = base / "adapters"
    keys = write_adapters(Path(sd_dir), root)
    unet = load_pipeline(sd_dir).unet
    # a compressed model to A/B against (FP vs quantized)
    dt.quantize_rtn_(unet, bits=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    compressed = dt.save_compressed(unet, base / "unet-rtn4", base_model=str(sd_dir))
    return Path(sd_dir), root, keys, Path(compressed)


@pytest.fixture(scope="session")
def served(studio_files, tmp_path_factory):
    """(studio, local url): the app served on 127.0.0.1 for the whole session, with the compressed A/B model."""
    pytest.importorskip("gradio")
    from apps.studio import Studio
    from apps.studio.ui import launch

    model, root, _, compressed = studio_files
    studio = Studio(model, root, compare=compressed, out=tmp_path_factory.mktemp("studio-out"))
    demo = launch(studio, block=False)
    try:
        yield studio, demo.local_url
    finally:
        demo.close()


# -- SD3 and Flux (test_flow.py, test_flow_api.py) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def flow_files(tmp_path_factory, sd_dir):
    """{family: (pipeline folder, adapters folder)} for SD3 and Flux (`flow_case.write_flow_files`)."""
    from flow_case import write_flow_files

    return write_flow_files(tmp_path_factory.mktemp("flow"), Path(sd_dir))
