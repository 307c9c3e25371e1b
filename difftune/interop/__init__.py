"""Exchange adapters with other tools' file formats (kohya/LyCORIS LoKr, full-ΔW "diff" files, official checkpoints).

Each format module converts one method's adapters (``krona.py``); ``kohya.py`` holds the kohya key naming they share.
The methods themselves never import from here.
"""

from .krona import export_krona, load_lokr, load_official_krona

__all__ = ["export_krona", "load_lokr", "load_official_krona"]
