"""Image processor for few-shot semantic segmentation: settings, normalisation, batching of episodes, post-processing.

Geometry follows the PFENet test protocol (`util/transform.py::test_Resize` and `ori_resize` in `test.py` of
dvlab-research/PFENet), shared by the PFENet-derived code bases, on arrays in `hf_fss.image_geometry`: an image whose
longer side exceeds `image_size` is scaled (OpenCV, bilinear) to it, both sides floored to multiples of
`size_divisor` (473 -> 472), smaller images keep their size; the result sits at the top-left corner of an
`image_size x image_size` canvas (masks: nearest neighbour, padded with the ignore value 255); pixels are normalised
with the ImageNet mean and standard deviation. Post-processing scales the logits of a resized image to `L x L`,
`L = max(h, w)` (bilinear, `align_corners=True`) and crops `h x w`, computing only that corner (memory grows with the
image, not `L x L`); an image that kept its size is cropped directly. Inputs are decoded by `hf_fss.annotations`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

from .annotations import (
    IGNORE_INDEX,
    MASK_THRESHOLD,  # noqa: F401  (re-exported: it was defined here before annotations.py)
    decode_annotation,
    decode_image,
    describe,
    is_leaf,
    nest_class_ids,
    nest_supports,
)
from .image_geometry import (
    SQUARE_TO_OUTPUT_LIMIT,  # noqa: F401  (re-exported: it was defined here before)
    logits_to_original_size,
    resize_mask,
    resized_size,
)
from .processor_settings import (
    _CV2_INTERPOLATION,
    _FLAG_NAMES,
    _METADATA_KEYS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _checked_flag,
    _checked_settings,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FewShotSegmentationImageProcessor",
    "FewShotSegmentationImageProcessorKwargs",
    "load_image_processor",
]

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


def _logits_of(outputs: Any) -> torch.Tensor:
    """The float32 logits `(B, 2, S, S)` or `(B, K, 2, S, S)` of a model output, a dict or a tensor / array."""
    if isinstance(outputs, torch.Tensor | np.ndarray):
        logits = outputs
    elif isinstance(outputs, dict) and "logits" in outputs:
        logits = outputs["logits"]
    elif hasattr(outputs, "logits"):
        logits = outputs.logits
    else:
        raise ValueError(
            f"`outputs` must be a model output with `.logits` or a logits tensor, got {describe(outputs)}"
        )
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor) or logits.ndim not in (4, 5) or logits.shape[-3] < 2:
        raise ValueError(f"`outputs` logits must have shape (B, 2, S, S) or (B, K, 2, S, S), got {describe(logits)}")
    return logits.detach().float()


def target_height_width(target_size: Any) -> tuple[int, int]:
    """One entry of `target_sizes` (a pair, list, tensor or array) as `(height, width)` ints; `ValueError` otherwise."""
    if isinstance(target_size, torch.Tensor | np.ndarray):
        target_size = target_size.tolist()
    if not isinstance(target_size, list | tuple) or len(target_size) != 2:
        raise ValueError(f"`target_sizes`: each size must be (height, width), got {target_size!r}")
    return int(target_size[0]), int(target_size[1])


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

    Images and annotations are decoded by `hf_fss.annotations` (its docstring holds the rules), the one policy
    shared with the pipeline and the Space: PIL images, arrays, tensors, file paths or URLs; EXIF orientation
    applied; 16-bit images scaled by their range; transparency composited onto white. Annotations are masks
    (white = target, of the image's size), label maps with a class id, or boxes `(x0, y0, x1, y1)`.
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
        unknown = sorted(set(kwargs) - set(_METADATA_KEYS))
        if unknown:  # a misspelt setting (`image_mea` in a hand-edited file) would otherwise be ignored
            raise TypeError(f"unknown setting(s) {unknown}; the settings are {list(_OPTION_NAMES)}")
        super().__init__(**kwargs)
        size_divisor, image_mean, image_std, resample = _checked_settings(
            image_size, size_divisor, image_mean, image_std, resample
        )
        flags = {
            name: _checked_flag(name, value)
            for name, value in zip(_FLAG_NAMES, (upscale_small_images, do_normalize, pad_with_mean))
        }
        self.image_size = int(image_size)
        self.size_divisor = int(size_divisor)
        self.upscale_small_images = flags["upscale_small_images"]
        self.do_normalize = flags["do_normalize"]
        self.image_mean = image_mean
        self.image_std = image_std
        self.resample = resample
        self.pad_with_mean = flags["pad_with_mean"]

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs) -> Any:
        """
        The processor of a settings dict (a `preprocessor_config.json`, also through `AutoImageProcessor`).

        Raises:
            `ValueError`: a setting given as `null` (the file holds every value `save_pretrained` wrote; `null` would
                silently become the default; `size_divisor: null` keeps its meaning 1), or any constructor check.
            `TypeError`: an unknown setting.
        """
        nulls = [
            k
            for k in _OPTION_NAMES
            if k != "size_divisor" and k in image_processor_dict and image_processor_dict[k] is None
        ]
        if nulls:
            raise ValueError(f"`{nulls[0]}` is null; give its value, or remove the field to use the default")
        return super().from_dict(image_processor_dict, **kwargs)

    # ------------------------------------------------------------------------------------------------ geometry

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """
        Size `(new_height, new_width)` an image of size `(height, width)` takes on the canvas: PFENet's
        `find_new_hw` with this processor's settings ([`~hf_fss.image_geometry.resized_size`] has the rule).

        Example: with the defaults, `(375, 500) -> (352, 472)` and `(100, 120) -> (100, 120)`.
        """
        return resized_size(height, width, self.image_size, self.size_divisor, self.upscale_small_images)

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
        # PFENet subtracts mean * 255 and divides by std * 255 (computed in float64, applied in float32).
        mean = (np.asarray(self.image_mean, dtype=np.float64) * 255).astype(np.float32)
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[:] = mean if self.pad_with_mean else 0  # black around the image, as PFENet's test_Resize
        canvas[:new_height, :new_width] = rgb
        if self.do_normalize:
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
            mask = resize_mask(mask, new_height, new_width)
        size = self.image_size
        canvas = np.full((size, size), IGNORE_INDEX, dtype=np.int64)
        canvas[:new_height, :new_width] = mask
        return canvas

    # -------------------------------------------------------------------------------------------------- inputs

    # The one decoding policy (hf_fss.annotations): any accepted image -> float32 (H, W, 3) in [0, 255]; one
    # annotation -> uint8 (h, w) in {0, 1, 255}; errors name the argument passed as `name`.
    to_rgb_array = staticmethod(decode_image)
    annotation_to_mask = staticmethod(decode_annotation)

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
        single = is_leaf(images)
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
        maps = [segmentation_maps] if is_leaf(segmentation_maps) else list(segmentation_maps)
        if len(maps) != batch_size:
            raise ValueError(f"`segmentation_maps` has {len(maps)} annotations but `images` has {batch_size} images")
        map_ids = [row[0] for row in nest_class_ids(class_ids, "class_ids", [1] * batch_size)]
        labels = []
        for index, (annotation, rgb, class_id) in enumerate(zip(maps, query_rgb, map_ids)):
            name = "segmentation_maps" if single else f"segmentation_maps[{index}]"
            mask = self.annotation_to_mask(annotation, rgb.shape[:2], class_id, name, "class_ids", allow_empty=True)
            labels.append(self.resize_and_pad_mask(mask))
        data["labels"] = np.stack(labels)
        return batch_size

    def _preprocess_supports(
        self, support_images: Any, support_masks: Any, support_class_ids: Any, batch_size: int | None, data: dict
    ) -> None:
        """Support images and annotations into `data["support_pixel_values"]` and `data["support_masks"]`."""
        support_nested, masks_nested, ids_nested = nest_supports(
            support_images, support_masks, support_class_ids, batch_size
        )
        support_pixels, support_labels = [], []
        for q, (image_row, mask_row, id_row) in enumerate(zip(support_nested, masks_nested, ids_nested)):
            row_pixels, row_labels = [], []
            for k, (image, annotation, class_id) in enumerate(zip(image_row, mask_row, id_row)):
                rgb = self.to_rgb_array(image, f"support_images[{q}][{k}]")
                name = f"support_masks[{q}][{k}] (query {q}, shot {k})"
                mask = self.annotation_to_mask(annotation, rgb.shape[:2], class_id, name, "support_class_ids")
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

        Memory grows with the output, never with `L x L` alone: for aspect ratios beyond 4:1 only the `h x w`
        corner of the square is computed ([`~hf_fss.image_geometry.logits_to_original_size`]).

        Args:
            logits (`torch.Tensor` of shape `(..., C, s, s)`): scores on the canvas (any `s`; other than `S`
                they are first scaled to `S x S`).
            target_size (`tuple[int, int]`): original `(height, width)`.

        Returns:
            `torch.Tensor` of shape `(..., C, height, width)`.
        """
        height, width = target_height_width(target_size)
        lead = logits.shape[:-2]
        logits = logits.reshape(-1, *logits.shape[-3:]) if logits.ndim >= 3 else logits[None, None]
        size = self.image_size
        if tuple(logits.shape[-2:]) != (size, size):
            # Logits at another resolution (e.g. a stride-8 head) are first brought to the canvas size.
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
        resized = self.resized_size(height, width) != (height, width)
        return logits_to_original_size(logits, height, width, resized).reshape(*lead, height, width)

    def _masks(self, logits: torch.Tensor, sizes: Any, threshold: float | None, mismatch: str) -> list[torch.Tensor]:
        """
        `(N, C, S, S)` logits -> N long `(h, w)` masks at `sizes` (N of them, else `mismatch.format(len(sizes))`; a
        size `None`: on the canvas): the argmax, or with `threshold` target where the softmax of channel 1 exceeds it.
        """
        if sizes is not None and len(sizes) != len(logits):
            raise ValueError(mismatch.format(len(sizes)))
        masks = []
        for item, size in zip(logits, [None] * len(logits) if sizes is None else sizes):
            item = item if size is None else self.resize_logits(item, size)
            masks.append(_channel_argmax(item) if threshold is None else (item.softmax(dim=0)[1] > threshold).long())
        return masks

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
        logits = _logits_of(outputs)
        batch_size = logits.shape[0]
        if logits.ndim == 4:
            mismatch = f"`target_sizes` has {{}} sizes but the logits have batch size {batch_size}"
            return self._masks(logits, target_sizes, threshold, mismatch)
        rows = [None] * batch_size if target_sizes is None else target_sizes
        if len(rows) != batch_size:
            raise ValueError(
                f"`target_sizes` has {len(rows)} lists but the support logits have batch size {batch_size}"
            )
        shots, masks = logits.shape[1], []
        for i, (row, sizes) in enumerate(zip(logits, rows)):
            mismatch = f"`target_sizes[{i}]` has {{}} sizes but the support logits have K={shots} shots"
            masks.append(self._masks(row, sizes, threshold, mismatch))
        return masks


def _channel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """
    `logits.argmax(dim=0)` of `(C, h, w)` logits as a long `(h, w)` map; for background / target logits (C = 2)
    computed as one elementwise comparison: torch's reduction over a leading dimension of 2 costs about 1 ms per
    128 x 128 map on one CPU thread, the comparison 25 times less. Equal to `argmax` on every input: a tie goes to
    the background, and a NaN counts as the maximum (a NaN background wins over anything), as in torch.
    """
    if logits.shape[0] != 2:
        return logits.argmax(dim=0)
    background, target = logits[0], logits[1]
    wins = target > background
    if target.isnan().any():
        wins |= target.isnan() & ~background.isnan()
    return wins.long()


def load_image_processor(
    name_or_path: str | os.PathLike | None,
    image_size: int,
    min_size: int = 1,
    processor_class: type[FewShotSegmentationImageProcessor] = FewShotSegmentationImageProcessor,
) -> FewShotSegmentationImageProcessor:
    """
    The image processor saved with a model (`preprocessor_config.json` of a folder or Hub repo), else, when there is
    no such file (a converted checkpoint, a model built in memory: `name_or_path` empty), one built from the model's
    `image_size`. The pipeline, `scripts/evaluate.py` and the Space load processors this one way.

    Args:
        min_size (`int`, *optional*, defaults to 1): the smallest image side the model takes (the larger side of
            `model.min_input_size()`); the processor's `image_size` (the side of the images it makes) must reach it.
        processor_class (`type`, *optional*): the model's processor class (`model.fss_image_processor_class`: the
            SegGPT adapter has its own); the file must name it.

    Raises:
        `ValueError`: the file exists but is not valid JSON, names another processor type, or holds an invalid
            setting (image_size 0 or below `min_size`, a 2-value mean, a zero std, an unknown resample); the message
            names the file.
    """
    if not name_or_path:
        return processor_class(image_size=image_size)
    path = cached_file(
        str(name_or_path),
        IMAGE_PROCESSOR_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return processor_class(image_size=image_size)
    try:
        with open(path, encoding="utf-8") as handle:
            settings = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err}); save the processor again") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object of processor settings, got {type(settings).__name__}")
    name = processor_class.__name__
    kind = settings.get("image_processor_type", name)
    if kind != name:
        raise ValueError(
            f"{path} names image_processor_type {kind!r}, not {name}; save {name}(image_size=...) there, or delete "
            "the file to use the model's image_size"
        )
    try:
        processor = processor_class.from_pretrained(name_or_path)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}; fix the file or save the processor again") from None
    if processor.image_size < min_size:
        raise ValueError(
            f"{path}: image_size {processor.image_size} is below {min_size}, the smallest image side the model "
            f"takes; set image_size >= {min_size} (the model's config has image_size={image_size})"
        )
    return processor
