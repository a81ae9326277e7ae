"""NTRENet (CVPR 2022): few-shot segmentation by mining and eliminating background and distracting objects."""

from ...utils.lazy import lazy_exports
from .configuration_ntrenet import NTRENetConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
_LAZY = dict.fromkeys(
    ["DIFFERENCES_FROM_OFFICIAL_CODE", "NTRENetContrastiveBank", "NTRENetModel", "NTRENetSupportEncoding"],
    ".modeling_ntrenet",
)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["NTRENetConfig", *sorted(_LAZY)]
