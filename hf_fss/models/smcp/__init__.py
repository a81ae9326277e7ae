"""SMCP (IEEE TMM 2021): multi-class label guidance, pyramid feature fusion, self-prototype training and test-time
pseudo-prototype fusion."""

from ...utils.lazy import lazy_exports
from .configuration_smcp import SMCPConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        [
            "DIFFERENCES_FROM_OFFICIAL_CODE",
            "SMCPModel",
            "SMCPPyramidModule",
            "SMCPSupportEncoding",
            "fuse_prototypes",
            "image_resolution_prototype",
        ],
        ".modeling_smcp",
    ),
)

__all__ = [
    "DIFFERENCES_FROM_OFFICIAL_CODE",
    "SMCPConfig",
    "SMCPModel",
    "SMCPPyramidModule",
    "SMCPSupportEncoding",
    "fuse_prototypes",
    "image_resolution_prototype",
]
