"""CRCNet (IJCV 2022): cross-reference, region-global conditioning, recurrent mask refinement, K-shot finetuning."""

from ...utils.lazy import lazy_exports
from .configuration_crcnet import CRCNetConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
_LAZY = dict.fromkeys(
    ["DIFFERENCES_FROM_PAPER", "CRCNetHead", "CRCNetModel", "CRCNetSupportEncoding", "PairPrediction"],
    ".modeling_crcnet",
)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["CRCNetConfig", *sorted(_LAZY)]
