"""Compressed models: modules replaced by compact classes (quantized, vector-quantized), saved and loaded as one
format that never needs the FP weights.

* `packing`: b-bit packing of codes (b in 1..8).
* `replaced`: the registry of replacement classes (`register_replacement`) and the Linear-like base class.
* `rtn`: `RTNLinear`, round-to-nearest per-channel quantization, and `quantize_rtn_` for a whole model.
* `format`: `save_compressed` / `load_compressed` / `load_compressed_pipeline`.
"""

from __future__ import annotations

from .format import (
    load_compressed,
    load_compressed_pipeline,
    read_compressed_header,
    save_compressed,
    tensor_bytes,
)
from .packing import pack, packed_size, unpack
from .replaced import (
    REPLACEMENTS,
    ReplacedLinear,
    ReplacedModule,
    get_replacement,
    register_replacement,
    replaced_modules,
)
from .rtn import RTN_BITS, RTNLinear, quantize_rtn_, rtn_quantize

__all__ = [
    "REPLACEMENTS",
    "RTN_BITS",
    "RTNLinear",
    "ReplacedLinear",
    "ReplacedModule",
    "get_replacement",
    "load_compressed",
    "load_compressed_pipeline",
    "pack",
    "packed_size",
    "quantize_rtn_",
    "read_compressed_header",
    "register_replacement",
    "replaced_modules",
    "rtn_quantize",
    "save_compressed",
    "tensor_bytes",
    "unpack",
]
