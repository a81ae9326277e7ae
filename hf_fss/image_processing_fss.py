"""Image processor for few-shot semantic segmentation.

Geometry follows the PFENet test protocol (`util/transform.py::test_Resize` and `ori_resize` in `test.py` of
dvlab-research/PFENet), shared by the PFENet-derived code bases:

1. an image whose longer side exceeds `image_size` is scaled (OpenCV, bilinear) so that its longer side becomes
   `image_size`, the shorter side `int(short * image_size / long)`, and both sides are then floored to multiples of
   `size_divisor` (473 -> 472); smaller images keep their size;
2. the result is placed at the top-left corner of an `image_size x image_size` canvas; masks are scaled with nearest
   neighbour and padded with the ignore value 255;
3. pixels are normalised with the ImageNet mean and standard deviation.

Post-processing maps the `image_size x image_size` logits back to the original image: for a resized image the
logits are scaled to `L x L`, `L = max(h, w)` (bilinear, `align_corners=True`) and cropped to `h x w`, as PFENet's
`ori_resize` evaluation does, but only the `h x w` corner is computed (memory grows with the image, not `L x L`);
for an image that kept its size the `h x w` corner is cropped directly.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FewShotSegmentationImageProcessor",
    "FewShotSegmentationImageProcessorKwargs",
    "load_image_processor",
]

IGNORE_INDEX = 255
"""Mask value of pixels that are neither target nor background (padding, object borders)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The ImageNet RGB mean and standard deviation, in [0, 1]: hf_fss's one normalisation (also used in training)."""
_EXIF_ORIENTATION = 0x0112
MASK_THRESHOLD = 128
"""A grayscale mask (other than {0, 1}, {0, 255} or {0, 1, 255}) is target where its value is at least this."""
SQUARE_TO_OUTPUT_LIMIT = 4
"""Post-processing builds PFENet's `L x L` logits square only while it is at most this many times the output."""
_OPTION_NAMES = (
    "image_size",
    "size_divisor",
    "upscale_small_images",
    "do_normalize",
    "image_mean",
    "image_std",
    "resample",
    "pad_with_mean",
)

_CV2_INTERPOLATION = {
    PILImageResampling.NEAREST: cv2.INTER_NEAREST,
    PILImageResampling.BILINEAR: cv2.INTER_LINEAR,
    PILImageResampling.BICUBIC: cv2.INTER_CUBIC,
    PILImageResampling.LANCZOS: cv2.INTER_LANCZOS4,
    PILImageResampling.BOX: cv2.INTER_AREA,
}


class FewShotSegmentationImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    image_size (`int`, *optional*, defaults to `self.image_size`):
        Side of the square canvas every image is placed on.
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        Both sides of a resized image are floored to a multiple of this value.
    upscale_small_images (`bool`, *optional*, defaults to `self.upscale_small_images`):
        Whether images smaller than `image_size` are scaled up as well.
    pad_with_mean (`bool`, *optional*, defaults to `self.pad_with_mean`):
        Fill the canvas with the mean colour (0 after normalisation) instead of black.

    These, and `do_normalize`, `image_mean`, `image_std` and `resample`, can be passed to a call
    (`processor(images=..., image_size=321)`) and then apply to that call only.
    """

    image_size: int
    size_divisor: int
    upscale_small_images: bool
    pad_with_mean: bool


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_box(value: Any) -> bool:
    """`(x0, y0, x1, y1)` given as a tuple / list of four numbers or a 1-D array / tensor of four numbers."""
    if isinstance(value, list | tuple):
        return len(value) == 4 and all(_is_number(v) for v in value)
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.ndim == 1 and value.shape[0] == 4
    return False


def _is_leaf(value: Any) -> bool:
    """A single image / annotation rather than a list of them."""
    return not isinstance(value, list | tuple) or _is_box(value)


def _is_class_id(value: Any) -> bool:
    return value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_))


def _describe(value: Any) -> str:
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


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


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


def _align_corners_axis(count: int, size: int, longer: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Indices and weights of the first `count` samples of a `size -> longer` bilinear `align_corners=True` resize,
    computed as `F.interpolate` does on the CPU (float32 scale `(size - 1) / (longer - 1)`, source `scale * i`)."""
    scale = np.float32(size - 1) / np.float32(longer - 1) if longer > 1 else np.float32(0)
    source = torch.arange(count, dtype=torch.float32, device=device) * torch.tensor(scale, device=device)
    index0 = source.floor().long().clamp(max=size - 1)
    weight1 = (source - index0).clamp(0, 1)
    index1 = torch.clamp(index0 + 1, max=size - 1)
    return index0, index1, 1 - weight1, weight1


def _resize_then_crop(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """
    `F.interpolate(logits, (L, L), mode="bilinear", align_corners=True)[..., :height, :width]` with `L =
    max(height, width)`, without the `L x L` square: only the `height x width` corner is computed, from the source
    rows and columns it reads (columns first, then rows, the order of PyTorch's own kernel), so memory grows with
    the output, not with `L ** 2`.
    """
    size = logits.shape[-1]
    longer = max(height, width)
    row0, row1, row_w0, row_w1 = _align_corners_axis(height, size, longer, logits.device)
    col0, col1, col_w0, col_w1 = _align_corners_axis(width, size, longer, logits.device)
    source = logits[..., : int(row1.max()) + 1, :]
    columns = source[..., col0] * col_w0 + source[..., col1] * col_w1  # (N, C, rows read, width)
    return columns[..., row0, :] * row_w0[:, None] + columns[..., row1, :] * row_w1[:, None]


def _keep_target_pieces(mask: np.ndarray, resized: np.ndarray) -> np.ndarray:
    """
    `resized`, the nearest-neighbour downscaled `mask`, with every 8-connected piece of the target (`mask == 1`)
    that nearest neighbour dropped drawn back where it lies: each of its pixels marks the output pixel whose
    footprint holds it (max pooling of that piece). Pieces nearest neighbour kept are left as they are, so ordinary
    masks are resized exactly as PFENet does, and a target present at full size is always present after.
    """
    target = (mask == 1).astype(np.uint8)
    if not target.any():
        return resized
    count, pieces = cv2.connectedComponents(target, connectivity=8, ltype=cv2.CV_32S)
    height, width = mask.shape
    new_height, new_width = resized.shape
    sampled = cv2.resize(pieces, dsize=(new_width, new_height), interpolation=cv2.INTER_NEAREST)
    lost = np.setdiff1d(np.arange(1, count), sampled)
    if lost.size == 0:
        return resized
    ys, xs = np.nonzero(np.isin(pieces, lost))
    resized = resized.copy()
    resized[ys * new_height // height, xs * new_width // width] = 1
    return resized


class FewShotSegmentationImageProcessor(BaseImageProcessor):
    r"""
    Constructs an image processor for few-shot semantic segmentation: query images, support images with their
    annotations (binary masks, label maps plus a class id, or boxes) and optional query labels become fixed-size
    tensors following the PFENet test protocol, and model logits are mapped back to the original images.

    Args:
        image_size (`int`, *optional*, defaults to 473):
            Side `S` of the square canvas. An image whose longer side exceeds `S` is scaled so its longer side
            becomes `S` (keeping the aspect ratio, the shorter side computed as `int(short * S / long)`); smaller
            images keep their size unless `upscale_small_images=True`. The (resized) image sits at the top-left
            corner of the canvas.
        size_divisor (`int`, *optional*, defaults to 8):
            Both sides of a resized image are floored to a multiple of this value (PFENet turns 473 into 472).
            Images that are not resized are not floored.
        upscale_small_images (`bool`, *optional*, defaults to `False`):
            Whether images whose longer side is smaller than `image_size` are scaled up to it as well (same
            formula as for large images). PFENet keeps them at their size.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise pixels as `(x / 255 - image_mean) / image_std`. When `False`, pixel values are
            only rescaled to `[0, 1]`.
        image_mean (`list[float]`, *optional*, defaults to `[0.485, 0.456, 0.406]`):
            Per-channel RGB mean (ImageNet).
        image_std (`list[float]`, *optional*, defaults to `[0.229, 0.224, 0.225]`):
            Per-channel RGB standard deviation (ImageNet).
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Filter for resizing images, applied with OpenCV as in the reference code (`NEAREST`, `BILINEAR`,
            `BICUBIC`, `LANCZOS` or `BOX` -> `cv2.INTER_NEAREST`, `INTER_LINEAR`, `INTER_CUBIC`, `INTER_LANCZOS4`,
            `INTER_AREA`). Masks are always resized with nearest neighbour.
        pad_with_mean (`bool`, *optional*, defaults to `False`):
            Fill the canvas around the image with the mean colour, so the padding is exactly 0 after
            normalisation. By default the canvas is black before normalisation (i.e. `-mean / std` after it), which
            is what the official PFENet / NTRENet `test_Resize` does, so official checkpoints see what they were
            evaluated on.

    Inputs accepted as images: `PIL.Image.Image`, `np.ndarray` or `torch.Tensor` of shape `(H, W)`, `(H, W, 1)`,
    `(H, W, 3)` or `(H, W, 4)` (channels-first `(C, H, W)` is recognised too; a shape whose both ends are 1..4, such
    as `(3, 40, 3)`, is a `ValueError` asking for a PIL image), uint8 in `[0, 255]` or float in
    `[0, 1]` (float arrays with values above 1 are taken as `[0, 255]`), or a file path (`str` / `os.PathLike`, also
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

    model_input_names = ["pixel_values", "support_pixel_values", "support_masks"]
    valid_kwargs = FewShotSegmentationImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 473,
        size_divisor: int = 8,
        upscale_small_images: bool = False,
        do_normalize: bool = True,
        image_mean: list[float] | tuple[float, ...] | None = None,
        image_std: list[float] | tuple[float, ...] | None = None,
        resample: PILImageResampling | int = PILImageResampling.BILINEAR,
        pad_with_mean: bool = False,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if not isinstance(image_size, numbers.Integral) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
        if size_divisor is None:
            size_divisor = 1
        if not isinstance(size_divisor, numbers.Integral) or isinstance(size_divisor, bool) or size_divisor < 1:
            raise ValueError(f"`size_divisor` must be a positive int, got {size_divisor!r}")
        if size_divisor > image_size:
            raise ValueError(f"`size_divisor` ({size_divisor}) must not exceed `image_size` ({image_size})")
        image_mean = list(IMAGENET_MEAN if image_mean is None else image_mean)
        image_std = list(IMAGENET_STD if image_std is None else image_std)
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(
                f"`image_mean` and `image_std` need 3 values (RGB) and a positive std, got {image_mean} and {image_std}"
            )
        try:
            resample = PILImageResampling(resample)
        except ValueError as err:
            raise ValueError(f"`resample` must be a PILImageResampling value, got {resample!r}") from err
        if resample not in _CV2_INTERPOLATION:
            raise ValueError(
                f"`resample`={resample!r} has no OpenCV counterpart; use one of {[r.name for r in _CV2_INTERPOLATION]}"
            )
        self.image_size = int(image_size)
        self.size_divisor = int(size_divisor)
        self.upscale_small_images = bool(upscale_small_images)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.resample = resample
        self.pad_with_mean = bool(pad_with_mean)

    # ------------------------------------------------------------------------------------------------ geometry

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """
        Size `(new_height, new_width)` an image of size `(height, width)` takes on the canvas.

        PFENet's `find_new_hw`: when `max(height, width) > image_size` (or it is smaller and
        `upscale_small_images=True`) the longer side becomes `image_size` and the shorter one
        `int(short * image_size / long)`; both are then floored to multiples of `size_divisor` (a side that would
        floor to 0, possible only for extreme aspect ratios, keeps its unfloored length, at least 1). Otherwise the
        size is returned unchanged.

        Example: with the defaults, `(375, 500) -> (352, 472)` and `(100, 120) -> (100, 120)`.
        """
        height, width = int(height), int(width)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width} (h x w)")
        size = self.image_size
        longer = max(height, width)
        if longer == size or (longer < size and not self.upscale_small_images):
            return height, width
        if height >= width:
            ratio = size * 1.0 / height
            new_height, new_width = size, int(width * ratio)
        else:
            ratio = size * 1.0 / width
            new_height, new_width = int(height * ratio), size
        divisor = self.size_divisor
        new_height = (new_height // divisor) * divisor or max(new_height, 1)
        new_width = (new_width // divisor) * divisor or max(new_width, 1)
        return new_height, new_width

    def _fill_value(self) -> np.ndarray:
        if self.pad_with_mean:
            return (np.asarray(self.image_mean, dtype=np.float64) * 255).astype(np.float32)
        return np.zeros(3, dtype=np.float32)

    def resize_and_pad_image(self, image: Any, name: str = "images") -> np.ndarray:
        """
        Resize one image as PFENet does, place it on the canvas and normalise it.

        Args:
            image: any accepted image input (PIL image, array, tensor or path).
            name: argument name used in error messages.

        Returns:
            `np.ndarray` of shape `(3, image_size, image_size)` and dtype float32.
        """
        return self.resize_and_pad_rgb(self.to_rgb_array(image, name))

    def resize_and_pad_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """float32 (H, W, 3) array in [0, 255] -> normalised (3, S, S) canvas."""
        height, width = rgb.shape[:2]
        new_height, new_width = self.resized_size(height, width)
        if (new_height, new_width) != (height, width):
            rgb = cv2.resize(rgb, dsize=(new_width, new_height), interpolation=_CV2_INTERPOLATION[self.resample])
        size = self.image_size
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[:] = self._fill_value()
        canvas[:new_height, :new_width] = rgb
        if self.do_normalize:
            # PFENet subtracts mean * 255 and divides by std * 255 (computed in float64, applied in float32).
            mean = (np.asarray(self.image_mean, dtype=np.float64) * 255).astype(np.float32)
            std = (np.asarray(self.image_std, dtype=np.float64) * 255).astype(np.float32)
            canvas = (canvas - mean) / std
        else:
            canvas = canvas / np.float32(255)
        return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)

    def resize_and_pad_mask(self, mask: np.ndarray) -> np.ndarray:
        """
        Resize a `{0, 1, 255}` mask with nearest neighbour as PFENet does and pad it with 255.

        Small targets never vanish: when the mask is downscaled, a piece of the target (8-connected) that nearest
        neighbour would drop entirely (a 3x3 object, a 2-px stroke, a thin strip between sampled rows) is drawn at
        the output pixels that cover it (max pooling of that piece). Pieces nearest neighbour keeps are resized
        exactly as PFENet does, so a target present at full size is present after, and ordinary masks are unchanged.

        Args:
            mask (`np.ndarray` of shape `(height, width)`): values 0 (background), 1 (target), 255 (ignore), e.g.
                from [`~FewShotSegmentationImageProcessor.annotation_to_mask`].

        Returns:
            `np.ndarray` of shape `(image_size, image_size)` and dtype int64.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
        height, width = mask.shape
        new_height, new_width = self.resized_size(height, width)
        if (new_height, new_width) != (height, width):
            resized = cv2.resize(
                mask.astype(np.float32), dsize=(new_width, new_height), interpolation=cv2.INTER_NEAREST
            )
            mask = _keep_target_pieces(mask, resized)
        size = self.image_size
        canvas = np.full((size, size), IGNORE_INDEX, dtype=np.int64)
        canvas[:new_height, :new_width] = mask
        return canvas

    # -------------------------------------------------------------------------------------------------- inputs

    def to_rgb_array(self, image: Any, name: str) -> np.ndarray:
        """
        Any accepted image input -> float32 array (H, W, 3) with values in [0, 255]. Grayscale is repeated to RGB;
        an image with an alpha channel is composited onto white (`rgb * alpha + 255 * (1 - alpha)`).
        """
        if isinstance(image, str | os.PathLike):
            image = _open_image(image, name)
        if isinstance(image, Image.Image):
            image = _upright(image)
            if image.mode in ("I", "F") or image.mode.startswith("I;"):  # 16/32-bit: read as an array below
                image = np.asarray(image)
            elif image.mode not in ("RGB", "RGBA"):
                transparent = "A" in image.getbands() or "transparency" in image.info
                image = image.convert("RGBA" if transparent else "RGB")
            image = np.asarray(image)
        image = _to_numpy(image)
        if not isinstance(image, np.ndarray):
            raise ValueError(
                f"`{name}` must be a PIL image, a numpy array, a torch tensor or a file path, got {_describe(image)}"
            )
        array = _channels_last(image, name)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        elif array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"`{name}` must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
        if array.shape[0] < 1 or array.shape[1] < 1:
            raise ValueError(f"`{name}` is empty: shape {array.shape}")
        rgb = self._to_0_255(array, name)
        if rgb.shape[-1] == 4:  # transparent pixels show white, whatever the input type
            alpha = rgb[..., 3:] / np.float32(255)
            rgb = rgb[..., :3] * alpha + np.float32(255) * (1 - alpha)
        return np.ascontiguousarray(rgb, dtype=np.float32)

    @staticmethod
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

    @staticmethod
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
        annotation = _to_numpy(annotation)
        if not isinstance(annotation, np.ndarray):
            raise ValueError(
                f"`{name}` must be a mask (PIL image, numpy array, torch tensor or file path) or a box "
                f"(x0, y0, x1, y1), got {_describe(annotation)}"
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
            raise ValueError(
                f"`{name}` must have shape (H, W) or (H, W, C) with C in 1..4, got {tuple(annotation.shape)}"
            )
        return array

    def annotation_to_mask(
        self,
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
            annotation: binary mask, label map or box `(x0, y0, x1, y1)`; see the class docstring for the rules.
            size (`tuple[int, int]`): `(height, width)` of the annotated image, which the mask must match.
            class_id (`int`, *optional*): class of a label map to segment.
            name / class_ids_name (`str`): argument names used in error messages.
            allow_empty (`bool`, *optional*, defaults to `False`): accept a mask without target pixel.

        Returns:
            `np.ndarray` of shape `(height, width)`, dtype uint8, values 0 (background), 1 (target), 255 (ignore).
        """
        height, width = (int(v) for v in size)
        if _is_box(annotation):
            values = annotation if isinstance(annotation, list | tuple) else _to_numpy(annotation).tolist()
            coords = [float(v) for v in values]
            if not all(np.isfinite(coords)):
                raise ValueError(f"`{name}`: box {tuple(coords)} has non-finite coordinates")
            x0, y0, x1, y1 = (int(round(v)) for v in coords)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"`{name}`: box (x0, y0, x1, y1) = {tuple(coords)} needs x0 < x1 and y0 < y1")
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[max(y0, 0) : max(min(y1, height), 0), max(x0, 0) : max(min(x1, width), 0)] = 1
        else:
            array = self._annotation_to_array(annotation, name)
            if array.shape[:2] != (height, width):
                raise ValueError(
                    f"`{name}` has size {array.shape[0]}x{array.shape[1]} (h x w) but its image has size "
                    f"{height}x{width} (h x w); a mask must have the image's size"
                )
            if class_id is not None:
                mask = self._label_map_to_mask(array, int(class_id), name)
            else:
                mask = self._binary_to_mask(array, name, class_ids_name)
        if not allow_empty and not (mask == 1).any():
            if _is_box(annotation):
                detail = f" (the box lies outside the {width}x{height} (w x h) image)"
            else:
                detail = f" of class {class_id}" if class_id is not None else ""
            raise ValueError(f"`{name}` has no target pixel{detail}; every support annotation must mark the target")
        return mask

    @staticmethod
    def _label_map_to_mask(array: np.ndarray, class_id: int, name: str) -> np.ndarray:
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

    @staticmethod
    def _binary_to_mask(array: np.ndarray, name: str, class_ids_name: str) -> np.ndarray:
        """A binary or grayscale mask (white = target) -> `{0, 1, 255}`; see the class docstring for the rules."""
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

    # ----------------------------------------------------------------------------------------------- structure

    @staticmethod
    def _nest(value: Any, name: str, batch_size: int | None) -> list[list[Any]]:
        """One item, a flat list (one query) or a list of lists (one per query) -> list of `batch_size` lists."""
        if _is_leaf(value):
            value = [value]
        if len(value) == 0:
            raise ValueError(f"`{name}` is empty")
        leaves = [_is_leaf(v) for v in value]
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

    @staticmethod
    def _nest_class_ids(value: Any, name: str, counts: list[int]) -> list[list[int | None]]:
        """`None`, one int, one int (or `None`) per query, or one list per query -> one id per annotation."""
        batch_size = len(counts)
        if _is_class_id(value):
            return [[value] * count for count in counts]
        if isinstance(value, np.ndarray | torch.Tensor):
            value = value.tolist()
        if not isinstance(value, list | tuple):
            raise ValueError(
                f"`{name}` must be an int, a list of ints or a list of lists of ints, got {_describe(value)}"
            )
        value = list(value)
        if batch_size == 1 and counts[0] > 1 and len(value) == counts[0] and all(_is_class_id(v) for v in value):
            value = [value]  # a flat list with one id per support image of the single query
        if len(value) != batch_size:
            raise ValueError(f"`{name}` has {len(value)} entries but there are {batch_size} queries: {value!r}")
        nested = []
        for index, (item, count) in enumerate(zip(value, counts)):
            if _is_class_id(item):
                nested.append([item] * count)
            elif isinstance(item, list | tuple) and len(item) == count and all(_is_class_id(v) for v in item):
                nested.append(list(item))
            else:
                raise ValueError(f"`{name}[{index}]` must be an int or a list of {count} ints, got {item!r}")
        return nested

    # ---------------------------------------------------------------------------------------------- preprocess

    def __call__(self, images: Any = None, *args, **kwargs) -> BatchFeature:
        """Preprocess query images, support images and annotations; see [`~FewShotSegmentationImageProcessor.preprocess`]."""
        return self.preprocess(images, *args, **kwargs)

    def preprocess(
        self,
        images: Any = None,
        support_images: Any = None,
        support_masks: Any = None,
        support_class_ids: Any = None,
        segmentation_maps: Any = None,
        class_ids: Any = None,
        return_tensors: str | None = None,
        **options: Any,
    ) -> BatchFeature:
        r"""
        Preprocess an episode (or a batch of episodes).

        Args:
            images (`ImageInput` or `list[ImageInput]`):
                One query image or a list of `B` query images. May be left out when only supports are given.
            support_images (`list[ImageInput]` or `list[list[ImageInput]]`, *optional*):
                For a single query a list of `K` support images (or one image for `K=1`); for `B` queries a list of
                `B` lists, each with the same `K`.
            support_masks (same nesting as `support_images`, *optional*):
                One annotation per support image: binary mask, label map (with `support_class_ids`) or box
                `(x0, y0, x1, y1)`. Every annotation must mark at least one target pixel.
            support_class_ids (`int`, `list[int]` or `list[list[int]]`, *optional*):
                Class to segment when support annotations are label maps: one int for everything, one per query,
                or one per support image (nested like `support_images`).
            segmentation_maps (`ImageInput` or `list[ImageInput]`, *optional*):
                Ground-truth annotation per query image (same rules as `support_masks`, empty allowed), returned
                as `labels`.
            class_ids (`int` or `list[int]`, *optional*):
                Class to segment when `segmentation_maps` are label maps (one int, or one per query).
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `"pt"` for PyTorch tensors, `"np"` or `None` for NumPy arrays.
            options:
                Per-call values of the processor's settings (`image_size`, `size_divisor`, `upscale_small_images`,
                `pad_with_mean`, `do_normalize`, `image_mean`, `image_std`, `resample`), for this call only; any
                other keyword raises a `TypeError`.

        Returns:
            [`BatchFeature`] with (`S = image_size`):

            - **pixel_values** -- `(B, 3, S, S)` float32, normalised query images (when `images` is given).
            - **support_pixel_values** -- `(B, K, 3, S, S)` float32 support images.
            - **support_masks** -- `(B, K, S, S)` int64, 1 target, 0 background, 255 ignore / padding.
            - **labels** -- `(B, S, S)` int64 in `{0, 1, 255}` (only with `segmentation_maps`).
        """
        processor = self.with_options(**options)
        if images is None and support_images is None:
            raise ValueError("`images` is required (a query image or a list of them), got None")
        data: dict[str, np.ndarray] = {}
        batch_size = None
        if images is not None:
            batch_size = processor._preprocess_queries(images, segmentation_maps, class_ids, data)
        elif segmentation_maps is not None:
            raise ValueError("`segmentation_maps` was given without `images`")
        elif class_ids is not None:
            raise ValueError("`class_ids` was given without `images` and `segmentation_maps`")
        if support_images is not None:
            processor._preprocess_supports(support_images, support_masks, support_class_ids, batch_size, data)
        elif support_masks is not None:
            raise ValueError("`support_masks` was given without `support_images`")
        elif support_class_ids is not None:
            raise ValueError("`support_class_ids` was given without `support_images` and `support_masks`")
        return BatchFeature(data=data, tensor_type=return_tensors)

    def with_options(self, **options: Any) -> FewShotSegmentationImageProcessor:
        """
        This processor, or a copy with some settings replaced (`image_size=...`, ...; `None` keeps a setting).
        Unknown names raise a `TypeError`, invalid values the constructor's `ValueError`.
        """
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {unknown}; per-call options are "
                f"{list(_OPTION_NAMES)}"
            )
        changes = {name: value for name, value in options.items() if value is not None}
        if not changes:
            return self
        return type(self)(**{**{name: getattr(self, name) for name in _OPTION_NAMES}, **changes})

    def _preprocess_queries(self, images: Any, segmentation_maps: Any, class_ids: Any, data: dict) -> int:
        """Query images (and their annotations) into `data["pixel_values"]` (and `data["labels"]`); returns B."""
        if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
            images = list(images)
        single = _is_leaf(images)
        queries = [images] if single else list(images)
        if len(queries) == 0:
            raise ValueError("`images` is an empty list")
        names = ["images" if single else f"images[{i}]" for i in range(len(queries))]
        batch_size = len(queries)
        query_rgb = [self.to_rgb_array(image, n) for image, n in zip(queries, names)]
        data["pixel_values"] = np.stack([self.resize_and_pad_rgb(rgb) for rgb in query_rgb])
        if segmentation_maps is None:
            if class_ids is not None:
                raise ValueError("`class_ids` was given without `segmentation_maps`")
            return batch_size
        maps = [segmentation_maps] if _is_leaf(segmentation_maps) else list(segmentation_maps)
        if len(maps) != batch_size:
            raise ValueError(f"`segmentation_maps` has {len(maps)} annotations but `images` has {batch_size} images")
        map_ids = [row[0] for row in self._nest_class_ids(class_ids, "class_ids", [1] * batch_size)]
        labels = []
        for index, (annotation, rgb, class_id) in enumerate(zip(maps, query_rgb, map_ids)):
            mask = self.annotation_to_mask(
                annotation,
                rgb.shape[:2],
                class_id,
                name="segmentation_maps" if single else f"segmentation_maps[{index}]",
                class_ids_name="class_ids",
                allow_empty=True,
            )
            labels.append(self.resize_and_pad_mask(mask))
        data["labels"] = np.stack(labels)
        return batch_size

    def _preprocess_supports(
        self, support_images: Any, support_masks: Any, support_class_ids: Any, batch_size: int | None, data: dict
    ) -> None:
        """Support images and annotations into `data["support_pixel_values"]` and `data["support_masks"]`."""
        if support_masks is None:
            raise ValueError("`support_masks` is required with `support_images` (one annotation per support image)")
        support_nested = self._nest(support_images, "support_images", batch_size)
        shots = [len(row) for row in support_nested]
        if len(set(shots)) != 1:
            raise ValueError(f"`support_images`: every query needs the same number of support images K, got {shots}")
        if shots[0] == 0:
            raise ValueError("`support_images` has no support image (K=0)")
        masks_nested = self._nest(support_masks, "support_masks", len(support_nested))
        for index, (image_row, mask_row) in enumerate(zip(support_nested, masks_nested)):
            if len(mask_row) != len(image_row):
                raise ValueError(
                    f"`support_masks` has {len(mask_row)} masks for query {index} but `support_images` has "
                    f"{len(image_row)} images; pass one annotation per support image"
                )
        ids_nested = self._nest_class_ids(support_class_ids, "support_class_ids", shots)
        support_pixels, support_labels = [], []
        for q, (image_row, mask_row, id_row) in enumerate(zip(support_nested, masks_nested, ids_nested)):
            row_pixels, row_labels = [], []
            for k, (image, annotation, class_id) in enumerate(zip(image_row, mask_row, id_row)):
                rgb = self.to_rgb_array(image, f"support_images[{q}][{k}]")
                mask = self.annotation_to_mask(
                    annotation,
                    rgb.shape[:2],
                    class_id,
                    name=f"support_masks[{q}][{k}] (query {q}, shot {k})",
                    class_ids_name="support_class_ids",
                    allow_empty=False,
                )
                row_pixels.append(self.resize_and_pad_rgb(rgb))
                row_labels.append(self.resize_and_pad_mask(mask))
            support_pixels.append(np.stack(row_pixels))
            support_labels.append(np.stack(row_labels))
        data["support_pixel_values"] = np.stack(support_pixels)
        data["support_masks"] = np.stack(support_labels)

    # ------------------------------------------------------------------------------------------ post-process

    def resize_logits(self, logits: torch.Tensor, target_size: Any) -> torch.Tensor:
        """
        Bring logits on the `S x S` canvas back to an image's original size, following the PFENet protocol: a
        resized image's logits are scaled to `L x L` (`L = max(h, w)`, bilinear, `align_corners=True`) and cropped
        to `h x w`; an image that kept its size is cropped from the canvas.

        Memory grows with the output, never with `L x L` alone: the `L x L` square is built (PFENet's own
        `F.interpolate`, bit-exact) only while it holds at most `SQUARE_TO_OUTPUT_LIMIT` (4) times the output's
        pixels, i.e. for aspect ratios up to 4:1, every ordinary photo. A longer strip (a 40000 x 100 query would
        need a 1.6-billion-pixel square) gets only the `h x w` corner, computed from the source rows and columns
        it reads with the same bilinear indices and weights: equal to the square's corner up to float32 rounding
        (a few 1e-6 on logits of magnitude 10, as PyTorch's kernel fuses multiply-adds). No size limit is needed
        beyond the image's own.

        Args:
            logits (`torch.Tensor` of shape `(..., C, s, s)`): scores on the canvas (any `s`; other than `S`
                they are first scaled to `S x S`).
            target_size (`tuple[int, int]`): original `(height, width)`.

        Returns:
            `torch.Tensor` of shape `(..., C, height, width)`.
        """
        if isinstance(target_size, torch.Tensor | np.ndarray):
            target_size = target_size.tolist()
        if not isinstance(target_size, list | tuple) or len(target_size) != 2:
            raise ValueError(f"`target_sizes`: each size must be (height, width), got {target_size!r}")
        height, width = (int(v) for v in target_size)
        lead = logits.shape[:-2]
        logits = logits.reshape(-1, *logits.shape[-3:]) if logits.ndim >= 3 else logits[None, None]
        size = self.image_size
        if tuple(logits.shape[-2:]) != (size, size):
            # Logits at another resolution (e.g. a stride-8 head) are first brought to the canvas size.
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
        if self.resized_size(height, width) != (height, width):
            longer = max(height, width)
            if longer * longer > SQUARE_TO_OUTPUT_LIMIT * height * width:  # only the h x w corner of L x L
                return _resize_then_crop(logits, height, width).reshape(*lead, height, width)
            logits = F.interpolate(logits, size=(longer, longer), mode="bilinear", align_corners=True)
        return logits[..., :height, :width].reshape(*lead, height, width)

    def _logits_to_mask(self, logits: torch.Tensor, target_size: Any, threshold: float | None) -> torch.Tensor:
        """`(C, S, S)` logits -> `(h, w)` long mask following the PFENet protocol."""
        if target_size is not None:
            logits = self.resize_logits(logits, target_size)
        if threshold is not None:
            return (logits.softmax(dim=0)[1] > threshold).long()
        return logits.argmax(dim=0).long()

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Any = None,
        threshold: float | None = None,
    ) -> list[torch.Tensor] | list[list[torch.Tensor]]:
        r"""
        Turn model logits into binary masks at the original image sizes.

        Args:
            outputs ([`~utils.ModelOutput`] with `.logits`, or `torch.Tensor`):
                Query logits of shape `(B, 2, S, S)` (channel 1 = target), or support logits of shape
                `(B, K, 2, S, S)`.
            target_sizes (`list[tuple[int, int]]` or `list[list[tuple[int, int]]]`, *optional*):
                Original `(height, width)` of every query image (`B` sizes), or for support logits `B` lists of `K`
                sizes. A resized image gets the PFENet treatment (logits scaled to `L x L`, `L = max(h, w)`, with
                bilinear `align_corners=True`, then cropped to `h x w`); an image that kept its size is cropped
                from the top-left corner of the canvas. If `None`, the `S x S` maps are returned.
            threshold (`float`, *optional*):
                If given, target where the softmax probability of channel 1 exceeds it, instead of the argmax.

        Returns:
            `list[torch.Tensor]`: `B` long tensors of shape `(height, width)` with values in `{0, 1}` (for support
            logits, a list of `B` lists of `K` such tensors).
        """
        if isinstance(outputs, torch.Tensor | np.ndarray):
            logits = outputs
        elif isinstance(outputs, dict) and "logits" in outputs:
            logits = outputs["logits"]
        elif hasattr(outputs, "logits"):
            logits = outputs.logits
        else:
            raise ValueError(
                f"`outputs` must be a model output with `.logits` or a logits tensor, got {_describe(outputs)}"
            )
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        if not isinstance(logits, torch.Tensor) or logits.ndim not in (4, 5) or logits.shape[-3] < 2:
            raise ValueError(
                f"`outputs` logits must have shape (B, 2, S, S) or (B, K, 2, S, S), got {_describe(logits)}"
            )
        logits = logits.detach().float()

        if logits.ndim == 4:
            if target_sizes is None:
                return [self._logits_to_mask(item, None, threshold) for item in logits]
            if len(target_sizes) != logits.shape[0]:
                raise ValueError(
                    f"`target_sizes` has {len(target_sizes)} sizes but the logits have batch size {logits.shape[0]}"
                )
            return [self._logits_to_mask(item, size, threshold) for item, size in zip(logits, target_sizes)]

        batch_size, shots = logits.shape[:2]
        if target_sizes is None:
            return [[self._logits_to_mask(item, None, threshold) for item in row] for row in logits]
        if len(target_sizes) != batch_size:
            raise ValueError(
                f"`target_sizes` has {len(target_sizes)} lists but the support logits have batch size {batch_size}"
            )
        results = []
        for index, (row, sizes) in enumerate(zip(logits, target_sizes)):
            if len(sizes) != shots:
                raise ValueError(
                    f"`target_sizes[{index}]` has {len(sizes)} sizes but the support logits have K={shots} shots"
                )
            results.append([self._logits_to_mask(item, size, threshold) for item, size in zip(row, sizes)])
        return results


def load_image_processor(
    name_or_path: str | os.PathLike | None, image_size: int, min_size: int = 1
) -> FewShotSegmentationImageProcessor:
    """
    The image processor saved with a model (`preprocessor_config.json` of a folder or Hub repo), else, when there is
    no such file (a converted checkpoint, a model built in memory: `name_or_path` empty), one built from the model's
    `image_size`. The pipeline, `scripts/evaluate.py` and the Space load processors this one way.

    Args:
        min_size (`int`, *optional*, defaults to 1): the smallest image side the model takes (the larger side of
            `model.min_input_size()`); the processor's `image_size` (the side of the images it makes) must reach it.

    Raises:
        `ValueError`: the file exists but is not valid JSON, names another processor type, or holds an invalid
            setting (image_size 0 or below `min_size`, a 2-value mean, a zero std, an unknown resample); the message
            names the file.
    """
    if not name_or_path:
        return FewShotSegmentationImageProcessor(image_size=image_size)
    path = cached_file(
        str(name_or_path),
        IMAGE_PROCESSOR_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return FewShotSegmentationImageProcessor(image_size=image_size)
    try:
        with open(path, encoding="utf-8") as handle:
            settings = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err}); save the processor again") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object of processor settings, got {type(settings).__name__}")
    kind = settings.get("image_processor_type", FewShotSegmentationImageProcessor.__name__)
    if kind != FewShotSegmentationImageProcessor.__name__:
        raise ValueError(
            f"{path} names image_processor_type {kind!r}, not FewShotSegmentationImageProcessor; save "
            "FewShotSegmentationImageProcessor(image_size=...) there, or delete the file to use the model's image_size"
        )
    try:
        processor = FewShotSegmentationImageProcessor.from_pretrained(name_or_path)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}; fix the file or save the processor again") from None
    if processor.image_size < min_size:
        raise ValueError(
            f"{path}: image_size {processor.image_size} is below {min_size}, the smallest image side the model "
            f"takes; set image_size >= {min_size} (the model's config has image_size={image_size})"
        )
    return processor
