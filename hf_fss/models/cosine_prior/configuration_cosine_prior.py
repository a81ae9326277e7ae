"""Configuration of the training-free cosine prior baseline."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from ...configuration_fss import FewShotSegmentationConfig


@strict(accept_kwargs=True)
class CosinePriorConfig(FewShotSegmentationConfig):
    r"""
    The training-free baseline of the PFENet lineage: the cosine prior mask of the query's layer-4 features against
    the masked support's, thresholded. It has no trained layers; its numbers are the floor every method must beat.

    threshold (`float`, *optional*, defaults to 0.5):
        A pixel is predicted as target where the prior exceeds it.

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

    def validate_threshold(self):
        """Part of `@strict` validation."""
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
