"""DeepLab-v2 ASPP classifier, as SMCP's `Classifier_Module` (attribute `conv2d_list` kept for checkpoint keys)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import initialization as init

__all__ = ["ASPPBranch", "ASPPClassifier"]


class ASPPBranch(nn.Conv2d):
    r"""
    One ASPP branch: a 3x3 convolution with dilation and padding `rate`, straight to class scores. Weights are drawn
    from N(0, `init_std`) and biases keep torch's default, as in SMCP / DeepLab-v2.

    It is its own `nn.Conv2d` subclass so that a model's `_init_weights` can recognise it (check it *before* a
    generic `nn.Conv2d` branch and call `module.reset_parameters()`). transformers 5 skips `_init_weights` for
    custom-code modules without direct parameters, so a hook on the parent [`ASPPClassifier`] would never run.

    Args:
        in_channels (`int`):
            Channels of the input features.
        out_channels (`int`):
            Number of classes.
        rate (`int`):
            Dilation and padding.
        init_std (`float`, *optional*, defaults to 0.01):
            Standard deviation of the weight initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, rate: int, init_std: float = 0.01):
        # Set before nn.Conv2d.__init__, which calls reset_parameters.
        self.init_std = init_std
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=rate, dilation=rate, bias=True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # torch's default init first (kept for the bias), then the normal weights. The transformers initialisers skip
        # tensors already loaded from a checkpoint.
        super().reset_parameters()
        init.normal_(self.weight, mean=0.0, std=self.init_std)


class ASPPClassifier(nn.Module):
    r"""
    Atrous spatial pyramid pooling classifier of DeepLab-v2 (SMCP's `Classifier_Module`): parallel 3x3 convolutions
    with different dilation rates (padding equal to the rate, so the size is kept), straight to class scores, summed.

    Args:
        in_channels (`int`):
            Channels of the input features.
        num_classes (`int`):
            Output channels.
        rates (`Sequence[int]`, *optional*, defaults to `(6, 12, 18, 24)`):
            Dilation (and padding) of each branch.
        init_std (`float`, *optional*, defaults to 0.01):
            Standard deviation of the normal initialisation of the branch weights, as in SMCP / DeepLab-v2.
    """

    def __init__(
        self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24), init_std: float = 0.01
    ):
        super().__init__()
        if not rates:
            raise ValueError("rates must not be empty")
        self.rates = tuple(rates)
        self.conv2d_list = nn.ModuleList(ASPPBranch(in_channels, num_classes, rate, init_std) for rate in self.rates)

    def reset_parameters(self) -> None:
        """Re-draw every branch's weights (see [`ASPPBranch`])."""
        for conv in self.conv2d_list:
            conv.reset_parameters()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Input features.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_classes, height, width)`: the sum of all branches.
        """
        out = self.conv2d_list[0](features)
        for conv in self.conv2d_list[1:]:
            out = out + conv(features)
        return out
