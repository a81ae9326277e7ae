"""Building blocks shared by the hf_fss methods: the resize and conv blocks, the masked cross-entropy, prototypes, prior
masks, PFENet's support path and FEM, the DeepLab-v2 ASPP and the memory bank."""

from . import memory_bank
from .aspp import ASPPBranch, ASPPClassifier
from .feature_enrichment import FeatureEnrichmentModule
from .losses import MaskedCrossEntropy
from .memory_bank import MemoryBank, gather_rows
from .ops import autocast_off, classifier, conv_block, conv_relu, double_conv3x3, resize
from .pfenet import PFENetSupportFeatures, pfenet_mid_level, pfenet_support_encoding, pfenet_support_features
from .prototypes import (
    average_prototypes,
    cosine_prior_mask,
    masked_average_pooling,
    multi_shot_prior_mask,
    resize_mask,
)

__all__ = [
    "autocast_off",
    "ASPPBranch",
    "ASPPClassifier",
    "FeatureEnrichmentModule",
    "MaskedCrossEntropy",
    "MemoryBank",
    "PFENetSupportFeatures",
    "average_prototypes",
    "classifier",
    "conv_block",
    "conv_relu",
    "cosine_prior_mask",
    "double_conv3x3",
    "gather_rows",
    "masked_average_pooling",
    "memory_bank",
    "multi_shot_prior_mask",
    "pfenet_mid_level",
    "pfenet_support_encoding",
    "pfenet_support_features",
    "resize",
    "resize_mask",
]
