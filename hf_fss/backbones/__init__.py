"""
Backbones of the hf_fss models: five-stage feature extractors `layer0..layer4`.

Every backbone has `channels` and `strides` (per stage), `forward(pixel_values)` returning the five stage outputs
and `forward_stages(x, start, end)` to run a slice of the stages (e.g. `layer4` on masked `layer3` features).
Besides the dilated ResNets and VGGs, `TransformersBackbone` adapts any supported transformers `AutoBackbone` (DINOv2,
DINOv3, ConvNeXt, ResNet) on the methods' stride-8 grid (`transformers_backbone.py`, docs/backbones.md).
"""

from __future__ import annotations

import inspect

from torch import nn

from .feature_cache import FeatureCache
from .resnet import Bottleneck, DilatedResNet
from .staged import CPU_CHUNK_BYTES, StagedBackbone
from .transformers_backbone import TransformersBackbone, build_transformers_config
from .vgg import DILATED_VGG16_STAGE_BOUNDS, VGG16_BN_STAGE_BOUNDS, VGG16BN, DilatedVGG16
from .weights import (
    convert_backbone_state_dict,
    load_backbone_weights,
    pfenet_backbone_key_map,
    pfenet_backbone_key_to_original,
    select_moco_encoder,
    smcp_backbone_key_map,
)

# name -> (class, fixed constructor arguments)
_BACKBONES = {
    "resnet50": (DilatedResNet, {"depth": 50}),
    "resnet101": (DilatedResNet, {"depth": 101}),
    "vgg16_bn": (VGG16BN, {}),
    "vgg16_dilated": (DilatedVGG16, {}),
}
BACKBONE_NAMES = tuple(_BACKBONES)


def build_backbone(name: str | None, backbone_config: dict | None = None, **kwargs) -> nn.Module:
    """
    Build a backbone by name, or a transformers backbone from its config, randomly initialised.

    Args:
        name (`str`): `"resnet50"`, `"resnet101"` (`DilatedResNet`), `"vgg16_bn"` (`VGG16BN`) or `"vgg16_dilated"`
            (`DilatedVGG16`); ignored when `backbone_config` is given.
        backbone_config (`dict`, *optional*): a transformers backbone config as `FewShotSegmentationConfig` keeps it
            (`model_type` and fields, four `out_indices`): builds a `TransformersBackbone` (`AutoBackbone.from_config`,
            nothing downloaded).
        **kwargs: constructor arguments of that class, e.g. `stem="7x7"`, `output_stride=16`, `base_width=8`,
            `depths=(1, 1, 1, 1)` for ResNets, `base_width`, `fc_channels` for VGGs; for a transformers backbone,
            fields of its config to override (`backbone_kwargs`).

    Returns:
        `nn.Module`: a `StagedBackbone`; load pretrained weights with its `load_weights`.
    """
    if backbone_config is not None:
        return TransformersBackbone(build_transformers_config(backbone_config, kwargs))
    if name not in _BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {list(BACKBONE_NAMES)}.")
    cls, fixed = _BACKBONES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in fixed]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"build_backbone({name!r}) got unexpected keyword arguments {unknown}; allowed: {allowed}.")
    return cls(**fixed, **kwargs)


__all__ = [
    "BACKBONE_NAMES",
    "CPU_CHUNK_BYTES",
    "DILATED_VGG16_STAGE_BOUNDS",
    "VGG16_BN_STAGE_BOUNDS",
    "Bottleneck",
    "DilatedResNet",
    "DilatedVGG16",
    "FeatureCache",
    "StagedBackbone",
    "TransformersBackbone",
    "VGG16BN",
    "build_backbone",
    "convert_backbone_state_dict",
    "load_backbone_weights",
    "pfenet_backbone_key_map",
    "pfenet_backbone_key_to_original",
    "select_moco_encoder",
    "smcp_backbone_key_map",
]
