"""PFENet's Feature Enrichment Module (FEM), the multi-scale decoder NTRENet, QGNet and CRCNet build on.

Attribute names and `nn.Sequential` layouts follow PFENet's `model/PFENet.py` so that official checkpoint keys
(`init_merge.0.0.weight`, `alpha_conv.0.0.weight`, `beta_conv.0.2.weight`, `inner_cls.0.3.bias`, `res1.0.weight`,
`res2.2.weight`, `cls.3.weight`) map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import classifier, conv_relu, double_conv3x3, resize

__all__ = ["FeatureEnrichmentModule"]


class FeatureEnrichmentModule(nn.Module):
    r"""
    PFENet's Feature Enrichment Module.

    At every pyramid scale the query features are average-pooled, concatenated with the expanded support prototype and
    the resized prior mask (and optional extra maps), merged by a 1x1 convolution, refined top-down with the previous
    (coarser-index) scale, passed through a residual block and an auxiliary classifier, then all scales are upsampled
    back, fused and classified.

    Args:
        reduce_dim (`int`, *optional*, defaults to 256):
            Channels of the query features and of the prototype.
        pyramid_bins (`Sequence[int | float]`, *optional*, defaults to `(60, 30, 15, 8)`):
            Pyramid scales in PFENet's order. A value `> 1` is a fixed square adaptive-pool size; a value `<= 1` is a
            fraction of the feature size.
        num_classes (`int`, *optional*, defaults to 2):
            Output channels of the main and auxiliary classifiers.
        prior_channels (`int`, *optional*, defaults to 1):
            Channels of the prior-mask input.
        extra_channels (`int`, *optional*, defaults to 0):
            Channels of optional extra maps concatenated after the prior at each scale.
        dropout (`float`, *optional*, defaults to 0.1):
            `Dropout2d` rate inside the auxiliary classifiers and the main classifier (0.1 in PFENet for both).
        extra_resize (`str`, *optional*, defaults to `"bilinear"`):
            How the extra maps reach each scale: `"bilinear"` (like the prior, `align_corners=True`) or
            `"adaptive_avg"` (like the query features).
        use_init_merge (`bool`, *optional*, defaults to `True`):
            Build `init_merge`. Variants with their own per-scale merge (NTRENet's `init_merge1/2/3`) set it to
            `False` and drive the pyramid through [`pyramid_sizes`], [`refine_scale`] and [`fuse`].
    """

    def __init__(
        self,
        reduce_dim: int = 256,
        pyramid_bins: Sequence[int | float] = (60, 30, 15, 8),
        num_classes: int = 2,
        prior_channels: int = 1,
        extra_channels: int = 0,
        dropout: float = 0.1,
        extra_resize: str = "bilinear",
        use_init_merge: bool = True,
    ):
        super().__init__()
        if not pyramid_bins:
            raise ValueError("pyramid_bins must not be empty")
        if extra_resize not in ("bilinear", "adaptive_avg"):
            raise ValueError(f"extra_resize must be 'bilinear' or 'adaptive_avg', got {extra_resize!r}")
        self.reduce_dim = reduce_dim
        self.pyramid_bins = tuple(pyramid_bins)
        self.prior_channels = prior_channels
        self.extra_channels = extra_channels
        self.extra_resize = extra_resize
        num_bins = len(self.pyramid_bins)
        merge_in = reduce_dim * 2 + prior_channels + extra_channels

        if use_init_merge:
            self.init_merge = nn.ModuleList(
                conv_relu(merge_in, reduce_dim, kernel_size=1, bias=False) for _ in range(num_bins)
            )
        else:
            self.init_merge = None
        # Inter-scale merge for every scale after the first; PFENet's ReLU here is not in-place (no effect on values).
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(reduce_dim * 2, reduce_dim, kernel_size=1, bias=False), nn.ReLU())
            for _ in range(num_bins - 1)
        )
        self.beta_conv = nn.ModuleList(double_conv3x3(reduce_dim) for _ in range(num_bins))
        self.inner_cls = nn.ModuleList(classifier(reduce_dim, num_classes, dropout) for _ in range(num_bins))
        self.res1 = conv_relu(reduce_dim * num_bins, reduce_dim, kernel_size=1, bias=False)
        self.res2 = double_conv3x3(reduce_dim)
        self.cls = classifier(reduce_dim, num_classes, dropout)

    def pyramid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """
        The `(bin_height, bin_width)` of every pyramid scale for features of size `(height, width)`.

        A bin `<= 1` is a fraction of the feature size, truncated like PFENet's `int(h * bin)` (PFENet only uses the
        height because its features are square; each side is scaled here). A bin `> 1` is a fixed square size.
        """
        sizes = []
        for value in self.pyramid_bins:
            if value <= 1:
                sizes.append((max(1, int(height * value)), max(1, int(width * value))))
            else:
                sizes.append((int(value), int(value)))
        return sizes

    def refine_scale(
        self, index: int, merged: torch.Tensor, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Everything PFENet does to one scale after its initial merge.

        Args:
            index (`int`):
                Position of the scale in `pyramid_bins`.
            merged (`torch.Tensor` of shape `(batch_size, reduce_dim, bin_height, bin_width)`):
                Output of the initial merge at this scale.
            previous (`torch.Tensor` of shape `(batch_size, reduce_dim, height, width)`, *optional*):
                Refined features of the previous scale (already upsampled to the feature size); required when
                `index >= 1`.

        Returns:
            `tuple(torch.Tensor, torch.Tensor)`: the refined features `(batch_size, reduce_dim, bin_height,
            bin_width)` and the auxiliary logits `(batch_size, num_classes, bin_height, bin_width)`.
        """
        size = tuple(merged.shape[-2:])
        if index >= 1:
            if previous is None:
                raise ValueError("scales after the first need the previous scale's features")
            previous = resize(previous, size)
            merged = self.alpha_conv[index - 1](torch.cat([merged, previous], dim=1)) + merged
        merged = self.beta_conv[index](merged) + merged
        return merged, self.inner_cls[index](merged)

    def fuse(self, pyramid_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Fuse the per-scale features (all upsampled to the feature size) and classify.

        Args:
            pyramid_features (list of `torch.Tensor` of shape `(batch_size, reduce_dim, height, width)`):
                One tensor per pyramid scale, in `pyramid_bins` order.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_classes, height, width)`.
        """
        fused = self.res1(torch.cat(list(pyramid_features), dim=1))
        fused = self.res2(fused) + fused
        return self.cls(fused)

    def forward(
        self,
        query_features: torch.Tensor,
        support_prototype: torch.Tensor,
        prior_mask: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            query_features (`torch.Tensor` of shape `(batch_size, reduce_dim, height, width)`):
                Reduced mid-level query features.
            support_prototype (`torch.Tensor` of shape `(batch_size, reduce_dim, 1, 1)`):
                Support prototype (already averaged over shots).
            prior_mask (`torch.Tensor` of shape `(batch_size, prior_channels, height, width)`):
                Prior mask (already averaged over shots).
            extra (`torch.Tensor` of shape `(batch_size, extra_channels, height, width)`, *optional*):
                Extra maps concatenated after the prior; required when `extra_channels > 0`.

        Returns:
            `tuple(torch.Tensor, list[torch.Tensor])`: logits `(batch_size, num_classes, height, width)` at the
            feature resolution, and one auxiliary-logit tensor `(batch_size, num_classes, bin_height, bin_width)` per
            pyramid scale.
        """
        if self.init_merge is None:
            raise RuntimeError("built with use_init_merge=False: the owning model must run the pyramid itself")
        if (extra is None) != (self.extra_channels == 0):
            raise ValueError(f"extra maps must be given exactly when extra_channels > 0 (got {self.extra_channels})")
        height, width = query_features.shape[-2:]

        pyramid_features, aux_logits = [], []
        for index, size in enumerate(self.pyramid_sizes(height, width)):
            inputs = [
                F.adaptive_avg_pool2d(query_features, size),
                support_prototype.expand(-1, -1, *size),
                resize(prior_mask, size),
            ]
            if extra is not None:
                inputs.append(
                    F.adaptive_avg_pool2d(extra, size) if self.extra_resize == "adaptive_avg" else resize(extra, size)
                )
            merged = self.init_merge[index](torch.cat(inputs, dim=1))
            merged, aux = self.refine_scale(index, merged, pyramid_features[-1] if index >= 1 else None)
            aux_logits.append(aux)
            pyramid_features.append(resize(merged, (height, width)))

        return self.fuse(pyramid_features), aux_logits
