"""Configuration of the training-free cosine prior baseline."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict

from ...backbones.transformers_backbone import FAMILIES
from ...configuration_fss import FewShotSegmentationConfig


@strict(accept_kwargs=True)
class CosinePriorConfig(FewShotSegmentationConfig):
    r"""
    The training-free baseline of the PFENet lineage: the cosine prior mask of the query's layer-4 features against
    the masked support's, thresholded. It has no trained layers; its numbers are the floor every method must beat.

    threshold (`float`, *optional*, defaults to 0.5):
        A pixel is predicted as target where the prior exceeds it.
    support_masking (`str`, *optional*):
        How the support's target selects its high-level features: `"input"` (PFENet: `layer4` run on `layer3 * mask`)
        or `"features"` (`layer4` of the whole support image, the mask applied to those features). Defaults to
        `"features"` for a ViT backbone (DINOv2 / DINOv3 ViT: global attention over a mostly zeroed token map is out
        of its distribution, while the query's features come from the whole image; docs/cosine_prior.md) and to
        `"input"` for every other backbone.

    The zero-training default for real images (downloads facebook/dinov2-small once; docs/cosine_prior.md):
    `CosinePriorConfig(backbone="facebook/dinov2-small", use_pretrained_backbone=True)`, then
    `model.load_pretrained_extractors()`.

    Example:
    ```python
    >>> from hf_fss import CosinePriorConfig, CosinePriorModel
    >>> config = CosinePriorConfig(backbone="resnet50", backbone_kwargs={"stem": "7x7"}, use_pretrained_backbone=True)
    >>> model = CosinePriorModel(config)
    >>> model.load_pretrained_extractors()  # ImageNet weights from microsoft/resnet-50
    ```
    """

    model_type = "cosine_prior"

    threshold: float = 0.5
    support_masking: Literal["input", "features"] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.support_masking is None:
            vit = self.backbone_config is not None and FAMILIES[self.backbone_config["model_type"]] == "vit"
            self.support_masking = "features" if vit else "input"

    def validate_threshold(self):
        """Part of `@strict` validation."""
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
