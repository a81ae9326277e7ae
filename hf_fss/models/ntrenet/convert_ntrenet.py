"""
Convert an official NTRENet checkpoint (github.com/LIUYUANWEI98/NERTNet) to an hf_fss `save_pretrained` folder.

The official `.pth` is a pickle written by `torch.save({"epoch", "state_dict", "optimizer"}, ...)` around a
`DataParallel` model, so keys usually start with `module.`; a bare state dict is accepted too. It is read with
`torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects.

Key map (official -> ours):
- `layer0..layer4.*` (deep-stem ResNet or VGG-16-BN) -> `backbone.*` via `pfenet_backbone_key_map`;
- `inital_beta_conv.*` / `inital_inner_cls.*` -> `initial_beta_conv.*` / `initial_inner_cls.*`;
- `alpha_conv.*`, `beta_conv.*`, `inner_cls.*`, `res1.*`, `res2.*`, `cls.*` -> `feature_enrichment.*`;
- everything else (`bg_prototype`, `down_query`, `down_supp`, `down_bg`, `bg_res1`, `bg_cls`, `init_merge1/2/3`)
  keeps its name.

The config is inferred from the weights: ResNet depth from the number of `layer3` blocks (6 -> ResNet-50, 23 ->
ResNet-101), VGG from the key layout, the backbone width and block counts (so tiny test checkpoints convert too),
`reduce_dim`, the BG prototype width and the number of pyramid scales. The scale sizes themselves are not in the
weights: four scales default to the official `(60, 30, 15, 8)`, other counts need `pyramid_bins`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from ...backbones import pfenet_backbone_key_map
from ..conversion import (
    PFENET_PYRAMID_BINS,
    load_official_state_dict,
    load_original_state_dict,
    pyramid_bins_of,
    unwrap_state_dict,
)
from .configuration_ntrenet import NTRENetConfig
from .modeling_ntrenet import NTRENetModel

__all__ = [
    "build_official_model",
    "convert_ntrenet_checkpoint",
    "convert_ntrenet_state_dict",
    "infer_ntrenet_config",
    "load_original_state_dict",
    "original_key_to_ours",
    "our_key_to_original",
]

DEFAULT_PYRAMID_BINS = PFENET_PYRAMID_BINS
_RESNET_DEPTH_BY_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101"}
_STANDARD_RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
_RENAMED_PREFIXES = {"inital_beta_conv.": "initial_beta_conv.", "inital_inner_cls.": "initial_inner_cls."}
_DECODER_MODULES = ("alpha_conv", "beta_conv", "inner_cls", "res1", "res2", "cls")
_DECODER_PREFIX = "feature_enrichment."
_BACKBONE_PREFIX = "backbone."
# Our ResNet stem child -> index in the official nn.Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, ...).
_STEM_INDEX = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
_BLOCK_RE = re.compile(r"^layer([1-4])\.(\d+)\.")


def _is_vgg(state_dict: Mapping[str, torch.Tensor]) -> bool:
    if "layer1.0.conv1.weight" in state_dict:
        return False
    if "layer0.0.weight" in state_dict and "layer0.0.bias" in state_dict:
        return True
    raise ValueError(
        "cannot tell the backbone: expected a deep-stem ResNet (`layer1.0.conv1.weight`) or VGG-16-BN "
        "(`layer0.0.weight` and `layer0.0.bias`) in the checkpoint"
    )


def original_key_to_ours(key: str, vgg: bool) -> str:
    """Map one official key (without `module.`) to our parameter name."""
    if key.startswith(("layer0.", "layer1.", "layer2.", "layer3.", "layer4.")):
        return _BACKBONE_PREFIX + pfenet_backbone_key_map(key, "vgg16_bn" if vgg else "resnet")
    for old, new in _RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key.split(".", 1)[0] in _DECODER_MODULES:
        return _DECODER_PREFIX + key
    return key


def our_key_to_original(key: str, vgg: bool) -> str:
    """The inverse of `original_key_to_ours` (handy to export weights in the official layout)."""
    if key.startswith(_BACKBONE_PREFIX):
        key = key[len(_BACKBONE_PREFIX) :]
        if not vgg and key.startswith("layer0."):
            _, child, param = key.split(".", 2)
            return f"layer0.{_STEM_INDEX[child]}.{param}"
        return key
    if key.startswith(_DECODER_PREFIX):
        return key[len(_DECODER_PREFIX) :]
    for old, new in _RENAMED_PREFIXES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def infer_ntrenet_config(
    state_dict: Mapping[str, torch.Tensor],
    pyramid_bins: Sequence[int | float] | None = None,
    **config_kwargs,
) -> NTRENetConfig:
    """
    Infer an `NTRENetConfig` from an official state dict (bare keys, no `module.`).

    Args:
        state_dict: official keys and tensors.
        pyramid_bins: scale sizes; required when the checkpoint does not have four scales.
        config_kwargs: other config fields (`image_size`, `shot`, ...).
    """
    for required in ("bg_prototype", "down_query.0.weight", "layer0.0.weight"):
        if required not in state_dict:
            raise ValueError(f"not an NTRENet checkpoint: {required!r} is missing")
    vgg = _is_vgg(state_dict)
    stem_width = state_dict["layer0.0.weight"].shape[0]
    if vgg:
        backbone = "vgg16_bn"
        backbone_kwargs = {"base_width": stem_width} if stem_width != 64 else None
    else:
        if state_dict["layer0.0.weight"].shape[-1] != 3:
            raise ValueError("only the deep 3x3 ResNet stem of the official code is supported")
        depths = tuple(
            len({int(m.group(2)) for k in state_dict if (m := _BLOCK_RE.match(k)) and m.group(1) == str(stage)})
            for stage in range(1, 5)
        )
        backbone = _RESNET_DEPTH_BY_LAYER3_BLOCKS.get(depths[2], "resnet50")
        backbone_kwargs = {}
        if stem_width != 64:
            backbone_kwargs["base_width"] = stem_width
        if depths != _STANDARD_RESNET_DEPTHS[backbone]:
            backbone_kwargs["depths"] = list(depths)
        backbone_kwargs = backbone_kwargs or None

    pyramid_bins = pyramid_bins_of(state_dict, "init_merge1.", pyramid_bins)

    return NTRENetConfig(
        backbone=backbone,
        backbone_kwargs=backbone_kwargs,
        reduce_dim=state_dict["down_query.0.weight"].shape[0],
        background_prototype_dim=state_dict["bg_prototype"].shape[1],
        pyramid_bins=tuple(pyramid_bins),
        **config_kwargs,
    )


def convert_ntrenet_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    pyramid_bins: Sequence[int | float] | None = None,
    **config_kwargs,
) -> tuple[NTRENetModel, NTRENetConfig]:
    """
    Build an `NTRENetModel` holding the official weights.

    Args:
        state_dict: the official state dict (with or without `state_dict` wrapper / `module.` prefixes).
        pyramid_bins, config_kwargs: see `infer_ntrenet_config`.

    Returns:
        `tuple(NTRENetModel, NTRENetConfig)`, the model in eval mode.

    Raises:
        `ValueError` listing every missing, unexpected or mis-shaped key.
    """
    state_dict = unwrap_state_dict(state_dict)
    config = infer_ntrenet_config(state_dict, pyramid_bins=pyramid_bins, **config_kwargs)
    vgg = config.backbone == "vgg16_bn"
    model = load_official_state_dict(
        NTRENetModel(config),
        state_dict,
        lambda k: original_key_to_ours(k, vgg),
        lambda k: our_key_to_original(k, vgg),
        "NTRENet",
    )
    return model.eval(), config


def convert_ntrenet_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int = 473,
    shot: int = 1,
    pyramid_bins: Sequence[int | float] | None = None,
) -> NTRENetModel:
    """
    Convert an official `.pth` into `output_dir` (`config.json`, `model.safetensors`, `preprocessor_config.json` and
    a model card saying where the weights come from), written atomically.

    Args:
        checkpoint: path of the official checkpoint.
        output_dir: folder written by `save_pretrained`.
        image_size (`int`, *optional*, defaults to 473): test size, saved in the config and the image processor.
        shot (`int`, *optional*, defaults to 1): K the checkpoint was trained with (metadata).
        pyramid_bins: scale sizes when the checkpoint does not use the official four.
    """
    from ...hub import save_pretrained_with_card
    from ...image_processing_fss import FewShotSegmentationImageProcessor

    state_dict = load_original_state_dict(checkpoint)
    model, _ = convert_ntrenet_state_dict(state_dict, pyramid_bins=pyramid_bins, image_size=image_size, shot=shot)
    record = {
        "converted_from": os.path.basename(checkpoint),
        "shot": shot,
        "source": "github.com/LIUYUANWEI98/NERTNet",
    }
    save_pretrained_with_card(
        model, FewShotSegmentationImageProcessor(image_size=image_size), output_dir, training=record
    )
    return model


def build_official_model(source_dir: str | os.PathLike, shot: int = 1, image_size: int = 473, seed: int = 0):
    """
    The official NTRENet (`model/ourmodel.py` of a NERTNet checkout, built out of tree with the fixes it needs to run
    here, e.g. without CUDA) with seeded random weights, and the hf_fss model converted from them, for
    `scripts/benchmark.py --official ntrenet=DIR`.

    Args:
        source_dir: root of the official checkout.
        shot (`int`): K of the episodes the official forward will get (it is a constructor argument there).
        image_size (`int`): test size; the official forward needs `(size - 1) % 8 == 0` (473).
        seed (`int`): seed of the official model's own initialisation.

    Returns:
        [`hf_fss.models.official.OfficialModel`]

    Raises:
        `FileNotFoundError`: `source_dir` lacks `model/ourmodel.py`.
        `ValueError`: an image size the official forward refuses.
    """
    from ..official import OfficialModel, import_from_checkout

    if (image_size - 1) % 8:
        raise ValueError(f"the official NTRENet needs (image_size - 1) % 8 == 0 (e.g. 473), got {image_size}")
    official_class = import_from_checkout(source_dir, "model.ourmodel", "NTRENet")
    torch.manual_seed(seed)
    official = official_class(
        layers=50, classes=2, zoom_factor=8, pretrained=False, shot=shot, ppm_scales=list(DEFAULT_PYRAMID_BINS)
    ).eval()
    ours, _ = convert_ntrenet_state_dict(official.state_dict(), image_size=image_size, shot=shot)

    def forward(query, support, support_masks):
        labels = torch.zeros(query.shape[0], *query.shape[-2:], dtype=torch.long)  # unused in eval
        return official(support, support_masks.float(), query, labels, None)

    return OfficialModel(official, forward, ours, f"{source_dir}: model/ourmodel.py NTRENet")
