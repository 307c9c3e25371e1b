"""``app``: the studio, a Gradio app to generate with and combine adapters."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from typing import Any

from ..errors import DifftuneError
from .commands import command


def studio_package() -> Any:
    """The studio package: ``difftune.apps.studio`` where difftune is installed (the wheel ships the repository's
    ``apps/`` as ``difftune.apps``, and an editable install maps it), else ``apps.studio`` of a checkout whose root
    is on the path (``python -m difftune`` run from the repository)."""
    for name in ("difftune.apps.studio", "apps.studio"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package (difftune.apps, apps) is not there
            found = False
        if found:
            return importlib.import_module(name)
    raise DifftuneError("`difftune app` cannot find the studio (difftune.apps.studio): reinstall difftune "
                        "(pip install 'difftune[app]', or pip install -e '.[app]' in a checkout)")


def cmd_app(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise DifftuneError("`difftune app` needs gradio: pip install 'difftune[app]'")
    from ..zoo import path as zoo_path

    studio_package().main(args.model or str(zoo_path("sd-mini")), args.adapters, host=args.host, port=args.port,
                          compare=args.compare, out=args.out, device=args.device, models=args.models)
    return 0


@command("app", help="the studio: a Gradio app to generate with and combine adapters")
def _app_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default=None, help="base model: a pipeline folder, a shipped model, a Hub repo id or a "
                                                 ".safetensors checkpoint (default: the shipped sd-mini)")
    s.add_argument("--adapters", default="outputs", help="adapters folder, read recursively (default: outputs/, "
                                                         "where quickstart and the labs write)")
    s.add_argument("--compare", default=None, help="a second model for A/B: a BK student pipeline folder or a "
                                                   "compressed model (difftune quantize --out) of --model")
    s.add_argument("--models", default="models", help="folder of pipelines the model dropdown offers, besides the "
                                                       "shipped models and the Hub cache's (default: models/)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    s.add_argument("--out", default="outputs/studio", help="where generated PNGs (with infotext) are written")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.set_defaults(func=cmd_app)
