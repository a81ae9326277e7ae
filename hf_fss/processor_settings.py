"""
The image processor's settings and their checks: the ImageNet normalisation, the resampling filters OpenCV has, and
the validation of `image_size`, `size_divisor`, `image_mean` / `image_std`, `resample` and the on / off flags, shared
by the constructor, `from_dict` (so `AutoImageProcessor` runs them) and `load_image_processor`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import cv2
import numpy as np
from transformers.image_utils import PILImageResampling

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The ImageNet RGB mean and standard deviation, in [0, 1]: hf_fss's one normalisation (also used in training)."""

_CV2_INTERPOLATION = {
    PILImageResampling.NEAREST: cv2.INTER_NEAREST,
    PILImageResampling.BILINEAR: cv2.INTER_LINEAR,
    PILImageResampling.BICUBIC: cv2.INTER_CUBIC,
    PILImageResampling.LANCZOS: cv2.INTER_LANCZOS4,
    PILImageResampling.BOX: cv2.INTER_AREA,
}


_FLAG_NAMES = ("upscale_small_images", "do_normalize", "pad_with_mean")
_METADATA_KEYS = ("feature_extractor_type", "processor_class", "_processor_class", "auto_map")
"""Keys transformers itself writes into or reads from a processor's settings, passed on to it untouched."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _checked_settings(image_size: Any, size_divisor: Any, image_mean: Any, image_std: Any, resample: Any) -> tuple:
    """
    The constructor's checks: `(size_divisor, image_mean, image_std, resample)`, `size_divisor=None` read as 1, the
    mean and std as lists of floats (the ImageNet values for `None`), `resample` as a `PILImageResampling`.

    Raises:
        `ValueError` naming the setting: `image_size` / `size_divisor` not a positive int, `size_divisor` above
            `image_size`, a mean or std that is not 3 numbers in [0, 1] (NaN, or a 0-255 mean such as
            `[124, 116, 104]`) or a std not positive, a resample without OpenCV filter.
    """
    if not _is_int(image_size) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
    if size_divisor is None:
        size_divisor = 1
    if not _is_int(size_divisor) or size_divisor < 1:
        raise ValueError(f"`size_divisor` must be a positive int, got {size_divisor!r}")
    if size_divisor > image_size:
        raise ValueError(f"`size_divisor` ({size_divisor}) must not exceed `image_size` ({image_size})")
    image_mean, image_std = _checked_mean_std(
        IMAGENET_MEAN if image_mean is None else image_mean, IMAGENET_STD if image_std is None else image_std
    )
    try:
        resample = PILImageResampling(resample)
    except ValueError as err:
        raise ValueError(f"`resample` must be a PILImageResampling value, got {resample!r}") from err
    if resample not in _CV2_INTERPOLATION:
        raise ValueError(
            f"`resample`={resample!r} has no OpenCV counterpart; use one of {[r.name for r in _CV2_INTERPOLATION]}"
        )
    return size_divisor, image_mean, image_std, resample


def _checked_mean_std(image_mean: Any, image_std: Any) -> tuple[list[float], list[float]]:
    """
    The mean and std as lists of 3 floats in [0, 1], a std above 0. Pixels are normalised as
    `(x / 255 - mean) / std`, so 0-255 values (`[124, 116, 104]`) would silently give near-constant images, and
    NaN would blame the user's images later.

    Raises:
        `ValueError` naming the setting and saying the fix.
    """
    values = {"image_mean": image_mean, "image_std": image_std}
    for name, given in values.items():
        if not isinstance(given, list | tuple | np.ndarray) or not all(_is_real(v) for v in given):
            raise ValueError(f"`{name}` must be a list of 3 numbers (RGB) in [0, 1], got {given!r}")
    if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
        raise ValueError(
            f"`image_mean` and `image_std` need 3 values (RGB) and a positive std, got {image_mean} and {image_std}"
        )
    imagenet = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    for name, given in values.items():
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in given):
            raise ValueError(
                f"`{name}` must hold values in [0, 1] (the scale of pixels x / 255), got {list(given)}; divide "
                f"0-255 values by 255 (ImageNet's is {imagenet[name]})"
            )
    return [float(v) for v in image_mean], [float(v) for v in image_std]


def _checked_flag(name: str, value: Any) -> bool:
    """A `True` / `False` setting; a string such as `"yes"` (truthy, even `"false"`) is refused naming `name`."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"`{name}` must be true or false, got {value!r}")
    return bool(value)
