"""
Support encodings served from the evaluation cache: one encoding per (support image, class mask, annotation).

Under every protocol the same (support image, class) pairs recur across episodes and seeds, and what a method
computes from a support alone (PFENet's masked `layer4`, the reduced features and their prototype, SMCP's
prototypes, CRCNet's encoder features) does not depend on the query. `encode_support` asks the model for the
encoding of each support image on its own (batch 1, shot 1), stores it in the `FeatureCache` under a content key
(the image's key, a digest of its mask's pixels, the annotation kind, autocast) tagged with the model's weights
state, and joins the parts into the episode's encoding:

- K shots: the K single-shot parts joined along the shot dimension (`join_shots`), only for a model whose K-shot
  encoding is exactly that (`support_shots_separable`: NTRENet, QGNet, the cosine prior, SMCP in eval mode). A
  model whose encoding depends on all shots together (CRCNet's K-shot finetuning) is encoded as usual for K > 1,
  its backbone features still served by the feature cache.
- several episodes per batch: the episodes' encodings concatenated along the batch dimension (`cat_batch`).

Only in eval mode without autograd (the evaluation loop's state); a batch holding support inputs beyond images
and masks (SMCP's `support_semantic_labels`) is encoded as usual, as no key covers them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import fields

import torch

from hf_fss.backbones.feature_cache import FeatureCache, autocast_state

__all__ = ["cat_batch", "encode_support", "join_shots"]


def _tensors(encoding) -> list[torch.Tensor]:
    """Every tensor an encoding holds (tensor fields and the tensors of tuple / list fields)."""
    found = []
    for value in encoding.values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _join(values: list, dim: int, how: str):
    if values[0] is None or how == "first":
        return values[0]
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values, dim=1).mean(dim=1) if how == "mean" else torch.cat(values, dim=dim)
    if isinstance(values[0], (tuple, list)):
        return type(values[0])(_join(list(group), dim, how) for group in zip(*values))
    return values[0]


def join_shots(parts: Sequence) -> object:
    """
    The K-shot encoding of K single-shot encodings (each of batch 1 and shot 1) of one support set: tensor fields
    concatenated along dimension 1 (the shot), the encoding class's `shot_mean_fields` averaged over shots (a mean
    of per-shot prototypes, computed as `pfenet_support_encoding` computes it, hence bit-identical) and its
    `shot_shared_fields` taken from the first part; `shot` is K.
    """
    cls = type(parts[0])
    values = {}
    for f in fields(cls):
        if f.name == "shot":
            values["shot"] = sum(part.shot for part in parts)
            continue
        how = "mean" if f.name in cls.shot_mean_fields else "first" if f.name in cls.shot_shared_fields else "cat"
        values[f.name] = _join([getattr(part, f.name) for part in parts], 1, how)
    return cls(**values)


def cat_batch(encodings: Sequence) -> object:
    """One encoding of several support sets: every tensor field concatenated along the batch dimension (first)."""
    if len(encodings) == 1:
        return encodings[0]
    cls = type(encodings[0])
    values = {f.name: _join([getattr(e, f.name) for e in encodings], 0, "cat") for f in fields(cls)}
    return cls(**values)


def _mask_digest(mask: torch.Tensor) -> str:
    """A digest of a `(height, width)` mask's values {0, 1, 255} (as bytes, so any integer dtype gives the same)."""
    data = mask.to(torch.uint8).cpu().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest() + str(tuple(mask.shape))


def encode_support(
    model: torch.nn.Module,
    support: dict[str, torch.Tensor],
    cache: FeatureCache | None,
    image_keys: Sequence[Hashable] | None,
    annotation: str = "mask",
):
    """
    `model.encode_support(**support)`, served per support image from `cache` where that gives the same encoding.

    Args:
        model: an hf_fss model, attached to `cache` (`cache.attach(model)`).
        support: `support_pixel_values` `(B, K, 3, S, S)`, `support_masks` `(B, K, S, S)` and any declared
            support-side input (with which the call is not cached).
        cache: the evaluation's `FeatureCache`, or None (no caching).
        image_keys: one key per support image in row-major `(B, K)` order, naming the image and its geometry (as
            registered with `cache.images`).
        annotation: the support annotation kind (`mask`, `bbox`, `scribble`), part of the key.

    Returns:
        The model's `SupportEncoding` for the batch, equal to the uncached call's (bit-identical at batch size 1).
    """
    pixels, masks = support.get("support_pixel_values"), support.get("support_masks")
    usable = (
        cache is not None
        and cache.max_bytes > 0
        and image_keys is not None
        and set(support) == {"support_pixel_values", "support_masks"}
        and not model.training
        and not torch.is_grad_enabled()
    )
    if not usable or (pixels.shape[1] > 1 and not getattr(model, "support_shots_separable", False)):
        return model.encode_support(**support)
    batch_size, shot = pixels.shape[:2]
    state = cache.model_state()
    context = (type(model).__name__, annotation, str(pixels.dtype), autocast_state(pixels.device))
    episodes = []
    for b in range(batch_size):
        parts = []
        for k in range(shot):
            key = ("support", image_keys[b * shot + k], _mask_digest(masks[b, k]), *context)
            part = cache.get(key, state)
            if part is None:
                cache.support_misses += 1
                part = model.encode_support(pixels[b : b + 1, k : k + 1], masks[b : b + 1, k : k + 1])
                cache.put(key, part, _tensors(part), state)
            else:
                cache.support_hits += 1
            parts.append(part)
        episodes.append(parts[0] if shot == 1 else join_shots(parts))
    return cat_batch(episodes)
