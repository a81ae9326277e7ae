"""The segmentation loss every method's loss module is made of."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import resize

__all__ = ["MaskedCrossEntropy"]


class MaskedCrossEntropy(nn.Module):
    """
    Two-class (or multi-class) cross-entropy of logits resized to the labels' size, pixels of `ignore_index` left out.

    Args:
        ignore_index (`int`, *optional*, defaults to 255): the label value of ignored pixels.
        align_corners (`bool`, *optional*, defaults to `True`): of the bilinear resize (SMCP's official code: False).
        float32 (`bool`, *optional*, defaults to `False`): compute in float32 whatever the logits' dtype (CRCNet).
    """

    def __init__(self, ignore_index: int = 255, align_corners: bool = True, float32: bool = False):
        super().__init__()
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.float32 = float32

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits (`torch.FloatTensor` of shape `(batch_size, num_classes, h, w)`): any size.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`): class ids or `ignore_index`.

        Returns:
            `torch.FloatTensor` of shape `()`: the mean over the pixels that are not ignored; a zero that keeps the
            graph when every pixel is ignored (no signal, and no NaN).
        """
        logits = resize(logits.float() if self.float32 else logits, labels.shape[-2:], self.align_corners)
        if not bool((labels != self.ignore_index).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels.long(), ignore_index=self.ignore_index)
