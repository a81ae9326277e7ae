"""
The one entry point of checkpoint conversion: reading an official `.pth` safely (`torch.load(weights_only=True)`,
never unpickling code), unwrapping its state dict, inferring the config, putting the weights into the hf_fss model
through the method's key maps with every key accounted for (`convert_state_dict`), and writing the
`save_pretrained` folder with its card (`convert_checkpoint`).

A method's `models/<method>/convert_<method>.py` holds what is its own, gathered in an [`OfficialFormat`]: its key
maps and config inference; its `convert_<method>_state_dict` / `convert_<method>_checkpoint` call the two functions
here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cli import IMAGE_SIDE, POSITIVE, POSITIVE_INT, ScriptArgumentParser, command_prog, os_error_line
from ..utils.io import check_output_path

__all__ = [
    "CONVERTERS",
    "PFENET_PYRAMID_BINS",
    "OfficialFormat",
    "convert_checkpoint",
    "convert_state_dict",
    "load_checkpoint_tensors",
    "load_official_state_dict",
    "load_original_state_dict",
    "main",
    "parse_args",
    "pyramid_bins_of",
    "resnet_spec_of",
    "unwrap_state_dict",
]

# The pyramid scales of PFENet's feature enrichment module in every official PFENet-lineage config.
PFENET_PYRAMID_BINS = (60, 30, 15, 8)
# A ResNet's name from its layer3 block count (another count is a ResNet-50 with its own `depths`).
_RESNET_BY_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101"}
_STANDARD_RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


KeyMap = Callable[[str], str]
PathLike = str | os.PathLike
# The scale sizes of a PFENet-lineage pyramid (sides > 1, or fractions of the feature map in (0, 1]); None: official.
PyramidBins = Sequence[int | float] | None


@dataclass(frozen=True)
class OfficialFormat:
    """
    What converting one method's official checkpoints takes; each `convert_<method>.py` defines one.

    Args:
        method (`str`): the method's name in messages, e.g. `"NTRENet"`.
        repository (`str`): the official repository, recorded as the source in the converted folder's card.
        model_class (`type`): the hf_fss model class, built from the inferred config.
        infer_config (`Callable`): `(bare official state dict, **options) -> config`; `options` are config fields
            (`image_size`, `shot`, ...) and the method's own inference options (e.g. `pyramid_bins`).
        key_maps (`Callable`): `config -> (to_ours, to_original)`, the method's key maps for that architecture
            (`to_ours` raises `ValueError` for a key it does not know).
    """

    method: str
    repository: str
    model_class: type
    infer_config: Callable[..., Any]
    key_maps: Callable[[Any], tuple[KeyMap, KeyMap]]


def convert_state_dict(official: OfficialFormat, state_dict: Mapping, **options) -> tuple[nn.Module, Any]:
    """
    Build the hf_fss model holding an official state dict's weights.

    Args:
        official (`OfficialFormat`): the method's format.
        state_dict: the official state dict, with or without the `state_dict` wrapper / `module.` prefixes.
        options: passed to `official.infer_config`.

    Returns:
        `tuple(model, config)`, the model in eval mode.

    Raises:
        `ValueError`: the config cannot be inferred, or a list of every missing (by its official name), unexpected or
            mis-shaped key.
    """
    state_dict = unwrap_state_dict(state_dict)
    config = official.infer_config(state_dict, **options)
    to_ours, to_original = official.key_maps(config)
    model = load_official_state_dict(official.model_class(config), state_dict, to_ours, to_original, official.method)
    return model, config


def convert_checkpoint(
    official: OfficialFormat,
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int,
    shot: int = 1,
    tensors: Any = None,
    **options,
) -> nn.Module:
    """
    Convert an official `.pth` into `output_dir` (`config.json`, `model.safetensors`, `preprocessor_config.json` and
    a model card saying where the weights come from), written atomically.

    Args:
        official (`OfficialFormat`): the method's format.
        checkpoint: path of the official checkpoint.
        output_dir: folder written by `save_pretrained`.
        image_size (`int`): test size, saved in the config and the image processor.
        shot (`int`, *optional*, defaults to 1): K the checkpoint was trained with (metadata).
        tensors (*optional*): what `load_checkpoint_tensors(checkpoint)` returned, when the caller has read the file
            already (QGNet tells MoCo files apart first); else the file is read here.
        options: the method's other inference options (e.g. `pyramid_bins`).

    Returns:
        The converted model, in eval mode.

    Raises:
        `ValueError`: unreadable file, or a checkpoint that does not match the method (see `convert_state_dict`).
    """
    from ..hub import save_pretrained_with_card  # the card renderer sits above the models
    from ..image_processing_fss import FewShotSegmentationImageProcessor

    state_dict = load_original_state_dict(checkpoint) if tensors is None else tensors
    model, _ = convert_state_dict(official, state_dict, image_size=image_size, shot=shot, **options)
    record = {"converted_from": os.path.basename(checkpoint), "shot": shot, "source": official.repository}
    save_pretrained_with_card(
        model, FewShotSegmentationImageProcessor(image_size=image_size), output_dir, training=record
    )
    return model


def load_original_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Read an official checkpoint safely and return its bare state dict (`state_dict` unwrapped, `module.` dropped).
    """
    return unwrap_state_dict(load_checkpoint_tensors(checkpoint_path))


def load_checkpoint_tensors(checkpoint_path: str | os.PathLike) -> Any:
    """
    `torch.load(path, weights_only=True)` with errors that name the file: a pickled object other than tensors and
    plain containers is refused (never unpickled), an empty / truncated / foreign file is "not a readable checkpoint".

    Raises:
        `ValueError`: the file holds other objects, or cannot be read as a PyTorch checkpoint.
        `OSError`: the file cannot be opened.
    """
    path = os.fspath(checkpoint_path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle at all, or pickle operations weights-only loading refuses
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint (not a tensors-only pickle: "
                f"{reason.group(1).strip() if reason else 'weights only load failed'})"
            ) from None
        raise ValueError(
            f"{path}: refused (weights only load failed: Unsupported global): it holds a pickled {found.group(1)} "
            "object, and unpickling it could run code; extract its state dict (tensors only) with code you trust "
            "and convert that"
        ) from None
    except OSError:
        raise
    except Exception as err:  # torch reports a damaged file with many exception types
        reason = " ".join(str(err).split()[:12]) or type(err).__name__
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (empty, truncated or another format: {reason})"
        ) from None


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Take `checkpoint["state_dict"]` (or `"model"`) when present and drop a `module.` prefix from every key."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict or a dict holding one, got {type(checkpoint).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key.removeprefix("module.")] = value
    return state_dict


def load_official_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    to_ours: Callable[[str], str],
    to_original: Callable[[str], str],
    method: str,
    optional: tuple[str, ...] = ("num_batches_tracked",),
) -> nn.Module:
    """
    Load an official (bare) state dict into `model` through the method's key maps, in eval mode.

    Args:
        model: the hf_fss model built from the config inferred from the checkpoint.
        state_dict: the official state dict, unwrapped (`unwrap_state_dict`).
        to_ours / to_original: the method's key maps (`to_ours` raises `ValueError` for a key it does not know).
        method: the method's name, for the error message.
        optional: endings of model keys a checkpoint may lack (BN step counters of checkpoints saved before torch
            0.4.1 do not affect inference).

    Raises:
        `ValueError` listing every missing (by its official name), unexpected or mis-shaped key: a checkpoint that
        would load only partly is refused.
    """
    expected = model.state_dict()
    converted, unexpected = {}, []
    for key, value in state_dict.items():
        try:
            new_key = to_ours(key)
        except ValueError:
            new_key = None
        if new_key in expected:
            converted[new_key] = value
        else:
            unexpected.append(key)
    missing = [to_original(k) for k in expected if k not in converted and not k.endswith(optional)]
    mismatched = [
        f"{to_original(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if v.shape != expected[k].shape
    ]
    problems = [
        f"{what} ({len(keys)}): {keys}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"the checkpoint does not match {method} as inferred from it; " + "; ".join(problems))
    model.load_state_dict(converted, strict=False)
    return model.eval()


def pyramid_bins_of(state_dict: Mapping[str, torch.Tensor], merge_prefix: str, pyramid_bins=None) -> tuple:
    """
    The pyramid scale sizes of a PFENet-lineage checkpoint: the weights give only their count (the modules under
    `merge_prefix`, e.g. `"init_merge."`); four scales are the official `PFENET_PYRAMID_BINS`, other counts need
    `pyramid_bins`.

    Raises:
        `ValueError`: another count without `pyramid_bins`, or `pyramid_bins` of the wrong length.
    """
    indices = {int(k[len(merge_prefix) :].split(".", 1)[0]) for k in state_dict if k.startswith(merge_prefix)}
    num_bins = max(indices) + 1 if indices else 0
    if pyramid_bins is None:
        if num_bins != len(PFENET_PYRAMID_BINS):
            raise ValueError(
                f"the checkpoint has {num_bins} pyramid scales; pass their sizes with pyramid_bins / --pyramid-bins"
            )
        return PFENET_PYRAMID_BINS
    if len(pyramid_bins) != num_bins:
        raise ValueError(
            f"pyramid_bins={tuple(pyramid_bins)} has {len(pyramid_bins)} scales, the checkpoint {num_bins}"
        )
    return tuple(pyramid_bins)


def resnet_spec_of(
    state_dict: Mapping[str, torch.Tensor], stage_prefix: str, method: str, what: str = "backbone"
) -> tuple[str, dict]:
    """
    `(backbone name, DilatedResNet kwargs)` of the ResNet whose stage `i` keys start with `stage_prefix.format(i)`
    (e.g. `"layer{}."`): depth from the block counts, width from `layer1.0.conv1` (so that tiny test checkpoints
    convert too); `base_width` / `depths` are given only where they differ from the named ResNet's.

    Raises:
        `ValueError`: a stage has no keys (`method` and `what`, e.g. `"QGNet"`, `"prior extractor"`, are named).
    """
    depths = []
    for stage in range(1, 5):
        prefix = stage_prefix.format(stage)
        blocks = {int(k[len(prefix) :].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
        if not blocks:
            article = "an" if method[0] in "AEFHILMNORSX" else "a"  # as the letter is spoken: "an NTRENet", "a QGNet"
            raise ValueError(f"not {article} {method} checkpoint: no {what} keys `{prefix}*`")
        depths.append(max(blocks) + 1)
    name = _RESNET_BY_LAYER3_BLOCKS.get(depths[2], "resnet50")
    width = state_dict[stage_prefix.format(1) + "0.conv1.weight"].shape[0]
    kwargs = {} if width == 64 else {"base_width": int(width)}
    if tuple(depths) != _STANDARD_RESNET_DEPTHS[name]:
        kwargs["depths"] = depths
    return name, kwargs


# ------------------------------------------------------------------------------------ command line

CONVERT_USAGE = """
Convert an official checkpoint of a supported method to an hf_fss `save_pretrained` folder (safetensors weights,
`config.json` inferred from the weights, and the image processor's `preprocessor_config.json`).

    python scripts/convert_original_checkpoint.py --model-type ntrenet --checkpoint train_epoch_200.pth \
        --output-dir ntrenet-pascal5i-fold0-resnet50 [--image-size 473 --shot 1 --pyramid-bins 60 30 15 8]
    python scripts/convert_original_checkpoint.py --model-type qgnet --checkpoint train_epoch_200.pth --output-dir X
    python scripts/convert_original_checkpoint.py --model-type qgnet --checkpoint checkpoint_2000.pth.tar \
        --output-dir prior-extractor [--moco-encoder encoder_q]   # QGNet's prior extractor from a MoCo checkpoint

The checkpoint may be a bare state dict or a dict holding one under `state_dict`, with or without the `module.`
prefixes of `DataParallel`. It is read with `torch.load(..., weights_only=True)`: tensors only, no arbitrary objects.
A checkpoint that does not match the inferred architecture, holds pickled objects other than tensors, or is empty or
truncated stops with one line `convert_original_checkpoint.py: error: ...` (exit status 2, like a usage error)
naming the file and, for a mismatch, the missing and unexpected keys.

Methods are looked up in `CONVERTERS` (model type -> "module:function"); a converter takes
`(checkpoint, output_dir, image_size=..., shot=..., **options)` and writes the folder.
"""
CONVERT_DESCRIPTION = CONVERT_USAGE.split("\n\n")[0]

PROG = "convert_original_checkpoint.py"

# model type -> "module:function"; add QGNet, SMCP, ... here as their converters land.
CONVERTERS = {
    "ntrenet": "hf_fss.models.ntrenet.convert_ntrenet:convert_ntrenet_checkpoint",
    "qgnet": "hf_fss.models.qgnet.convert_qgnet:convert_qgnet_checkpoint",
    "smcp": "hf_fss.models.smcp.convert_smcp:convert_smcp_checkpoint",
}


def _load_converter(model_type: str):
    module_name, function_name = CONVERTERS[model_type].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _bin(value: str) -> int | float:
    """A pyramid bin: an int side > 1, or a fraction of the feature map in (0, 1]."""
    number = POSITIVE(value)
    return int(number) if number > 1 and number.is_integer() else number


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(
        prog=PROG, description=CONVERT_DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-type", required=True, choices=sorted(CONVERTERS), help="method of the checkpoint")
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="official .pth / .pt file, or for qgnet a MoCo .pth.tar (prior extractor alone)",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to write (save_pretrained layout)")
    parser.add_argument(
        "--image-size",
        allowed=IMAGE_SIDE,
        default=None,
        help="test image size for the config and processor (default: the method's, 473 NTRENet / QGNet, 417 SMCP)",
    )
    parser.add_argument(
        "--shot",
        allowed=POSITIVE_INT,
        default=1,
        help="K the checkpoint was trained with, recorded in the config (default 1)",
    )
    parser.add_argument(
        "--pyramid-bins",
        type=_bin,
        nargs="+",
        default=None,
        help="NTRENet: pyramid scale sizes when the checkpoint does not use the official 60 30 15 8",
    )
    parser.add_argument(
        "--moco-encoder",
        choices=("encoder_k", "encoder_q"),
        default=None,
        help="QGNet, MoCo checkpoint of the prior extractor: the encoder to take (default encoder_k, as the official code)",
    )
    args = parser.parse_checked(argv)
    return args


def main(argv=None) -> int:
    """Convert; on a bad checkpoint print one line `convert_original_checkpoint.py: error: ...` and return 2."""
    args = parse_args(argv)
    try:
        # Before the (slow) conversion: a file where the folder goes, an unwritable place.
        check_output_path(args.output_dir, "--output-dir")
        if not args.checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist or is not a file")
        converter = _load_converter(args.model_type)
        options = {} if args.image_size is None else {"image_size": args.image_size}
        if args.pyramid_bins is not None:
            options["pyramid_bins"] = tuple(args.pyramid_bins)
        if args.moco_encoder is not None:
            options["moco_encoder"] = args.moco_encoder
        model = converter(args.checkpoint, args.output_dir, shot=args.shot, **options)
    except OSError as err:
        if err.errno is None:  # the checkpoint's own problem, in its words
            return _refuse(args, str(err))
        # A full disk or a refused write names its own path (the output's, or the checkpoint's when unreadable).
        print(f"{command_prog(PROG)}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except ValueError as err:
        return _refuse(args, str(err))
    # A QGNet MoCo checkpoint converts to a prior extractor (a backbone, no config).
    backbone = model.config.backbone if hasattr(model, "config") else f"{type(model).__name__} prior extractor"
    print(
        f"converted {args.checkpoint} -> {args.output_dir} ({args.model_type}, backbone={backbone}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return 0


def _refuse(args: argparse.Namespace, text: str) -> int:
    """Print one line naming the checkpoint (and the output check's flag as it comes); the exit status, 2."""
    message = " ".join(text.splitlines())
    if str(args.checkpoint) not in message and not message.startswith("--output-dir"):
        message = f"{args.checkpoint}: {message}"
    print(f"{command_prog(PROG)}: error: {message}", file=sys.stderr)
    return 2
