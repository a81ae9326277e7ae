"""The image processor of the SegGPT adapter: SegGPT's own geometry and normalisation in hf_fss's processor API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
)

from ...image_processing_fss import FewShotSegmentationImageProcessor, target_height_width

if TYPE_CHECKING:
    from transformers import SegGptImageProcessorPil


class SegGptFssImageProcessor(FewShotSegmentationImageProcessor):
    r"""
    `FewShotSegmentationImageProcessor` with SegGPT's preprocessing, so the pipeline, `scripts/evaluate.py`,
    `scripts/compare.py` and the Space give `SegGptFssModel` exactly what transformers' `SegGptImageProcessor` gives
    `SegGptForImageSegmentation` (its PIL backend, the one transformers uses without torchvision):

    - images are stretched to `image_size x image_size` (no aspect ratio kept, no padding) with PIL bicubic, rescaled
      by 1/255 and normalised with ImageNet's mean and std (SegGPT's defaults; `image_mean` / `image_std` are those);
    - masks `{0, 1, 255}` are stretched with PIL nearest neighbour (the model draws 1 white, 0 and 255 black, as
      `SegGptImageProcessor(prompt_masks=..., num_labels=1)` draws a 0/1 mask);
    - logits are brought back to an image's original size with nearest neighbour, as
      `SegGptImageProcessor.post_process_semantic_segmentation` resizes its prediction.

    Args:
        image_size (`int`, *optional*, defaults to 448): side of SegGPT's square inputs (`BAAI/seggpt-vit-large`: 448).
        other arguments: as `FewShotSegmentationImageProcessor`; `size_divisor`, `upscale_small_images`, `resample`
            and `pad_with_mean` have no effect here (every image is stretched to the square).
    """

    def __init__(self, image_size: int = 448, **kwargs):
        kwargs.setdefault("image_mean", list(IMAGENET_DEFAULT_MEAN))
        kwargs.setdefault("image_std", list(IMAGENET_DEFAULT_STD))
        kwargs.setdefault("resample", PILImageResampling.BICUBIC)
        kwargs.setdefault("upscale_small_images", True)
        super().__init__(image_size=image_size, **kwargs)

    def _seggpt(self) -> SegGptImageProcessorPil:
        # Imported here: transformers' SegGPT processor imports image_processing_auto, whose import registers this
        # class (hf_fss/__init__.py), which must not find this module half-imported.
        from transformers import SegGptImageProcessorPil

        return SegGptImageProcessorPil(
            size={"height": self.image_size, "width": self.image_size},
            do_normalize=self.do_normalize,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Every image is stretched to the square: `(image_size, image_size)`."""
        return self.image_size, self.image_size

    def resize_and_pad_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """float32 `(H, W, 3)` array in [0, 255] -> `(3, S, S)` float32 as SegGPT's processor makes it."""
        # SegGPT's processor reads 8-bit images; the decoded arrays hold whole values in [0, 255] (16-bit ones are
        # scaled to that range by hf_fss.annotations and rounded here).
        pixels = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        # Channels last, stated: transformers would otherwise guess the layout from the shape, and take an image of
        # height 1, 3 or 4 for a channels-first one (an error in its normalisation, or a silently wrong image).
        outputs = self._seggpt()(images=pixels, input_data_format=ChannelDimension.LAST, return_tensors="np")
        return outputs["pixel_values"][0].astype(np.float32)

    def resize_and_pad_mask(self, mask: np.ndarray) -> np.ndarray:
        """`(h, w)` mask in {0, 1, 255} -> `(S, S)` int64, stretched with PIL nearest neighbour as SegGPT's prompt masks."""
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
        size = SizeDict(height=self.image_size, width=self.image_size)
        # `resize` reads its input as channels first whatever its shape: a `(1, h, w)` mask is never misread.
        resized = self._seggpt().resize(mask.astype(np.uint8)[None], size, PILImageResampling.NEAREST)
        return np.asarray(resized)[0].astype(np.int64)

    def resize_logits(self, logits: torch.Tensor, target_size: Any) -> torch.Tensor:
        """
        `(..., C, s, s)` scores -> `(..., C, height, width)` with nearest neighbour, as SegGPT's post-processing
        resizes its predicted mask before reading the classes from it (scores of a nearest-resized prediction are the
        nearest-resized scores).
        """
        height, width = target_height_width(target_size)
        lead = logits.shape[:-2]
        flat = logits.reshape(-1, *logits.shape[-3:]) if logits.ndim >= 3 else logits[None, None]
        resized = F.interpolate(flat, size=(height, width), mode="nearest")
        return resized.reshape(*lead, height, width)
