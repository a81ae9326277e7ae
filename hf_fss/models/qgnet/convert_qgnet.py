"""
Convert official QGNet checkpoints (github.com/liuweide01/QGNet-Few-shot-segmentation) to hf_fss folders.

Two kinds of file, told apart by their keys:

1. A QGNet segmentation checkpoint, as the official train.py writes it (`torch.save({"epoch", "state_dict",
   "optimizer"})` around a `DataParallel` model, so every key starts with `module.`; a bare state dict is accepted
   too): 685 tensors for ResNet-50. Key map (official -> ours):
   - `layer0.{0,1,3,4,6,7}.*`, `layer1..4.*` (deep-stem ResNet) -> `backbone.*` via `pfenet_backbone_key_map`;
   - `layer0_unsuper.0.*` / `layer0_unsuper.1.*` (7x7 stem conv / BN) -> `prior_extractor.layer0.conv1.*` /
     `prior_extractor.layer0.bn1.*`; `layer{1..4}_unsuper.*` -> `prior_extractor.layer{1..4}.*`;
   - `down_learn_super.*` / `down_learn_unsuper.*` -> `bridge_projection.*` / `prior_projection.*`;
   - `init_merge.*` (514 input channels: query, prototype, guided map, prior map), `alpha_conv.*`, `beta_conv.*`,
     `inner_cls.*`, `res1.*`, `res2.*`, `cls.*` -> `feature_enrichment.*`;
   - `down_query.*`, `down_supp.*` keep their names.
   The result is a `save_pretrained` folder with the model card and its list of differences from the official code.
2. A MoCo training checkpoint of the prior extractor alone (facebookresearch/moco `main_moco.py`:
   `{"epoch", "arch", "state_dict", "optimizer"}`, keys `[module.]encoder_q.*`, `[module.]encoder_k.*`,
   `[module.]queue`, `[module.]queue_ptr`). One encoder is taken (`encoder_k`, the momentum encoder, as the official
   loader; `encoder_q` on request), its `fc` head and the queues are dropped, and the backbone is written as a prior
   extractor folder (`model.safetensors` with hf_fss stage names, `config.json`, `README.md`) that
   `QGNetConfig(prior_extractor_weights=folder)` loads. Unlike the official loader (which copies nothing from a file
   saved without `module.`), every key of the encoder must be there, or the conversion fails naming the missing ones.

Files are read with `torch.load(..., weights_only=True)`: tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import torch

from ...backbones import (
    build_backbone,
    convert_backbone_state_dict,
    pfenet_backbone_key_map,
    pfenet_backbone_key_to_original,
)
from ...backbones.weights import MOCO_ENCODERS
from ..conversion import (
    OfficialFormat,
    PathLike,
    PyramidBins,
    convert_checkpoint,
    convert_state_dict,
    load_checkpoint_tensors,
    pyramid_bins_of,
    resnet_spec_of,
)
from ..official import build_pfenet_official
from .configuration_qgnet import QGNetConfig
from .modeling_qgnet import QGNetModel

__all__ = [
    "QGNET_FORMAT",
    "build_official_model",
    "convert_moco_prior_extractor",
    "convert_qgnet_checkpoint",
    "convert_qgnet_state_dict",
    "infer_qgnet_config",
    "original_key_to_ours",
    "our_key_to_original",
]

OFFICIAL_REPOSITORY = "github.com/liuweide01/QGNet-Few-shot-segmentation"
_DECODER_MODULES = ("init_merge", "alpha_conv", "beta_conv", "inner_cls", "res1", "res2", "cls")
_RENAMED = {"down_learn_super.": "bridge_projection.", "down_learn_unsuper.": "prior_projection."}
_PRIOR_STEM = {"0": "conv1", "1": "bn1"}
_PRIOR_STEM_INDEX = {"conv1": "0", "bn1": "1"}
_UNSUPER_RE = re.compile(r"^layer([0-4])_unsuper\.(.+)$")


# --- key maps ----------------------------------------------------------------------------------------------------------
def original_key_to_ours(key: str) -> str:
    """Map one official QGNet key (without `module.`) to our parameter name (unknown keys come back unchanged)."""
    if match := _UNSUPER_RE.match(key):
        stage, rest = match.groups()
        if stage == "0":
            index, _, param = rest.partition(".")
            if index not in _PRIOR_STEM:
                raise ValueError(f"{key!r}: the prior extractor's stem has parameters only at layer0_unsuper.{{0,1}}")
            rest = f"{_PRIOR_STEM[index]}.{param}"
        return f"prior_extractor.layer{stage}.{rest}"
    if key.startswith(("layer0.", "layer1.", "layer2.", "layer3.", "layer4.")):
        return "backbone." + pfenet_backbone_key_map(key, "resnet")
    for old, new in _RENAMED.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key.split(".", 1)[0] in _DECODER_MODULES:
        return "feature_enrichment." + key
    return key


def our_key_to_original(key: str) -> str:
    """The inverse of `original_key_to_ours` (to write weights in the official layout)."""
    if key.startswith("prior_extractor."):
        stage, child, rest = key.removeprefix("prior_extractor.").split(".", 2)
        if stage == "layer0":
            return f"layer0_unsuper.{_PRIOR_STEM_INDEX[child]}.{rest}"
        return f"{stage}_unsuper.{child}.{rest}"
    if key.startswith("backbone."):
        return pfenet_backbone_key_to_original(key.removeprefix("backbone."), "resnet")
    for old, new in _RENAMED.items():
        if key.startswith(new):
            return old + key[len(new) :]
    return key.removeprefix("feature_enrichment.")


# --- architecture inference --------------------------------------------------------------------------------------------
def infer_qgnet_config(
    state_dict: Mapping[str, torch.Tensor], pyramid_bins: Sequence[int | float] | None = None, **config_kwargs
) -> QGNetConfig:
    """
    Infer a `QGNetConfig` from an official state dict (bare keys): both ResNets (depth, width, block counts, so that
    tiny test checkpoints convert too), `reduce_dim` and the number of pyramid scales. The scale sizes are not in the
    weights: four scales default to the official `(60, 30, 15, 8)`, other counts need `pyramid_bins`.

    Raises:
        `ValueError`: not a QGNet checkpoint (a required key is named), or a scale count without `pyramid_bins`.
    """
    for required in ("down_query.0.weight", "down_learn_super.0.weight", "layer0.0.weight", "layer0_unsuper.0.weight"):
        if required not in state_dict:
            raise ValueError(f"not a QGNet checkpoint: {required!r} is missing")
    if state_dict["layer0.0.weight"].shape[-1] != 3:
        raise ValueError("only the deep 3x3 ResNet stem of the official backbone is supported")
    backbone, backbone_kwargs = resnet_spec_of(state_dict, "layer{}.", "QGNet")
    if state_dict["layer0.0.weight"].shape[0] != backbone_kwargs.get("base_width", 64):
        raise ValueError("the backbone's stem and layer1 widths disagree; not an official QGNet checkpoint")
    prior_backbone, prior_kwargs = resnet_spec_of(state_dict, "layer{}_unsuper.", "QGNet", "prior extractor")
    pyramid_bins = pyramid_bins_of(state_dict, "init_merge.", pyramid_bins)
    return QGNetConfig(
        backbone=backbone,
        backbone_kwargs=backbone_kwargs or None,
        prior_extractor_backbone=prior_backbone,
        prior_extractor_kwargs={"stem": "7x7", **prior_kwargs},
        reduce_dim=state_dict["down_query.0.weight"].shape[0],
        pyramid_bins=tuple(pyramid_bins),
        **config_kwargs,
    )


# --- QGNet checkpoints -------------------------------------------------------------------------------------------------
QGNET_FORMAT = OfficialFormat(
    "QGNet",
    OFFICIAL_REPOSITORY,
    QGNetModel,
    infer_qgnet_config,
    lambda config: (original_key_to_ours, our_key_to_original),
)


def convert_qgnet_state_dict(
    state_dict: Mapping[str, torch.Tensor], pyramid_bins: Sequence[int | float] | None = None, **config_kwargs
) -> tuple[QGNetModel, QGNetConfig]:
    """
    Build a `QGNetModel` holding the official weights.

    Args:
        state_dict: the official state dict (with or without the `state_dict` wrapper / `module.` prefixes).
        pyramid_bins, config_kwargs: see `infer_qgnet_config`.

    Returns:
        `tuple(QGNetModel, QGNetConfig)`, the model in eval mode.

    Raises:
        `ValueError` listing every missing (by its official name), unexpected or mis-shaped key.
    """
    return convert_state_dict(QGNET_FORMAT, state_dict, pyramid_bins=pyramid_bins, **config_kwargs)


# --- MoCo checkpoints of the prior extractor ---------------------------------------------------------------------------
def _moco_encoders(state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    return {k.removeprefix("module.").split(".", 1)[0] for k in state_dict} & set(MOCO_ENCODERS)


def convert_moco_prior_extractor(
    state_dict: Mapping[str, torch.Tensor], output_dir: str | os.PathLike, moco_encoder: str = "encoder_k", source=""
):
    """
    Write one encoder of a MoCo checkpoint as a prior-extractor folder (`model.safetensors` in hf_fss stage names,
    `config.json` with `prior_extractor_backbone` / `prior_extractor_kwargs`, `README.md`).

    Args:
        state_dict: MoCo's `state_dict` (or the dict holding it), with or without `module.`.
        output_dir: the folder to write.
        moco_encoder (`str`, *optional*, defaults to `"encoder_k"`): `"encoder_k"` or `"encoder_q"`.
        source (`str`, *optional*): the file name, for the card and errors.

    Returns:
        `DilatedResNet`: the prior extractor (undilated) holding the weights.

    Raises:
        `ValueError`: unknown encoder, or a key of the encoder missing (named with its MoCo prefix) or unexpected.
    """
    from safetensors.torch import save_file

    if moco_encoder not in MOCO_ENCODERS:
        raise ValueError(f"moco_encoder must be one of {list(MOCO_ENCODERS)}, got {moco_encoder!r}")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    module = "module." if any(k.startswith("module.") for k in state_dict) else ""
    prefix = f"{module}{moco_encoder}."
    encoder = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError(
            f"MoCo checkpoint {source} holds no {prefix}* keys (it has {sorted(_moco_encoders(state_dict))})"
        )
    if "conv1.weight" not in encoder or "conv2.weight" in encoder:
        raise ValueError(f"{prefix}conv1.weight missing or a deep stem: a torchvision 7x7-stem ResNet is expected")
    name, kwargs = resnet_spec_of(encoder, "layer{}.", "QGNet", f"{prefix}ResNet")
    kwargs = {"stem": "7x7", **kwargs}
    backbone = build_backbone(name, output_stride=32, **kwargs)
    expected = [k.removeprefix("layer0.") for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    missing = [f"{prefix}{k}" for k in expected if k not in encoder]
    if missing:
        raise ValueError(
            f"MoCo checkpoint {source}: {len(missing)} key(s) of the {moco_encoder} ResNet missing: {missing}"
        )
    weights = convert_backbone_state_dict(backbone, encoder, source=f"{source} ({moco_encoder})")
    backbone.load_state_dict(weights, strict=False)

    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt", "layout": "stages"})
    record = {
        "hf_fss_artifact": "prior_extractor",
        "backbone": name,
        "backbone_kwargs": kwargs,
        "prior_extractor_backbone": name,
        "prior_extractor_kwargs": kwargs,
        "encoder": moco_encoder,
        "converted_from": os.path.basename(str(source)),
    }
    with open(os.path.join(output_dir, "config.json"), "w") as file:
        json.dump(record, file, indent=2, sort_keys=True)
        file.write("\n")
    with open(os.path.join(output_dir, "README.md"), "w") as file:
        file.write(_moco_card(record))
    return backbone


def _moco_card(record: dict) -> str:
    return f"""# QGNet prior extractor ({record["backbone"]}, {record["encoder"]})

The `{record["encoder"]}` encoder of the MoCo training checkpoint `{record["converted_from"]}`, converted by
`scripts/convert_original_checkpoint.py --model-type qgnet` (names only: torchvision ResNet keys to hf_fss stage
names, the `fc` projection head and the queues dropped). Architecture: `{record["backbone"]}` with
`{json.dumps(record["backbone_kwargs"])}`, weights shape-compatible with any output stride.

Use it as QGNet's prior extractor: `QGNetConfig(prior_extractor_backbone="{record["backbone"]}",
prior_extractor_kwargs={json.dumps(record["prior_extractor_kwargs"])}, prior_extractor_weights=<this folder>)`, then
`model.load_pretrained_extractors()` (the QGNet official code takes `encoder_k`, MoCo's linear evaluation `encoder_q`).
"""


def convert_qgnet_checkpoint(
    checkpoint: PathLike,
    output_dir: PathLike,
    image_size: int = 473,
    shot: int = 1,
    pyramid_bins: PyramidBins = None,
    moco_encoder: str | None = None,
):
    """
    Convert an official QGNet `.pth` (to a `save_pretrained` folder with its card) or a MoCo checkpoint of the prior
    extractor (to a prior-extractor folder, `moco_encoder` picking the encoder, `encoder_k` by default).

    Returns:
        `QGNetModel` for a QGNet checkpoint, the prior extractor (`DilatedResNet`) for a MoCo checkpoint.

    Raises:
        `ValueError`: unreadable file, unknown layout, missing / unexpected keys (named).
    """
    raw = load_checkpoint_tensors(checkpoint)
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a state dict or a dict holding one, got {type(raw).__name__}")
    inner = raw["state_dict"] if isinstance(raw.get("state_dict"), Mapping) else raw
    if _moco_encoders(inner):
        return convert_moco_prior_extractor(inner, output_dir, moco_encoder or "encoder_k", source=str(checkpoint))
    if moco_encoder is not None:
        raise ValueError(
            "--moco-encoder applies to MoCo checkpoints of the prior extractor, not to a QGNet checkpoint"
        )
    return convert_checkpoint(QGNET_FORMAT, checkpoint, output_dir, image_size, shot, raw, pyramid_bins=pyramid_bins)


def _official_forward(official, query, support, support_masks):
    return official(query, support, support_masks.float())


def build_official_model(source_dir: str | os.PathLike, shot: int = 1, image_size: int = 473, seed: int = 0):
    """
    The official QGNet (`model/PFENet_QGNet.py` of a checkout of the official repository, built out of tree with
    the fixes it needs to run here: no `.cuda()` default arguments, no pretrained-weight loading when
    `pretrained=False`) with seeded random weights, and the hf_fss model converted from them, for
    `scripts/benchmark.py --official qgnet=DIR`: see `hf_fss.models.official.build_pfenet_official`.
    """
    return build_pfenet_official(
        QGNET_FORMAT, source_dir, "model.PFENet_QGNet", "PFENet", _official_forward, shot, image_size, seed
    )
