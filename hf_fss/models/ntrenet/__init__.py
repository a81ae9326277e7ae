"""NTRENet (CVPR 2022): few-shot segmentation by mining and eliminating background and distracting objects."""

from ...utils.lazy import lazy_exports
from .configuration_ntrenet import NTRENetConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        ["DIFFERENCES_FROM_OFFICIAL_CODE", "NTRENetContrastiveBank", "NTRENetModel", "NTRENetSupportEncoding"],
        ".modeling_ntrenet",
    ),
)

__all__ = [
    "DIFFERENCES_FROM_OFFICIAL_CODE",
    "NTRENetConfig",
    "NTRENetContrastiveBank",
    "NTRENetModel",
    "NTRENetSupportEncoding",
]
