"""Benchmarks as Hugging Face datasets, episodic sampling and training augmentation."""

from .augmentation import TrainAugmentation
from .builders import build_coco20i, build_folder, build_fss1000, build_pascal5i, build_report
from .episodes import (
    Episode,
    EpisodicTestDataset,
    EpisodicTrainDataset,
    collate_test_batch,
    load_episodes_jsonl,
    make_test_episodes,
    save_episodes_jsonl,
    shard_episodes,
    split_base_validation,
    support_annotation,
    target_mask,
)
from .folds import FoldSplit, fold_classes
from .loading import infer_benchmark, load_benchmark
from .schema import COCO_CLASSES, IGNORE_INDEX, VOC_CLASSES, benchmark_features
from .synthetic import SYNTHETIC_CLASSES, build_synthetic

__all__ = [
    "COCO_CLASSES",
    "IGNORE_INDEX",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "Episode",
    "EpisodicTestDataset",
    "EpisodicTrainDataset",
    "FoldSplit",
    "TrainAugmentation",
    "benchmark_features",
    "build_coco20i",
    "build_folder",
    "build_fss1000",
    "build_pascal5i",
    "build_report",
    "build_synthetic",
    "collate_test_batch",
    "fold_classes",
    "infer_benchmark",
    "load_benchmark",
    "load_episodes_jsonl",
    "make_test_episodes",
    "save_episodes_jsonl",
    "shard_episodes",
    "split_base_validation",
    "support_annotation",
    "target_mask",
]
