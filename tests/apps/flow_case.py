"""SD3 and Flux cases of the studio tests: tiny pipelines of both families and an adapters folder for each."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

FAMILIES = ("sd3", "flux")
#: the methods that apply to an MMDiT, made on the family's own tiny pipeline (``diff``: the full-ΔW adapter)
METHODS = ("lora", "loha", "krona", "sara", "diff", "spm")


def _config(method: str) -> Any:
    import difftune as dt
    from difftune.methods.diff import DiffConfig

    return {"lora": dt.LoRAConfig(rank=2, alpha=2), "loha": dt.LoHaConfig(rank=2, alpha=2),
            "krona": dt.KronAConfig(a1=4, a2=4), "sara": dt.SaRAConfig(), "diff": DiffConfig(),
            "spm": dt.SPMConfig(concepts=["cat"])}[method]


def write_flow_files(base: Path, sd_dir: Path) -> dict[str, tuple[Path, Path]]:
    """{family: (pipeline folder, adapters folder)} under ``base``: each adapters folder holds randomized adapters of
    `METHODS` made on that family, an SCEdit adapter made on the tiny SD ``sd_dir`` (its UNet) and a KIND adapter made
    on a tiny class DiT."""
    import difftune as dt
    from difftune.generation import load_pipeline
    from difftune.methods.kind import KINDConfig
    from difftune.methods.spm import encode_concepts
    from difftune.testing import randomize_adapter, save_tiny_pipeline

    foreign = base / "foreign"
    sd = load_pipeline(sd_dir)
    dt.inject(sd, dt.SCEditConfig(), name="scedit")
    randomize_adapter(sd.unet, "scedit", std=0.3)
    dt.save_adapter(sd, foreign / "scedit", name="scedit", base_model=str(sd_dir))
    dit = load_pipeline(save_tiny_pipeline("dit", base / "dit"))
    dt.inject(dit, KINDConfig(learngenes=2, tailors_per_class=2, classes=[0, 1], init="random"), name="kind")
    dt.save_adapter(dit, foreign / "kind", name="kind", base_model=str(base / "dit"))
    out = {}
    for family in FAMILIES:
        folder = save_tiny_pipeline(family, base / family)
        root = base / f"{family}-adapters"
        shutil.copytree(foreign, root)
        pipe = load_pipeline(folder)
        for i, method in enumerate(METHODS):
            dt.inject(pipe, _config(method), name=method)
            randomize_adapter(pipe.transformer, method, seed=i, std=1.0)
            if method == "spm":
                encode_concepts(pipe, method)
            dt.save_adapter(pipe, root / method, name=method, base_model=str(folder))
            dt.delete_adapter(pipe, method)
        out[family] = (folder, root)
    return out
