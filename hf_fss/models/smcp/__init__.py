"""SMCP (IEEE TMM 2021): multi-class label guidance, pyramid feature fusion, self-prototype training and test-time
pseudo-prototype fusion."""

from ...utils.lazy import lazy_exports
from .configuration_smcp import SMCPConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
_LAZY = dict.fromkeys(
    [
        "DIFFERENCES_FROM_OFFICIAL_CODE",
        "SMCPModel",
        "SMCPPyramidModule",
        "SMCPSupportEncoding",
        "fuse_prototypes",
        "image_resolution_prototype",
    ],
    ".modeling_smcp",
)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["SMCPConfig", *sorted(_LAZY)]
