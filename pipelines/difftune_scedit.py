"""Stable Diffusion 1.x/2.x with SCEdit control: StableDiffusionPipeline, difftune's adapter verbs, and
``control=`` / ``control_scale=`` for CSC adapters (several conditions at once, each with its own scale, plus any
SC-Tuner or LoRA).

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("scedit"),
                                             trust_remote_code=True)
    pipe.load_adapter("out/canny", name="canny")
    pipe.load_adapter("out/style", name="style")          # an SC-Tuner
    pipe("a house", control={"canny": edges}, control_scale={"canny": 0.8})

or import it: ``from difftune.pipelines.difftune_scedit import DifftuneSCEditPipeline``.
"""

from diffusers import StableDiffusionPipeline

from difftune.methods.scedit.conditions import ControlMixin
from difftune.pipeline_mixin import DifftuneAdapterMixin


class DifftuneSCEditPipeline(ControlMixin, DifftuneAdapterMixin, StableDiffusionPipeline):
    pass
