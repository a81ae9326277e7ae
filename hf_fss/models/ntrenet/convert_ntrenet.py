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
from collections.abc import Mapping, Sequence

import torch

from ...backbones import pfenet_backbone_key_map, pfenet_backbone_key_to_original
from ..conversion import (
    PFENET_PYRAMID_BINS,
    OfficialFormat,
    PathLike,
    PyramidBins,
    convert_checkpoint,
    convert_state_dict,
    load_original_state_dict,
    pyramid_bins_of,
    resnet_spec_of,
)
from ..official import build_pfenet_official
from .configuration_ntrenet import NTRENetConfig
from .modeling_ntrenet import NTRENetModel

__all__ = [
    "NTRENET_FORMAT",
    "build_official_model",
    "convert_ntrenet_checkpoint",
    "convert_ntrenet_state_dict",
    "infer_ntrenet_config",
    "load_original_state_dict",
    "original_key_to_ours",
    "our_key_to_original",
]

OFFICIAL_REPOSITORY = "github.com/LIUYUANWEI98/NERTNet"
DEFAULT_PYRAMID_BINS = PFENET_PYRAMID_BINS
_RENAMED_PREFIXES = {"inital_beta_conv.": "initial_beta_conv.", "inital_inner_cls.": "initial_inner_cls."}
_DECODER_MODULES = ("alpha_conv", "beta_conv", "inner_cls", "res1", "res2", "cls")
_DECODER_PREFIX = "feature_enrichment."
_BACKBONE_PREFIX = "backbone."


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
        return pfenet_backbone_key_to_original(key[len(_BACKBONE_PREFIX) :], "vgg16_bn" if vgg else "resnet")
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
        backbone, backbone_kwargs = resnet_spec_of(state_dict, "layer{}.", "NTRENet")
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


def _key_maps(config: NTRENetConfig):
    vgg = config.backbone == "vgg16_bn"
    return (lambda key: original_key_to_ours(key, vgg)), (lambda key: our_key_to_original(key, vgg))


NTRENET_FORMAT = OfficialFormat("NTRENet", OFFICIAL_REPOSITORY, NTRENetModel, infer_ntrenet_config, _key_maps)


def convert_ntrenet_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    pyramid_bins: Sequence[int | float] | None = None,
    **config_kwargs,
) -> tuple[NTRENetModel, NTRENetConfig]:
    """
    Build an `NTRENetModel` holding the official weights (`state_dict` with or without the `state_dict` wrapper /
    `module.` prefixes; `pyramid_bins`, `config_kwargs`: see `infer_ntrenet_config`).

    Returns:
        `tuple(NTRENetModel, NTRENetConfig)`, the model in eval mode.

    Raises:
        `ValueError` listing every missing, unexpected or mis-shaped key.
    """
    return convert_state_dict(NTRENET_FORMAT, state_dict, pyramid_bins=pyramid_bins, **config_kwargs)


def convert_ntrenet_checkpoint(
    checkpoint: PathLike, output_dir: PathLike, image_size: int = 473, shot: int = 1, pyramid_bins: PyramidBins = None
) -> NTRENetModel:
    """
    Convert an official NTRENet `.pth` into the `save_pretrained` folder `output_dir` with its card
    (`hf_fss.models.conversion.convert_checkpoint`): `image_size` (default 473) is the test size of the config and the
    processor, `shot` the K the checkpoint was trained with (metadata), `pyramid_bins` the scale sizes when the
    checkpoint does not use the official four.
    """
    return convert_checkpoint(NTRENET_FORMAT, checkpoint, output_dir, image_size, shot, pyramid_bins=pyramid_bins)


def _official_forward(official, query, support, support_masks):
    labels = torch.zeros(query.shape[0], *query.shape[-2:], dtype=torch.long)  # unused in eval
    return official(support, support_masks.float(), query, labels, None)  # supports first, as the official code


def build_official_model(source_dir: str | os.PathLike, shot: int = 1, image_size: int = 473, seed: int = 0):
    """
    The official NTRENet (`model/ourmodel.py` of a NERTNet checkout, built out of tree with the fixes it needs to run
    here, e.g. without CUDA) with seeded random weights, and the hf_fss model converted from them, for
    `scripts/benchmark.py --official ntrenet=DIR`: see `hf_fss.models.official.build_pfenet_official` (its forward
    takes the supports first, as the official code).
    """
    return build_pfenet_official(
        NTRENET_FORMAT, source_dir, "model.ourmodel", "NTRENet", _official_forward, shot, image_size, seed
    )
