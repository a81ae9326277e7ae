"""The training-free cosine prior baseline (PFENet's prior mask, thresholded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import multi_shot_prior_mask, pfenet_support_encoding, resize
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


class CosinePriorLoss(nn.Module):
    """
    Binary cross-entropy of the prior (clamped to [1e-6, 1 - 1e-6]) against the target, ignored pixels left out.

    Args:
        config (`CosinePriorConfig`): `ignore_index`.
    """

    def __init__(self, config: CosinePriorConfig):
        super().__init__()
        self.config = config

    def forward(self, labels: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`): {0, 1, 255}.
            prior (`torch.FloatTensor` of shape `(batch_size, 1, height, width)`): values in [0, 1].

        Returns:
            `tuple(torch.FloatTensor, dict[str, torch.FloatTensor])`: the loss (zero, keeping the graph, when every
            pixel is ignored) and `{"main": loss}` detached.
        """
        valid = labels != self.config.ignore_index
        target = (labels == 1).to(prior.dtype)
        prob = prior[:, 0].clamp(1e-6, 1 - 1e-6)
        loss = F.binary_cross_entropy(prob[valid], target[valid]) if valid.any() else prob.sum() * 0
        return loss, {"main": loss.detach()}


class CosinePriorModel(FewShotSegmentationPreTrainedModel):
    """
    Cosine prior mask baseline. `logits[:, 1]` is the prior (in [0, 1]) upsampled to the input size and
    `logits[:, 0]` the constant threshold, so the argmax is "prior > threshold". The support's high-level features
    follow `config.support_masking` (PFENet's masked input, or masked features of the whole image).
    """

    config_class = CosinePriorConfig
    support_encoding_class = CosinePriorSupportEncoding
    support_shots_separable = True
    output_maps = {"prior": "PFENet prior mask: similarity of the query to the support's target (stage 4)"}

    def __init__(self, config: CosinePriorConfig):
        super().__init__(config)
        self.backbone = self.build_backbone()
        self.criterion = CosinePriorLoss(config)
        self.post_init()

    def _encode_support(self, support_pixel_values, support_masks) -> CosinePriorSupportEncoding:
        if self.config.support_masking == "features":  # the whole image's layer4; the prior applies the mask
            batch_size, shot = support_pixel_values.shape[:2]
            features = self.backbone_features(support_pixel_values.flatten(0, 1))[-1].unflatten(0, (batch_size, shot))
            masks = (support_masks == 1).unsqueeze(2).to(support_pixel_values.dtype)
            return CosinePriorSupportEncoding(shot=shot, features=features, masks=masks)
        fields = pfenet_support_encoding(self.backbone, support_pixel_values, support_masks)
        return CosinePriorSupportEncoding(
            shot=fields["shot"], features=fields["high_level_features"], masks=fields["masks"]
        )

    def _segment(self, pixel_values, support_encoding, labels=None) -> FewShotSegmentationOutput:
        query_layer4 = self.backbone_features(pixel_values)[-1]
        prior = multi_shot_prior_mask(query_layer4, support_encoding.features, support_encoding.masks)
        prior_full = resize(prior, pixel_values.shape[-2:])
        logits = torch.cat([torch.full_like(prior_full, self.config.threshold), prior_full], dim=1)
        loss, losses = self.criterion(labels, prior_full) if labels is not None else (None, None)
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses=losses, maps={"prior": prior})
