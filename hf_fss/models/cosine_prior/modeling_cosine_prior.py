"""The training-free cosine prior baseline (PFENet's prior mask, thresholded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import multi_shot_prior_mask, pfenet_support_features
from .configuration_cosine_prior import CosinePriorConfig


@dataclass
class CosinePriorSupportEncoding(SupportEncoding):
    """
    Args:
        features (`torch.FloatTensor` of shape `(batch_size, shot, channels, h, w)`):
            layer-4 features of the supports, computed on mask-weighted layer-3 features as in PFENet.
        masks (`torch.FloatTensor` of shape `(batch_size, shot, 1, height, width)`): 1 on the target, else 0.
    """

    features: torch.FloatTensor | None = None
    masks: torch.FloatTensor | None = None


class CosinePriorModel(FewShotSegmentationPreTrainedModel):
    """
    Cosine prior mask baseline. `logits[:, 1]` is the prior (in [0, 1]) upsampled to the input size and
    `logits[:, 0]` the constant threshold, so the argmax is "prior > threshold".
    """

    config_class = CosinePriorConfig
    output_maps = {"prior": "PFENet prior mask: similarity of the query to the support's target (stage 4)"}

    def __init__(self, config: CosinePriorConfig):
        super().__init__(config)
        self.backbone = self.build_backbone()
        self.post_init()

    def _encode_support(self, support_pixel_values, support_masks) -> CosinePriorSupportEncoding:
        batch_size, shot = support_pixel_values.shape[:2]
        support = pfenet_support_features(
            self.backbone, support_pixel_values.flatten(0, 1), support_masks.flatten(0, 1)
        )
        return CosinePriorSupportEncoding(
            shot=shot,
            features=support.masked_layer4.unflatten(0, (batch_size, shot)),
            masks=support.masks.unflatten(0, (batch_size, shot)),
        )

    def _segment(self, pixel_values, support_encoding, labels=None) -> FewShotSegmentationOutput:
        query_layer4 = self.backbone_features(pixel_values)[-1]
        prior = multi_shot_prior_mask(query_layer4, support_encoding.features, support_encoding.masks)
        prior_full = F.interpolate(prior, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)
        logits = torch.cat([torch.full_like(prior_full, self.config.threshold), prior_full], dim=1)
        loss = losses = None
        if labels is not None:
            valid = labels != self.config.ignore_index
            target = (labels == 1).to(prior_full.dtype)
            prob = prior_full[:, 0].clamp(1e-6, 1 - 1e-6)
            loss = F.binary_cross_entropy(prob[valid], target[valid]) if valid.any() else prob.sum() * 0
            losses = {"main": loss.detach()}
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses=losses, maps={"prior": prior})
