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

import contextlib
import importlib
import os
import sys
import types
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import smcp_backbone_key_map
from ...backbones.vgg import _VGG16_CFG, DILATED_VGG16_STAGE_BOUNDS
from ..conversion import OfficialFormat, convert_checkpoint, convert_state_dict
from ..official import build_official, import_from_checkout
from .configuration_smcp import SMCPConfig
from .modeling_smcp import SMCPModel

__all__ = [
    "SMCP_FORMAT",
    "build_official_model",
    "convert_smcp_checkpoint",
    "convert_smcp_state_dict",
    "infer_smcp_config",
    "original_key_to_ours",
    "our_key_to_original",
]

OFFICIAL_REPOSITORY = "github.com/NUST-Machine-Intelligence-Laboratory/SMCP"
OFFICIAL_ASPP_RATES = (6, 12, 18, 24)
# The official test-time model: models/vgg_test.py's `Encoder` (two passes, the second with the fused prototype).
OFFICIAL_TEST_MODULE = "models.vgg_test"
# Its one CUDA-only statement: `Encoder.forward` moves the first-pass pseudo-mask (built with numpy on the CPU) to the
# GPU with `.cuda()`. `build_official_model` moves it to the query's device instead, so the module runs on CPU too.
OFFICIAL_DEVICE_FIX = {"torch.from_numpy(label).cuda()": "torch.from_numpy(label).to(qry_imgs.device)"}
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


SMCP_FORMAT = OfficialFormat(
    "SMCP",
    OFFICIAL_REPOSITORY,
    SMCPModel,
    infer_smcp_config,
    lambda config: (original_key_to_ours, our_key_to_original),
)


def convert_smcp_state_dict(state_dict: Mapping[str, torch.Tensor], **config_kwargs) -> tuple[SMCPModel, SMCPConfig]:
    """
    An `SMCPModel` (eval mode) holding the official weights, and its config: `state_dict` with or without `module.`
    prefixes, `config_kwargs` as in `infer_smcp_config`; every key must be matched, or a `ValueError` lists every
    missing, unexpected or mis-shaped one.
    """
    return convert_state_dict(SMCP_FORMAT, state_dict, **config_kwargs)


def convert_smcp_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, image_size: int = 417, shot: int = 1
) -> SMCPModel:
    """
    Convert an official SMCP `.pth` (e.g. the published `25000.pth`) into the `save_pretrained` folder `output_dir`
    with its card (`hf_fss.models.conversion.convert_checkpoint`); `image_size` defaults to the official 417, `shot`
    is recorded as metadata.
    """
    return convert_checkpoint(SMCP_FORMAT, checkpoint, output_dir, image_size, shot)


def _torchvision_vgg16_layout(**kwargs) -> nn.Module:
    # What the official constructor reads of `torchvision.models.vgg16()`: its `features` list (13 x [Conv2d 3x3
    # padding 1, ReLU(inplace)] with MaxPool2d(2, 2) closing each of the 5 blocks), with torchvision's initialisation
    # (convolutions Kaiming-normal on fan-out, zero biases). `classifier` has torchvision's layers on the meta device:
    # the official code lists them and drops them, so they cost nothing here.
    if kwargs.get("pretrained") or kwargs.get("weights") is not None:
        raise ValueError("the torchvision stand-in of build_official_model has no ImageNet weights")
    layers, in_channels = [], 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, 64 * item, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        in_channels = 64 * item
    vgg = nn.Module()
    vgg.features = nn.Sequential(*layers)
    vgg.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    linear = {"device": "meta"}
    vgg.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096, **linear), nn.ReLU(True), nn.Dropout(),
        nn.Linear(4096, 4096, **linear), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000, **linear),
    )  # fmt: skip
    return vgg


@contextlib.contextmanager
def _torchvision_for_import() -> Iterator[None]:
    # The official module does `from torchvision import models` and calls only `models.vgg16()`. hf_fss does not
    # depend on torchvision (its wheels pin a torch build); when it cannot be imported, a stand-in offering that one
    # constructor is put in `sys.modules` for the duration of the import only.
    before = set(sys.modules)
    try:
        importlib.import_module("torchvision")
    except Exception:  # missing, or a wheel whose compiled operators do not match this torch
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
    else:
        yield
        return
    stand_in, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.vgg16 = _torchvision_vgg16_layout
    stand_in.models = models
    sys.modules.update({"torchvision": stand_in, "torchvision.models": models})
    try:
        yield
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.models"]


def _official_forward(official, query, support, support_masks):
    # test.py: Encoder(support image, query, support mask == 1), logits upsampled to the query's size.
    if query.shape[0] != 1:
        raise ValueError(
            f"the official SMCP forward takes one episode per call (batch 1), got a batch of {query.shape[0]}"
        )
    logits = official(support[:, 0], query, (support_masks[:, 0] == 1).to(query.dtype))
    return F.interpolate(logits, size=query.shape[-2:], mode="bilinear", align_corners=False)


def build_official_model(source_dir: str | os.PathLike, shot: int = 1, image_size: int = 417, seed: int = 0):
    """
    The official SMCP test-time model (`Encoder` of `models/vgg_test.py` in a checkout of the official repository,
    commit 191fbff) with seeded random weights, and the hf_fss model converted from them, for
    `scripts/benchmark.py --official smcp=DIR`.

    The checkout is used unmodified; the fixes it needs to run here are made at import, in memory:
    - its one `.cuda()` (`Encoder.forward` moving the first-pass pseudo-mask to the GPU) becomes a move to the
      query's device (`OFFICIAL_DEVICE_FIX`), so it runs on CPU and on GPU;
    - if `torchvision` cannot be imported (hf_fss does not depend on it), a stand-in `torchvision.models.vgg16()`
      building torchvision's VGG-16 layer list with its initialisation is in `sys.modules` during the import only
      (removed afterwards). The official test constructor loads no ImageNet file, so no weights are needed.

    The returned `forward(query (1, 3, H, W), support (1, 1, 3, H, W), support_masks (1, 1, H, W) in {0, 1, 255})`
    calls the official `Encoder(support image, query, support mask == 1)` as test.py does and upsamples its
    (1, 2, h, w) logits to the query's size (bilinear, align_corners=False), like test.py; it raises `ValueError`
    for a batch of several episodes, which the official forward cannot take (it reads the first episode's
    pseudo-mask only).

    Args:
        source_dir: root of the official checkout.
        shot (`int`): K of the episodes; the official code supports 1 only.
        image_size (`int`): test size (the official 417), in the hf_fss config.
        seed (`int`): seed of the official model's own initialisation (torchvision's VGG-16 init for the backbone).

    Returns:
        [`hf_fss.models.official.OfficialModel`]

    Raises:
        `FileNotFoundError`: `source_dir` lacks `models/vgg_test.py`.
        `ValueError`: `shot` > 1 (the official forward broadcasts one support's mask against the support features
            and crashes for K > 1), or `models/vgg_test.py` is not the official file the device fix was written for.
    """
    if shot != 1:
        raise ValueError(
            f"the official SMCP code is 1-shot only (its Encoder.forward pools the prototype with one support mask "
            f"and crashes for K > 1), got shot={shot}; compare K > 1 with hf_fss alone"
        )
    with _torchvision_for_import():
        official_class = import_from_checkout(source_dir, OFFICIAL_TEST_MODULE, "Encoder", OFFICIAL_DEVICE_FIX)
    source = f"{source_dir}: models/vgg_test.py Encoder"
    return build_official(SMCP_FORMAT, official_class, {}, _official_forward, source, shot, image_size, seed)
