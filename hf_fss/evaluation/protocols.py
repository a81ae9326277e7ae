"""
Evaluation protocols: every setting that changes a few-shot segmentation number, named, bundled into presets and
written into the results.

The three presets follow the released test code of the papers they are named after (file / line references are to
the public repositories):

`pfenet` (the default; PFENet, TPAMI 2020, and the PFENet-derived code such as NTRENet)
    - labels at their original resolution: `ori_resize: True` in the configs; `test.py` pads the original label to a
      square with 255 and resizes the logits to it (PFENet `test.py` L196-202), so the padding is ignored and the
      score is that of the original-size label (`label_size="original"`);
    - 255 boundary pixels excluded (`util/util.py::intersectionAndUnionGPU`, L67-79: the prediction is set to 255
      where the label is 255 and `torch.histc` drops values outside `[0, K-1]`);
    - class IoU = summed intersections / summed unions over the episodes of the class; mIoU = mean over the fold's
      classes; FB-IoU = mean of background and foreground IoU summed over all episodes (`test.py` L210-246);
    - one run with seed 321 (`manual_seed: 321`, `fix_random_seed_val: True` in the configs; `test.py` L163-168);
    - episodes: PFENet's own `test.py` samples 5000 (PASCAL-5i) / 20000 (COCO-20i) episodes (L173-176) -- in fact one
      more, as its loop only stops once `(iter_num - 1) * batch_size >= test_num` (L184) -- while the PFENet-derived
      NTRENet code uses 1000 / 20000 (NERTNet `train.py::validate` L350-354). The preset uses 1000 / 20000; pass
      `num_episodes=5000` for PFENet's own PASCAL count;
    - COCO-20i folds interleaved (`use_split_coco: True` in PFENet's COCO configs, `util/dataset.py` L101-115);
    - k-shot: support prototypes and prior masks averaged over the shots inside the model (`model/PFENet.py`
      L247, L250-254): `shot_fusion="feature-average"`.

`hsnet` (HSNet, ICCV 2021)
    - labels nearest-resized to 400 x 400 (`test.py` L88 `img_size=400`; `data/pascal.py` L38-39 resizes the query
      mask unless `--use_original_imgsize`, which the README's test commands do not pass; `data/fss.py` L39 always
      resizes): `label_size=400`;
    - 255 boundary pixels excluded (`common/evaluation.py` L15-21; only the PASCAL loader provides them);
    - class IoU and FB-IoU as PFENet's, from per-class sums (`common/logger.py::AverageMeter` L29-45; the class IoU
      divides by `max(union, 1)`, FB-IoU sums the background / foreground counts of the fold's classes);
    - seed 0 (`test.py` L20 `utils.fix_randseed(0)`), one run;
    - 1000 episodes on PASCAL-5i (`data/pascal.py` L30) and COCO-20i (`data/coco.py` L30), every test image once on
      FSS-1000 (`data/fss.py` L31-32: 240 classes x 10 images);
    - COCO-20i folds interleaved (`data/coco.py::build_class_ids`);
    - k-shot: the per-shot argmax masks are summed and thresholded at half the maximal vote
      (`model/hsnet.py::predict_mask_nshot` L67-90): `shot_fusion="mask-vote"`.

`panet` (PANet, ICCV 2019; SMCP keeps its protocol)
    - images and labels resized to 417 x 417, labels with nearest neighbour (SMCP `config.py` L27, `test.py` L59,
      `dataloaders/transforms.py` L54), logits resized back to 417 x 417 (`test.py` L127): `label_size=417`;
    - 255 boundary pixels excluded (`util/metric.py` L56 counts predicted pixels only where the label is not 255;
      `dataloaders/customized.py` L178 keeps 255 in the query label);
    - 5 runs of 1000 episodes (`config.py` L64-65), run r seeded with 1234 + r (`config.py` L28, `test.py` L68-70):
      seeds 1234..1238; results are the mean and the (population, `np.std`) standard deviation over the runs
      (`util/metric.py` L92-97, `test.py` L145-146);
    - within a run, class IoU = summed TP / summed (TP + FP + FN) over the class's episodes (`util/metric.py`
      L99-107) -- the same "sum-over-episodes" aggregation as PFENet and HSNet, not a mean of per-episode IoUs; the
      binary (FB) IoU sums the foreground counts of all classes against the background (`util/metric.py` L109-151);
    - test episodes drawn from the `trainaug` image set of the test classes (`config.py` L107-108) and, for COCO, from
      `train2014` (`config.py` L109-110, `dataloaders/coco.py` L29);
    - COCO-20i folds contiguous (`util/utils.py::CLASS_LABELS`);
    - k-shot: prototypes averaged over the shots (PANet `models/fewshot.py::getPrototype`); SMCP's released test model
      handles one shot only.

The `mean-per-episode` aggregation (IoU of each episode averaged per class, then over classes) is used by none of the
three; it is offered for comparison with work that reports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FOLD_CONVENTIONS",
    "IOU_AGGREGATIONS",
    "PROTOCOLS",
    "EvaluationProtocol",
    "get_protocol",
]

IOU_AGGREGATIONS = ("sum-over-episodes", "mean-per-episode")
# "contiguous" / "interleaved" / "canet_40_20_20" are the COCO-20i conventions of `hf_fss.data.folds`; PASCAL-5i
# (and the synthetic benchmark) only has contiguous folds and FSS-1000 a fixed class split.
FOLD_CONVENTIONS = ("contiguous", "interleaved", "canet_40_20_20", "fixed")
_BENCHMARK_CONVENTIONS = {
    "pascal5i": ("contiguous",),
    "synthetic": ("contiguous",),
    "coco20i": ("contiguous", "interleaved", "canet_40_20_20"),
    "fss1000": ("fixed",),
    "folder": ("fixed",),
}


def _normalize_benchmark(benchmark: Any) -> str:
    # Imported lazily: the data package is only needed to spell benchmark names the same way everywhere.
    from hf_fss.data.folds import normalize_benchmark_name

    return normalize_benchmark_name(benchmark)


@dataclass(frozen=True)
class EvaluationProtocol:
    """
    The settings behind a few-shot segmentation number; `to_dict()` is written into every result.

    Attributes:
        name: preset name (`"pfenet"`, `"hsnet"`, `"panet"`) or `"custom"`.
        benchmark: `"pascal5i"`, `"coco20i"`, `"fss1000"` or `"synthetic"` (spellings as in `hf_fss.data.folds`).
        label_size: `"original"` (scores on the labels at their stored resolution) or an int `S`: scores on labels
            nearest-resized to `S x S` (see `hf_fss.evaluation.resize_label`). The metric checks the label size
            when it is an int.
        ignore_boundary: True: the 255 pixels of the labels are excluded from every count. False: they count as
            background.
        iou_aggregation: `"sum-over-episodes"` (class IoU = summed intersections / summed unions over the class's
            episodes) or `"mean-per-episode"` (class IoU = mean of the episodes' foreground IoUs).
        num_episodes: test episodes per seed; None = every test image once as query (HSNet's FSS-1000).
        seeds: one run per seed; results over several seeds are combined with `aggregate_seeds`.
        fold_convention: `"contiguous"`, `"interleaved"`, `"canet_40_20_20"` (COCO-20i, see `hf_fss.data.folds`)
            or `"fixed"` (FSS-1000's class split).
        shot_fusion: how k-shot predictions combine the shots: `"feature-average"` (PFENet), `"mask-vote"`
            (HSNet), `"prototype-average"` (PANet); recorded, the model implements it.
        annotation: label files and image set the episodes come from, e.g. `"SegmentationClassAug:val"`.
        overridden: fields a caller changed from the preset (recorded so a modified preset is never mistaken for
            the original).
    """

    name: str = "custom"
    benchmark: str = "pascal5i"
    label_size: str | int = "original"
    ignore_boundary: bool = True
    iou_aggregation: str = "sum-over-episodes"
    num_episodes: int | None = 1000
    seeds: tuple[int, ...] = (321,)
    fold_convention: str = "contiguous"
    shot_fusion: str = "feature-average"
    annotation: str = "SegmentationClassAug:val"
    overridden: tuple[str, ...] = field(default=())

    def __post_init__(self):
        # frozen: normalised values are written with object.__setattr__.
        set_ = object.__setattr__
        set_(self, "benchmark", _normalize_benchmark(self.benchmark))
        label_size = self.label_size
        if isinstance(label_size, str):
            if label_size != "original":
                raise ValueError(f"label_size must be 'original' or a positive int, got {label_size!r}")
        elif isinstance(label_size, bool) or not isinstance(label_size, int) or label_size <= 0:
            raise ValueError(f"label_size must be 'original' or a positive int, got {label_size!r}")
        if not isinstance(self.ignore_boundary, bool):
            raise ValueError(f"ignore_boundary must be a bool, got {self.ignore_boundary!r}")
        if self.iou_aggregation not in IOU_AGGREGATIONS:
            raise ValueError(f"iou_aggregation must be one of {IOU_AGGREGATIONS}, got {self.iou_aggregation!r}")
        num = self.num_episodes
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num <= 0):
            raise ValueError(f"num_episodes must be a positive int or None, got {num!r}")
        seeds = (self.seeds,) if isinstance(self.seeds, int) else tuple(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise ValueError(f"seeds must be a non-empty sequence of ints, got {self.seeds!r}")
        set_(self, "seeds", seeds)
        allowed = _BENCHMARK_CONVENTIONS.get(self.benchmark, FOLD_CONVENTIONS)
        if self.fold_convention not in allowed:
            raise ValueError(
                f"fold_convention {self.fold_convention!r} does not apply to {self.benchmark}; expected one of "
                f"{allowed}"
            )
        for name in ("name", "shot_fusion", "annotation"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        set_(self, "overridden", tuple(self.overridden))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.seeds)
        out["overridden"] = list(self.overridden)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationProtocol:
        """Inverse of `to_dict`; unknown keys raise a ValueError naming them."""
        _check_fields(data)
        return cls(**dict(data))

    def fold_split(self, fold: int | None = 0, dataset: Mapping[str, Any] | None = None):
        """
        Novel and base classes of `fold` under this protocol's benchmark and fold convention
        (`hf_fss.data.folds.fold_classes`; FSS-1000 needs its `DatasetDict` as `dataset`).
        """
        from hf_fss.data.folds import fold_classes

        convention = self.fold_convention if self.benchmark == "coco20i" else None
        return fold_classes(self.benchmark, fold, convention, dataset=dataset)


_FIELDS = tuple(f.name for f in dataclasses.fields(EvaluationProtocol))


def _check_fields(data: Mapping[str, Any]) -> None:
    unknown = [key for key in data if key not in _FIELDS]
    if unknown:
        raise ValueError(f"unknown EvaluationProtocol field(s) {unknown}; fields are {list(_FIELDS)}")


# Per preset and benchmark: the settings of the reference code (see the module docstring for where each comes from).
# The synthetic benchmark (hf_fss.data.synthetic) follows the PASCAL-5i rules of each preset.
# A user's folder (hf_fss.data.builders.folder): each preset's PASCAL-5i settings on its fixed class split.
_FOLDER = {"fold_convention": "fixed", "annotation": "folder:test"}
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "pfenet": {
        "pascal5i": {
            "label_size": "original",
            "ignore_boundary": True,
            "iou_aggregation": "sum-over-episodes",
            "num_episodes": 1000,
            "seeds": (321,),
            "fold_convention": "contiguous",
            "shot_fusion": "feature-average",
            "annotation": "SegmentationClassAug:val",
        },
        "coco20i": {"num_episodes": 20000, "fold_convention": "interleaved", "annotation": "coco2014:val"},
        "synthetic": {"annotation": "synthetic"},
        "folder": _FOLDER,
    },
    "hsnet": {
        "pascal5i": {
            "label_size": 400,
            "ignore_boundary": True,
            "iou_aggregation": "sum-over-episodes",
            "num_episodes": 1000,
            "seeds": (0,),
            "fold_convention": "contiguous",
            "shot_fusion": "mask-vote",
            "annotation": "SegmentationClassAug:val",
        },
        "coco20i": {"num_episodes": 1000, "fold_convention": "interleaved", "annotation": "coco2014:val"},
        "fss1000": {"num_episodes": None, "fold_convention": "fixed", "annotation": "fss1000:test"},
        "synthetic": {"annotation": "synthetic"},
        "folder": _FOLDER,
    },
    "panet": {
        "pascal5i": {
            "label_size": 417,
            "ignore_boundary": True,
            "iou_aggregation": "sum-over-episodes",
            "num_episodes": 1000,
            "seeds": (1234, 1235, 1236, 1237, 1238),
            "fold_convention": "contiguous",
            "shot_fusion": "prototype-average",
            "annotation": "SegmentationClassAug:trainaug",
        },
        "coco20i": {"fold_convention": "contiguous", "annotation": "coco2014:train"},
        "synthetic": {"annotation": "synthetic"},
        "folder": _FOLDER,
    },
}


def _preset(name: str, benchmark: str) -> EvaluationProtocol:
    variants = _PRESETS[name]
    if benchmark not in variants:
        raise ValueError(f"preset {name!r} has no settings for benchmark {benchmark!r}; it covers {list(variants)}")
    settings = {**variants["pascal5i"], **variants[benchmark]}
    return EvaluationProtocol(name=name, benchmark=benchmark, **settings)


PROTOCOLS: dict[str, EvaluationProtocol] = {name: _preset(name, "pascal5i") for name in _PRESETS}
"""The presets on PASCAL-5i; `get_protocol(name, benchmark=...)` gives their COCO-20i / FSS-1000 variants."""


def get_protocol(name: str | EvaluationProtocol = "pfenet", /, **overrides: Any) -> EvaluationProtocol:
    """
    A preset (or a given protocol) with some settings changed.

    Args:
        name: `"pfenet"`, `"hsnet"`, `"panet"` (case-insensitive), or an `EvaluationProtocol` to modify.
        **overrides: `EvaluationProtocol` fields. `benchmark` selects the preset's settings for that benchmark
            (e.g. `get_protocol("hsnet", benchmark="fss1000")` has `num_episodes=None`); every other field that
            differs from the preset is listed in `overridden`.

    Raises:
        ValueError: unknown preset name, unknown field, a benchmark the preset does not cover, or an invalid value.
    """
    _check_fields(overrides)
    if "overridden" in overrides or "name" in overrides:
        raise ValueError("'name' and 'overridden' are set by get_protocol, not overridable")
    overrides = dict(overrides)
    benchmark = overrides.pop("benchmark", None)
    if isinstance(name, EvaluationProtocol):
        given = name
        if given.name in _PRESETS and benchmark is not None:
            # Switching a (possibly modified) preset to another benchmark: the preset's settings for that benchmark,
            # with the given protocol's own changes re-applied.
            base = _preset(given.name, _normalize_benchmark(benchmark))
            overrides = {**{k: getattr(given, k) for k in given.overridden}, **overrides}
            base = dataclasses.replace(base, overridden=())
        elif benchmark is not None:
            base = dataclasses.replace(given, benchmark=benchmark)
        else:
            base = given
    elif isinstance(name, str):
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown evaluation protocol {name!r}; presets are {sorted(_PRESETS)}")
        base = _preset(key, _normalize_benchmark(benchmark if benchmark is not None else "pascal5i"))
    else:
        raise ValueError(f"protocol must be a preset name or an EvaluationProtocol, got {type(name).__name__}")
    changed = []
    for key, value in overrides.items():
        if key == "seeds":
            value = (value,) if isinstance(value, int) else tuple(value)
            overrides[key] = value
        current = getattr(base, key)
        if value != current or type(value) is not type(current):
            changed.append(key)
    overridden = tuple(dict.fromkeys((*base.overridden, *changed)))
    return dataclasses.replace(base, **overrides, overridden=overridden)
