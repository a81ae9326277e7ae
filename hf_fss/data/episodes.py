"""
Episodic datasets for few-shot segmentation: training episodes over a fold's base classes (PFENet) and fixed test
episodes through the model's image processor. Sampling lives in `hf_fss.data.sampling`, weak support annotations
in `hf_fss.data.weak_annotations`; their public names are re-exported here (`from hf_fss.data.episodes import ...`
keeps working).

- Training (PFENet `util/dataset.py`): the items are the images with at least one eligible base class; an item's
  class is drawn uniformly among its eligible base classes and its K supports uniformly (distinct, never the
  query) among that class's eligible images. Novel classes seen in training images are background in PFENet (its
  labels only mark the chosen class); `novel_class_policy="ignore"` makes them 255 instead and `"exclude"` drops
  every image that contains one (the stricter protocol some later papers use).
- Testing: the episodes of `make_test_episodes` (or a JSON Lines file); support annotations `"mask"`, `"bbox"` and
  `"scribble"` (PANet / SMCP `dataloaders/customized.py`, see `support_annotation`).

Randomness is always a `np.random.Generator` seeded from integers (`[seed, epoch, index]` for training items,
`[seed, episode_index, shot]` for test annotations), never global state, so results do not depend on the number
or order of DataLoader workers or processes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hf_fss.data import sampling, weak_annotations
from hf_fss.data.folds import FoldSplit
from hf_fss.data.sampling import (  # noqa: F401  (re-exported, see __all__)
    PFENET_MIN_AREA,
    Episode,
    _default_min_area,
    _draw_supports,
    _holdout_rows,
    _read_class_columns,
    _read_image_ids,
    _usable_classes,
    eligible_images,
    is_binary_split,
    load_episodes_jsonl,
    make_test_episodes,
    save_episodes_jsonl,
    shard_bounds,
    shard_episodes,
    split_base_validation,
    target_mask,
)
from hf_fss.data.schema import IGNORE_INDEX
from hf_fss.data.weak_annotations import ANNOTATION_KINDS, BBOX_MODES, support_annotation  # noqa: F401

# The episodic datasets, and the names of sampling and weak_annotations: `from hf_fss.data.episodes import ...`
# keeps working for all of them.
__all__ = [
    "EXTRA_TRAINING_INPUTS",
    "NOVEL_CLASS_POLICIES",
    "EpisodicTestDataset",
    "EpisodicTrainDataset",
    "collate_test_batch",
    *sampling.__all__,
    *weak_annotations.__all__,
]

logger = logging.getLogger(__name__)

NOVEL_CLASS_POLICIES = ("background", "ignore", "exclude")
# Extra model inputs the episodic training dataset can emit (a model declares the ones it takes).
EXTRA_TRAINING_INPUTS = ("class_ids", "semantic_labels", "support_semantic_labels")


def _decode_row(split: Any, row: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Decode one row: `(H, W, 3)` uint8 RGB image, `(H, W)` uint8 label map, and the row dict."""
    example = split[int(row)]
    image = np.asarray(example["image"].convert("RGB"), dtype=np.uint8)
    label = np.asarray(example["label"])
    if label.ndim != 2:
        raise ValueError(f"image {example['image_id']!r}: label must be single-channel, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"image {example['image_id']!r}: label values must lie in 0..255")
        label = label.astype(np.uint8)
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"image {example['image_id']!r}: image {image.shape[:2]} and label {label.shape} sizes differ"
        )
    return image, label, example


# --------------------------------------------------------------------------------------------------- training


class EpisodicTrainDataset(Dataset):
    """
    Training episodes over the base classes of a fold, PFENet-style, with PFENet's augmentation.

    Args:
        dataset: a benchmark `train` split (`datasets.Dataset` with the columns of `hf_fss.data.schema`).
        fold: `FoldSplit` of the fold (`fold_classes(...)`): episodes use `fold.base`; `fold.unseen` (the novel
            classes, and the validation classes of a split that has them) is what `novel_class_policy` acts on.
        shot: number of supports K.
        size: side S of the square training crops.
        seed: base seed; item `i` of epoch `e` uses `np.random.default_rng([seed, e, i])` (PFENet seeds with 321).
        novel_class_policy: `"background"` (PFENet, default: novel pixels become 0), `"ignore"` (255) or
            `"exclude"` (images containing any novel class, at any area, are dropped as queries and supports).
        min_area: eligibility threshold in pixels; default `2 * 32 * 32` (PFENet), 1 for binary rows (FSS-1000).
        binary_labels: whether rows are binary masks (FSS-1000); default: `is_binary_split(dataset)`.
        augmentation: callable `(image, label, rng, target_value=, require_target=) -> (pixels, mask)`;
            default `TrainAugmentation(size)`.
        holdout_fraction / holdout_seed / holdout_min_images: hold out images as `split_base_validation` does
            (they are neither queries nor supports here); `validation_split()` returns them.
        extra_inputs: the extra model inputs to emit besides the four standard ones, among
            `EXTRA_TRAINING_INPUTS`; a trainer passes `model.query_inputs + model.support_inputs`. Default
            `("class_ids", "semantic_labels")`. An unknown name raises a `ValueError` naming it.

    Items are dicts of tensors (S = `size`, K = `shot`):
        - `pixel_values` `(3, S, S)` float32, normalised query;
        - `labels` `(S, S)` int64 in {0, 1, 255}: the query's target mask for the episode class;
        - `support_pixel_values` `(K, 3, S, S)` float32;
        - `support_masks` `(K, S, S)` int64 in {0, 1, 255}, each with at least one 1;
        and, when requested in `extra_inputs`:
        - `class_ids` int64 scalar, the episode class id;
        - `semantic_labels` `(S, S)` int64: base classes -> 1..len(base) (ascending class id), novel classes per
          the policy (0 or 255), other classes 0, 255 kept;
        - `support_semantic_labels` `(K, S, S)` int64: the same mapping on each support.

    Call `set_epoch(epoch)` before each epoch (with non-persistent DataLoader workers the dataset is re-sent to
    the workers every epoch, so they see the new epoch).
    """

    def __init__(
        self,
        dataset: Any,
        fold: FoldSplit,
        shot: int = 1,
        size: int = 473,
        *,
        seed: int = 321,
        novel_class_policy: str = "background",
        min_area: int | None = None,
        binary_labels: bool | None = None,
        augmentation: Any = None,
        holdout_fraction: float = 0.0,
        holdout_seed: int = 0,
        holdout_min_images: int = 100,
        extra_inputs: Collection[str] = ("class_ids", "semantic_labels"),
    ):
        if isinstance(extra_inputs, str):
            raise TypeError(f"extra_inputs must be a collection of input names, got the string {extra_inputs!r}")
        unknown = sorted(set(extra_inputs) - set(EXTRA_TRAINING_INPUTS))
        if unknown:
            raise ValueError(
                f"EpisodicTrainDataset cannot emit the extra input(s) {unknown}; it emits {list(EXTRA_TRAINING_INPUTS)}"
            )
        self.extra_inputs = tuple(name for name in EXTRA_TRAINING_INPUTS if name in set(extra_inputs))
        if not isinstance(fold, FoldSplit):
            raise TypeError(f"fold must be a FoldSplit (see hf_fss.data.folds.fold_classes), got {type(fold)}")
        if novel_class_policy not in NOVEL_CLASS_POLICIES:
            raise ValueError(f"novel_class_policy must be one of {NOVEL_CLASS_POLICIES}, got {novel_class_policy!r}")
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        self.dataset = dataset
        self.fold = fold
        self.shot = int(shot)
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0
        self.novel_class_policy = novel_class_policy
        self.binary = is_binary_split(dataset) if binary_labels is None else bool(binary_labels)
        self.min_area = _default_min_area(min_area, self.binary)
        if augmentation is None:
            from hf_fss.data.augmentation import TrainAugmentation  # albumentations (~1 s at import): training only

            augmentation = TrainAugmentation(size=self.size)
        self.augmentation = augmentation

        # One pass over the two list columns: the class index is never rebuilt or scanned per episode.
        class_ids, class_areas = _read_class_columns(dataset)
        self.holdout_indices = _holdout_rows(len(dataset), holdout_fraction, holdout_seed, holdout_min_images)
        excluded = set(self.holdout_indices.tolist())
        novel = set(fold.unseen)  # validation classes (COCO canet_40_20_20) are kept out of training as well
        num_dropped_novel = 0
        if novel_class_policy == "exclude":
            with_novel = {row for row, ids in enumerate(class_ids) if novel.intersection(ids)}
            num_dropped_novel = len(with_novel - excluded)
            excluded |= with_novel
        eligible = eligible_images(class_ids, class_areas, fold.base, self.min_area, excluded)
        self.class_to_rows = _usable_classes(eligible, self.shot, "EpisodicTrainDataset")
        if not self.class_to_rows:
            raise ValueError(
                f"no base class of {fold.base} has {self.shot + 1} images with >= {self.min_area} target pixels"
            )

        row_classes: dict[int, list[int]] = {}
        for c, rows in self.class_to_rows.items():
            for row in rows.tolist():
                row_classes.setdefault(row, []).append(c)
        self.item_rows = np.asarray(sorted(row_classes), dtype=np.int64)
        # Flat CSR layout (offsets + values): compact to pickle to DataLoader workers even for COCO.
        counts = [len(row_classes[row]) for row in self.item_rows.tolist()]
        self._item_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._item_classes = np.asarray(
            [c for row in self.item_rows.tolist() for c in sorted(row_classes[row])], dtype=np.int64
        )
        # Class id per binary row (FSS-1000 rows hold one class, label value 1).
        self._row_class = (
            np.asarray([ids[0] if len(ids) else 0 for ids in class_ids], dtype=np.int64) if self.binary else None
        )
        self._build_luts()

        logger.info(
            "EpisodicTrainDataset: %d query images (training set size), %d/%d base classes usable, %d-shot, "
            "min_area=%d, novel_class_policy=%s, %d images held out, %d dropped for novel classes",
            len(self.item_rows),
            len(self.class_to_rows),
            len(fold.base),
            self.shot,
            self.min_area,
            novel_class_policy,
            len(self.holdout_indices),
            num_dropped_novel,
        )

    def _build_luts(self) -> None:
        """Value lookup tables for dense label maps: policy (applied before augmentation) and semantic ids."""
        policy = np.arange(256, dtype=np.uint8)
        for c in self.fold.unseen:
            if c < 256:
                policy[c] = IGNORE_INDEX if self.novel_class_policy == "ignore" else 0
        semantic = np.zeros(256, dtype=np.int64)
        semantic[IGNORE_INDEX] = IGNORE_INDEX
        for rank, c in enumerate(self.fold.base, start=1):
            if c < 256:
                semantic[c] = rank
        self._policy_lut = policy
        self._semantic_lut = semantic
        self._base_rank = {c: rank for rank, c in enumerate(self.fold.base, start=1)}

    @property
    def num_items(self) -> int:
        """Training set size: the number of query images."""
        return len(self.item_rows)

    def __len__(self) -> int:
        return len(self.item_rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def validation_split(self) -> Any:
        """The held-out images (`holdout_fraction > 0`) as a `datasets.Dataset` view, for base-class validation."""
        return self.dataset.select(self.holdout_indices.tolist())

    def item_classes(self, index: int) -> tuple[int, ...]:
        """Eligible base classes of item `index` (the episode class is drawn among them)."""
        return tuple(self._item_classes[self._item_offsets[index] : self._item_offsets[index + 1]].tolist())

    def sample_episode(self, index: int, epoch: int | None = None) -> tuple[int, int, list[int]]:
        """`(query_row, class_id, support_rows)` of item `index` (rows of `dataset`), without decoding anything."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), int(index)])
        return self._sample(index, rng)

    def _sample(self, index: int, rng: np.random.Generator) -> tuple[int, int, list[int]]:
        if not 0 <= index < len(self.item_rows):
            raise IndexError(f"index {index} out of range for {len(self.item_rows)} items")
        classes = self._item_classes[self._item_offsets[index] : self._item_offsets[index + 1]]
        class_id = int(classes[rng.integers(len(classes))])
        query_row = int(self.item_rows[index])
        supports = _draw_supports(self.class_to_rows[class_id], query_row, self.shot, rng)
        return query_row, class_id, supports

    def _luts_for_row(self, row: int, class_id: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, int]:
        """(policy LUT or None, target LUT, semantic LUT, target value) of one row's stored label values."""
        target = np.zeros(256, dtype=np.int64)
        target[IGNORE_INDEX] = IGNORE_INDEX
        if not self.binary:
            target[class_id] = 1
            return self._policy_lut, target, self._semantic_lut, class_id
        row_class = int(self._row_class[row])
        target[1] = 1 if row_class == class_id else 0
        semantic = np.zeros(256, dtype=np.int64)
        semantic[IGNORE_INDEX] = IGNORE_INDEX
        if row_class in self._base_rank:
            semantic[1] = self._base_rank[row_class]
        elif row_class in set(self.fold.unseen) and self.novel_class_policy == "ignore":
            semantic[1] = IGNORE_INDEX
        return None, target, semantic, 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        query_row, class_id, support_rows = self._sample(int(index), rng)

        pixels, label_maps = [], []
        for k, row in enumerate([query_row, *support_rows]):
            image, label, _ = _decode_row(self.dataset, row)
            policy, target_lut, semantic_lut, target_value = self._luts_for_row(row, class_id)
            if policy is not None:
                label = policy[label]
            # The full label map is augmented (not only the target) so semantic labels stay aligned.
            image_t, label_t = self.augmentation(image, label, rng, target_value=target_value, require_target=k > 0)
            pixels.append(image_t)
            label_maps.append((label_t, target_lut, semantic_lut))

        query_label, target_lut, semantic_lut = label_maps[0]
        support_masks = [torch.from_numpy(lut[m.numpy()]) for m, lut, _ in label_maps[1:]]
        item = {
            "pixel_values": pixels[0],
            "labels": torch.from_numpy(target_lut[query_label.numpy()]),
            "support_pixel_values": torch.stack(pixels[1:]),
            "support_masks": torch.stack(support_masks),
        }
        if "class_ids" in self.extra_inputs:
            item["class_ids"] = torch.tensor(class_id, dtype=torch.long)
        if "semantic_labels" in self.extra_inputs:
            item["semantic_labels"] = torch.from_numpy(semantic_lut[query_label.numpy()])
        if "support_semantic_labels" in self.extra_inputs:
            item["support_semantic_labels"] = torch.stack(
                [torch.from_numpy(lut[m.numpy()]) for m, _, lut in label_maps[1:]]
            )
        return item


# --------------------------------------------------------------------------------------------- test dataset


class EpisodicTestDataset(Dataset):
    """
    Fixed test episodes through the model's image processor (evaluation geometry = the processor's).

    Args:
        split: the `datasets.Dataset` the episodes were drawn from.
        episodes: `list[Episode]` (e.g. `make_test_episodes(...)`, `load_episodes_jsonl(...)`, or one shard).
        processor: a `FewShotSegmentationImageProcessor` (called once per item with one query and its supports).
        annotation: support annotation, `"mask"`, `"bbox"` or `"scribble"` (see `support_annotation`).
        seed: seed of the annotations; support k of episode i uses `np.random.default_rng([seed, i, k])`.
        episode_offset: global index of `episodes[0]` (`shard_bounds(...)[0]` for a shard), so annotations and
            `episode_index` match the unsharded run.
        binary_labels: default `is_binary_split(split)`.
        annotation_kwargs: extra keyword arguments of `support_annotation` (e.g. `bbox_mode="union"`).
        cache: an evaluation cache with `get(key, state)` / `put(key, value, tensors, state)` (a
            `hf_fss.backbones.FeatureCache`): each image is then decoded and preprocessed once (its normalised
            canvas and label map), and each support's dense mask once per class, instead of once per episode; the
            items are identical. Only with a `FewShotSegmentationImageProcessor` (its per-image steps are used) and
            in the loading process (`num_workers=0`: a worker would fill its own copy).
        cache_prefix: what the cache keys start with besides the image id: the split's and the processor's identity
            (equal prefixes must mean the same split and processor settings).

    Items (S = processor image size, K = shot, H x W = the query's original size):
        - `pixel_values` `(3, S, S)` float32; `support_pixel_values` `(K, 3, S, S)` float32;
        - `support_masks` `(K, S, S)` int64 in {0, 1, 255};
        - `target` `(H, W)` int64 in {0, 1, 255}: the query's target mask at original resolution;
        - `original_size` `(2,)` int64 `(H, W)`; `class_ids` and `episode_index` int64 scalars.
    Batch with `collate_test_batch` (targets differ in size).
    """

    def __init__(
        self,
        split: Any,
        episodes: Sequence[Episode],
        processor: Any,
        annotation: str = "mask",
        seed: int = 0,
        *,
        episode_offset: int = 0,
        binary_labels: bool | None = None,
        annotation_kwargs: dict[str, Any] | None = None,
        cache: Any = None,
        cache_prefix: tuple = (),
    ):
        if annotation not in ANNOTATION_KINDS:
            raise ValueError(f"unknown support annotation {annotation!r}; expected one of {ANNOTATION_KINDS}")
        self.split = split
        self.episodes = list(episodes)
        self.processor = processor
        self.annotation = annotation
        self.seed = int(seed)
        self.episode_offset = int(episode_offset)
        self.binary = is_binary_split(split) if binary_labels is None else bool(binary_labels)
        self.annotation_kwargs = dict(annotation_kwargs or {})
        per_image = ("resize_and_pad_image", "resize_and_pad_mask", "annotation_to_mask")
        self.cache = cache if all(hasattr(processor, name) for name in per_image) else None
        self.cache_prefix = tuple(cache_prefix)
        # Only the id column is read here: a plain dict from image_id to row, built once.
        self._row_of = {image_id: row for row, image_id in enumerate(_read_image_ids(split))}
        missing = sorted({i for e in self.episodes for i in (e.query, *e.supports)} - set(self._row_of))
        if missing:
            raise ValueError(f"{len(missing)} episode image ids are not in the split, e.g. {missing[:5]}")

    def __len__(self) -> int:
        return len(self.episodes)

    def _scribble_width(self, shape: tuple[int, int]) -> int:
        """
        Default scribble width: `support_annotation`'s, but at least the processor's downscale factor, so lines
        survive its nearest-neighbour mask resize (a run of `ceil(f)` pixels always keeps one sample).
        """
        longer = max(shape)
        width = max(1, round(longer / 160))
        image_size = getattr(self.processor, "image_size", None)
        if isinstance(image_size, int) and image_size > 0:
            width = max(width, math.ceil(longer / image_size))
        return width

    def _cached(self, key: tuple, compute, *args) -> Any:
        """`compute(*args)` (a tuple of tensors), stored in / served from `self.cache` under `key`."""
        key = (key[0], *self.cache_prefix, *key[1:])
        value = self.cache.get(key, ())
        if value is None:
            value = compute(*args)
            self.cache.put(key, value, value, ())
        return value

    def _preprocessed_image(self, image_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's normalised canvas `(3, S, S)` of an image and its label map `(H, W)` uint8."""
        image, label, _ = _decode_row(self.split, self._row_of[image_id])
        return torch.from_numpy(self.processor.resize_and_pad_image(image)), torch.from_numpy(label.copy())

    def _dense_mask(self, label: torch.Tensor, c: int, k: int) -> tuple[torch.Tensor]:
        return (self._preprocessed_mask(target_mask(label.numpy(), c, self.binary), k),)

    def _preprocessed_mask(self, mask: np.ndarray, k: int) -> torch.Tensor:
        """A support annotation as the processor prepares it (`support_class_ids=1`): `(S, S)` int64."""
        name = f"support_masks[0][{k}] (query 0, shot {k})"
        mask = self.processor.annotation_to_mask(mask, mask.shape, 1, name, "support_class_ids")
        return torch.from_numpy(np.asarray(self.processor.resize_and_pad_mask(mask))).long()

    def _annotation(self, mask: np.ndarray, episode_index: int, k: int) -> np.ndarray:
        """Support k's annotation of a dense target mask (itself for `mask`), seeded by the episode."""
        if self.annotation == "mask":
            return mask
        rng = np.random.default_rng([self.seed, episode_index, k])
        kwargs = dict(self.annotation_kwargs)
        if self.annotation == "scribble" and kwargs.get("scribble_width") is None:
            kwargs["scribble_width"] = self._scribble_width(mask.shape)
        return support_annotation(mask, self.annotation, rng, **kwargs)

    def _cached_item(self, episode: Episode, episode_index: int) -> dict[str, torch.Tensor]:
        """`__getitem__` from the cache: each image decoded and preprocessed once, dense support masks once per
        class (weak annotations depend on the episode: prepared each time)."""
        c = episode.class_id
        pixel_values, query_label = self._cached(("image", episode.query), self._preprocessed_image, episode.query)
        support_pixels, support_masks = [], []
        for k, image_id in enumerate(episode.supports):
            pixels, label = self._cached(("image", image_id), self._preprocessed_image, image_id)
            support_pixels.append(pixels)
            if self.annotation == "mask":
                support_masks.append(self._cached(("mask", image_id, c), self._dense_mask, label, c, k)[0])
            else:
                mask = self._annotation(target_mask(label.numpy(), c, self.binary), episode_index, k)
                support_masks.append(self._preprocessed_mask(mask, k))
        return self._item(
            pixel_values,
            torch.stack(support_pixels),
            torch.stack(support_masks),
            query_label.numpy(),
            c,
            episode_index,
        )

    def _item(self, pixel_values, support_pixel_values, support_masks, query_label, c, episode_index) -> dict:
        height, width = query_label.shape
        return {
            "pixel_values": pixel_values,
            "support_pixel_values": support_pixel_values,
            "support_masks": support_masks,
            "target": torch.from_numpy(target_mask(query_label, c, self.binary).astype(np.int64)),
            "original_size": torch.tensor([height, width], dtype=torch.long),
            "class_ids": torch.tensor(c, dtype=torch.long),
            "episode_index": torch.tensor(episode_index, dtype=torch.long),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        episode = self.episodes[int(index)]
        episode_index = self.episode_offset + int(index)
        if self.cache is not None:
            return self._cached_item(episode, episode_index)
        c = episode.class_id
        query_image, query_label, _ = _decode_row(self.split, self._row_of[episode.query])
        support_images, support_masks = [], []
        for k, image_id in enumerate(episode.supports):
            image, label, _ = _decode_row(self.split, self._row_of[image_id])
            mask = self._annotation(target_mask(label, c, self.binary), episode_index, k)
            support_images.append(image)
            support_masks.append(mask)
        # support_class_ids=1 makes the processor read the masks as label maps (1 target, 255 ignore), which is
        # unambiguous even for a mask whose only values are {0, 255}.
        batch = self.processor(
            images=[query_image],
            support_images=[support_images],
            support_masks=[support_masks],
            support_class_ids=1,
            return_tensors="pt",
        )
        return self._item(
            batch["pixel_values"][0],
            batch["support_pixel_values"][0],
            batch["support_masks"][0].long(),
            query_label,
            c,
            episode_index,
        )


def collate_test_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the fixed-size tensors of test items; `target` (original sizes differ) stays a list of tensors."""
    if not items:
        raise ValueError("empty batch")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key != "target" and all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
