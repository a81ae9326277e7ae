"""
What every converter of an official checkpoint shares: reading the `.pth` safely (`torch.load(weights_only=True)`,
never unpickling code), unwrapping its state dict, and putting it into the hf_fss model through the method's key
maps with every key accounted for. The method's own key maps and config inference stay in its
`models/<method>/convert_<method>.py`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "PFENET_PYRAMID_BINS",
    "load_checkpoint_tensors",
    "load_official_state_dict",
    "load_original_state_dict",
    "pyramid_bins_of",
    "unwrap_state_dict",
]

# The pyramid scales of PFENet's feature enrichment module in every official PFENet-lineage config.
PFENET_PYRAMID_BINS = (60, 30, 15, 8)


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
