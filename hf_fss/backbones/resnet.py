"""Dilated ResNet backbones (PSPNet deep stem or torchvision 7x7 stem) split into five stages `layer0..layer4`."""

from __future__ import annotations

import torch
from torch import nn

from .staged import StagedBackbone

RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STEMS = ("deep", "7x7")
# Random initialisations of the convolutions: torchvision's ResNet init (Kaiming normal, fan_out) or torch's default.
CONV_INITS = ("kaiming_fan_out", "torch_default")
# Per output stride: (stride, dilation) of layer3 and layer4.
_DILATION_PLAN = {8: ((1, 2), (1, 4)), 16: ((2, 1), (1, 2)), 32: ((2, 1), (2, 1))}


class Bottleneck(nn.Module):
    """
    ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision, PSPNet and transformers' ResNet).

    Maps `(batch_size, inplanes, h, w)` to `(batch_size, planes * 4, h / stride, w / stride)`.
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.downsample is None else self.downsample(hidden_states)
        out = self.relu(self.bn1(self.conv1(hidden_states)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # `out` is a fresh tensor, so the block never overwrites its input (which callers may keep).
        out += residual
        return self.relu(out)


class DilatedResNet(StagedBackbone):
    """
    Bottleneck ResNet with dilated late stages, as used by PFENet and its descendants.

    `layer0` is the stem (ending with the 3x3 / stride 2 max pool), `layer1..layer4` the four residual stages with
    `base_width * (1, 2, 4, 8)` bottleneck planes. With `output_stride=8` (the PFENet setting) `layer3` and
    `layer4` keep stride 1 and dilate *every* 3x3 conv of the stage by 2 and 4 respectively; `output_stride=16`
    dilates only `layer4` (by 2); `output_stride=32` is the plain ResNet.

    Parameter names follow PSPNet / torchvision inside the stages (`layer1.0.conv1.weight`,
    `layer1.0.downsample.0.weight`, ...) and name the stem's children (`layer0.conv1`, `layer0.bn1`, ...).

    Args:
        depth (`int`, *optional*, defaults to 50):
            50, 101 or 152; picks the default `depths`.
        stem (`str`, *optional*, defaults to `"deep"`):
            `"deep"`: PSPNet's three 3x3 convs (`w -> w -> 2w` channels, the first with stride 2);
            `"7x7"`: torchvision / transformers' single 7x7 stride-2 conv to `w` channels.
        base_width (`int`, *optional*, defaults to 64):
            `w`, the stem width and the bottleneck planes of `layer1`; small values give tiny test models.
        depths (`tuple[int, int, int, int]`, *optional*):
            Blocks per residual stage; defaults to the standard counts for `depth`.
        output_stride (`int`, *optional*, defaults to 8):
            8, 16 or 32: output stride of `layer4`.
        conv_init (`str`, *optional*, defaults to `"kaiming_fan_out"`):
            Random initialisation of the convolutions: `"kaiming_fan_out"` (torchvision's ResNet init, Kaiming normal
            over fan_out) or `"torch_default"` (`nn.Conv2d`'s own, Kaiming uniform with a=sqrt(5)). Irrelevant once
            pretrained weights are loaded; a random, frozen backbone (the quickstart) gives more separable features
            with the latter (cosine-prior baseline on the synthetic benchmark, fold 0: 34.6 vs 27.8 mIoU).

    Example shapes for `base_width=64`, deep stem, `output_stride=8` and a `(1, 3, 473, 473)` input: `layer0`
    `(1, 128, 119, 119)`, `layer1` `(1, 256, 119, 119)`, `layer2..4` `(1, 512 | 1024 | 2048, 60, 60)`.
    """

    weight_family = "resnet"

    def __init__(
        self,
        depth: int = 50,
        stem: str = "deep",
        base_width: int = 64,
        depths: tuple[int, ...] | list[int] | None = None,
        output_stride: int = 8,
        conv_init: str = "kaiming_fan_out",
    ):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth={depth!r} is not supported; choose one of {sorted(RESNET_DEPTHS)}.")
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r} is not supported; choose one of {list(STEMS)}.")
        if output_stride not in _DILATION_PLAN:
            raise ValueError(
                f"output_stride={output_stride!r} is not supported; choose one of {sorted(_DILATION_PLAN)}."
            )
        depths = tuple(RESNET_DEPTHS[depth] if depths is None else depths)
        if len(depths) != 4 or any(int(d) < 1 for d in depths):
            raise ValueError(f"depths must be four positive block counts, got {depths!r}.")
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width!r}.")
        if conv_init not in CONV_INITS:
            raise ValueError(f"conv_init={conv_init!r} is not supported; choose one of {list(CONV_INITS)}.")

        self.depth = depth
        self.stem = stem
        self.base_width = base_width
        self.depths = depths
        self.output_stride = output_stride
        self.conv_init = conv_init

        width = base_width
        if stem == "deep":
            self.layer0 = nn.Sequential()
            self.layer0.add_module("conv1", nn.Conv2d(3, width, kernel_size=3, stride=2, padding=1, bias=False))
            self.layer0.add_module("bn1", nn.BatchNorm2d(width))
            self.layer0.add_module("relu1", nn.ReLU(inplace=True))
            self.layer0.add_module("conv2", nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False))
            self.layer0.add_module("bn2", nn.BatchNorm2d(width))
            self.layer0.add_module("relu2", nn.ReLU(inplace=True))
            self.layer0.add_module("conv3", nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False))
            self.layer0.add_module("bn3", nn.BatchNorm2d(2 * width))
            self.layer0.add_module("relu3", nn.ReLU(inplace=True))
            stem_channels = 2 * width
        else:
            self.layer0 = nn.Sequential()
            self.layer0.add_module("conv1", nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False))
            self.layer0.add_module("bn1", nn.BatchNorm2d(width))
            self.layer0.add_module("relu", nn.ReLU(inplace=True))
            stem_channels = width
        self.layer0.add_module("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

        (stride3, dilation3), (stride4, dilation4) = _DILATION_PLAN[output_stride]
        plan = ((width, 1, 1), (2 * width, 2, 1), (4 * width, stride3, dilation3), (8 * width, stride4, dilation4))
        inplanes = stem_channels
        for index, ((planes, stride, dilation), blocks) in enumerate(zip(plan, depths), start=1):
            setattr(self, f"layer{index}", self._make_stage(inplanes, planes, int(blocks), stride, dilation))
            inplanes = planes * Bottleneck.expansion

        self.channels = (stem_channels, 4 * width, 8 * width, 16 * width, 32 * width)
        strides = [4, 4, 8]
        for stride in (stride3, stride4):
            strides.append(strides[-1] * stride)
        self.strides = tuple(strides)

        self._init_weights()

    @staticmethod
    def _make_stage(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        # Every block of a dilated stage uses the same dilation: PFENet patches all `conv2` of layer3/layer4, unlike
        # torchvision's `replace_stride_with_dilation`, which keeps the previous dilation in the first block.
        layers = [Bottleneck(inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
        for _ in range(1, blocks):
            layers.append(Bottleneck(planes * Bottleneck.expansion, planes, dilation=dilation))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for module in self.modules():
            # Random values on the meta device mean nothing, and drawing them there is slow (imports torch._dynamo).
            if getattr(getattr(module, "weight", None), "is_meta", False):
                continue
            if isinstance(module, nn.Conv2d) and self.conv_init == "kaiming_fan_out":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Conv2d):  # torch's default: kaiming_uniform_(a=sqrt(5)), std 1/sqrt(3 fan_in)
                module.reset_parameters()
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, stem={self.stem!r}, base_width={self.base_width}, depths={self.depths}, "
            f"output_stride={self.output_stride}"
        )
