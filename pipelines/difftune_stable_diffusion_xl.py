"""Stable Diffusion XL with difftune adapters: StableDiffusionXLPipeline
plus difftune's adapter verbs (`load_adapter`, `set_adapter_weights`, `fuse_adapters`, `unfuse_adapters`,
`delete_adapter`, `list_adapters`).

Load as a diffusers custom pipeline by path (works offline)::

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("stable_diffusion_xl"),
                                             trust_remote_code=True)

or import it: ``from difftune.pipelines.difftune_stable_diffusion_xl import DifftuneStableDiffusionXLPipeline``.
"""

from diffusers import StableDiffusionXLPipeline

from difftune.pipeline_mixin import DifftuneAdapterMixin


class DifftuneStableDiffusionXLPipeline(DifftuneAdapterMixin, StableDiffusionXLPipeline):
    pass
