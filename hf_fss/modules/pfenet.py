"""PFENet's support path and support encoding, shared by every PFENet-lineage method (NTRENet, QGNet, the cosine
prior)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ops import resize
from .prototypes import masked_average_pooling


@dataclass
class PFENetSupportFeatures:
    """
    Backbone features of a flattened support batch (`n = batch_size * shot` images).

    Args:
        stages (`list[torch.FloatTensor]`): `layer0 .. layer3` outputs, each `(n, channels_i, h_i, w_i)`.
        masks (`torch.FloatTensor` of shape `(n, 1, height, width)`): 1 on the target, else 0 (ignore is 0), at the
            image resolution.
        stage3_masks (`torch.FloatTensor` of shape `(n, 1, h_3, w_3)`): `masks` resized bilinearly
            (`align_corners=True`) to `layer3`'s size, values in [0, 1].
        masked_layer4 (`torch.FloatTensor` of shape `(n, channels_4, h_4, w_4)`): `layer4` computed on
            `layer3 * stage3_masks`, the support side of the cosine prior mask.
    """

    stages: list[torch.Tensor]
    masks: torch.Tensor
    stage3_masks: torch.Tensor
    masked_layer4: torch.Tensor


def pfenet_support_features(backbone, support_pixel_values: torch.Tensor, support_masks: torch.Tensor):
    """
    Stage features of the supports and PFENet's masked stage-4 features (PFENet, `model/PFENet.py`, `forward`:
    `mask = F.interpolate(mask, size=layer3 size, bilinear, align_corners=True)`, `layer4(layer3 * mask)`).

    Args:
        backbone (`StagedBackbone`): the extractor; it applies its own no-grad / chunking policy.
        support_pixel_values (`torch.FloatTensor` of shape `(n, 3, height, width)`): normalised support images
            (batch and shot flattened).
        support_masks (`torch.Tensor` of shape `(n, height, width)`): 1 = target, 0 = background, 255 = ignore.

    Returns:
        `PFENetSupportFeatures`.
    """
    masks = (support_masks == 1).unsqueeze(1).to(support_pixel_values.dtype)
    stages = backbone.forward_stages(support_pixel_values, 0, 4)
    stage3_masks = resize(masks, stages[3].shape[-2:])
    masked_layer4 = backbone.forward_stages(stages[3] * stage3_masks, 4, 5)[-1]
    return PFENetSupportFeatures(stages, masks, stage3_masks, masked_layer4)


def pfenet_mid_level(layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
    """
    PFENet's mid-level features `[layer3, layer2]` along channels, `(n, c3 + c2, h3, w3)`, the input of `down_query` /
    `down_supp`; VGG's stage 2 is larger than stage 3 and is resized (bilinear) to it first.
    """
    return torch.cat([layer3, resize(layer2, layer3.shape[-2:])], dim=1)


def pfenet_support_encoding(
    backbone, support_pixel_values: torch.Tensor, support_masks: torch.Tensor, down_supp: nn.Module | None = None
) -> dict[str, torch.Tensor | int]:
    """
    The fields of a PFENet support encoding (NTRENet, QGNet and the cosine prior build theirs from them): the masked
    stage-4 features and target masks, and with `down_supp` the reduced mid-level features and their target prototype
    (PFENet's `Weighted_GAP` under the stage-3 mask), averaged over shots.

    Args:
        backbone (`StagedBackbone`): the extractor.
        support_pixel_values (`torch.FloatTensor` of shape `(batch_size, shot, 3, height, width)`).
        support_masks (`torch.Tensor` of shape `(batch_size, shot, height, width)`): 1 = target, 0 = background,
            255 = ignore.
        down_supp (`nn.Module`, *optional*): the reduction of `pfenet_mid_level` features to `reduce_dim` channels.

    Returns:
        `dict` with `shot` (`int`), `high_level_features` `(batch_size, shot, channels_4, h_4, w_4)`, `masks`
        `(batch_size, shot, 1, height, width)` and, with `down_supp`, `features` `(batch_size, shot, reduce_dim, h_3,
        w_3)` and `prototype` `(batch_size, reduce_dim, 1, 1)`.
    """
    batch_size, shot = support_pixel_values.shape[:2]
    support = pfenet_support_features(backbone, support_pixel_values.flatten(0, 1), support_masks.flatten(0, 1))
    fields = {
        "shot": shot,
        "high_level_features": support.masked_layer4.unflatten(0, (batch_size, shot)),
        "masks": support.masks.unflatten(0, (batch_size, shot)),
    }
    if down_supp is not None:
        features = down_supp(pfenet_mid_level(support.stages[2], support.stages[3]))
        prototypes = masked_average_pooling(features, support.stage3_masks)  # (batch * shot, reduce_dim, 1, 1)
        fields["features"] = features.unflatten(0, (batch_size, shot))
        fields["prototype"] = prototypes.unflatten(0, (batch_size, shot)).mean(dim=1)
    return fields
