"""
Decoding of images, masks, boxes and label maps: one policy for every input form (PIL image, array, tensor, file
path or URL), used by the image processor ([`~FewShotSegmentationImageProcessor.to_rgb_array`] and
[`~FewShotSegmentationImageProcessor.annotation_to_mask`]) and through it by the pipeline and the Space.

Every decoder takes the name of the argument its value came in as, and its errors (`ValueError`) name it: the
processor passes `support_masks[0][1] (query 0, shot 1)`, the pipeline `support_mask[1]`, so neither rewrites the
other's messages. `nest_per_query` and `nest_class_ids` read the list forms of a batch (one item, one list, one
list per query) the same way.

Inputs accepted as images: `PIL.Image.Image`, `np.ndarray` or `torch.Tensor` of shape `(H, W)`, `(H, W, 1)`,
`(H, W, 3)` or `(H, W, 4)` (channels-first `(C, H, W)` is recognised too; a shape whose both ends are 1..4, such
as `(3, 40, 3)`, is a `ValueError` asking for a PIL image; a PIL image, even 3x3, is never read channels-first),
uint8 in `[0, 255]` or float in `[0, 1]` (float arrays with values above 1 are taken as `[0, 255]`; float16 and
bfloat16 tensors are read as float32; a tensor on a GPU is copied to the CPU, one on the `meta` device, which holds
no values, is a `ValueError`), or a file path (`str` / `os.PathLike`, also
an `http(s)://` URL). Grayscale is repeated to RGB. An image with transparency (RGBA, grayscale + alpha, a
palette with a transparent colour, an `(H, W, 4)` array) is composited onto white: `rgb * a + 255 * (1 - a)`
with `a` the alpha in [0, 1], so a fully opaque RGBA image equals its RGB channels.

One rule for bit depth, whatever the input form: an unsigned integer image is scaled by its type's range, so a
16-bit image (a 16-bit PNG opened as mode `"I;16"`, from a path or with `Image.open`, or a `uint16` array or
tensor) is divided by 257 (65535 = white), the way image viewers show it, never clipped. Signed integer arrays
(e.g. `np.array([[0, 255]])`, PIL mode `"I"`) have no such range: they must lie in [0, 255], else a
`ValueError` says how to pass them (as `uint16`, or as floats in [0, 1]).

EXIF orientation is applied the same way to every input form that carries it: an image or mask given as a file
path and a PIL image (e.g. from `Image.open`) are both turned upright (`PIL.ImageOps.exif_transpose`) before
anything else, so a photo and a mask drawn on it as displayed stay aligned. Arrays and tensors carry no EXIF
and are taken as they are.

Annotations (`support_masks`, `segmentation_maps`), each one of:

- a mask (PIL image, array, tensor or file path) of exactly the image's size (another size is a `ValueError`
  naming both sizes), white = target: boolean, `{0, 1}` (1 = target), `{0, 255}` (255 = target) or
  `{0, 1, 255}` (1 = target, 255 = ignore); any other grayscale mask (anti-aliased, JPEG) is thresholded,
  target where the value is at least 128 (at least 0.5 for a float mask in [0, 1]; a 16-bit mask is read on
  its own scale: `{0, 65535}` is binary, and the threshold is 32768). -1 marks ignore like 255 (`{0, 1, -1}`).
  Integer values that are all below 128 or 255 (e.g. `{0, 3, 7}`) are taken for a label map and need a class
  id, unless they are a faint anti-aliased mask (values between 0 and the maximum that only ever form edges, never
  a 3x3 region, e.g. a thin stroke downscaled with bilinear): that one is target where it is at least half its
  maximum. A `(C, H, W)` array with C in 2..4 (stacked masks) is a `ValueError`. An RGB mask counts by
  its brightest channel (the same rules); an RGBA (or grayscale + alpha) mask whose alpha varies is target where
  alpha > 0, one with constant alpha counts by its colour;
- a label map together with a class id (`support_class_ids` / `class_ids`): target where `label == class_id`,
  ignore where `label` is 255 or -1, background elsewhere. PIL palette (`"P"`) images are read as palette indices;
- a box `(x0, y0, x1, y1)` in pixel coordinates of its image (rounded to integers): target on rows `y0..y1-1`
  and columns `x0..x1-1`, background elsewhere. Class ids do not apply to boxes.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IGNORE_INDEX",
    "MASK_THRESHOLD",
    "decode_annotation",
    "decode_image",
    "describe",
    "is_box",
    "is_class_id",
    "is_leaf",
    "nest_per_query",
    "nest_supports",
    "nest_class_ids",
]

IGNORE_INDEX = 255
"""Mask value of pixels that are neither target nor background (padding, object borders)."""
MASK_THRESHOLD = 128
"""A grayscale mask (other than {0, 1}, {0, 255} or {0, 1, 255}) is target where its value is at least this."""
_EXIF_ORIENTATION = 0x0112


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def is_box(value: Any) -> bool:
    """`(x0, y0, x1, y1)` given as a tuple / list of four numbers or a 1-D array / tensor of four numbers."""
    if isinstance(value, list | tuple):
        return len(value) == 4 and all(_is_number(v) for v in value)
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.ndim == 1 and value.shape[0] == 4
    return False


def is_class_id(value: Any) -> bool:
    """`None` (no class: a binary mask or a box) or an int (a numpy integer too), never a bool."""
    return value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_))


def describe(value: Any) -> str:
    """A short description of `value` for error messages: type and shape / dtype / mode, or a clipped repr."""
    if isinstance(value, np.ndarray | torch.Tensor):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, Image.Image):
        return f"PIL image of mode {value.mode!r} and size {value.width}x{value.height} (w x h)"
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def _preview_values(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} distinct values)"


def _looks_like_label_map(values: np.ndarray) -> bool:
    """Sorted distinct mask values that could be class ids (integers below 128, maybe 255), not a grayscale mask."""
    if not np.all(np.mod(values, 1) == 0) or values[0] < 0:
        return False
    mid = values[(values >= MASK_THRESHOLD) & (values < IGNORE_INDEX)]
    return mid.size == 0 and bool(np.any((values > 1) & (values < MASK_THRESHOLD)))


def _is_faint_grayscale(array: np.ndarray, values: np.ndarray) -> bool:
    """
    Whether a mask whose values could be class ids (all below 128) is rather a faint anti-aliased mask (a thin
    stroke downscaled with bilinear): it has values between 0 and its maximum, and none of them fills a 3x3
    neighbourhood anywhere. The classes of a label map are regions with an inside; anti-aliasing ramps are edges.
    """
    labels = np.where(array == IGNORE_INDEX, 0, array).astype(np.float32)
    top = float(labels.max())
    between = (labels > 0) & (labels < top)
    if not between.any():
        return False
    kernel = np.ones((3, 3), np.uint8)
    flat = cv2.erode(labels, kernel, borderType=cv2.BORDER_REPLICATE) == cv2.dilate(
        labels, kernel, borderType=cv2.BORDER_REPLICATE
    )
    return not bool((between & flat).any())


def _open_image(path: str | os.PathLike, name: str) -> Image.Image:
    source = os.fspath(path)
    try:
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            from transformers.image_utils import load_image

            return load_image(source)
        image = Image.open(source)
        image.load()
        return _upright(image)
    except Exception as err:  # any reader failure becomes one ValueError naming the argument and the path
        raise ValueError(f"`{name}`: could not read image file {source!r} ({type(err).__name__}: {err})") from err


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is displayed: its EXIF orientation (tag 274) applied, for a file path and a PIL image alike."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """An upright PIL image as (H, W) (16/32-bit modes) or (H, W, 3 / 4) (RGB / RGBA) array."""
    image = _upright(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;"):  # 16/32-bit: scaled by _to_0_255
        return np.asarray(image)
    if image.mode not in ("RGB", "RGBA"):
        transparent = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if transparent else "RGB")
    return np.asarray(image)


def _to_numpy(value: Any, name: str) -> Any:
    """
    A tensor on any device (a GPU one is copied to the CPU) as a numpy array; bfloat16, which numpy lacks, as
    float32 (exact). Anything else is returned as it is.

    Raises:
        `ValueError` naming `name`: a tensor on the `meta` device, which holds no values.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_meta:
        raise ValueError(f"`{name}` is a tensor on the meta device, which holds no values; pass a tensor with data")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.numpy()


def _channels_last(array: np.ndarray, name: str) -> np.ndarray:
    """
    Move a leading channel axis (C, H, W) with C in 1..4 to the end; (H, W, C) arrays pass unchanged.

    Raises:
        `ValueError`: both ends are in 1..4 (`(3, 40, 3)`: a 3-wide channels-first image or a 3-high
            channels-last one), which no rule can tell apart.
    """
    if array.ndim != 3 or array.shape[0] not in (1, 2, 3, 4):
        return array
    if array.shape[-1] in (1, 2, 3, 4):
        raise ValueError(
            f"`{name}` has shape {tuple(array.shape)}, which reads as channels-first (C, H, W) and channels-last "
            "(H, W, C) alike; pass it as a PIL image (Image.fromarray of the (H, W, C) uint8 array)"
        )
    return np.moveaxis(array, 0, -1)


def decode_image(image: Any, name: str) -> np.ndarray:
    """
    Any accepted image input (see the module docstring) -> float32 array (H, W, 3) with values in [0, 255].
    Grayscale is repeated to RGB; an image with an alpha channel is composited onto white
    (`rgb * alpha + 255 * (1 - alpha)`).

    Args:
        image: PIL image, array, tensor, file path or `http(s)://` URL.
        name (`str`): the argument `image` came in as (`"images[1]"`, `"support_image"`), named by every error.

    Raises:
        `ValueError`: an unreadable file, an unsupported type, shape or dtype, values out of range, NaN.
    """
    if isinstance(image, str | os.PathLike):
        image = _open_image(image, name)
    if isinstance(image, Image.Image):
        # A decoded PIL image is (H, W) or (H, W, C) by construction: no channels-first reading, even at 3x3.
        array = _pil_to_array(image)
    else:
        array = _to_numpy(image, name)
        if not isinstance(array, np.ndarray):
            raise ValueError(
                f"`{name}` must be a PIL image, a numpy array, a torch tensor or a file path, got {describe(image)}"
            )
        array = _channels_last(array, name)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"`{name}` must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"`{name}` is empty: shape {array.shape}")
    rgb = _to_0_255(array, name)
    if rgb.shape[-1] == 4:  # transparent pixels show white, whatever the input type
        alpha = rgb[..., 3:] / np.float32(255)
        rgb = rgb[..., :3] * alpha + np.float32(255) * (1 - alpha)
    return np.ascontiguousarray(rgb, dtype=np.float32)


def _to_0_255(array: np.ndarray, name: str) -> np.ndarray:
    """
    bool, unsigned integers (scaled by their type's range: uint8 as is, uint16 / 257), signed integers in
    [0, 255] or floats in [0, 1] (or [0, 255]) -> float32 in [0, 255].
    """
    if array.dtype == np.bool_:
        return array.astype(np.float32) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"`{name}` contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"`{name}`: float images must lie in [0, 1] (or [0, 255]), got [{low}, {high}]")
        return array * 255 if high <= 1.0 else array
    if np.issubdtype(array.dtype, np.unsignedinteger):
        if array.dtype.itemsize == 1:
            return array.astype(np.float32)
        # 16-bit (and wider) images use their type's whole range: 65535 is white, as in any image viewer.
        return (array.astype(np.float64) * (255.0 / np.iinfo(array.dtype).max)).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"`{name}`: a signed integer ({array.dtype}) image must lie in [0, 255], got [{low}, {high}]; "
                "pass a 16-bit image as uint16 (scaled by 65535) or as floats in [0, 1]"
            )
        return array.astype(np.float32)
    raise ValueError(f"`{name}` has unsupported dtype {array.dtype}")


def _annotation_to_array(annotation: Any, name: str) -> np.ndarray:
    """Raw annotation values: palette images give indices, RGB(A) images give their channels."""
    if isinstance(annotation, str | os.PathLike):
        annotation = _open_image(annotation, name)
    if isinstance(annotation, Image.Image):
        annotation = _upright(annotation)
        if annotation.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            annotation = annotation.convert("RGB")
        # np.array keeps palette ("P") images as indices; never a luminance conversion.
        return np.array(annotation)
    annotation = _to_numpy(annotation, name)
    if not isinstance(annotation, np.ndarray):
        raise ValueError(
            f"`{name}` must be a mask (PIL image, numpy array, torch tensor or file path) or a box "
            f"(x0, y0, x1, y1), got {describe(annotation)}"
        )
    if annotation.ndim == 3 and annotation.shape[0] in (2, 3, 4) and annotation.shape[-1] > 4:
        # Several stacked masks, far more often than a channels-first colour mask: never one RGB mask.
        raise ValueError(
            f"`{name}` has shape {tuple(annotation.shape)}: one annotation per support image is an (H, W) mask; "
            f"pass {annotation.shape[0]} support images with a list of {annotation.shape[0]} masks, or a colour "
            "mask as (H, W, C)"
        )
    array = _channels_last(annotation, name)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(f"`{name}` must have shape (H, W) or (H, W, C) with C in 1..4, got {tuple(annotation.shape)}")
    return array


def decode_annotation(
    annotation: Any,
    size: tuple[int, int],
    class_id: int | None = None,
    name: str = "support_masks",
    class_ids_name: str = "support_class_ids",
    allow_empty: bool = False,
) -> np.ndarray:
    """
    Turn one annotation (binary mask, label map with `class_id`, or box) into a `{0, 1, 255}` mask.

    Args:
        annotation: binary mask, label map or box `(x0, y0, x1, y1)`; see the module docstring for the rules.
        size (`tuple[int, int]`): `(height, width)` of the annotated image, which the mask must match.
        class_id (`int`, *optional*): class of a label map to segment.
        name (`str`): the argument `annotation` came in as, named by every error.
        class_ids_name (`str`): the argument that carries class ids, named when a label map comes without one.
        allow_empty (`bool`, *optional*, defaults to `False`): accept a mask without target pixel.

    Returns:
        `np.ndarray` of shape `(height, width)`, dtype uint8, values 0 (background), 1 (target), 255 (ignore).

    Raises:
        `ValueError`: an undecodable annotation, a mask of another size than its image (both sizes named), a
            label map without class id, a box with `x1 <= x0` or `y1 <= y0`, or no target pixel (unless
            `allow_empty`).
    """
    height, width = (int(v) for v in size)
    if is_box(annotation):
        mask = _box_to_mask(annotation, height, width, name)
    else:
        array = _annotation_to_array(annotation, name)
        if array.shape[:2] != (height, width):
            raise ValueError(
                f"`{name}` has size {array.shape[0]}x{array.shape[1]} (h x w) but its image has size "
                f"{height}x{width} (h x w); a mask must have the image's size"
            )
        if class_id is not None:
            mask = _label_map_to_mask(array, int(class_id), name)
        else:
            mask = _binary_to_mask(array, name, class_ids_name)
    if not allow_empty and not (mask == 1).any():
        if is_box(annotation):
            detail = f" (the box lies outside the {width}x{height} (w x h) image)"
        else:
            detail = f" of class {class_id}" if class_id is not None else ""
        raise ValueError(f"`{name}` has no target pixel{detail}; every support annotation must mark the target")
    return mask


def _box_to_mask(box: Any, height: int, width: int, name: str) -> np.ndarray:
    """`(x0, y0, x1, y1)`, rounded to integers -> target on rows `y0..y1-1` and columns `x0..x1-1`, clipped."""
    values = box if isinstance(box, list | tuple) else _to_numpy(box, name).tolist()
    coords = [float(v) for v in values]
    if not all(np.isfinite(coords)):
        raise ValueError(f"`{name}`: box {tuple(coords)} has non-finite coordinates")
    x0, y0, x1, y1 = (int(round(v)) for v in coords)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"`{name}`: box (x0, y0, x1, y1) = {tuple(coords)} needs x0 < x1 and y0 < y1")
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[max(y0, 0) : max(min(y1, height), 0), max(x0, 0) : max(min(x1, width), 0)] = 1
    return mask


def _label_map_to_mask(array: np.ndarray, class_id: int, name: str) -> np.ndarray:
    """Target where `array == class_id`, ignore where it is 255 or -1; a colour label map is refused."""
    if array.ndim == 3:
        channels = array[..., :3] if array.shape[-1] == 4 else array[..., :1]
        if not (channels == channels[..., :1]).all():
            raise ValueError(
                f"`{name}`: a label map used with a class id must be single-channel (e.g. a PIL 'L' or 'P' "
                f"image), got a colour image of shape {array.shape}"
            )
        array = channels[..., 0]
    mask = np.zeros(array.shape, dtype=np.uint8)
    mask[(array == IGNORE_INDEX) | (array == -1)] = IGNORE_INDEX
    mask[array == class_id] = 1
    return mask


def _binary_to_mask(array: np.ndarray, name: str, class_ids_name: str) -> np.ndarray:
    """A binary or grayscale mask (white = target) -> `{0, 1, 255}`; see the module docstring for the rules."""
    if array.ndim == 3:
        alpha = array[..., -1] if array.shape[-1] in (2, 4) else None
        if alpha is not None and alpha.min() != alpha.max():
            return (alpha > 0).astype(np.uint8)
        colour = array[..., :1] if array.shape[-1] == 2 else array[..., :3]
        array = colour.max(axis=-1)  # an RGB mask counts by its brightest channel
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    values = np.unique(array)
    present = set(values.tolist())
    if values[0] < 0:  # -1, torch's usual ignore value, reads like 255; other negatives mean nothing here
        if not present <= {-1, 0, 1, 255}:
            raise ValueError(
                f"`{name}` has negative values {_preview_values(values[values < 0])}; a mask holds 0 "
                "(background), 1 or 255 (target) and 255 or -1 (ignore)"
            )
        array = np.where(array == -1, IGNORE_INDEX, array.astype(np.int64))  # int8 cannot hold 255
        values = np.unique(array)
        present = set(values.tolist())
    mask = np.zeros(array.shape, dtype=np.uint8)
    white, threshold = IGNORE_INDEX, MASK_THRESHOLD
    if np.issubdtype(array.dtype, np.unsignedinteger) and array.dtype.itemsize > 1:
        white = int(np.iinfo(array.dtype).max)  # a 16-bit mask is read on its own scale, as 16-bit images
        threshold = (white + 1) // 2
    if present <= {0, 1}:
        mask[array == 1] = 1
    elif present <= {0, 255}:
        mask[array == 255] = 1
    elif present <= {0, 1, 255}:
        mask[array == 1] = 1
        mask[array == 255] = IGNORE_INDEX
    elif present <= {0, white}:
        mask[array == white] = 1
    elif np.issubdtype(array.dtype, np.floating) and values[0] >= 0 and values[-1] <= 1:
        mask[array >= 0.5] = 1  # a soft mask in [0, 1]
    elif _looks_like_label_map(values) and _is_faint_grayscale(array, values):
        mask[array >= values[values != IGNORE_INDEX][-1] / 2] = 1  # faint: thresholded at half its maximum
    elif _looks_like_label_map(values):
        raise ValueError(
            f"`{name}` has values {_preview_values(values)}: a label map rather than a mask (white = target); "
            f"pass `{class_ids_name}` with the class to segment (a faint grayscale mask: scale it to 0..255)"
        )
    else:
        mask[array >= threshold] = 1  # a grayscale mask: white = target
    return mask


# ------------------------------------------------------------------ one item or a list of them, per query


def is_leaf(value: Any) -> bool:
    """A single image / annotation rather than a list of them."""
    return not isinstance(value, list | tuple) or is_box(value)


def nest_per_query(value: Any, name: str, batch_size: int | None) -> list[list[Any]]:
    """
    One item, a flat list (one query) or a list of lists (one per query) -> list of `batch_size` lists (a box is one
    item). `batch_size=None`: as many as given.

    Raises:
        `ValueError` naming `name`: empty, a count other than `batch_size`, or items and lists mixed.
    """
    if is_leaf(value):
        value = [value]
    if len(value) == 0:
        raise ValueError(f"`{name}` is empty")
    leaves = [is_leaf(v) for v in value]
    if all(leaves):
        nested = [list(value)]
        if batch_size is not None and batch_size != 1:
            raise ValueError(
                f"`{name}` is a flat list of {len(value)} items but there are {batch_size} query images; "
                f"pass one list per query ({batch_size} lists)"
            )
    elif not any(leaves):
        nested = [list(v) for v in value]
        if batch_size is not None and len(nested) != batch_size:
            raise ValueError(
                f"`{name}` has {len(nested)} lists but there are {batch_size} query images; pass one list per query"
            )
    else:
        raise ValueError(f"`{name}` mixes single items and lists; pass a list per query (a list of lists)")
    return nested


def nest_class_ids(value: Any, name: str, counts: list[int]) -> list[list[int | None]]:
    """
    `None`, one int, one int (or `None`) per query, or one list per query -> one id per annotation: `counts[q]` ids
    for query `q` (a flat list of `counts[0]` ids is read as one per support of a single query).

    Raises:
        `ValueError` naming `name`: not an int or a list of them, or counts other than `counts`.
    """
    batch_size = len(counts)
    if is_class_id(value):
        return [[value] * count for count in counts]
    if isinstance(value, np.ndarray | torch.Tensor):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise ValueError(f"`{name}` must be an int, a list of ints or a list of lists of ints, got {describe(value)}")
    value = list(value)
    if batch_size == 1 and counts[0] > 1 and len(value) == counts[0] and all(is_class_id(v) for v in value):
        value = [value]  # a flat list with one id per support image of the single query
    if len(value) != batch_size:
        raise ValueError(f"`{name}` has {len(value)} entries but there are {batch_size} queries: {value!r}")
    nested = []
    for index, (item, count) in enumerate(zip(value, counts)):
        if is_class_id(item):
            nested.append([item] * count)
        elif isinstance(item, list | tuple) and len(item) == count and all(is_class_id(v) for v in item):
            nested.append(list(item))
        else:
            raise ValueError(f"`{name}[{index}]` must be an int or a list of {count} ints, got {item!r}")
    return nested


def nest_supports(support_images: Any, support_masks: Any, support_class_ids: Any, batch_size: int | None) -> tuple:
    """
    The processor's support arguments -> `(images, masks, class_ids)`, each a list of B lists of K items (the same K
    for every query; B = `batch_size`, or as many as given when `None`): one annotation and one class id per image.

    Raises:
        `ValueError` naming the argument: no `support_masks`, K differing between queries or 0, an annotation count
            other than the image count, or a list form `nest_per_query` / `nest_class_ids` refuse.
    """
    if support_masks is None:
        raise ValueError("`support_masks` is required with `support_images` (one annotation per support image)")
    images_nested = nest_per_query(support_images, "support_images", batch_size)
    shots = [len(row) for row in images_nested]
    if len(set(shots)) != 1:
        raise ValueError(f"`support_images`: every query needs the same number of support images K, got {shots}")
    if shots[0] == 0:
        raise ValueError("`support_images` has no support image (K=0)")
    masks_nested = nest_per_query(support_masks, "support_masks", len(images_nested))
    for index, (image_row, mask_row) in enumerate(zip(images_nested, masks_nested)):
        if len(mask_row) != len(image_row):
            raise ValueError(
                f"`support_masks` has {len(mask_row)} masks for query {index} but `support_images` has "
                f"{len(image_row)} images; pass one annotation per support image"
            )
    ids_nested = nest_class_ids(support_class_ids, "support_class_ids", shots)
    return images_nested, masks_nested, ids_nested
