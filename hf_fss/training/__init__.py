"""
Training under Accelerate: `loop` (the generic loop with callbacks: prepare, accumulate, clip, step, log, checkpoint,
resume), `episodic` (episodic few-shot training around it: folds, validation and best model, novel-class test,
cards) and `arguments` (argument groups `LoopArguments` / `EpisodicArguments`, YAML recipe + command line).
`main` is the entry point of `scripts/train.py`.
"""

from hf_fss.training.arguments import (
    QUICKSTART_RECIPE,
    RECIPES_DIR,
    TRAIN_GROUPS,
    EpisodicArguments,
    LoopArguments,
    load_recipe,
    parse_args,
    parse_groups,
)
from hf_fss.training.checkpoint import CheckpointError, load_tree, verify_checkpoint
from hf_fss.training.episodic import build_data, build_model, main, train
from hf_fss.training.loop import (
    EpochShuffleSampler,
    LoopCallback,
    LoopState,
    NonFiniteError,
    TrainingLoop,
    create_optimizer,
    create_scheduler,
    find_latest_checkpoint,
)

__all__ = [
    "QUICKSTART_RECIPE",
    "RECIPES_DIR",
    "TRAIN_GROUPS",
    "CheckpointError",
    "EpisodicArguments",
    "EpochShuffleSampler",
    "LoopArguments",
    "LoopCallback",
    "LoopState",
    "NonFiniteError",
    "TrainingLoop",
    "build_data",
    "build_model",
    "create_optimizer",
    "create_scheduler",
    "find_latest_checkpoint",
    "load_recipe",
    "load_tree",
    "main",
    "parse_args",
    "parse_groups",
    "train",
    "verify_checkpoint",
]
