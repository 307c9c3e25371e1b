"""diffusers pipeline files that add difftune adapter loading to stock pipelines.

Installed as ``difftune.pipelines``. Each file defines one pipeline class and can be given to diffusers as a custom
pipeline by path: ``DiffusionPipeline.from_pretrained(model, custom_pipeline=difftune.pipelines.path("dit"),
                                             trust_remote_code=True)``.
"""

from __future__ import annotations

from pathlib import Path

FILES = {
    "stable_diffusion": "difftune_stable_diffusion.py",
    "stable_diffusion_xl": "difftune_stable_diffusion_xl.py",
    "dit": "difftune_dit.py",
    "pixart": "difftune_pixart.py",
    "scedit": "difftune_scedit.py",
    "scedit_xl": "difftune_scedit_xl.py",
}


def path(kind: str) -> str:
    """File path of the pipeline for ``kind`` (one of `FILES`), for ``custom_pipeline=``."""
    if kind not in FILES:
        from difftune.errors import bad_value

        raise bad_value("kind", kind, f"one of {sorted(FILES)}")
    return str(Path(__file__).with_name(FILES[kind]))
