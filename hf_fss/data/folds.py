"""
Class splits of the few-shot segmentation benchmarks: which classes a fold tests (novel) and trains on (base).

- PASCAL-5i (20 classes, 4 folds): fold i tests classes 5i+1..5i+5 and trains on the other 15 (PFENet, HSNet).
- COCO-20i (80 classes): two 4-fold conventions exist in the literature, and CANet's single class split:
  `"interleaved"` (default): fold i tests {4k + i + 1 : k = 0..19}, i.e. 1, 5, 9, ... for fold 0. This is PFENet's
  `use_split_coco=True` and HSNet's split, which later work reports on.
  `"contiguous"`: fold i tests 20i+1..20i+20 (PFENet's `use_split_coco=False`; PANet's and SMCP's COCO label
  sets in `util/utils.py::CLASS_LABELS`).
  `"canet_40_20_20"`: one fixed split (fold 0 only) of 40 training, 20 validation and 20 test classes, the COCO
  setting of CANet (Zhang et al., CVPR 2019) and CRCNet (Liu et al., IJCV 2022, section 5: "40 classes for
  training, 20 classes for validation, and 20 classes for the test"; its Table 13). Neither paper publishes the
  class lists, so the lists are this project's choice, a deterministic rule: the 80 classes in the standard
  COCO category order (`hf_fss.data.schema.COCO_CLASSES`, i.e. ascending category id), in contiguous blocks.
  Numbers under this convention are comparable with Table 13 only as far as the papers' unpublished split
  matches this one.
    base (train, 1-40): person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light,
      fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra,
      giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite,
      baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle
    validation (41-60): wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, broccoli,
      carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed
    novel (test, 61-80; the novel classes of contiguous fold 3): dining table, toilet, tv, laptop, mouse, remote,
      keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors,
      teddy bear, hair drier, toothbrush
  The validation classes are in `FoldSplit.validation`: training never learns them (they are treated like the
  novel classes) and selects its best model on episodes of them drawn from the test split's (val2014) images,
  never on a test class (see `hf_fss.training.episodic.build_data`).
- synthetic (the embedded benchmark of `hf_fss.data.synthetic`, 20 classes, 4 folds): the PASCAL-5i rule.
- folder (a user's images built by `scripts/prepare_dataset.py folder`) has a fixed class split like FSS-1000,
  recorded by the build: novel = the classes of its `test` split, base = those of `train` (`fold` is ignored).
- FSS-1000 has no folds but fixed class splits: its novel classes are those of the `test` split of the DatasetDict
  and its base classes those of the `train` split, so `fold_classes("fss1000", dataset=dataset_dict)` reads them
  from the `class_ids` column (no image is decoded) and ignores `fold`.

Class ids are the values of the label maps (1-based; 0 is background), as stored by `hf_fss.data.schema`.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BENCHMARKS",
    "CANET_40_20_20",
    "COCO_CONVENTIONS",
    "FoldSplit",
    "fold_classes",
    "has_class_split",
    "normalize_benchmark_name",
    "num_folds",
]

BENCHMARKS = ("pascal5i", "coco20i", "synthetic", "fss1000", "folder")
# Benchmarks with a fixed class split (train / validation / test splits of disjoint classes) instead of folds.
CLASS_SPLIT_BENCHMARKS = ("fss1000", "folder")
COCO_CONVENTIONS = ("interleaved", "contiguous", "canet_40_20_20")
# CANet's / CRCNet's single COCO split, as (first, last) class ids of each block; the project's rule (module docstring).
CANET_40_20_20 = {"base": (1, 40), "validation": (41, 60), "novel": (61, 80)}

# (number of classes, number of folds) of the benchmarks with folds.
_FOLDED = {"pascal5i": (20, 4), "coco20i": (80, 4), "synthetic": (20, 4)}

_ALIASES = {
    "pascal": "pascal5i",
    "pascal5i": "pascal5i",
    "pascal5": "pascal5i",
    "voc": "pascal5i",
    "coco": "coco20i",
    "coco20i": "coco20i",
    "coco20": "coco20i",
    "synthetic": "synthetic",
    "fss": "fss1000",
    "fss1000": "fss1000",
    "folder": "folder",
    "custom": "folder",
}


@dataclass(frozen=True)
class FoldSplit:
    """
    Class ids of one fold.

    Attributes:
        novel: classes the fold is tested on (never seen in training), ascending.
        base: classes the fold is trained on, ascending.
        validation: classes held out from both for model selection, ascending; empty (the default) except under
            COCO-20i's `"canet_40_20_20"` convention. Training treats them like the novel classes.
    """

    novel: tuple[int, ...]
    base: tuple[int, ...]
    validation: tuple[int, ...] = ()

    def __post_init__(self):
        for (name_a, a), (name_b, b) in (
            (("novel", self.novel), ("base", self.base)),
            (("novel", self.novel), ("validation", self.validation)),
            (("base", self.base), ("validation", self.validation)),
        ):
            overlap = set(a) & set(b)
            if overlap:
                raise ValueError(f"{name_a} and {name_b} classes overlap: {sorted(overlap)}")

    @property
    def unseen(self) -> tuple[int, ...]:
        """Classes training must not learn: the novel and the validation classes, ascending."""
        return tuple(sorted({*self.novel, *self.validation}))


def normalize_benchmark_name(benchmark: str) -> str:
    """`"PASCAL-5i"`, `"pascal"`, `"coco-20i"`, `"FSS-1000"`, ... -> one of `BENCHMARKS`; ValueError otherwise."""
    if not isinstance(benchmark, str):
        raise ValueError(f"benchmark must be a string, one of {BENCHMARKS}; got {benchmark!r}")
    key = benchmark.lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    return _ALIASES[key]


def has_class_split(benchmark: str) -> bool:
    """Whether `benchmark` has a fixed class split read from its DatasetDict (FSS-1000, folder) instead of folds."""
    return normalize_benchmark_name(benchmark) in CLASS_SPLIT_BENCHMARKS


def num_folds(benchmark: str, convention: str | None = None) -> int:
    """Number of folds of a benchmark (1 for FSS-1000 and COCO-20i's `"canet_40_20_20"`, fixed class splits)."""
    name = normalize_benchmark_name(benchmark)
    if name == "coco20i" and convention == "canet_40_20_20":
        return 1
    return _FOLDED[name][1] if name in _FOLDED else 1


def _classes_of_split(split: Any, name: str) -> tuple[int, ...]:
    """Sorted union of the `class_ids` column of a `datasets.Dataset` (read without decoding images)."""
    try:
        column = split.select_columns(["class_ids"])[:]["class_ids"]
    except (AttributeError, KeyError) as err:
        raise ValueError(f"split {name!r} must be a datasets.Dataset with a `class_ids` column") from err
    return tuple(sorted({int(c) for ids in column for c in ids if int(c) != 0}))


def fold_classes(
    benchmark: str,
    fold: int | None = 0,
    convention: str | None = None,
    *,
    dataset: Mapping[str, Any] | None = None,
    novel_split: str = "test",
    base_split: str = "train",
) -> FoldSplit:
    """
    Novel (test) and base (train) classes of a fold.

    Args:
        benchmark: `"pascal5i"`, `"coco20i"`, `"synthetic"` or `"fss1000"` (spellings such as `"PASCAL-5i"`,
            `"coco"`, `"FSS-1000"` are accepted).
        fold: fold index, 0..3 for the folded benchmarks; ignored for FSS-1000.
        convention: COCO-20i only, `"interleaved"` (default, PFENet `use_split_coco` / HSNet), `"contiguous"` or
            `"canet_40_20_20"` (CANet's / CRCNet's 40 / 20 / 20 split, fold 0 only, with `validation` classes; the
            lists are this project's rule, see the module docstring). Must be `None` for the other benchmarks.
        dataset: FSS-1000 only: its `DatasetDict` (or any mapping of split name -> `datasets.Dataset`); the novel
            classes are the union of the `class_ids` of `dataset[novel_split]`, the base classes that of
            `dataset[base_split]`.
        novel_split / base_split: FSS-1000 split names (e.g. `novel_split="validation"` for model selection).

    Returns:
        `FoldSplit(novel, base)` with ascending class ids (and `validation` under `"canet_40_20_20"`).

    Raises:
        ValueError: unknown benchmark, fold out of range (any fold but 0 under `"canet_40_20_20"`), bad
            convention, FSS-1000 without `dataset`, or `dataset` given as a path instead of the loaded splits.
    """
    name = normalize_benchmark_name(benchmark)
    if isinstance(dataset, str | os.PathLike):  # a path would be read as a mapping of its characters
        raise ValueError(
            f"dataset must be the loaded DatasetDict, not the path {str(dataset)!r}: pass "
            f"hf_fss.data.load_benchmark({str(dataset)!r})"
        )
    if name == "folder":
        return _recorded_fold(dataset, convention, novel_split, base_split)
    if name == "fss1000":
        if convention is not None:
            raise ValueError(f"convention={convention!r} applies to coco20i only, not to {benchmark!r}")
        if dataset is None:
            raise ValueError(
                "fss1000 has class splits instead of folds: pass its DatasetDict, "
                "e.g. fold_classes('fss1000', dataset=dataset_dict)"
            )
        for split in (novel_split, base_split):
            if split not in dataset:
                raise ValueError(f"fss1000: the DatasetDict has no {split!r} split (has {sorted(dataset)})")
        novel = _classes_of_split(dataset[novel_split], novel_split)
        base = tuple(c for c in _classes_of_split(dataset[base_split], base_split) if c not in set(novel))
        return FoldSplit(novel=novel, base=base)

    if name == "coco20i" and convention == "canet_40_20_20":
        return _canet_split(fold)
    num_classes, folds = _FOLDED[name]
    if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or not 0 <= fold < folds:
        raise ValueError(f"fold must be an int in 0..{folds - 1} for {benchmark!r}, got {fold!r}")
    fold = int(fold)
    per_fold = num_classes // folds
    if name == "coco20i":
        convention = "interleaved" if convention is None else convention
        if convention == "interleaved":
            novel = tuple(folds * k + fold + 1 for k in range(per_fold))
        elif convention == "contiguous":
            novel = tuple(range(per_fold * fold + 1, per_fold * (fold + 1) + 1))
        else:
            raise ValueError(f"unknown coco20i convention {convention!r}; expected one of {COCO_CONVENTIONS}")
    else:
        if convention is not None:
            raise ValueError(f"convention={convention!r} applies to coco20i only, not to {benchmark!r}")
        novel = tuple(range(per_fold * fold + 1, per_fold * (fold + 1) + 1))
    base = tuple(c for c in range(1, num_classes + 1) if c not in set(novel))
    return FoldSplit(novel=novel, base=base)


def _canet_split(fold) -> FoldSplit:
    """The single 40 / 20 / 20 COCO split of `"canet_40_20_20"` (`CANET_40_20_20`); `fold` must be 0."""
    if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or fold != 0:
        raise ValueError(
            f"coco20i convention 'canet_40_20_20' is a single 40 / 20 / 20 class split without folds: fold must be "
            f"0, got {fold!r}"
        )
    blocks = {key: tuple(range(first, last + 1)) for key, (first, last) in CANET_40_20_20.items()}
    return FoldSplit(novel=blocks["novel"], base=blocks["base"], validation=blocks["validation"])


def _recorded_fold(dataset, convention, novel_split: str, base_split: str) -> FoldSplit:
    """The class split a folder build recorded in its splits' descriptions (see `builders.folder`)."""
    from .builders.folder import recorded_class_split

    if convention is not None:
        raise ValueError(f"convention={convention!r} applies to coco20i only, not to 'folder'")
    if dataset is None:
        raise ValueError("folder has a class split instead of folds: pass its DatasetDict as dataset=")
    for split in (novel_split, base_split):
        if split not in dataset:
            raise ValueError(f"folder: the DatasetDict has no {split!r} split (has {sorted(dataset)})")
    recorded = recorded_class_split(dataset[novel_split].info.description or "")
    if recorded is None:
        raise ValueError(
            "the dataset has no recorded class split (it was not built by `scripts/prepare_dataset.py folder`); "
            "pass the --benchmark it was built as"
        )
    novel, base = recorded.get(novel_split, ()), recorded.get(base_split, ())
    return FoldSplit(novel=tuple(sorted(novel)), base=tuple(c for c in sorted(base) if c not in set(novel)))


def _as_class_tuple(classes: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated tuple of int class ids (helper shared with `episodes`)."""
    return tuple(sorted({int(c) for c in classes}))
