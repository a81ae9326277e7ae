"""Building blocks shared by the hf_fss methods: prototypes, prior masks, PFENet's support path and FEM, the DeepLab-v2
ASPP and the memory bank."""

from . import memory_bank
from .aspp import ASPPBranch, ASPPClassifier
from .feature_enrichment import FeatureEnrichmentModule
from .memory_bank import MemoryBank, gather_rows
from .pfenet import PFENetSupportFeatures, pfenet_mid_level, pfenet_support_features
from .prototypes import (
    average_prototypes,
    cosine_prior_mask,
    masked_average_pooling,
    multi_shot_prior_mask,
    resize_mask,
)

__all__ = [
    "ASPPBranch",
    "ASPPClassifier",
    "FeatureEnrichmentModule",
    "MemoryBank",
    "PFENetSupportFeatures",
    "average_prototypes",
    "cosine_prior_mask",
    "gather_rows",
    "masked_average_pooling",
    "memory_bank",
    "multi_shot_prior_mask",
    "pfenet_mid_level",
    "pfenet_support_features",
    "resize_mask",
]
