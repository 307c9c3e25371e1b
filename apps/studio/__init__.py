"""The difftune studio (``difftune app``): generate with and combine every kind of adapter in a Gradio app.

`engine` holds the logic (tested without Gradio), `request` what a generation asks for, `models` the loaded models and
their adapter mix, `compat` the base-model checks, `partner` the A/B model (BK students), `modes` img2img and
inpainting, `panels` the method panels' inputs, `catalog` the model dropdown's list, `library` the adapters folder and
its safety rules, `merging` the "save this mix" merge, `infotext` the A1111 image metadata, `recall` what an infotext
puts back, `rows` the adapter rows, `ui` and `controls` the Gradio components and thin callbacks.
"""

from .engine import Limits, Request, Studio

__all__ = ["Limits", "Request", "Studio", "main"]


def main(model: str, adapters: str, host: str = "127.0.0.1", port: int | None = None, compare: str | None = None,
         out: str = "outputs/studio", device: str | None = None, models: str | None = None) -> None:
    """Load the model(s) and serve the studio until interrupted (``models``: the model dropdown's folder)."""
    from .ui import launch

    studio = Studio(model, adapters, compare=compare, out=out, device=device, models=models)
    print(f"difftune studio: model {studio.main.label}, adapters folder {studio.root}, images to {studio.out}")
    launch(studio, host=host, port=port, block=True)
