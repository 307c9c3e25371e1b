"""SPM (concept semi-permeable membranes): the membrane and transport in `adapter`, training in `training`."""

from .adapter import (
    SPMAdapter,
    SPMConfig,
    SPMPart,
    encode_concepts,
    permeability,
    set_matching,
    set_transport,
    token_overlap,
    words,
)
from .training import SPMPlugin, random_anchors

__all__ = ["SPMAdapter", "SPMConfig", "SPMPart", "SPMPlugin", "encode_concepts", "permeability", "random_anchors",
           "set_matching", "set_transport", "token_overlap", "words"]
