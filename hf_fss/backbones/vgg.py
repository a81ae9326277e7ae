"""VGG-16 backbones: PFENet's five-stage split of vgg16_bn and SMCP's dilated VGG-16 (DeepLab-LargeFOV style)."""

from __future__ import annotations

from torch import nn

from .staged import StagedBackbone
from .weights import DILATED_VGG16_STAGE_BOUNDS, VGG16_BN_STAGE_BOUNDS  # the stage cuts are the weight layouts

__all__ = ["DILATED_VGG16_STAGE_BOUNDS", "VGG16_BN_STAGE_BOUNDS", "VGG16BN", "DilatedVGG16"]

# VGG-16 (configuration "D") as multiples of base_width; "M" is a 2x2 max pool.
_VGG16_CFG = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


def _split_stages(backbone: nn.Module, modules: list[nn.Module], bounds: tuple[int, ...]) -> None:
    for stage in range(len(bounds) - 1):
        setattr(backbone, f"layer{stage}", nn.Sequential(*modules[bounds[stage] : bounds[stage + 1]]))


def _init_vgg_weights(modules: list[nn.Module]) -> None:
    # torchvision's VGG initialisation.
    for module in modules:
        # Random values on the meta device mean nothing, and drawing them there is slow (imports torch._dynamo).
        if getattr(getattr(module, "weight", None), "is_meta", False):
            continue
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class VGG16BN(StagedBackbone):
    """
    VGG-16 with batch norm, cut into five stages exactly as PFENet's `get_vgg16_layer`.

    Each stage is an `nn.Sequential` holding torchvision's `vgg16_bn().features[a:b]` with local indices, so a
    PFENet-lineage checkpoint's `layer3.4.running_mean` is our `layer3.4.running_mean`. Convs are 3x3 with bias,
    each followed by batch norm and ReLU; pools are `MaxPool2d(2, 2, ceil_mode=True)` as in PFENet's vgg.py
    (torchvision uses `ceil_mode=False`; the two differ on odd sizes such as 473).

    Stages: `layer0` conv1_x + pool1 (stride 2), `layer1` conv2_x + pool2 (4), `layer2` conv3_x + pool3 (8),
    `layer3` conv4_x + pool4 (16), `layer4` conv5_x without pool5 (16).

    Args:
        base_width (`int`, *optional*, defaults to 64):
            `w`; stage channels are `(w, 2w, 4w, 8w, 8w)`.

    Example shapes for `base_width=64` and a `(1, 3, 473, 473)` input: `(1, 64, 237, 237)`, `(1, 128, 119, 119)`,
    `(1, 256, 60, 60)`, `(1, 512, 30, 30)`, `(1, 512, 30, 30)`.
    """

    weight_family = "vgg16_bn"

    def __init__(self, base_width: int = 64):
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width!r}.")
        self.base_width = base_width
        modules: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_CFG:
            if item == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out_channels = item * base_width
                modules += [
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = out_channels
        _init_vgg_weights(modules)
        _split_stages(self, modules, VGG16_BN_STAGE_BOUNDS)
        w = base_width
        self.channels = (w, 2 * w, 4 * w, 8 * w, 8 * w)
        self.strides = (2, 4, 8, 16, 16)

    def extra_repr(self) -> str:
        return f"base_width={self.base_width}"


class DilatedVGG16(StagedBackbone):
    """
    SMCP's VGG-16 encoder (DeepLab-LargeFOV style), output stride 8.

    torchvision's vgg16 (no batch norm, 3x3 convs with bias) with pool4 and pool5 removed, conv5_x dilated by 2
    (padding 2), followed by `fc6` and `fc7`: 3x3 convs with dilation 4 and padding 4, each followed by ReLU. Pools
    1-3 are `MaxPool2d(2, 2)` with torchvision's default `ceil_mode=False`.

    Stages (local indices inside each `nn.Sequential` in brackets):
    - `layer0`: conv1_1 [0], conv1_2 [2], pool1 [4]; stride 2.
    - `layer1`: conv2_1 [0], conv2_2 [2], pool2 [4]; stride 4.
    - `layer2`: conv3_1 [0], conv3_2 [2], conv3_3 [4], pool3 [6]; stride 8.
    - `layer3`: conv4_1 [0], conv4_2 [2], conv4_3 [4]; stride 8.
    - `layer4`: conv5_1 [0], conv5_2 [2], conv5_3 [4], fc6 [6], fc7 [8]; stride 8.
    The concatenation of the stages is exactly SMCP's `Encoder.features`, so its `features.{i}` is our
    `layer{k}.{i - DILATED_VGG16_STAGE_BOUNDS[k]}` (see `smcp_backbone_key_map`).

    `fc6` / `fc7` are not part of ImageNet VGG-16 in this convolutional form; as in SMCP they keep PyTorch's
    default `Conv2d` initialisation until a checkpoint provides them.

    Args:
        base_width (`int`, *optional*, defaults to 64):
            `w`; conv channels are `(w, 2w, 4w, 8w, 8w)` for conv1_x..conv5_x.
        fc_channels (`int`, *optional*):
            Channels of fc6 / fc7; defaults to `8 * base_width` (512).

    Example shapes for `base_width=64` and a `(1, 3, 417, 417)` input: `(1, 64, 208, 208)`,
    `(1, 128, 104, 104)`, `(1, 256, 52, 52)`, `(1, 512, 52, 52)`, `(1, 512, 52, 52)`.
    """

    weight_family = "vgg16_dilated"

    def __init__(self, base_width: int = 64, fc_channels: int | None = None):
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width!r}.")
        fc_channels = 8 * base_width if fc_channels is None else fc_channels
        if fc_channels < 1:
            raise ValueError(f"fc_channels must be positive, got {fc_channels!r}.")
        self.base_width = base_width
        self.fc_channels = fc_channels

        modules: list[nn.Module] = []
        in_channels = 3
        block = 1
        for item in _VGG16_CFG:
            if item == "M":
                # pool4 and pool5 are removed to keep output stride 8.
                if block <= 3:
                    modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
                block += 1
            else:
                out_channels = item * base_width
                dilation = 2 if block == 5 else 1
                modules += [
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation),
                    nn.ReLU(inplace=True),
                ]
                in_channels = out_channels
        _init_vgg_weights(modules)
        fc6 = nn.Conv2d(in_channels, fc_channels, kernel_size=3, padding=4, dilation=4)
        fc7 = nn.Conv2d(fc_channels, fc_channels, kernel_size=3, padding=4, dilation=4)
        modules += [fc6, nn.ReLU(inplace=True), fc7, nn.ReLU(inplace=True)]
        _split_stages(self, modules, DILATED_VGG16_STAGE_BOUNDS)
        w = base_width
        self.channels = (w, 2 * w, 4 * w, 8 * w, fc_channels)
        self.strides = (2, 4, 8, 8, 8)

    def extra_repr(self) -> str:
        return f"base_width={self.base_width}, fc_channels={self.fc_channels}"
