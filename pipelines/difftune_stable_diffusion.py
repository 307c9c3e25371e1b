"""Stable Diffusion 1.x/2.x with difftune adapters: StableDiffusionPipeline
plus difftune's adapter verbs (`load_adapter`, `set_adapter_weights`, `fuse_adapters`, `unfuse_adapters`,
`delete_adapter`, `list_adapters`).

Load as a diffusers custom pipeline by path (works offline)::

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("stable_diffusion"),
                                             trust_remote_code=True)

or import it: ``from difftune.pipelines.difftune_stable_diffusion import DifftuneStableDiffusionPipeline``.
"""

from diffusers import StableDiffusionPipeline

from difftune.pipeline_mixin import DifftuneAdapterMixin


class DifftuneStableDiffusionPipeline(DifftuneAdapterMixin, StableDiffusionPipeline):
    pass
