"""Exchange adapters with other tools' file formats (kohya/LyCORIS LoKr, full-ΔW "diff" files, official checkpoints).

Each module converts one method's adapters; the methods themselves never import from here.
"""

from .krona import export_krona, load_lokr, load_official_krona

__all__ = ["export_krona", "load_lokr", "load_official_krona"]
