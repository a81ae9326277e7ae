"""
Convert an official SMCP checkpoint (github.com/NUST-Machine-Intelligence-Laboratory/SMCP) to an hf_fss
`save_pretrained` folder.

The official `.pth` (e.g. the published fold-0 `25000.pth`) is `torch.save(model.state_dict())` of an
`nn.DataParallel(Encoder)`: a bare state dict whose keys start with `module.` (train.py). It is read with
`torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects.

Key map (official, without `module.` -> ours):
- `features.{i}.*` (the dilated VGG-16) -> `backbone.layer{k}.{j}.*` via `smcp_backbone_key_map`;
- `classifier.conv2d_list.*` (MCL head), `feat_rd.0.*`, `pyramid_m.*`, `classifier_2.conv2d_list.*` keep their
  names.

The config is inferred from the weights: the VGG width (`features.0`) and fc6/fc7 channels (`features.29`), the MCL
head's classes (`num_base_classes` = outputs - 1: 20 for the official 21-class head), `reduce_dim` (`feat_rd`), the
bottleneck width (`pyramid_m.residule1.0`) and the number of ASPP branches (four: the official rates 6/12/18/24).
`self_prototype_branch` is set to `"official"`, the routing the released weights were trained with, so fine-tuning
them continues the same way (it has no effect on inference).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ...backbones import smcp_backbone_key_map
from ...backbones.vgg import DILATED_VGG16_STAGE_BOUNDS
from ..conversion import load_official_state_dict, load_original_state_dict, unwrap_state_dict
from .configuration_smcp import SMCPConfig
from .modeling_smcp import SMCPModel

__all__ = [
    "convert_smcp_checkpoint",
    "convert_smcp_state_dict",
    "infer_smcp_config",
    "original_key_to_ours",
    "our_key_to_original",
]

OFFICIAL_ASPP_RATES = (6, 12, 18, 24)
_BACKBONE_PREFIX = "backbone."


def original_key_to_ours(key: str) -> str:
    """Map one official key (with or without `module.`) to our parameter name."""
    key = key.removeprefix("module.")
    if key.startswith("features."):
        return _BACKBONE_PREFIX + smcp_backbone_key_map(key)
    return key


def our_key_to_original(key: str) -> str:
    """The inverse of `original_key_to_ours` (without `module.`)."""
    if not key.startswith(_BACKBONE_PREFIX):
        return key
    stage, index, param = key[len(_BACKBONE_PREFIX) :].split(".", 2)
    return f"features.{DILATED_VGG16_STAGE_BOUNDS[int(stage.removeprefix('layer'))] + int(index)}.{param}"


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"cannot infer the SMCP configuration: the checkpoint has no {key!r}")
    return state_dict[key]


def infer_smcp_config(state_dict: Mapping[str, torch.Tensor], **config_kwargs) -> SMCPConfig:
    """
    The `SMCPConfig` of an official state dict (without `module.`); `config_kwargs` (e.g. `image_size`, `shot`) are
    passed on.

    Raises:
        `ValueError`: a key needed for the inference is missing, or the ASPP heads do not have four branches.
    """
    base_width = _require(state_dict, "features.0.weight").shape[0]
    fc_channels = _require(state_dict, "features.29.weight").shape[0]
    backbone_kwargs = {}
    if base_width != 64:
        backbone_kwargs["base_width"] = base_width
    if fc_channels != 8 * base_width:
        backbone_kwargs["fc_channels"] = fc_channels
    branches = {k.split(".")[2] for k in state_dict if k.startswith("classifier_2.conv2d_list.")}
    if len(branches) != len(OFFICIAL_ASPP_RATES):
        raise ValueError(
            f"the checkpoint's classifier_2 has {len(branches)} ASPP branches; the official code has four "
            f"(rates {OFFICIAL_ASPP_RATES}) and other rates cannot be inferred from the weights"
        )
    config_kwargs.setdefault("self_prototype_branch", "official")
    return SMCPConfig(
        backbone_kwargs=backbone_kwargs or None,
        num_base_classes=_require(state_dict, "classifier.conv2d_list.0.weight").shape[0] - 1,
        reduce_dim=_require(state_dict, "feat_rd.0.weight").shape[0],
        bottleneck_dim=_require(state_dict, "pyramid_m.residule1.0.weight").shape[0],
        aspp_rates=OFFICIAL_ASPP_RATES,
        **config_kwargs,
    )


def convert_smcp_state_dict(state_dict: Mapping[str, torch.Tensor], **config_kwargs) -> tuple[SMCPModel, SMCPConfig]:
    """
    Build an `SMCPModel` holding the official weights; every key must be matched.

    Args:
        state_dict: the official state dict (with or without `module.` prefixes).
        config_kwargs: see `infer_smcp_config`.

    Returns:
        `tuple(SMCPModel, SMCPConfig)`, the model in eval mode.

    Raises:
        `ValueError` listing every missing, unexpected or mis-shaped key.
    """
    state_dict = unwrap_state_dict(state_dict)
    config = infer_smcp_config(state_dict, **config_kwargs)
    model = load_official_state_dict(SMCPModel(config), state_dict, original_key_to_ours, our_key_to_original, "SMCP")
    return model.eval(), config


def convert_smcp_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, image_size: int = 417, shot: int = 1
) -> SMCPModel:
    """
    Convert an official `.pth` into `output_dir` (`config.json`, `model.safetensors`, `preprocessor_config.json` and
    a model card saying where the weights come from), written atomically.

    Args:
        checkpoint: path of the official checkpoint.
        output_dir: folder written by `save_pretrained`.
        image_size (`int`, *optional*, defaults to 417): test size (official 417), in the config and the processor.
        shot (`int`, *optional*, defaults to 1): K the checkpoint was trained with (metadata).
    """
    from ...hub import save_pretrained_with_card
    from ...image_processing_fss import FewShotSegmentationImageProcessor

    state_dict = load_original_state_dict(checkpoint)
    model, _ = convert_smcp_state_dict(state_dict, image_size=image_size, shot=shot)
    record = {
        "converted_from": os.path.basename(checkpoint),
        "shot": shot,
        "source": "github.com/NUST-Machine-Intelligence-Laboratory/SMCP",
    }
    save_pretrained_with_card(
        model, FewShotSegmentationImageProcessor(image_size=image_size), output_dir, training=record
    )
    return model
