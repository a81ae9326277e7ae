"""
Episodic datasets for few-shot segmentation: training episodes over a fold's base classes, fixed test episodes over
its novel classes, a held-out base-class validation set, and support annotations weaker than masks.

Conventions (PFENet `util/dataset.py` and `train.py`, HSNet `data/*.py`, PANet / SMCP `dataloaders/customized.py`):

- Eligibility. An image is eligible for class `c` when `c` covers at least `2 * 32 * 32` pixels (PFENet's
  `make_dataset`, following Shaban et al.: the object must survive a 1/32 downsampling with more than 2 pixels).
  PFENet's `make_dataset` is shared by its train and val modes, so the rule filters the validation queries and
  supports as well; we apply it to both (PFENet picks a val query's class among *all* novel classes of the image,
  we pick only among its eligible ones, so every episode's query holds a sizeable target). Areas come from the
  `class_areas` column (stored resolution). For binary benchmarks (FSS-1000) there is no such rule in HSNet (every
  image of a class is used), so the default threshold there is one pixel.
- Target mask for class `c`: 1 where `label == c` (`label == 1` for binary FSS-1000 rows), 255 where
  `label == 255`, 0 elsewhere.
- Training (PFENet): the items are the images with at least one eligible base class; an item's class is drawn
  uniformly among its eligible base classes and its K supports uniformly (distinct, never the query) among that
  class's eligible images. Novel classes seen in training images are background in PFENet (its labels only mark
  the chosen class); `novel_class_policy="ignore"` makes them 255 instead and `"exclude"` drops every image that
  contains one (the stricter protocol some later papers use).
- Testing: a fixed, seeded list of episodes, generated identically on every process. `sampling="pair"` walks the
  eligible (image, class) pairs in a seeded random order (every pair once before any repeats: HSNet's PASCAL
  loader cycles through its (image, class) list, PFENet's through its image list); `sampling="class"` draws a
  class uniformly, then a query (HSNet's COCO loader). `num_episodes=None` gives every eligible pair once in
  dataset order (FSS-1000: every test image once as query, as in HSNet).
- Support annotations at test time (PANet / SMCP): `"mask"` (dense), `"bbox"` and `"scribble"`; see
  `support_annotation`.

Randomness is always a `np.random.Generator` seeded from integers (`[seed, epoch, index]` for training items,
`[seed, episode_index, shot]` for test annotations), never global state, so results do not depend on the number
or order of DataLoader workers or processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from scipy import ndimage
from scipy.sparse.csgraph import connected_components, dijkstra
from skimage.draw import line as draw_line
from skimage.graph import pixel_graph
from skimage.morphology import skeletonize
from torch.utils.data import Dataset

from hf_fss.data.augmentation import TrainAugmentation
from hf_fss.data.folds import FoldSplit, _as_class_tuple
from hf_fss.data.schema import IGNORE_INDEX
from hf_fss.file_utils import atomic_write_text

__all__ = [
    "ANNOTATION_KINDS",
    "EXTRA_TRAINING_INPUTS",
    "NOVEL_CLASS_POLICIES",
    "PFENET_MIN_AREA",
    "Episode",
    "EpisodicTestDataset",
    "EpisodicTrainDataset",
    "collate_test_batch",
    "eligible_images",
    "is_binary_split",
    "load_episodes_jsonl",
    "make_test_episodes",
    "save_episodes_jsonl",
    "shard_bounds",
    "shard_episodes",
    "split_base_validation",
    "support_annotation",
    "target_mask",
]

logger = logging.getLogger(__name__)

PFENET_MIN_AREA = 2 * 32 * 32
NOVEL_CLASS_POLICIES = ("background", "ignore", "exclude")
ANNOTATION_KINDS = ("mask", "bbox", "scribble")
# Extra model inputs the episodic training dataset can emit (a model declares the ones it takes).
EXTRA_TRAINING_INPUTS = ("class_ids", "semantic_labels", "support_semantic_labels")
BBOX_MODES = ("instance", "union")

# Label maps with more class ids than fit in a uint8 PNG store one class per row as a binary mask (FSS-1000).
_MAX_DENSE_CLASSES = 256


# ------------------------------------------------------------------------------------------------ basics


@dataclass(frozen=True)
class Episode:
    """One test episode: the query's `image_id`, the K support `image_id`s and the class to segment."""

    query: str
    supports: tuple[str, ...]
    class_id: int

    def to_json(self) -> dict[str, Any]:
        return {"query": self.query, "supports": list(self.supports), "class_id": self.class_id}


def is_binary_split(split: Any) -> bool:
    """
    Whether rows store binary masks (1 = the row's class) rather than label maps of class ids: true for
    benchmarks with more classes than a uint8 label map holds (FSS-1000's ClassLabel has 1001 names).
    """
    feature = split.features["class_ids"]
    feature = getattr(feature, "feature", feature)
    return getattr(feature, "num_classes", 0) > _MAX_DENSE_CLASSES


def target_mask(label: np.ndarray, class_id: int, binary: bool = False) -> np.ndarray:
    """
    `(H, W)` label map -> `(H, W)` uint8 target mask: 1 where `label == class_id` (`label == 1` for a binary row),
    255 where `label == 255`, 0 elsewhere.
    """
    label = np.asarray(label)
    mask = np.zeros(label.shape, dtype=np.uint8)
    mask[label == IGNORE_INDEX] = IGNORE_INDEX
    mask[label == (1 if binary else class_id)] = 1
    return mask


def _read_class_columns(split: Any) -> tuple[list[list[int]], list[list[int]]]:
    """`class_ids` and `class_areas` of every row, read from the columns only (no image is decoded)."""
    columns = split.select_columns(["class_ids", "class_areas"])[:]
    ids, areas = columns["class_ids"], columns["class_areas"]
    for row, (row_ids, row_areas) in enumerate(zip(ids, areas)):
        if len(row_ids) != len(row_areas):
            raise ValueError(f"row {row}: class_ids {row_ids} and class_areas {row_areas} differ in length")
    return ids, areas


def _read_image_ids(split: Any) -> list[str]:
    ids = list(split.select_columns(["image_id"])[:]["image_id"])
    if len(set(ids)) != len(ids):
        values, counts = np.unique(np.asarray(ids, dtype=object).astype(str), return_counts=True)
        raise ValueError(
            f"image_id must be unique within a split (episodes refer to images by id); repeated: "
            f"{values[counts > 1][:5].tolist()}"
        )
    return ids


def _default_min_area(min_area: int | None, binary: bool) -> int:
    if min_area is None:
        return 1 if binary else PFENET_MIN_AREA
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1 (a class must be present), got {min_area}")
    return int(min_area)


def eligible_images(
    class_ids: Sequence[Sequence[int]],
    class_areas: Sequence[Sequence[int]],
    classes: Iterable[int],
    min_area: int,
    excluded_rows: Iterable[int] = (),
) -> dict[int, np.ndarray]:
    """
    Rows eligible for each class: `{c: sorted int64 array of rows where c covers >= min_area pixels}` for every
    `c` in `classes` (possibly empty arrays), ignoring `excluded_rows`.
    """
    wanted = set(_as_class_tuple(classes))
    excluded = {int(r) for r in excluded_rows}
    rows: dict[int, list[int]] = {c: [] for c in sorted(wanted)}
    for row, (row_ids, row_areas) in enumerate(zip(class_ids, class_areas)):
        if row in excluded:
            continue
        for c, area in zip(row_ids, row_areas):
            if c in wanted and area >= min_area:
                rows[c].append(row)
    return {c: np.asarray(sorted(set(r)), dtype=np.int64) for c, r in rows.items()}


def _usable_classes(eligible: dict[int, np.ndarray], shot: int, what: str) -> dict[int, np.ndarray]:
    """Keep the classes with enough eligible images for a query plus `shot` distinct supports."""
    usable = {c: rows for c, rows in eligible.items() if len(rows) >= shot + 1}
    dropped = sorted(set(eligible) - set(usable))
    if dropped:
        logger.warning(
            "%s: classes %s have fewer than %d eligible images (a query and %d supports) and are skipped",
            what,
            dropped,
            shot + 1,
            shot,
        )
    return usable


def _draw_supports(candidates: np.ndarray, query_row: int, shot: int, rng: np.random.Generator) -> list[int]:
    """`shot` distinct rows drawn uniformly from the sorted `candidates`, never `query_row`."""
    position = int(np.searchsorted(candidates, query_row))
    has_query = position < len(candidates) and candidates[position] == query_row
    pool = len(candidates) - int(has_query)
    if pool < shot:
        raise ValueError(f"need {shot} support images besides the query, only {pool} available")
    picks = rng.choice(pool, size=shot, replace=False)
    if has_query:
        # Positions at or after the query's shift by one, which skips it without building a new array.
        picks = np.where(picks >= position, picks + 1, picks)
    return [int(candidates[p]) for p in picks]


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


# ------------------------------------------------------------------------------------------- held-out validation


def _holdout_rows(num_rows: int, fraction: float, seed: int, min_images: int) -> np.ndarray:
    """Sorted rows of a seeded random subset: `max(ceil(fraction * n), min_images)` rows, at most `n - 1`."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or num_rows < 2:
        return np.zeros(0, dtype=np.int64)
    count = min(max(math.ceil(fraction * num_rows), int(min_images)), num_rows - 1)
    order = np.random.default_rng([int(seed), num_rows]).permutation(num_rows)
    return np.sort(order[:count]).astype(np.int64)


def split_base_validation(
    train_split: Any, fraction: float = 0.05, seed: int = 0, min_images: int = 100
) -> tuple[Any, Any]:
    """
    Hold out a fixed, seeded subset of the training images for model selection on base classes.

    Args:
        train_split: the benchmark's `train` `datasets.Dataset`.
        fraction: share of the images held out (default 5%).
        seed: seed of the subset.
        min_images: hold out at least this many images (so a few hundred validation episodes can be drawn on
            small datasets), never all of them.

    Returns:
        `(train_part, validation_part)`, two `datasets.Dataset` views (`.select`) of disjoint rows. Build the
        training episodes on `train_part` and the validation episodes with
        `make_test_episodes(validation_part, fold.base, ...)` + `EpisodicTestDataset`, so queries and supports of
        validation episodes come from the held-out images only. Selecting on the test fold instead, as the papers
        do, is `make_test_episodes(dataset["validation"], fold.novel, ...)`.
    """
    held = _holdout_rows(len(train_split), fraction, seed, min_images)
    mask = np.ones(len(train_split), dtype=bool)
    mask[held] = False
    return train_split.select(np.flatnonzero(mask).tolist()), train_split.select(held.tolist())


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
        self.augmentation = TrainAugmentation(size=self.size) if augmentation is None else augmentation

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


# ------------------------------------------------------------------------------------------------------ testing


def make_test_episodes(
    split: Any,
    classes: Iterable[int],
    num_episodes: int | None = 1000,
    shot: int = 1,
    seed: int = 0,
    *,
    min_area: int | None = None,
    binary_labels: bool | None = None,
    sampling: str = "pair",
) -> list[Episode]:
    """
    A fixed, seeded list of test episodes, identical on every process (generated entirely from `seed`).

    Args:
        split: a benchmark split (`datasets.Dataset`), e.g. `dataset["validation"]` for PASCAL-5i / COCO-20i,
            `dataset["test"]` for FSS-1000, or a held-out part of `train` for base-class validation.
        classes: classes episodes are drawn for, usually `fold.novel`.
        num_episodes: number of episodes (PASCAL-5i 1000; COCO-20i 1000 or 4000), or `None` for every eligible
            (image, class) pair once, in dataset order (FSS-1000: every test image once as query).
        shot: K supports per episode: distinct, never the query, each eligible for the class.
        seed: the only source of randomness.
        min_area: eligibility threshold (default `2 * 32 * 32`, 1 for binary FSS-1000 rows).
        binary_labels: default `is_binary_split(split)`.
        sampling: `"pair"` (seeded permutations of all eligible (image, class) pairs, repeated when
            `num_episodes` exceeds their number) or `"class"` (class uniformly, then query uniformly).

    Returns:
        `list[Episode]` of length `num_episodes` (or the number of eligible pairs).
    """
    if shot < 1:
        raise ValueError(f"shot must be >= 1, got {shot}")
    if num_episodes is not None and num_episodes < 1:
        raise ValueError(f"num_episodes must be positive or None, got {num_episodes}")
    if sampling not in ("pair", "class"):
        raise ValueError(f"sampling must be 'pair' or 'class', got {sampling!r}")
    binary = is_binary_split(split) if binary_labels is None else bool(binary_labels)
    threshold = _default_min_area(min_area, binary)
    image_ids = _read_image_ids(split)
    class_ids, class_areas = _read_class_columns(split)
    eligible = _usable_classes(eligible_images(class_ids, class_areas, classes, threshold), shot, "make_test_episodes")
    if not eligible:
        raise ValueError(f"no class of {_as_class_tuple(classes)} has {shot + 1} eligible images in this split")

    pairs = sorted((int(row), c) for c, rows in eligible.items() for row in rows.tolist())
    rng = np.random.default_rng(int(seed))
    if num_episodes is None:
        chosen = pairs
    elif sampling == "pair":
        order: list[int] = []
        while len(order) < num_episodes:
            order.extend(rng.permutation(len(pairs)).tolist())
        chosen = [pairs[i] for i in order[:num_episodes]]
    else:
        usable = sorted(eligible)
        chosen = []
        for _ in range(num_episodes):
            c = usable[int(rng.integers(len(usable)))]
            rows = eligible[c]
            chosen.append((int(rows[rng.integers(len(rows))]), c))

    episodes = []
    for row, c in chosen:
        supports = _draw_supports(eligible[c], row, shot, rng)
        episodes.append(Episode(image_ids[row], tuple(image_ids[s] for s in supports), int(c)))
    return episodes


def save_episodes_jsonl(episodes: Iterable[Episode], path: str | os.PathLike) -> None:
    """Write one JSON object per line, `{"query": id, "supports": [ids], "class_id": c}`, atomically."""
    atomic_write_text(path, "".join(json.dumps(episode.to_json()) + "\n" for episode in episodes))


def load_episodes_jsonl(path: str | os.PathLike, split: Any = None) -> list[Episode]:
    """
    Read a list written by `save_episodes_jsonl`. Every episode must have distinct supports, none of them its query;
    with `split`, its images must exist there and the class must be in every support image.

    Raises:
        `ValueError`: naming the file, the line, the episode's image ids and what is wrong.
    """
    from .text import read_user_text

    episodes, numbers = [], []
    # Read as editors save it: a BOM, CRLF or UTF-16 with a BOM are fine; another encoding is one line naming it.
    for number, line in enumerate(read_user_text(path, "episodes file").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            episode = Episode(str(record["query"]), tuple(str(s) for s in record["supports"]), int(record["class_id"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{os.fspath(path)}:{number}: not an episode record ({err})") from err
        _check_episode(episode, f"{os.fspath(path)}:{number}")
        episodes.append(episode)
        numbers.append(number)
    if split is not None:
        _check_episodes_against_split(episodes, [f"{os.fspath(path)}:{n}" for n in numbers], split)
    return episodes


def _describe(episode: Episode) -> str:
    return f"episode (query {episode.query!r}, supports {list(episode.supports)}, class {episode.class_id})"


def _check_episode(episode: Episode, where: str) -> None:
    if not episode.supports:
        raise ValueError(f"{where}: {_describe(episode)} has no support image")
    if episode.query in episode.supports:
        raise ValueError(
            f"{where}: {_describe(episode)} uses its query {episode.query!r} as a support; supports must be "
            "other images of the class"
        )
    if len(set(episode.supports)) != len(episode.supports):
        raise ValueError(f"{where}: {_describe(episode)} repeats a support image; the K supports must be distinct")


def _check_episodes_against_split(episodes: Sequence[Episode], places: Sequence[str], split: Any) -> None:
    """Every image of every episode is in `split` and its class is in every support image (class_ids column)."""
    row_of = {image_id: row for row, image_id in enumerate(_read_image_ids(split))}
    class_ids, _ = _read_class_columns(split)
    feature = split.features["class_ids"]
    names = getattr(getattr(feature, "feature", feature), "names", None)
    for episode, where in zip(episodes, places):
        absent = [i for i in (episode.query, *episode.supports) if i not in row_of]
        if absent:
            raise ValueError(f"{where}: {_describe(episode)} names image(s) {absent} that the split does not hold")
        c = episode.class_id
        for image_id in episode.supports:
            if c not in class_ids[row_of[image_id]]:
                name = f" ({names[c]!r})" if names and 0 <= c < len(names) else ""
                raise ValueError(
                    f"{where}: {_describe(episode)}: class {c}{name} is not in support image {image_id!r} (its "
                    f"classes: {list(class_ids[row_of[image_id]])})"
                )


def shard_bounds(num_items: int, num_shards: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of contiguous shard `index` of `num_shards` (sizes differ by at most one)."""
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"need num_shards >= 1 and 0 <= index < num_shards, got {num_shards}, {index}")
    base, extra = divmod(num_items, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_episodes(episodes: Sequence[Episode], num_shards: int, index: int) -> list[Episode]:
    """Contiguous shard `index`: joining shards `0..num_shards-1` in order gives `episodes` back."""
    start, stop = shard_bounds(len(episodes), num_shards, index)
    return list(episodes[start:stop])


# ---------------------------------------------------------------------------------------- support annotations


def _longest_paths(skeleton: np.ndarray, rng: np.random.Generator, min_nodes: int) -> list[np.ndarray]:
    """Per connected piece of a skeleton (>= min_nodes pixels): its longest path as an (N, 2) (y, x) array."""
    if not skeleton.any():
        return []
    # 8-neighbour graph over the skeleton pixels, edges weighted by distance (1 or sqrt 2); nodes in raster order.
    graph, nodes = pixel_graph(skeleton, connectivity=2)
    coords = np.stack(np.unravel_index(nodes, skeleton.shape), axis=1)
    count, labels = connected_components(graph, directed=False)
    paths = []
    for component in range(count):
        nodes = np.flatnonzero(labels == component)
        if len(nodes) < min_nodes:
            continue
        # Double sweep: the farthest node from any node is an end of a longest path (exact on trees).
        start = int(nodes[rng.integers(len(nodes))])
        distance = dijkstra(graph, directed=False, indices=start)
        end_a = int(nodes[np.argmax(distance[nodes])])
        distance, predecessors = dijkstra(graph, directed=False, indices=end_a, return_predecessors=True)
        node = int(nodes[np.argmax(distance[nodes])])
        path = [node]
        while node != end_a:
            node = int(predecessors[node])
            path.append(node)
        paths.append(coords[np.asarray(path)])
    return paths


def _region_scribble(
    region: np.ndarray,
    rng: np.random.Generator,
    kernel_range: tuple[float, float],
    max_radius: float,
    width: int,
    work_size: int = 128,
) -> np.ndarray:
    """
    Scribbles inside a boolean region, in the spirit of the DAVIS scribble robot that PANet's automatic scribbles
    come from (SMCP `util/scribbles.py`): open the region with a disk proportional to the square root of its area
    (drops thin parts and specks), skeletonise it, follow the longest path of every skeleton piece, trim and
    smooth it a little at random, draw it, and keep only pixels inside the region. The skeleton is computed on
    the region's bounding box scaled to at most `work_size` px (the curves are smoothed anyway; this keeps it
    fast); drawing is at full resolution. Never empty for a non-empty region (falls back to a dot at the
    innermost pixel).
    """
    height, width_px = region.shape
    out = np.zeros(region.shape, dtype=bool)
    if not region.any():
        return out
    ys, xs = np.nonzero(region)
    top, left = int(ys.min()), int(xs.min())
    crop = region[top : int(ys.max()) + 1, left : int(xs.max()) + 1].astype(np.uint8)
    scale = min(1.0, work_size / max(crop.shape))
    if scale < 1.0:
        small_size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, small_size, interpolation=cv2.INTER_NEAREST)
    area = int(crop.sum())
    radius = min(rng.uniform(*kernel_range) * math.sqrt(area) * 0.5, max_radius * scale)
    opened = crop
    while radius > 1.0:
        size = 2 * int(round(radius)) + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        candidate = cv2.morphologyEx(crop, cv2.MORPH_OPEN, kernel)
        if candidate.any():
            opened = candidate
            break
        radius *= 0.9
    skeleton = skeletonize(np.pad(opened.astype(bool), 1))[1:-1, 1:-1]
    for path in _longest_paths(skeleton, rng, min_nodes=4):
        length = len(path)
        # Random trim of each end (human scribbles rarely reach the extremities), then a moving-average smoothing.
        cut_a, cut_b = (int(rng.uniform(0.0, 0.15) * length) for _ in range(2))
        path = path[cut_a : max(length - cut_b, cut_a + 2)].astype(np.float64)
        window = max(1, len(path) // 8)
        if window > 1:
            padded = np.pad(path, ((window // 2, window - 1 - window // 2), (0, 0)), mode="edge")
            kernel_1d = np.ones(window) / window
            path = np.stack([np.convolve(padded[:, i], kernel_1d, mode="valid") for i in range(2)], axis=1)
        # Back to full-resolution image coordinates (pixel centres).
        path = (path + 0.5) / scale - 0.5 + np.array([top, left])
        points = np.rint(path).astype(np.int64)
        points[:, 0] = np.clip(points[:, 0], 0, height - 1)
        points[:, 1] = np.clip(points[:, 1], 0, width_px - 1)
        for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
            yy, xx = draw_line(int(y0), int(x0), int(y1), int(x1))
            out[yy, xx] = True
        out[points[-1, 0], points[-1, 1]] = True
    if width > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
        out = cv2.dilate(out.astype(np.uint8), kernel).astype(bool)
    out &= region
    if not out.any():
        # Object too small or thin for a skeleton path: a dot of the line width at its innermost pixel.
        distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(distance)), region.shape)
        out[y, x] = True
        if width > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
            out = cv2.dilate(out.astype(np.uint8), kernel).astype(bool) & region
    return out


def support_annotation(
    mask: np.ndarray,
    kind: str = "mask",
    rng: np.random.Generator | None = None,
    *,
    bbox_mode: str = "instance",
    scribble_width: int | None = None,
    background_scribbles: bool = True,
    kernel_range: tuple[float, float] = (0.1, 0.2),
    max_radius: float = 16.0,
) -> np.ndarray:
    """
    Turn a dense `(H, W)` target mask (1 target, 0 background, 255 ignore) into a support annotation of the same
    size and values (uint8), as PANet / SMCP evaluate weak supports.

    Args:
        mask: dense target mask; it must have at least one target pixel unless `kind="mask"`.
        kind:
            - `"mask"`: the mask itself (a copy).
            - `"bbox"`: boxes. PANet (SMCP `util/utils.py::get_bbox`) marks the box of the *largest instance* of
              the class as target, leaves the boxes of the class's other instances unlabelled, and makes the rest
              background. Without instance maps we take 8-connected components of the target as instances:
              `bbox_mode="instance"` (default) -> 1 in the largest component's box, 255 in the other components'
              boxes, 0 elsewhere; `bbox_mode="union"` -> 1 in the one box enclosing all target pixels, 0 elsewhere.
              The dense mask's 255 pixels play no role (a box annotation has no void).
            - `"scribble"`: PANet's scribble supports (`customized.py::getMask`): target = scribble pixels on the
              object, background = scribble pixels labelled background, every other pixel unlabelled. So the
              result is 1 on foreground scribbles, 0 on background scribbles (`background_scribbles=True`) and
              255 elsewhere. PANet's scribbles are pre-computed by the DAVIS scribble robot; ours are generated
              here in the same spirit (see `_region_scribble`), inside the target (`mask == 1`) and inside the
              background (`mask == 0`), one curve per piece of the opened region (PANet keeps the foreground
              scribbles of one randomly chosen scribble label). At least one foreground pixel is always marked.
        rng: randomness of the scribbles (bbox and mask are deterministic); default `np.random.default_rng(0)`.
        bbox_mode: `"instance"` or `"union"` (see above).
        scribble_width: line width in pixels; default `max(1, round(max(H, W) / 160))` (3 px for a 500 px image)
            so scribbles survive a resize to the model resolution.
        background_scribbles: draw background scribbles (otherwise only foreground scribbles, rest 255).
        kernel_range / max_radius: the opening radius is `uniform(*kernel_range) * sqrt(area) / 2`, capped at
            `max_radius` (the robot's `kernel_size=0.15`, `max_kernel_radius=16`).

    Returns:
        `np.ndarray` `(H, W)` uint8 with values in {0, 1, 255}.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if kind not in ANNOTATION_KINDS:
        raise ValueError(f"unknown support annotation kind {kind!r}; expected one of {ANNOTATION_KINDS}")
    if kind == "mask":
        return mask.astype(np.uint8, copy=True)
    target = mask == 1
    if not target.any():
        raise ValueError(f"a {kind!r} annotation needs a mask with at least one target pixel")
    rng = np.random.default_rng(0) if rng is None else rng

    if kind == "bbox":
        if bbox_mode not in BBOX_MODES:
            raise ValueError(f"bbox_mode must be one of {BBOX_MODES}, got {bbox_mode!r}")
        out = np.zeros(mask.shape, dtype=np.uint8)
        if bbox_mode == "union":
            ys, xs = np.nonzero(target)
            out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
            return out
        components, count = ndimage.label(target, structure=np.ones((3, 3), dtype=bool))
        areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
        largest = int(np.argmax(areas))
        boxes = ndimage.find_objects(components)
        for i, box in enumerate(boxes):
            if i != largest:
                out[box] = IGNORE_INDEX
        out[boxes[largest]] = 1
        return out

    height, width = mask.shape
    line_width = max(1, round(max(height, width) / 160)) if scribble_width is None else int(scribble_width)
    out = np.full(mask.shape, IGNORE_INDEX, dtype=np.uint8)
    if background_scribbles:
        background = mask == 0
        if background.any():
            out[_region_scribble(background, rng, kernel_range, max_radius, line_width)] = 0
    out[_region_scribble(target, rng, kernel_range, max_radius, line_width)] = 1
    return out


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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        episode = self.episodes[int(index)]
        episode_index = self.episode_offset + int(index)
        c = episode.class_id
        query_image, query_label, _ = _decode_row(self.split, self._row_of[episode.query])
        support_images, support_masks = [], []
        for k, image_id in enumerate(episode.supports):
            image, label, _ = _decode_row(self.split, self._row_of[image_id])
            mask = target_mask(label, c, self.binary)
            if self.annotation != "mask":
                rng = np.random.default_rng([self.seed, episode_index, k])
                kwargs = dict(self.annotation_kwargs)
                if self.annotation == "scribble" and kwargs.get("scribble_width") is None:
                    kwargs["scribble_width"] = self._scribble_width(mask.shape)
                mask = support_annotation(mask, self.annotation, rng, **kwargs)
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
        height, width = query_label.shape
        return {
            "pixel_values": batch["pixel_values"][0],
            "support_pixel_values": batch["support_pixel_values"][0],
            "support_masks": batch["support_masks"][0].long(),
            "target": torch.from_numpy(target_mask(query_label, c, self.binary).astype(np.int64)),
            "original_size": torch.tensor([height, width], dtype=torch.long),
            "class_ids": torch.tensor(c, dtype=torch.long),
            "episode_index": torch.tensor(episode_index, dtype=torch.long),
        }


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
