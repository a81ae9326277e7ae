"""
Unlabeled images for the pretraining: any `--dataset` of `hf_fss.data.loading` (`synthetic`, a built benchmark
folder, a Hub dataset id) or a plain folder of image files; the training split by default, every split with
`include_eval_images` (the paper's "all the images in the dataset", which includes the few-shot test queries).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch

from .superpixels import SuperpixelCache
from .views import ContrastiveViews

__all__ = ["IMAGE_SUFFIXES", "PretrainingImages", "load_unlabeled_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _image_folder(path: Path) -> datasets.Dataset:
    files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--dataset {str(path)!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return datasets.Dataset.from_dict({"image": files}).cast_column("image", datasets.Image())


def load_unlabeled_images(
    dataset: str, include_eval_images: bool = False, **synthetic_kwargs
) -> tuple[datasets.Dataset, list[str]]:
    """
    The images to pretrain on, as a `datasets.Dataset` with one `image` column, and the splits they come from.

    Args:
        dataset: `synthetic`, a `scripts/prepare_dataset.py` folder, a Hub dataset id, or a folder of image files
            (searched recursively).
        include_eval_images: every split of a benchmark, not only `train`.
        synthetic_kwargs: `synthetic_seed`, `num_train`, ... for `synthetic`.

    Raises:
        `ValueError` / `FileNotFoundError`: an unknown or empty dataset, or a benchmark without a `train` split.
    """
    from hf_fss.data.loading import load_benchmark

    path = Path(dataset).expanduser()
    if dataset != "synthetic" and path.is_dir() and not (path / "dataset_dict.json").is_file():
        return _image_folder(path), [str(path)]
    splits = load_benchmark(dataset, **synthetic_kwargs)
    names = list(splits) if include_eval_images else ["train"]
    if "train" not in splits:
        raise ValueError(f"--dataset {dataset!r} has no 'train' split (splits: {list(splits)})")
    images = datasets.concatenate_datasets([splits[name].select_columns(["image"]) for name in names])
    return images, names


class PretrainingImages(torch.utils.data.Dataset):
    """
    Item `i`: the views of image `i` (`ContrastiveViews`), randomised by `np.random.default_rng([seed, epoch, i])`,
    so an item does not depend on the process, the worker or what was drawn before (a resumed run sees the same
    views). Superpixels come from `superpixels` (computed once per image and cached), only when a local form needs
    them.
    """

    def __init__(
        self,
        images: datasets.Dataset,
        views: ContrastiveViews,
        superpixels: SuperpixelCache | None = None,
        seed: int = 0,
    ):
        if views.local_form is not None and superpixels is None:
            raise ValueError(f"local form {views.local_form!r} needs superpixels")
        self.images, self.views, self.superpixels = images, views, superpixels
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> np.ndarray:
        return np.asarray(self.images[int(index)]["image"].convert("RGB"))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.image(index)
        labels = self.superpixels(image) if self.views.local_form is not None else None
        return self.views(image, labels, np.random.default_rng([self.seed, self.epoch, int(index)]))
