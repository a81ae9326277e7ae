"""Building blocks shared by the hf_fss methods: prototypes, prior masks, PFENet's FEM and the DeepLab-v2 ASPP."""

from .aspp import ASPPBranch, ASPPClassifier
from .feature_enrichment import FeatureEnrichmentModule
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
    "average_prototypes",
    "cosine_prior_mask",
    "masked_average_pooling",
    "multi_shot_prior_mask",
    "resize_mask",
]
