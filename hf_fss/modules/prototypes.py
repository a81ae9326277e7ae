"""Support prototypes and training-free prior masks shared by the PFENet-lineage methods.

Every resize here is bilinear with `align_corners=True`, as in PFENet and its descendants, so that converted official
checkpoints reproduce the reference numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import autocast_off, resize

__all__ = [
    "average_prototypes",
    "cosine_prior_mask",
    "masked_average_pooling",
    "multi_shot_prior_mask",
    "resize_mask",
]


# The first name of `ops.resize`, under which the methods and their users import it.
resize_mask = resize


def masked_average_pooling(features: torch.Tensor, mask: torch.Tensor, eps: float = 0.0005) -> torch.Tensor:
    """
    Masked global average pooling (PFENet's `Weighted_GAP`): the support prototype.

    Computes `sum(features * mask) / (sum(mask) + eps)` over the spatial dimensions. The small area epsilon keeps an
    empty mask at a zero prototype rather than NaN.

    Args:
        features (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            Support features. Extra leading dimensions (e.g. `(batch_size, shot, channels, height, width)`) are
            allowed as long as `mask` has the same ones.
        mask (`torch.Tensor` of shape `(batch_size, 1, height, width)`):
            Float foreground mask in `[0, 1]`, already at the feature size (see [`resize_mask`]).
        eps (`float`, *optional*, defaults to 0.0005):
            Added to the mask area, as in PFENet.

    Returns:
        `torch.Tensor` of shape `(batch_size, channels, 1, 1)`: the prototype.
    """
    if features.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"mask spatial size {tuple(mask.shape[-2:])} must match the features' {tuple(features.shape[-2:])}; "
            "resize it first with `resize_mask`."
        )
    weighted = (features * mask).sum(dim=(-2, -1), keepdim=True)
    area = mask.sum(dim=(-2, -1), keepdim=True) + eps
    return weighted / area


def average_prototypes(prototypes: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """
    Fuse K-shot prototypes by their mean, as PFENet does.

    Args:
        prototypes (`torch.Tensor` of shape `(batch_size, shot, channels, 1, 1)` or a list of `shot` tensors of shape
            `(batch_size, channels, 1, 1)`):
            One prototype per support image.

    Returns:
        `torch.Tensor` of shape `(batch_size, channels, 1, 1)`.
    """
    if not torch.is_tensor(prototypes):
        prototypes = torch.stack(list(prototypes), dim=1)
    if prototypes.dim() != 5:
        raise ValueError(
            f"expected prototypes of shape (batch_size, shot, channels, 1, 1), got {tuple(prototypes.shape)}"
        )
    return prototypes.mean(dim=1)


def cosine_prior_mask(
    query_features: torch.Tensor,
    support_features: torch.Tensor,
    support_mask: torch.Tensor,
    eps: float = 1e-7,
    output_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """
    PFENet's training-free prior: for each query position, the highest cosine similarity to any foreground support
    position of the high-level (layer-4) features, min-max normalised per image.

    The support mask is resized to the support feature size (bilinear, `align_corners=True`) and multiplied into the
    support features, so background positions become zero vectors whose similarity is 0. Similarity follows PFENet
    exactly: `s . q / (|s| |q| + eps)`, then `(x - min) / (max - min + eps)`.

    Args:
        query_features (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            High-level query features.
        support_features (`torch.Tensor` of shape `(batch_size, channels, support_height, support_width)`):
            High-level features of one support image.
        support_mask (`torch.Tensor` of shape `(batch_size, 1, mask_height, mask_width)`):
            Float foreground mask of that support image, at any resolution.
        eps (`float`, *optional*, defaults to 1e-7):
            PFENet's `cosine_eps`, used in both the similarity and the normalisation.
        output_size (`int` or `tuple[int, int]`, *optional*):
            Resize the prior to this size (bilinear, `align_corners=True`). Defaults to `(height, width)`.

    Returns:
        `torch.Tensor` of shape `(batch_size, 1, height, width)` (or `output_size`) with values in `[0, 1]`, in the
        features' dtype. The similarities are computed in float32 whatever that dtype is, autocast disabled: the
        dot products of 2048-channel layer-4 features overflow float16 (max 65504) on an ordinary image, and
        bfloat16's 8-bit mantissa moves the max-over-positions and the min-max normalisation.
    """
    dtype = query_features.dtype
    query_features, support_features = query_features.float(), support_features.float()
    batch_size, channels, height, width = query_features.shape
    if support_features.shape[:2] != (batch_size, channels):
        raise ValueError(
            f"support features {tuple(support_features.shape)} do not match query features {tuple(query_features.shape)}"
        )
    with autocast_off(query_features):  # float32 under a caller's bfloat16 / float16 autocast too
        prior = _cosine_prior(query_features, support_features, support_mask, eps, output_size)
    return prior.to(dtype)


def _cosine_prior(query_features, support_features, support_mask, eps, output_size) -> torch.Tensor:
    """`cosine_prior_mask` of float32 features, in float32."""
    batch_size, _, height, width = query_features.shape
    # PFENet resizes to (h', h'), assuming square features; use the real (h', w') so non-square inputs work too.
    mask = resize_mask(support_mask.to(support_features.dtype), support_features.shape[-2:])
    query = query_features.flatten(2).transpose(1, 2)  # (batch, query_positions, channels)
    support = (support_features * mask).flatten(2)  # (batch, channels, support_positions)

    query_norm = torch.linalg.vector_norm(query, ord=2, dim=2, keepdim=True)  # (batch, query_positions, 1)
    support_norm = torch.linalg.vector_norm(support, ord=2, dim=1, keepdim=True)  # (batch, 1, support_positions)
    # One batched matmul over all position pairs (3600 x 3600 at 60x60 features). Support positions sit on the last,
    # contiguous axis so the max over them is a fast reduction; the norm product is an outer product.
    similarity = torch.bmm(query, support) / (query_norm * support_norm + eps)
    similarity = similarity.amax(dim=2)  # best-matching support position, (batch, query_positions)

    minimum = similarity.min(dim=1, keepdim=True).values
    maximum = similarity.max(dim=1, keepdim=True).values
    prior = (similarity - minimum) / (maximum - minimum + eps)
    prior = prior.view(batch_size, 1, height, width)
    if output_size is not None:
        prior = resize_mask(prior, output_size)
    return prior


def multi_shot_prior_mask(
    query_features: torch.Tensor,
    support_features: torch.Tensor | Sequence[torch.Tensor],
    support_masks: torch.Tensor | Sequence[torch.Tensor],
    eps: float = 1e-7,
    output_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """
    K-shot prior: [`cosine_prior_mask`] for every support, each resized to `output_size`, averaged over shots
    (PFENet resizes each to the query layer-3 size and takes the mean).

    Args:
        query_features (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            High-level query features.
        support_features (`torch.Tensor` of shape `(batch_size, shot, channels, support_height, support_width)` or a
            list of `shot` tensors of shape `(batch_size, channels, support_height, support_width)`):
            High-level support features.
        support_masks (`torch.Tensor` of shape `(batch_size, shot, 1, mask_height, mask_width)` or
            `(batch_size, shot, mask_height, mask_width)`, or a list of `shot` tensors of shape
            `(batch_size, 1, mask_height, mask_width)`):
            Float foreground masks of the supports.
        eps (`float`, *optional*, defaults to 1e-7):
            PFENet's `cosine_eps`.
        output_size (`int` or `tuple[int, int]`, *optional*):
            Size of each prior before averaging. Defaults to `(height, width)`.

    Returns:
        `torch.Tensor` of shape `(batch_size, 1, height, width)` (or `output_size`).
    """
    if torch.is_tensor(support_features):
        support_features = support_features.unbind(dim=1)
    if torch.is_tensor(support_masks):
        if support_masks.dim() == 4:
            support_masks = support_masks.unsqueeze(2)
        support_masks = support_masks.unbind(dim=1)
    support_features, support_masks = list(support_features), list(support_masks)
    if len(support_features) != len(support_masks) or not support_features:
        raise ValueError(f"got {len(support_features)} support features for {len(support_masks)} support masks")
    # A loop over the (few) shots keeps memory at one (positions x positions) similarity matrix at a time.
    priors = [
        cosine_prior_mask(query_features, features, mask, eps=eps, output_size=output_size)
        for features, mask in zip(support_features, support_masks)
    ]
    if len(priors) == 1:
        return priors[0]
    return torch.cat(priors, dim=1).mean(dim=1, keepdim=True)
