"""
Superpixels of the un-augmented images, the local patches of QGNet's local contrastive loss (paper 000 §IV-A2,
Algorithms 1 and 2): scikit-image's `slic` (default; Table V's best) or `felzenszwalb`, computed once per image and
cached in memory and, optionally, on disk (`.npy` files keyed by a hash of the image's pixels).

The paper gives no parameter values; the defaults are scikit-image's (`slic(n_segments=100, compactness=10)`,
`felzenszwalb(scale=1, sigma=0.8, min_size=20)`), every one exposed. A minimum patch area (a fraction of the image,
default 1%, a guess the paper does not make) keeps specks out of the patches that are sampled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["SUPERPIXEL_METHODS", "SuperpixelCache", "SuperpixelSettings", "compute_superpixels", "eligible_segments"]

SUPERPIXEL_METHODS = ("slic", "felzenszwalb")


@dataclass(frozen=True)
class SuperpixelSettings:
    """
    Which superpixel algorithm and its parameters.

    Args:
        method: `"slic"` (paper Algorithm 2) or `"felzenszwalb"` (Algorithm 1).
        slic_segments / slic_compactness / slic_sigma: `skimage.segmentation.slic`'s `n_segments`, `compactness`
            (the paper's `m` of Eq. 2) and `sigma`.
        felzenszwalb_scale / felzenszwalb_sigma / felzenszwalb_min_size: `skimage.segmentation.felzenszwalb`'s.
        min_area_fraction: a superpixel smaller than this share of the image is never sampled as a patch.
    """

    method: str = "slic"
    slic_segments: int = 100
    slic_compactness: float = 10.0
    slic_sigma: float = 0.0
    felzenszwalb_scale: float = 1.0
    felzenszwalb_sigma: float = 0.8
    felzenszwalb_min_size: int = 20
    min_area_fraction: float = 0.01

    def __post_init__(self):
        if self.method not in SUPERPIXEL_METHODS:
            raise ValueError(f"superpixels must be one of {list(SUPERPIXEL_METHODS)}, got {self.method!r}")
        if self.slic_segments < 1 or self.felzenszwalb_min_size < 1:
            raise ValueError("slic_segments and felzenszwalb_min_size must be >= 1")
        if not 0.0 <= self.min_area_fraction < 1.0:
            raise ValueError(f"superpixel_min_area must lie in [0, 1), got {self.min_area_fraction}")

    def key(self) -> str:
        """A short hash of the settings: cached label maps of other settings are never reused."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def compute_superpixels(image: np.ndarray, settings: SuperpixelSettings) -> np.ndarray:
    """
    Superpixel label map of one RGB image.

    Args:
        image: `(H, W, 3)` uint8 RGB.
        settings: the algorithm and its parameters.

    Returns:
        `(H, W)` int32 labels `0 .. n - 1`, each a connected-ish region (SLIC enforces connectivity).
    """
    from skimage.segmentation import felzenszwalb, slic

    if settings.method == "slic":
        labels = slic(
            image,
            n_segments=settings.slic_segments,
            compactness=settings.slic_compactness,
            sigma=settings.slic_sigma,
            start_label=0,
            channel_axis=-1,
        )
    else:
        labels = felzenszwalb(
            image,
            scale=settings.felzenszwalb_scale,
            sigma=settings.felzenszwalb_sigma,
            min_size=settings.felzenszwalb_min_size,
            channel_axis=-1,
        )
    return np.ascontiguousarray(labels, dtype=np.int32)


def eligible_segments(labels: np.ndarray, min_area_fraction: float) -> np.ndarray:
    """
    The labels of `labels` whose area is at least `min_area_fraction` of the image; when none is, the largest one
    (an image is never without a patch).

    Returns:
        `np.ndarray` of int label ids, ascending.
    """
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids[counts >= min_area_fraction * labels.size]
    return keep if keep.size else ids[[int(np.argmax(counts))]]


class SuperpixelCache:
    """
    Computes each image's superpixels once: in memory by image key, and on disk under `cache_dir` (one `.npy` per
    image, named by a hash of its pixels and the settings), so a second run or a second epoch reuses them.

    Attributes:
        computed (`int`): how many label maps this object computed (not read from a cache); tests count it.
    """

    def __init__(self, settings: SuperpixelSettings, cache_dir: str | os.PathLike | None = None):
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory: dict[str, np.ndarray] = {}
        self.computed = 0

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
        digest.update(str(image.shape).encode())
        return digest.hexdigest()

    def __call__(self, image: np.ndarray, key: str | None = None) -> np.ndarray:
        """The `(H, W)` int32 label map of `image` (`(H, W, 3)` uint8); `key` defaults to a hash of its pixels."""
        key = key or self.image_key(image)
        if key in self.memory:
            return self.memory[key]
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / self.settings.key() / f"{key}.npy"
            if path.is_file():
                labels = np.load(path, allow_pickle=False)
                if labels.shape == image.shape[:2]:
                    self.memory[key] = labels
                    return labels
        labels = compute_superpixels(image, self.settings)
        self.computed += 1
        self.memory[key] = labels
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written under a private name, then renamed: another process never reads half a file.
            partial = path.with_name(f".{path.stem}.{os.getpid()}.npy")
            np.save(partial, labels, allow_pickle=False)
            os.replace(partial, path)
        return labels
