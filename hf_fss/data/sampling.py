"""
Episode sampling for few-shot segmentation: which images are eligible for a class, the fixed test episodes, their
JSON Lines files, shards, and the held-out base-class validation images. Nothing here decodes an image: the
`class_ids` / `class_areas` / `image_id` columns suffice.

Conventions (PFENet `util/dataset.py` and `train.py`, HSNet `data/*.py`):

- Eligibility. An image is eligible for class `c` when `c` covers at least `2 * 32 * 32` pixels (PFENet's
  `make_dataset`, following Shaban et al.: the object must survive a 1/32 downsampling with more than 2 pixels).
  PFENet's `make_dataset` is shared by its train and val modes, so the rule filters the validation queries and
  supports as well; we apply it to both (PFENet picks a val query's class among *all* novel classes of the image,
  we pick only among its eligible ones, so every episode's query holds a sizeable target). Areas come from the
  `class_areas` column (stored resolution). For binary benchmarks (FSS-1000) there is no such rule in HSNet (every
  image of a class is used), so the default threshold there is one pixel.
- Target mask for class `c`: 1 where `label == c` (`label == 1` for binary FSS-1000 rows), 255 where
  `label == 255`, 0 elsewhere.
- Testing: a fixed, seeded list of episodes, generated identically on every process. `sampling="pair"` walks the
  eligible (image, class) pairs in a seeded random order (every pair once before any repeats: HSNet's PASCAL
  loader cycles through its (image, class) list, PFENet's through its image list); `sampling="class"` draws a
  class uniformly, then a query (HSNet's COCO loader). `num_episodes=None` gives every eligible pair once in
  dataset order (FSS-1000: every test image once as query, as in HSNet).

Randomness is always a `np.random.Generator` seeded from integers, never global state, so results do not depend on
the number or order of DataLoader workers or processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_fss.data.folds import _as_class_tuple
from hf_fss.data.schema import IGNORE_INDEX
from hf_fss.utils.io import atomic_write_text

__all__ = [
    "PFENET_MIN_AREA",
    "Episode",
    "eligible_images",
    "is_binary_split",
    "load_episodes_jsonl",
    "make_test_episodes",
    "save_episodes_jsonl",
    "shard_bounds",
    "shard_episodes",
    "split_base_validation",
    "target_mask",
]

logger = logging.getLogger(__name__)

PFENET_MIN_AREA = 2 * 32 * 32

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
        rule = " (PFENet's rule)" if threshold == PFENET_MIN_AREA else ""
        raise ValueError(
            f"no class of {_as_class_tuple(classes)} has {shot + 1} eligible images in this split: an image is "
            f"eligible for a class that covers at least {threshold} of its label pixels{rule}; use larger images "
            "or more of them"
        )

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


def episodes_jsonl_text(episodes: Iterable[Episode]) -> str:
    """The JSON Lines text of an episode list: one `{"query": id, "supports": [ids], "class_id": c}` per line."""
    return "".join(json.dumps(episode.to_json()) + "\n" for episode in episodes)


def save_episodes_jsonl(episodes: Iterable[Episode], path: str | os.PathLike) -> None:
    """Write `episodes_jsonl_text(episodes)` to `path`, atomically."""
    atomic_write_text(path, episodes_jsonl_text(episodes))


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
