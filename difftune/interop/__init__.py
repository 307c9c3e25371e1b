"""Exchange adapters with other tools' file formats (kohya, diffusers/peft, LyCORIS LoHa/LoKr/full, official code).

``export.py`` writes any weight-space adapter as a kohya/diffusers LoRA, LoKr or full-ΔW "diff" file and measures
the file's ΔW against ours; ``importer.py`` reads those formats back into adapters (`difftune.load_adapter` calls it
for any foreign ``.safetensors``); ``updates.py`` holds the per-module forms both share; ``kohya.py`` the kohya key
naming; ``krona.py`` and ``spm.py`` the method-specific formats. The methods themselves never import from here.
"""

from .export import ExportReport, export_adapter
from .importer import import_file, load_foreign
from .krona import export_krona, load_lokr, load_official_krona

__all__ = ["ExportReport", "export_adapter", "export_krona", "import_file", "load_foreign", "load_lokr",
           "load_official_krona"]
