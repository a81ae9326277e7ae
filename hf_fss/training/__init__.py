"""
Episodic training under Accelerate: `TrainingArguments` (YAML recipe + command line), `train(args)`, and `main`,
the entry point of `scripts/train.py`.
"""

from hf_fss.training.arguments import QUICKSTART_RECIPE, TrainingArguments, load_recipe, parse_args
from hf_fss.training.trainer import EpochShuffleSampler, TrainerState, find_latest_checkpoint, main, train

__all__ = [
    "QUICKSTART_RECIPE",
    "EpochShuffleSampler",
    "TrainerState",
    "TrainingArguments",
    "find_latest_checkpoint",
    "load_recipe",
    "main",
    "parse_args",
    "train",
]
