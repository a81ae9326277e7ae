"""QGNet (2021): few-shot segmentation with a contrastively pretrained prior extractor and two region maps."""

from ...utils.lazy import lazy_exports
from .configuration_qgnet import QGNetConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
_LAZY = dict.fromkeys(
    ["DIFFERENCES_FROM_OFFICIAL_CODE", "QGNetModel", "QGNetSupportEncoding", "prior_region_map"], ".modeling_qgnet"
)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["QGNetConfig", *sorted(_LAZY)]
