"""PixArt-α with difftune adapters: PixArtAlphaPipeline
plus difftune's adapter verbs (`load_adapter`, `set_adapter_weights`, `fuse_adapters`, `unfuse_adapters`,
`delete_adapter`, `list_adapters`).

Load as a diffusers custom pipeline by path (works offline)::

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=difftune.pipelines.path("pixart"),
                                             trust_remote_code=True)

or import it: ``from difftune.pipelines.difftune_pixart import DifftunePixArtAlphaPipeline``.
"""

from diffusers import PixArtAlphaPipeline

from difftune.pipeline_mixin import DifftuneAdapterMixin


class DifftunePixArtAlphaPipeline(DifftuneAdapterMixin, PixArtAlphaPipeline):
    pass
