"""CRCNet (IJCV 2022): cross-reference, region-global conditioning, recurrent mask refinement, K-shot finetuning."""

from .configuration_crcnet import CRCNetConfig
from .modeling_crcnet import DIFFERENCES_FROM_PAPER, CRCNetHead, CRCNetModel, CRCNetSupportEncoding, PairPrediction

__all__ = [
    "DIFFERENCES_FROM_PAPER",
    "CRCNetConfig",
    "CRCNetHead",
    "CRCNetModel",
    "CRCNetSupportEncoding",
    "PairPrediction",
]
