"""
The two augmented views of MoCo v2 ("aug-plus", facebookresearch/moco `main_moco.py`) with albumentations, the
project's augmentation library, and the local patches of QGNet's local contrastive loss (paper 000 §IV-A2):

- `"patch"` (default, the paper's Fig. 3: "two additional local patches as input"): one superpixel of the
  un-augmented image is cut out by its bounding box, pixels outside the superpixel set to the mean colour (a guess,
  the paper does not say), and two views of that patch are made with the same photometric augmentation and a milder
  random resized crop (scale 0.5-1, a guess: 0.2 would often crop the patch away);
- `"pooled"` (option, DetCon-style, not what Fig. 3 shows): the superpixel label map is carried through each
  image view's geometric transform (albumentations applies the crop and flip to `mask=` with nearest-neighbour
  interpolation), and the chosen superpixel's mask in each view pools the dense feature map.

All randomness comes from the `np.random.Generator` passed to each call (it seeds the albumentations pipelines), so
an item is reproducible from `(seed, epoch, index)`.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from hf_fss.data.augmentation import IMAGENET_MEAN, IMAGENET_STD, normalize_image

from .superpixels import eligible_segments

__all__ = ["LOCAL_FORMS", "ContrastiveViews", "moco_v2_augmentation"]

LOCAL_FORMS = ("patch", "pooled")


def moco_v2_augmentation(size: int, crop_scale: tuple[float, float] = (0.2, 1.0)) -> A.Compose:
    """
    MoCo v2's aug-plus as an albumentations pipeline (ImageNet normalisation is applied afterwards):
    RandomResizedCrop(size, scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, Gaussian
    blur sigma 0.1-2 with p 0.5 (MoCo: PIL's blur with radius = sigma), horizontal flip p 0.5. A `mask=` passed
    along gets the same crop and flip (nearest neighbour), which is how form `"pooled"` follows a superpixel.
    """
    return A.Compose(
        [
            A.RandomResizedCrop(
                size=(size, size),
                scale=crop_scale,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
            ),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
            A.ToGray(num_output_channels=3, p=0.2),
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 2.0), p=0.5),
            A.HorizontalFlip(p=0.5),
        ],
        seed=0,
    )


def _mean_colour() -> np.ndarray:
    return np.round(np.asarray(IMAGENET_MEAN) * 255).astype(np.uint8)


def cut_patch(image: np.ndarray, labels: np.ndarray, segment: int) -> np.ndarray:
    """The bounding box of superpixel `segment` of `image`, pixels outside the superpixel set to the mean colour."""
    rows, cols = np.nonzero(labels == segment)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    patch = image[top:bottom, left:right].copy()
    patch[labels[top:bottom, left:right] != segment] = _mean_colour()
    return patch


class ContrastiveViews:
    """
    Make one training item from an image and its superpixels.

    Args:
        size: side of the square image views (MoCo: 224).
        local_form: `"patch"`, `"pooled"` or `None` (global loss only: no superpixels needed).
        patch_size: side of the patch views for `"patch"` (default `size`).
        patch_crop_scale: random resized crop scale of the patch views.
        min_area_fraction: superpixels below this share of the image (or, for `"pooled"`, of a view) are not drawn.

    Call: `views(image, labels, rng)` with `image` an `(H, W, 3)` uint8 RGB array, `labels` its `(H, W)` superpixel
    map (ignored when `local_form` is None) and `rng` an `np.random.Generator`. Returns a dict of tensors:
    `pixel_values_q`, `pixel_values_k` `(3, size, size)` normalised; with `"patch"` also `patch_pixel_values_q`,
    `patch_pixel_values_k` `(3, patch_size, patch_size)`; with `"pooled"` also `patch_mask_q`, `patch_mask_k`
    `(size, size)` float 0/1 masks of the same superpixel in each view.
    """

    def __init__(
        self,
        size: int = 224,
        local_form: str | None = "patch",
        patch_size: int | None = None,
        patch_crop_scale: tuple[float, float] = (0.5, 1.0),
        min_area_fraction: float = 0.01,
    ):
        if local_form is not None and local_form not in LOCAL_FORMS:
            raise ValueError(f"local_form must be one of {list(LOCAL_FORMS)} or None, got {local_form!r}")
        self.size = int(size)
        self.local_form = local_form
        self.patch_size = int(patch_size or size)
        self.min_area_fraction = float(min_area_fraction)
        self.image_views = moco_v2_augmentation(self.size)
        self.patch_views = moco_v2_augmentation(self.patch_size, crop_scale=tuple(patch_crop_scale))

    def _augment(self, pipeline: A.Compose, rng: np.random.Generator, **inputs) -> dict:
        pipeline.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        return pipeline(**inputs)

    def __call__(self, image: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> dict:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        out: dict[str, torch.Tensor] = {}
        if self.local_form == "pooled":
            views = [self._augment(self.image_views, rng, image=image, mask=labels) for _ in range(2)]
            out["pixel_values_q"], out["pixel_values_k"] = (normalize_image(v["image"]) for v in views)
            segment = self._visible_segment(views[0]["mask"], views[1]["mask"], labels, rng)
            out["patch_mask_q"], out["patch_mask_k"] = (
                torch.from_numpy((v["mask"] == segment).astype(np.float32)) for v in views
            )
            return out
        views = [self._augment(self.image_views, rng, image=image)["image"] for _ in range(2)]
        out["pixel_values_q"], out["pixel_values_k"] = (normalize_image(v) for v in views)
        if self.local_form == "patch":
            # Paper Eq. 6: "random sample one query patch"; drawn among the superpixels large enough.
            segments = eligible_segments(labels, self.min_area_fraction)
            patch = cut_patch(image, labels, int(rng.choice(segments)))
            patches = [self._augment(self.patch_views, rng, image=patch)["image"] for _ in range(2)]
            out["patch_pixel_values_q"], out["patch_pixel_values_k"] = (normalize_image(p) for p in patches)
        return out

    def _visible_segment(
        self, mask_q: np.ndarray, mask_k: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> int:
        """A superpixel large enough in both views (else the one with the largest smaller area in the two)."""
        ids_q, counts_q = np.unique(mask_q, return_counts=True)
        ids_k, counts_k = np.unique(mask_k, return_counts=True)
        shared, index_q, index_k = np.intersect1d(ids_q, ids_k, return_indices=True)
        if shared.size == 0:  # two disjoint crops: no superpixel is in both; take the query view's largest
            return int(ids_q[np.argmax(counts_q)])
        smaller = np.minimum(counts_q[index_q], counts_k[index_k])
        eligible = shared[smaller >= self.min_area_fraction * mask_q.size]
        if eligible.size:
            return int(rng.choice(eligible))
        return int(shared[np.argmax(smaller)])


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    """`(3, H, W)` normalised tensor -> `(H, W, 3)` uint8 (for looking at views)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    array = ((pixel_values * std + mean) * 255).clamp(0, 255).round().byte()
    return array.permute(1, 2, 0).numpy()
