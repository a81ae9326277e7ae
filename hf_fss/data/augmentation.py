"""
Training augmentation of PFENet (`train.py` / `util/transform.py` of dvlab-research/PFENet), the recipe NTRENet,
QGNet, CRCNet and most PFENet descendants train with, written with albumentations:

1. random scale, factor uniform in [0.9, 1.1] (`RandScale`; always applied); a side never scales to 0 pixels
   (an image 1 or a few pixels thin keeps at least 1), where albumentations' `RandomScale` would make OpenCV raise;
2. rotation by an angle uniform in [-10, 10] degrees with probability 0.5 (`RandRotate`, whose default p is 0.5),
   the image filled with the ImageNet mean colour and the mask with 255;
3. Gaussian blur, 5x5 kernel with OpenCV's default sigma for that size (1.1), with probability 0.5
   (`RandomGaussianBlur`);
4. horizontal flip with probability 0.5;
5. a random `size x size` crop (`Crop(crop_type="rand")`): an image smaller than the crop is first padded
   symmetrically (mean colour / 255); the crop is re-drawn (up to `crop_tries` times) until it keeps at least 85%
   of the target pixels, as PFENet does. When no try reaches 85% the try with the most target pixels is kept
   (PFENet keeps the last one), and when even that has no target pixel although the image had some and
   `require_target=True` (supports), the whole augmented image is resized to `size x size` instead of cropped;
6. ImageNet normalisation to a `(3, size, size)` float tensor.

The geometric steps are applied by one albumentations call on `image=` and `mask=` so they stay aligned; masks
use nearest-neighbour interpolation (pixel-centre aligned `INTER_NEAREST_EXACT` for scaling, where PFENet's
`INTER_NEAREST` shifts the mask by up to a pixel). Randomness comes only from the `np.random.Generator` passed to each call
(it seeds the albumentations pipeline and draws the crop), so an item is reproducible from its generator.
"""

from __future__ import annotations

import albumentations as A
import albumentations.augmentations.geometric.functional as fgeometric
import cv2
import numpy as np
import torch

from hf_fss.data.schema import IGNORE_INDEX
from hf_fss.processor_settings import IMAGENET_MEAN, IMAGENET_STD  # the one ImageNet normalisation

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TrainAugmentation", "normalize_image"]


def normalize_image(
    image: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """`(H, W, 3)` RGB array in [0, 255] -> `(3, H, W)` float32 tensor `(x / 255 - mean) / std`."""
    array = np.asarray(image, dtype=np.float32)
    array = (array - np.asarray(mean, np.float32) * 255) / (np.asarray(std, np.float32) * 255)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class _RandomScaleAtLeastOne(A.RandomScale):
    """
    `A.RandomScale` whose output sides are never 0: it computes `int(side * factor)`, so a side of 1 (or a few)
    pixels scaled by 0.95 becomes 0 and OpenCV's resize asserts. Here each side is `max(1, int(side * factor))`;
    for every side of normal size the result (and the random draw) is exactly albumentations'.
    """

    @staticmethod
    def _scaled(array: np.ndarray, scale: float, interpolation: int) -> np.ndarray:
        height, width = array.shape[:2]
        return fgeometric.resize(array, (max(1, int(height * scale)), max(1, int(width * scale))), interpolation)

    def apply(self, img: np.ndarray, scale: float, **params) -> np.ndarray:
        return self._scaled(img, scale, self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, scale: float, **params) -> np.ndarray:
        return self._scaled(mask, scale, self.mask_interpolation)


def _opencv_default_sigma(ksize: int) -> float:
    # cv2.GaussianBlur(img, (k, k), 0) derives sigma from the kernel size; albumentations needs it explicitly.
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


class TrainAugmentation:
    """
    PFENet's training transform for one image and its mask.

    Args:
        size: side `S` of the square output (PFENet: 473 for PASCAL, 641 for COCO).
        scale_range: range of the random scale factor.
        rotate_limit: maximum absolute rotation in degrees.
        rotate_p / blur_p / flip_p: probabilities of rotation, blur and horizontal flip.
        blur_kernel: odd Gaussian kernel size.
        crop_keep_fraction: a crop is accepted when it keeps at least this fraction of the target pixels.
        crop_tries: how many times a crop may be re-drawn.
        mean / std: normalisation (ImageNet) and, `mean * 255`, the padding colour.
        ignore_index: mask value of padding.

    Call: `augmentation(image, mask, rng, target_value=1, require_target=False)` with `image` an `(H, W, 3)` uint8
    RGB array, `mask` an `(H, W)` integer array (a `{0, 1, 255}` target mask or a label map of class ids < 256),
    `rng` an `np.random.Generator`; returns `(pixel_values (3, S, S) float32, mask (S, S) int64)`. Mask values pass
    through unchanged (nearest neighbour); padding is `ignore_index`. `target_value` is the mask value counted as
    target by the crop rule.
    """

    def __init__(
        self,
        size: int = 473,
        scale_range: tuple[float, float] = (0.9, 1.1),
        rotate_limit: float = 10.0,
        rotate_p: float = 0.5,
        blur_p: float = 0.5,
        blur_kernel: int = 5,
        flip_p: float = 0.5,
        crop_keep_fraction: float = 0.85,
        crop_tries: int = 30,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        ignore_index: int = IGNORE_INDEX,
    ):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd int, got {blur_kernel}")
        self.size = int(size)
        self.crop_keep_fraction = float(crop_keep_fraction)
        self.crop_tries = int(crop_tries)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.ignore_index = int(ignore_index)
        fill = tuple(m * 255 for m in self.mean)
        sigma = _opencv_default_sigma(blur_kernel)
        self.geometric = A.Compose(
            [
                # scale_limit is relative to 1: the factor is drawn from [1 + low, 1 + high].
                # INTER_NEAREST_EXACT samples pixel centres like INTER_LINEAR does; cv2.INTER_NEAREST (PFENet's
                # choice) samples floor(x / s), shifting the mask by up to a pixel against the image.
                _RandomScaleAtLeastOne(
                    scale_limit=(scale_range[0] - 1, scale_range[1] - 1),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST_EXACT,
                    p=1.0,
                ),
                A.Rotate(
                    limit=(-rotate_limit, rotate_limit),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=fill,
                    fill_mask=self.ignore_index,
                    p=rotate_p,
                ),
                A.GaussianBlur(blur_limit=(blur_kernel, blur_kernel), sigma_limit=(sigma, sigma), p=blur_p),
                A.HorizontalFlip(p=flip_p),
                A.PadIfNeeded(
                    min_height=self.size,
                    min_width=self.size,
                    position="center",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=fill,
                    fill_mask=self.ignore_index,
                ),
            ],
            seed=0,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, crop_keep_fraction={self.crop_keep_fraction})"

    def _crop(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, target_value: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Random `S x S` crop of a padded (>= S) pair, re-drawn until it keeps enough target pixels."""
        size = self.size
        height, width = mask.shape
        total = int(np.count_nonzero(mask == target_value))
        best = None
        for _ in range(self.crop_tries + 1):
            top = int(rng.integers(0, height - size + 1))
            left = int(rng.integers(0, width - size + 1))
            kept = int(np.count_nonzero(mask[top : top + size, left : left + size] == target_value))
            if best is None or kept > best[2]:
                best = (top, left, kept)
            if total == 0 or kept >= self.crop_keep_fraction * total:
                break
        top, left, kept = best
        return image[top : top + size, left : left + size], mask[top : top + size, left : left + size], kept

    def _resize(self, image: np.ndarray, mask: np.ndarray, target_value: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole image to `S x S`; target pixels that nearest-neighbour sampling would miss are kept."""
        size = (self.size, self.size)
        out_image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        out_mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
        target = mask == target_value
        if target.any() and not (out_mask == target_value).any():
            # A tiny object in a large image: mark every output pixel the object overlaps.
            coverage = cv2.resize(target.astype(np.float32), size, interpolation=cv2.INTER_AREA)
            out_mask[coverage > 0] = target_value
        return out_image, out_mask

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        rng: np.random.Generator,
        target_value: int = 1,
        require_target: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
            raise ValueError(f"expected an (H, W, 3) image and an (H, W) mask, got {image.shape} and {mask.shape}")
        self.geometric.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        out = self.geometric(image=image, mask=mask)
        augmented_image, augmented_mask = out["image"], out["mask"]
        crop_image, crop_mask, kept = self._crop(augmented_image, augmented_mask, rng, target_value)
        if require_target and kept == 0:
            if (augmented_mask == target_value).any():
                crop_image, crop_mask = self._resize(augmented_image, augmented_mask, target_value)
            else:
                # Scaling / rotation pushed the whole object out (only possible at the very border): no augmentation.
                crop_image, crop_mask = self._resize(image, mask, target_value)
        return normalize_image(crop_image, self.mean, self.std), torch.from_numpy(crop_mask.astype(np.int64))
