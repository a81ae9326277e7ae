"""CRCNet (IJCV 2022): cross-reference, region-global conditioning, recurrent mask refinement, K-shot finetuning."""

from ...utils.lazy import lazy_exports
from .configuration_crcnet import CRCNetConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        ["DIFFERENCES_FROM_PAPER", "CRCNetHead", "CRCNetModel", "CRCNetSupportEncoding", "PairPrediction"],
        ".modeling_crcnet",
    ),
)

__all__ = [
    "CRCNetConfig",
    "CRCNetHead",
    "CRCNetModel",
    "CRCNetSupportEncoding",
    "DIFFERENCES_FROM_PAPER",
    "PairPrediction",
]
