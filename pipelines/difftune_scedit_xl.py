"""Stable Diffusion XL with SCEdit control: StableDiffusionXLPipeline, difftune's adapter verbs, and ``control=`` /
``control_scale=`` for CSC adapters (see difftune_scedit.py).

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("scedit_xl"),
                                             trust_remote_code=True)
"""

from diffusers import StableDiffusionXLPipeline

from difftune.methods.scedit.conditions import ControlMixin
from difftune.pipeline_mixin import DifftuneAdapterMixin


class DifftuneSCEditXLPipeline(ControlMixin, DifftuneAdapterMixin, StableDiffusionXLPipeline):
    pass
