"""
Checks of the inputs every hf_fss model takes (shape, dtype, device, finite values, mask values, image size), each
failure a one-line `ValueError` naming the argument, its shape and the fix. Called by the shared forward
(`hf_fss.modeling_fss`) before any method code runs.
"""

from __future__ import annotations

import torch


def _shape(x) -> str:
    return tuple(x.shape).__repr__() if isinstance(x, torch.Tensor) else type(x).__name__


def _check_finite(name: str, values: torch.Tensor) -> None:
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} holds NaN or infinite values; normalise real images with the image processor")


def _check_device(name: str, values: torch.Tensor, device: torch.device | None) -> None:
    # Before any check reads the values: a meta or other-device tensor would fail inside them.
    if device is not None and values.device != device:
        raise ValueError(f"{name} is on {values.device} but the model is on {device}; move it with .to(model.device)")


def _check_pixels(
    name: str, values: torch.Tensor, device: torch.device | None, min_size: tuple[int, int] | None = None
) -> None:
    """
    Device, a side of zero size or below `min_size` (the model's smallest input), a dtype that is not float (raw
    uint8 pixels), then NaN / infinity.
    """
    _check_device(name, values, device)
    if 0 in values.shape[-2:]:
        raise ValueError(f"{name} holds images of zero size {tuple(values.shape[-2:])} (height, width)")
    height, width = values.shape[-2:]
    if min_size is not None and (height < min_size[0] or width < min_size[1]):
        raise ValueError(
            f"{name} holds images of {height}x{width} (height x width) but the model takes at least "
            f"{min_size[0]}x{min_size[1]} (its backbone's pooling would leave no pixel); give larger images, or an "
            f"image processor with image_size >= {max(min_size)}"
        )
    if not values.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor of normalised pixels, got dtype {values.dtype}; preprocess raw "
            "images with the image processor (FewShotSegmentationImageProcessor)"
        )
    _check_finite(name, values)


def _check_mask_values(name: str, mask: torch.Tensor, device: torch.device | None = None) -> None:
    _check_device(name, mask, device)
    if mask.is_complex():
        raise ValueError(f"{name} must be an integer, bool or float tensor, got dtype {mask.dtype}")
    if mask.is_floating_point() and not bool((mask == mask.round()).all()):
        raise ValueError(f"{name} must hold only 0 (background), 1 (target) and 255 (ignore), got fractional values")
    invalid = (mask != 0) & (mask != 1) & (mask != 255)
    if bool(invalid.any()):
        found = sorted({int(v) for v in mask[invalid].unique()[:5].tolist()})
        fix = (
            f"mark ignored pixels with 255: {name}.masked_fill({name} < 0, 255)"
            if min(found) < 0
            else "for a label map, select the class first (mask == class_id), or give the processor `support_class_ids`"
        )
        raise ValueError(f"{name} must hold only 0 (background), 1 (target) and 255 (ignore), got also {found}; {fix}")


def check_query_inputs(
    pixel_values, labels=None, device: torch.device | None = None, min_size: tuple[int, int] | None = None
) -> None:
    """
    Raise a `ValueError` naming the argument when the query inputs are malformed: `pixel_values` not a float
    `(batch, 3, height, width)` tensor (integer pixels are refused: they are not normalised), a zero-size side or
    one below `min_size` (`(height, width)`, the model's `min_input_size()`), NaN / infinity, a tensor on another `device` than the model's, or `labels` of another shape or with values other
    than 0, 1, 255 (any integer, bool or whole-valued float dtype is accepted).
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {_shape(pixel_values)}")
    _check_pixels("pixel_values", pixel_values, device, min_size)
    if labels is not None:
        expected = (pixel_values.shape[0], *pixel_values.shape[2:])
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != expected:
            raise ValueError(
                f"labels must have shape (batch, height, width) = {expected} to match pixel_values "
                f"{tuple(pixel_values.shape)}, got {_shape(labels)}"
            )
        _check_mask_values("labels", labels, device)


def check_support_inputs(
    support_pixel_values,
    support_masks,
    batch_size=None,
    require_target=True,
    device: torch.device | None = None,
    min_size: tuple[int, int] | None = None,
) -> None:
    """
    Raise a `ValueError` naming the argument when the supports are malformed: the checks of `check_query_inputs`,
    batch / shot / size agreement and, if `require_target`, at least one target pixel (value 1) per mask.
    """
    if support_pixel_values is None or support_masks is None:
        raise ValueError(
            "support_pixel_values and support_masks are required unless a support_encoding from "
            "model.encode_support(...) is given"
        )
    if (
        not isinstance(support_pixel_values, torch.Tensor)
        or support_pixel_values.dim() != 5
        or support_pixel_values.shape[2] != 3
    ):
        raise ValueError(
            "support_pixel_values must be a (batch, shot, 3, height, width) tensor, "
            f"got {_shape(support_pixel_values)}"
        )
    if not isinstance(support_masks, torch.Tensor) or support_masks.dim() != 4:
        raise ValueError(f"support_masks must be a (batch, shot, height, width) tensor, got {_shape(support_masks)}")
    if support_pixel_values.shape[1] == 0:
        raise ValueError("support_pixel_values holds no support image (shot = 0); give at least one per query")
    if support_masks.shape[:2] != support_pixel_values.shape[:2]:
        raise ValueError(
            f"support_masks {tuple(support_masks.shape)} and support_pixel_values "
            f"{tuple(support_pixel_values.shape)} disagree on batch size or shot"
        )
    if support_masks.shape[2:] != support_pixel_values.shape[3:]:
        raise ValueError(
            f"support_masks size {tuple(support_masks.shape[2:])} differs from the support image size "
            f"{tuple(support_pixel_values.shape[3:])}"
        )
    if batch_size is not None and support_pixel_values.shape[0] != batch_size:
        raise ValueError(
            f"support_pixel_values holds {support_pixel_values.shape[0]} support sets but pixel_values holds "
            f"{batch_size} queries"
        )
    _check_pixels("support_pixel_values", support_pixel_values, device, min_size)
    _check_mask_values("support_masks", support_masks, device)
    if require_target:
        has_target = (support_masks == 1).flatten(2).any(-1)
        if not bool(has_target.all()):
            empty = [tuple(i) for i in (~has_target).nonzero().tolist()]
            raise ValueError(
                f"support_masks has no target pixel (value 1) for (batch, shot) index {empty}; every support "
                "image needs at least one pixel of the class"
            )
