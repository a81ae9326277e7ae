"""Small operations every method builds with: one bilinear resize and the conv blocks of the PFENet lineage, SMCP and
CRCNet.

The builders return `nn.Sequential`s whose indices are the official layouts' (`0` conv, `1` ReLU, `2` dropout, ...),
so converted checkpoint keys such as `down_query.0.weight` or `inner_cls.0.3.bias` stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["autocast_off", "classifier", "conv_block", "conv_relu", "double_conv3x3", "resize"]


def autocast_off(tensor: torch.Tensor) -> torch.autocast:
    """
    `torch.autocast(<tensor's device type>, enabled=False)`: inside it every op runs in its inputs' dtype, so a block
    that casts its inputs with `.float()` stays float32 even when the caller runs the model under
    `torch.autocast(dtype=torch.bfloat16)` (autocast would otherwise cast a `bmm` back to bfloat16). For the
    numerically sensitive parts: cosine similarities and priors, attention softmax, test-time finetuning.
    """
    return torch.autocast(tensor.device.type, enabled=False)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def resize(x: torch.Tensor, size: int | Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """
    Bilinear resize of a map, the one every method uses: `align_corners=True` as PFENet and its descendants (NTRENet,
    QGNet, CRCNet), `align_corners=False` as SMCP's official code.

    Args:
        x (`torch.Tensor` of shape `(..., channels, height, width)`): any number of leading dimensions (e.g.
            `(batch_size, shot)`).
        size (`int` or `tuple[int, int]`): target `(new_height, new_width)`; an int means a square size.
        align_corners (`bool`, *optional*, defaults to `True`).

    Returns:
        `torch.Tensor` of shape `(..., channels, new_height, new_width)`; `x` itself when it already has that size
        (bilinear resizing to the same size is the identity with either alignment, so skipping the copy changes no
        value).
    """
    size = _as_size(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.dim() == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    flat = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear", align_corners=align_corners)
    return flat.reshape(*x.shape[:-3], *flat.shape[1:])


def conv_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1, bias: bool = True
) -> nn.Sequential:
    """`Conv2d` ('same' padding for odd kernels) + in-place ReLU: CRCNet's and SMCP's module convs (3x3 with bias), the
    PFENet merges (`init_merge`, `res1`, NTRENet's `init_merge1/2/3`: 1x1 without bias)."""
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias
    )
    return nn.Sequential(conv, nn.ReLU(inplace=True))


def conv_block(in_channels: int, out_channels: int, dropout: float, kernel_size: int = 1) -> nn.Sequential:
    """Conv (no bias), ReLU, Dropout2d: PFENet's `down_query` / `down_supp` (1x1), NTRENet's `down_bg`, QGNet's 3x3
    projections."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


def double_conv3x3(channels: int) -> nn.Sequential:
    """Two 3x3 convs (no bias) with ReLU, the residual branch of PFENet's `beta_conv` / `res2` and NTRENet's
    `bg_res1` (the skip connection is the caller's)."""
    return nn.Sequential(*conv_relu(channels, channels, bias=False), *conv_relu(channels, channels, bias=False))


def classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """3x3 conv (no bias), ReLU, Dropout2d, 1x1 conv to `num_classes`: PFENet's `cls` / `inner_cls`, NTRENet's
    `bg_cls` / `initial_inner_cls`."""
    return nn.Sequential(
        *conv_relu(channels, channels, bias=False), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)
    )
