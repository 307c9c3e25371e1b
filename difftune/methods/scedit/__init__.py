"""SCEdit (skip-connection tuners, ``scedit``, and their controllable variant, ``csc``): the tuners and the hint
encoder in `adapter`, the CSC trainer plugin in `training`, the condition images (canny, sobel, outline, skeleton)
and the per-call control inputs in `conditions`."""

from .adapter import (
    CSCAdapter,
    CSCConfig,
    HintEncoder,
    SCEditAdapter,
    SCEditConfig,
    decoder_index,
    encoder_skips,
    skip_patterns,
)
from .conditions import EXTRACTORS, ControlMixin, control_inputs, control_scales, extract, to_tensor
from .training import CSCPlugin

__all__ = ["EXTRACTORS", "CSCAdapter", "CSCConfig", "CSCPlugin", "ControlMixin", "HintEncoder", "SCEditAdapter",
           "SCEditConfig", "control_inputs", "control_scales", "decoder_index", "encoder_skips", "extract",
           "skip_patterns", "to_tensor"]
