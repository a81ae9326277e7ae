"""
The data of an episodic training run: the benchmark, the fold, the episodic training set (with PFENet's
augmentation, emitting the extra inputs the model declares), and fixed validation and test episodes (`EpisodeSet`),
identical on every process. Model selection validates on held-out base-class images by default; on the validation
classes of a split that has them (COCO's canet_40_20_20); on the test fold only when asked
(`select_on_test_fold`, the papers' practice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_fss.evaluation.arguments import class_names_of, default_test_split, load_benchmark_dataset, protocol_for
from hf_fss.training.arguments import EpisodicArguments

__all__ = ["EpisodeSet", "TrainingData", "build_data"]


@dataclass
class EpisodeSet:
    """Fixed evaluation episodes with what is needed to score them."""

    split: Any
    episodes: list[Any]
    class_ids: tuple[int, ...]
    class_names: list[str] | None
    protocol: Any
    seed: int
    description: str


@dataclass
class TrainingData:
    dataset: Any
    fold: Any
    train_dataset: Any
    validation: EpisodeSet | None
    test: EpisodeSet | None


def _train_dataset(dataset, fold, args: EpisodicArguments, seed: int, extra_inputs):
    from hf_fss.data import EpisodicTrainDataset, TrainAugmentation

    augmentation = TrainAugmentation(
        size=args.image_size,
        scale_range=(args.scale_min, args.scale_max),
        rotate_limit=args.rotate_max,
        rotate_p=0.5 if args.rotate_max > 0 else 0.0,
        blur_p=0.5 if args.gaussian_blur else 0.0,
        flip_p=0.5 if args.horizontal_flip else 0.0,
    )
    # A split with validation classes (COCO canet_40_20_20) validates on them, so no training image is held out.
    holdout = args.wants_validation and not args.select_on_test_fold and not fold.validation
    return EpisodicTrainDataset(
        dataset["train"],
        fold,
        shot=args.shot,
        size=args.image_size,
        seed=seed,
        novel_class_policy=args.novel_class_policy,
        augmentation=augmentation,
        holdout_fraction=args.validation_fraction if holdout else 0.0,
        holdout_seed=seed,
        holdout_min_images=args.validation_min_images,
        extra_inputs=extra_inputs,
    )


def build_data(args: EpisodicArguments, seed: int, extra_inputs: tuple[str, ...] = ()) -> TrainingData:
    """
    Benchmark, fold, episodic training set (emitting `extra_inputs`), validation episodes and test episodes
    (identical on every process).
    """
    from hf_fss.data import fold_classes, make_test_episodes
    from hf_fss.data.folds import has_class_split

    dataset = load_benchmark_dataset(args)
    if "train" not in dataset:
        raise ValueError(f"dataset {args.dataset!r} has no 'train' split (splits: {sorted(dataset)})")
    fold = fold_classes(
        args.benchmark, args.fold, args.fold_convention, dataset=dataset if has_class_split(args.benchmark) else None
    )
    train_dataset = _train_dataset(dataset, fold, args, seed, extra_inputs)

    test_split_name = default_test_split(dataset, args.benchmark)
    test_split = dataset[test_split_name]
    base_protocol = protocol_for(args.eval_protocol, args.benchmark, fold_convention=args.fold_convention)
    test_seed = args.eval_seed if args.eval_seed is not None else base_protocol.seeds[0]
    num_test = args.num_eval_episodes if args.num_eval_episodes is not None else base_protocol.num_episodes
    test_protocol = protocol_for(
        base_protocol, args.benchmark, num_episodes=num_test, seeds=[test_seed], fold_convention=args.fold_convention
    )
    test = None
    if args.evaluate_at_end or args.select_on_test_fold:
        test = EpisodeSet(
            split=test_split,
            episodes=make_test_episodes(test_split, fold.novel, num_test, args.shot, test_seed),
            class_ids=fold.novel,
            class_names=class_names_of(test_split),
            protocol=test_protocol,
            seed=test_seed,
            description=f"test ({test_split_name}, novel classes)",
        )

    validation = None
    if args.wants_validation:
        if args.select_on_test_fold:
            split, classes, what = test_split, fold.novel, f"{test_split_name}, novel classes (test fold)"
        elif fold.validation:
            # The validation classes (never trained on) in the test split's images: disjoint from the test classes,
            # and these images are not training images, so none of their validation-class pixels was learnt as
            # background.
            split, classes, what = test_split, fold.validation, f"{test_split_name}, validation classes"
        else:
            split, classes, what = train_dataset.validation_split(), fold.base, "held-out train images, base classes"
        protocol = protocol_for(base_protocol, args.benchmark, num_episodes=args.num_validation_episodes, seeds=[seed])
        validation = EpisodeSet(
            split=split,
            episodes=make_test_episodes(split, classes, args.num_validation_episodes, args.shot, seed),
            class_ids=tuple(classes),
            class_names=class_names_of(split),
            protocol=protocol,
            seed=seed,
            description=f"validation ({what})",
        )
    return TrainingData(dataset, fold, train_dataset, validation, test)
