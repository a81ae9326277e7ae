"""SMCP (IEEE TMM 2021): multi-class label guidance, pyramid feature fusion, self-prototype training and test-time
pseudo-prototype fusion."""

from .configuration_smcp import SMCPConfig
from .modeling_smcp import (
    DIFFERENCES_FROM_OFFICIAL_CODE,
    SMCPModel,
    SMCPPyramidModule,
    SMCPSupportEncoding,
    fuse_prototypes,
    image_resolution_prototype,
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
