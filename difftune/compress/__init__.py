"""Compressed models: modules replaced by compact classes (quantized, vector-quantized), saved and loaded as one
format that never needs the FP weights.

* `packing`: b-bit packing of codes (b in 1..8).
* `replaced`: the registry of replacement classes (`register_replacement`) and the Linear-like base class.
* `rtn`: `RTNLinear`, round-to-nearest per-channel quantization, and `quantize_rtn_` for a whole model.
* `format`: `save_compressed` / `load_compressed` / `load_compressed_pipeline`.
* `vq4dit` (+ `kmeans`, `vq4dit_calib`): `VQLinear`, VQ4DiT vector quantization with zero-data calibration, the
  k-means-only baseline, paper-style size accounting.

Also here: `block_removal` (BK-SDM students) with `macs` (parameter and MAC counts), and `cli` (the ``quantize`` and
``distill`` commands).
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
from .vq4dit import VQ_PRESETS, VQ4DiTConfig, VQLinear, quantize_kmeans_, set_decode_mode, size_report
from .vq4dit_calib import quantize_vq4dit

__all__ = [
    "REPLACEMENTS",
    "RTN_BITS",
    "RTNLinear",
    "VQ4DiTConfig",
    "VQLinear",
    "VQ_PRESETS",
    "ReplacedLinear",
    "ReplacedModule",
    "get_replacement",
    "load_compressed",
    "load_compressed_pipeline",
    "pack",
    "packed_size",
    "quantize_kmeans_",
    "quantize_rtn_",
    "quantize_vq4dit",
    "read_compressed_header",
    "register_replacement",
    "replaced_modules",
    "rtn_quantize",
    "save_compressed",
    "set_decode_mode",
    "size_report",
    "tensor_bytes",
    "unpack",
]
