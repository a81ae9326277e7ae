"""Benchmarks as Hugging Face datasets, episodic sampling and training augmentation.

The submodules are imported when one of their names is first read (docs/development.md, "Import time").
"""

from hf_fss.utils.lazy import lazy_exports

_LAZY = {
    **dict.fromkeys(["TrainAugmentation"], ".augmentation"),
    **dict.fromkeys(["build_coco20i", "build_folder", "build_fss1000", "build_pascal5i", "build_report"], ".builders"),
    **dict.fromkeys(
        [
            "Episode",
            "EpisodicTestDataset",
            "EpisodicTrainDataset",
            "collate_test_batch",
            "load_episodes_jsonl",
            "make_test_episodes",
            "save_episodes_jsonl",
            "shard_episodes",
            "split_base_validation",
            "support_annotation",
            "target_mask",
        ],
        ".episodes",
    ),
    **dict.fromkeys(["FoldSplit", "fold_classes"], ".folds"),
    **dict.fromkeys(["infer_benchmark", "load_benchmark"], ".loading"),
    **dict.fromkeys(["COCO_CLASSES", "IGNORE_INDEX", "VOC_CLASSES", "benchmark_features"], ".schema"),
    **dict.fromkeys(["SYNTHETIC_CLASSES", "build_synthetic"], ".synthetic"),
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
