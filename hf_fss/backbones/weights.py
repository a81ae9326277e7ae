"""
Loading ImageNet (or reference-checkpoint) weights into the hf_fss backbones, from safetensors only.

Supported key layouts, detected from the checkpoint's keys:

- `transformers_resnet`: transformers' `ResNetModel` / `ResNetForImageClassification` / `ResNetBackbone`
  (e.g. `microsoft/resnet-50`), 7x7 stem only. `[resnet.]embedder.embedder.{convolution,normalization}` ->
  `layer0.{conv1,bn1}`; `[resnet.]encoder.stages.{s}.layers.{l}.layer.{j}.{convolution,normalization}` ->
  `layer{s+1}.{l}.{conv,bn}{j+1}`; `...shortcut.{convolution,normalization}` -> `layer{s+1}.{l}.downsample.{0,1}`;
  `classifier.*` ignored.
- `torchvision_resnet`: torchvision / timm / PSPNet ResNets (`conv1`, `bn1`, and for the deep stem `conv2`,
  `bn2`, `conv3`, `bn3` -> `layer0.*`; `layer1..4.*` unchanged; `fc.*` ignored).
- `torchvision_vgg`: torchvision / timm VGG `features.{i}` -> the stage holding that module (PFENet's split for
  `VGG16BN`, pool4/pool5 skipped for `DilatedVGG16`); `classifier.*`, `head.*`, `pre_logits.*` ignored.
  `DilatedVGG16`'s fc6 / fc7 are not in ImageNet VGG and stay as initialised.
- `smcp_vgg`: SMCP's encoder `features.{i}` (recognised by a parameter at index 23, which is pool4 in
  torchvision), see `smcp_backbone_key_map`.
- `stages`: our own names, or a PFENet-lineage backbone (`layer0..4.*`), see `pfenet_backbone_key_map`.
- `moco`: a MoCo (v1/v2) training checkpoint, `[module.]encoder_q.*` and `[module.]encoder_k.*` (torchvision
  ResNets), `queue` and `queue_ptr`: one encoder is taken (`moco_encoder`, the key encoder `encoder_k` by default,
  as QGNet's official loader does), its `fc.*` projection head, the other encoder and the queues are dropped, and
  the rest is read as `torchvision_resnet`.

A leading `module.` (left by `DataParallel`) on every key is dropped. Every key the backbone expects must be
matched: a checkpoint that would load only partly raises a `ValueError` naming the missing keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"

# Where PFENet cuts torchvision's vgg16_bn `features` into layer0..layer4: stage k is `features[b[k]:b[k + 1]]`.
# pool5 (features[43]) is dropped. (`VGG16BN` is built on these cuts; they live here, with the other layouts, so that
# this module needs no backbone class and the base class can load weights without an import circle.)
VGG16_BN_STAGE_BOUNDS = (0, 7, 14, 24, 34, 43)

# Where we cut SMCP's encoder `features` (torchvision vgg16 without pool4/pool5, then fc6, ReLU, fc7, ReLU):
#   0-4 conv1_x + pool1 | 5-9 conv2_x + pool2 | 10-16 conv3_x + pool3 | 17-22 conv4_x | 23-32 conv5_x, fc6, fc7.
DILATED_VGG16_STAGE_BOUNDS = (0, 5, 10, 17, 23, 33)

# Official PFENet deep stem: nn.Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, maxpool).
_PFENET_STEM_NAMES = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
_PFENET_STEM_INDEX = {name: index for index, name in _PFENET_STEM_NAMES.items()}

# torchvision vgg16 `features` index -> (stage, local index) of DilatedVGG16; pool4 (23) and pool5 (30) are gone.
_TV_VGG16_TO_DILATED = {
    i: (stage, i - start)
    for stage, (start, stop) in enumerate(zip(DILATED_VGG16_STAGE_BOUNDS[:4], DILATED_VGG16_STAGE_BOUNDS[1:5]))
    for i in range(start, stop)
}
_TV_VGG16_TO_DILATED.update({i: (4, i - 24) for i in range(24, 30)})

_MODULE_PREFIX = "module."
_FEATURES_RE = re.compile(r"^features\.(\d+)\.(.+)$")
_STAGE_RE = re.compile(r"^layer([0-4])\.(.+)$")
_HF_STEM_RE = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(\w+)$")
_HF_LAYER_RE = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.([0-2])\.(convolution|normalization)\.(\w+)$"
)
_HF_SHORTCUT_RE = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)$")
_TV_RESNET_STEM_RE = re.compile(r"^(conv[1-3]|bn[1-3])\.(\w+)$")
MOCO_ENCODERS = ("encoder_k", "encoder_q")

# Sentinel of the internal key maps: the checkpoint key is a classifier head, not part of the backbone.
_IGNORED = None


def _bounds_map(index: int, bounds: tuple[int, ...]) -> tuple[int, int]:
    for stage in range(len(bounds) - 1):
        if bounds[stage] <= index < bounds[stage + 1]:
            return stage, index - bounds[stage]
    raise ValueError(f"features index {index} is outside the backbone (indices {bounds[0]}..{bounds[-1] - 1}).")


def pfenet_backbone_key_map(key: str, backbone: str = "resnet") -> str:
    """
    Map a backbone key of a PFENet-lineage checkpoint (PFENet, NTRENet, ...) to our parameter name.

    ResNet: the official stem is `nn.Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, maxpool)`,
    so `layer0.{0,1,3,4,6,7}.*` -> `layer0.{conv1,bn1,conv2,bn2,conv3,bn3}.*`; `layer1..4.*` are identical.
    VGG (`vgg16_bn`): every `layerK.N.*` is identical. Keys already in our naming are returned unchanged, and a
    leading `module.` is dropped.

    Args:
        key (`str`): e.g. `"layer0.3.weight"` or `"module.layer2.0.downsample.1.running_var"`.
        backbone (`str`, *optional*, defaults to `"resnet"`):
            `"resnet"` (also `"resnet50"`, `"resnet101"`) or `"vgg"` (also `"vgg16_bn"`). Needed because both
            official stems use `layer0.0`, `layer0.1`, ... for different modules.

    Returns:
        `str`: the matching key of `DilatedResNet(stem="deep")` / `VGG16BN`.

    Raises:
        `ValueError`: for keys outside `layer0..layer4` or stem indices that hold no parameters.
    """
    if backbone.startswith("resnet"):
        is_resnet = True
    elif backbone in ("vgg", "vgg16_bn"):
        is_resnet = False
    else:
        raise ValueError(f"backbone={backbone!r}: expected 'resnet', 'resnet50', 'resnet101', 'vgg' or 'vgg16_bn'.")
    key = key.removeprefix(_MODULE_PREFIX)
    match = _STAGE_RE.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a backbone key (expected layer0..layer4).")
    stage, rest = match.groups()
    if not is_resnet or stage != "0":
        return key
    index, _, param = rest.partition(".")
    if not index.isdigit():
        return key
    if index not in _PFENET_STEM_NAMES or not param:
        raise ValueError(f"{key!r}: PFENet's ResNet stem has parameters only at layer0.{{0,1,3,4,6,7}}.")
    return f"layer0.{_PFENET_STEM_NAMES[index]}.{param}"


def pfenet_backbone_key_to_original(key: str, backbone: str = "resnet") -> str:
    """
    The inverse of `pfenet_backbone_key_map`: a key of `DilatedResNet(stem="deep")` (`backbone="resnet"`) or `VGG16BN`
    (`"vgg"`, `"vgg16_bn"`) to the PFENet-lineage official name, e.g. `"layer0.conv2.weight"` -> `"layer0.3.weight"`.
    """
    if backbone.startswith("resnet") and key.startswith("layer0."):
        _, child, param = key.split(".", 2)
        return f"layer0.{_PFENET_STEM_INDEX[child]}.{param}"
    return key


def smcp_backbone_key_map(key: str) -> str:
    """
    Map a backbone key of an official SMCP checkpoint (its encoder's `features.{i}.*`) to `DilatedVGG16`.

    SMCP's `features` is torchvision vgg16's minus pool4 / pool5 plus fc6 / fc7, and our stages cut it at
    `DILATED_VGG16_STAGE_BOUNDS = (0, 5, 10, 17, 23, 33)`:

    | SMCP `features.{i}`           | ours                  |
    |-------------------------------|-----------------------|
    | 0, 2 (conv1_x)                | `layer0.{0,2}`        |
    | 5, 7 (conv2_x)                | `layer1.{0,2}`        |
    | 10, 12, 14 (conv3_x)          | `layer2.{0,2,4}`      |
    | 17, 19, 21 (conv4_x)          | `layer3.{0,2,4}`      |
    | 23, 25, 27 (conv5_x, dilated) | `layer4.{0,2,4}`      |
    | 29 (fc6), 31 (fc7)            | `layer4.6`, `layer4.8`|

    Indices 0..22 equal torchvision's; torchvision's 24/26/28 (conv5_x) become SMCP's 23/25/27. A leading
    `module.` is dropped.

    Args:
        key (`str`): e.g. `"features.29.weight"`.

    Returns:
        `str`: e.g. `"layer4.6.weight"`.

    Raises:
        `ValueError`: for keys outside `features.0` .. `features.32`.
    """
    key = key.removeprefix(_MODULE_PREFIX)
    match = _FEATURES_RE.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not an SMCP backbone key (expected features.<index>.<param>).")
    stage, local = _bounds_map(int(match.group(1)), DILATED_VGG16_STAGE_BOUNDS)
    return f"layer{stage}.{local}.{match.group(2)}"


def _transformers_resnet_key_map(key: str) -> str | None:
    key = key.removeprefix("resnet.")
    if key.startswith("classifier."):
        return _IGNORED
    if match := _HF_STEM_RE.match(key):
        module, param = match.groups()
        return f"layer0.{'conv1' if module == 'convolution' else 'bn1'}.{param}"
    if match := _HF_LAYER_RE.match(key):
        stage, block, conv, module, param = match.groups()
        name = "conv" if module == "convolution" else "bn"
        return f"layer{int(stage) + 1}.{block}.{name}{int(conv) + 1}.{param}"
    if match := _HF_SHORTCUT_RE.match(key):
        stage, block, module, param = match.groups()
        return f"layer{int(stage) + 1}.{block}.downsample.{0 if module == 'convolution' else 1}.{param}"
    raise ValueError(key)


def _torchvision_resnet_key_map(key: str) -> str | None:
    if key.startswith("fc."):
        return _IGNORED
    if _TV_RESNET_STEM_RE.match(key):
        return f"layer0.{key}"
    if _STAGE_RE.match(key):
        return key
    raise ValueError(key)


def _vgg_head(key: str) -> bool:
    return key.startswith(("classifier.", "head.", "pre_logits."))


def _torchvision_vgg16_bn_key_map(key: str) -> str | None:
    if _vgg_head(key):
        return _IGNORED
    match = _FEATURES_RE.match(key)
    if match is None:
        raise ValueError(key)
    stage, local = _bounds_map(int(match.group(1)), VGG16_BN_STAGE_BOUNDS)
    return f"layer{stage}.{local}.{match.group(2)}"


def _torchvision_vgg16_dilated_key_map(key: str) -> str | None:
    if _vgg_head(key):
        return _IGNORED
    match = _FEATURES_RE.match(key)
    if match is None or int(match.group(1)) not in _TV_VGG16_TO_DILATED:
        raise ValueError(key)
    stage, local = _TV_VGG16_TO_DILATED[int(match.group(1))]
    return f"layer{stage}.{local}.{match.group(2)}"


def _smcp_key_map(key: str) -> str | None:
    return _IGNORED if _vgg_head(key) else smcp_backbone_key_map(key)


def _detect_layout(keys: list[str]) -> str:
    if any(_HF_STEM_RE.match(k.removeprefix("resnet.")) or ".stages." in k for k in keys):
        return "transformers_resnet"
    if any(k.startswith("features.") for k in keys):
        # torchvision's features[23] is pool4 (no parameters); in SMCP's encoder it is conv5_1.
        return "smcp_vgg" if any(k.startswith("features.23.") for k in keys) else "torchvision_vgg"
    if any(_TV_RESNET_STEM_RE.match(k) for k in keys):
        return "torchvision_resnet"
    if any(_STAGE_RE.match(k) for k in keys):
        return "stages"
    raise ValueError(f"Unrecognised checkpoint layout; first keys: {keys[:10]}")


def _key_map_for(backbone: nn.Module, layout: str) -> tuple[Callable[[str], str | None], tuple[str, ...]]:
    """The key map from `layout` to `backbone` and the prefixes of backbone keys it may leave unfilled."""
    family = getattr(backbone, "weight_family", None)  # set by each StagedBackbone class
    if family == "resnet":
        if layout == "transformers_resnet":
            if backbone.stem != "7x7":
                raise ValueError(
                    "transformers' ResNet checkpoints have the 7x7 stem; build the backbone with stem='7x7' "
                    f"(this one has stem={backbone.stem!r})."
                )
            return _transformers_resnet_key_map, ()
        if layout == "torchvision_resnet":
            return _torchvision_resnet_key_map, ()
        if layout == "stages":
            return (lambda key: pfenet_backbone_key_map(key, "resnet")), ()
    elif family == "vgg16_bn":
        if layout == "torchvision_vgg":
            return _torchvision_vgg16_bn_key_map, ()
        if layout == "stages":
            return (lambda key: pfenet_backbone_key_map(key, "vgg")), ()
    elif family == "vgg16_dilated":
        if layout == "torchvision_vgg":
            # ImageNet VGG has no convolutional fc6 / fc7.
            return _torchvision_vgg16_dilated_key_map, ("layer4.6.", "layer4.8.")
        if layout == "smcp_vgg":
            return _smcp_key_map, ()
        if layout == "stages":
            return (lambda key: key), ()
    else:
        raise TypeError(f"Cannot load weights into {type(backbone).__name__}; build it with build_backbone().")
    raise ValueError(f"A checkpoint in the {layout!r} layout cannot be loaded into {type(backbone).__name__}.")


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def _is_moco(keys: list[str]) -> bool:
    return any(k.removeprefix(_MODULE_PREFIX).startswith(tuple(f"{e}." for e in MOCO_ENCODERS)) for k in keys)


def select_moco_encoder(
    state_dict: Mapping[str, torch.Tensor], encoder: str = "encoder_k", source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """
    The tensors of one encoder of a MoCo checkpoint, with the `[module.]{encoder}.` prefix removed.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): keys `[module.]encoder_q.*`, `[module.]encoder_k.*`,
            `[module.]queue`, `[module.]queue_ptr` (MoCo's `main_moco.py` layout, with or without `module.`).
        encoder (`str`, *optional*, defaults to `"encoder_k"`): `"encoder_k"` (key, momentum encoder) or
            `"encoder_q"` (query encoder).
        source (`str`, *optional*): where it came from, for error messages.

    Raises:
        `ValueError`: an unknown `encoder`, or no key of that encoder in the checkpoint.
    """
    if encoder not in MOCO_ENCODERS:
        raise ValueError(f"moco_encoder must be one of {list(MOCO_ENCODERS)}, got {encoder!r}")
    prefix = f"{encoder}."
    selected = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(_MODULE_PREFIX)
        if name.startswith(prefix):
            selected[name.removeprefix(prefix)] = tensor
    if not selected:
        raise ValueError(f"MoCo checkpoint {source} holds no {encoder}.* keys; first keys: {list(state_dict)[:10]}")
    return selected


def convert_backbone_state_dict(
    backbone: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    moco_encoder: str = "encoder_k",
) -> dict[str, torch.Tensor]:
    """
    Rename a checkpoint's tensors to `backbone`'s parameter names, checking that they fit exactly.

    Args:
        backbone (`nn.Module`): a backbone from `build_backbone`.
        state_dict (`Mapping[str, torch.Tensor]`): the checkpoint, in any layout listed in this module's docstring.
        source (`str`, *optional*): where it came from, for error messages.
        moco_encoder (`str`, *optional*, defaults to `"encoder_k"`): the encoder taken from a MoCo checkpoint.

    Returns:
        `dict[str, torch.Tensor]`: tensors keyed by `backbone.state_dict()` names (classifier heads dropped).

    Raises:
        `ValueError`: unknown layout, backbone keys left unfilled (other than `num_batches_tracked` and, from
        ImageNet VGG, `DilatedVGG16`'s fc6 / fc7), unexpected checkpoint keys, or shape mismatches.
    """
    if _is_moco(list(state_dict)):
        state_dict = select_moco_encoder(state_dict, moco_encoder, source)
    keys = list(state_dict)
    strip = bool(keys) and all(k.startswith(_MODULE_PREFIX) for k in keys)
    try:
        layout = _detect_layout([k.removeprefix(_MODULE_PREFIX) if strip else k for k in keys])
    except ValueError as error:
        raise ValueError(f"{error} (in {source})") from None
    key_map, optional_prefixes = _key_map_for(backbone, layout)
    expected = backbone.state_dict()

    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for key in keys:
        try:
            target = key_map(key.removeprefix(_MODULE_PREFIX) if strip else key)
        except ValueError:
            target = ""
        if target is _IGNORED:
            continue
        if target not in expected:
            unexpected.append(key if target in ("", key) else f"{key} (-> {target})")
            continue
        if target in converted:
            raise ValueError(f"{key!r} and {origin[target]!r} both map to {target!r} in {source}.")
        tensor = state_dict[key]
        if tuple(tensor.shape) != tuple(expected[target].shape):
            renamed = "" if target == key else f" (-> {target!r})"
            raise ValueError(
                f"Shape mismatch for {key!r}{renamed} in {source}: checkpoint has {tuple(tensor.shape)}, "
                f"the backbone expects {tuple(expected[target].shape)}."
            )
        converted[target] = tensor
        origin[target] = key

    missing = [
        k
        for k in expected
        if k not in converted and not k.endswith("num_batches_tracked") and not k.startswith(optional_prefixes)
    ]
    problems = []
    if missing:
        problems.append(f"backbone keys missing from the checkpoint: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected checkpoint keys: {_format_keys(unexpected)}")
    if problems:
        raise ValueError(
            f"Checkpoint {source} ({layout} layout) does not fit {type(backbone).__name__}: " + "; ".join(problems)
        )
    return converted


def _resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None) -> str:
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith(".safetensors"):
            raise ValueError(f"Only safetensors checkpoints are supported, got {name_or_path!r}.")
        return name_or_path
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {WEIGHTS_NAME} in folder {name_or_path!r}.")
        return path
    # A Hub repo id is "name" or "owner/name"; anything else that does not exist locally is a bad path.
    if name_or_path.endswith(".safetensors") or name_or_path.startswith((".", os.sep)) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"No such file or folder: {name_or_path!r}.")
    return hf_hub_download(repo_id=name_or_path, filename=WEIGHTS_NAME, revision=revision)


def load_backbone_weights(
    backbone: nn.Module, name_or_path: str, revision: str | None = None, moco_encoder: str = "encoder_k"
) -> None:
    """
    Load pretrained (typically ImageNet) weights into a backbone built by `build_backbone`, in place.

    Args:
        backbone (`nn.Module`): `DilatedResNet`, `VGG16BN` or `DilatedVGG16`.
        name_or_path (`str`):
            A Hub repo id holding `model.safetensors` (e.g. `"microsoft/resnet-50"`, `"timm/vgg16_bn.tv_in1k"`),
            a local folder holding `model.safetensors`, or a `.safetensors` file. Pickled checkpoints are refused.
        revision (`str`, *optional*): Hub revision (branch, tag or commit) for repo ids.
        moco_encoder (`str`, *optional*, defaults to `"encoder_k"`): the encoder taken from a MoCo checkpoint.

    Raises:
        `ValueError`: see `convert_backbone_state_dict`; messages name the offending keys and the file.
    """
    path = _resolve_checkpoint(name_or_path, revision)
    state_dict = convert_backbone_state_dict(backbone, load_file(path), source=path, moco_encoder=moco_encoder)
    # Copying into meta tensors would silently do nothing: take the loaded tensors instead.
    current = backbone.state_dict()
    on_meta = any(tensor.is_meta for tensor in current.values())
    if on_meta:
        for key, tensor in current.items():
            if key.endswith("num_batches_tracked") and key not in state_dict:
                state_dict[key] = torch.zeros_like(tensor, device="cpu")
    backbone.load_state_dict(state_dict, strict=False, assign=on_meta)
