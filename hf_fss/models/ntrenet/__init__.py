"""NTRENet (CVPR 2022): few-shot segmentation by mining and eliminating background and distracting objects."""

from .configuration_ntrenet import NTRENetConfig
from .modeling_ntrenet import (
    DIFFERENCES_FROM_OFFICIAL_CODE,
    NTRENetContrastiveBank,
    NTRENetModel,
    NTRENetSupportEncoding,
)

__all__ = [
    "DIFFERENCES_FROM_OFFICIAL_CODE",
    "NTRENetConfig",
    "NTRENetContrastiveBank",
    "NTRENetModel",
    "NTRENetSupportEncoding",
]
