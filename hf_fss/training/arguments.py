"""
Arguments of the training scripts, in groups parsed together by transformers' `HfArgumentParser` (which takes
several dataclasses): `LoopArguments` (the generic Accelerate loop: optimisation, batches, checkpoints, logging) and
`EpisodicArguments` (episodic few-shot training: model, benchmark, fold, shot, augmentation, validation, test).
A script picks its groups (`scripts/train.py`: `TRAIN_GROUPS`); another kind of training adds its own group.

Values come from library defaults, then a YAML recipe (`--config`), then command-line flags, each overriding the
previous one. The command line is generated from the dataclasses (`--learning-rate` and `--learning_rate` both work,
booleans take `--flag` / `--no-flag`). A recipe uses the field names of any group as keys (one flat mapping), plus
`model:`, a mapping of model-config fields (`model_kwargs`); `--model-kwargs '{"reduce_dim": 64}'` updates that
mapping key by key instead of replacing it.

Recipes ship inside the package (`hf_fss/recipes/<method>/<name>.yaml`, found with `importlib.resources`), so a wheel
install has them: `--config recipes/ntrenet/pascal5i_resnet50.yaml` reads that file from disk when it exists and
otherwise the packaged recipe of the same relative name. With no `--config` and none of `--model-type`, `--dataset`,
`--benchmark`, the run is the embedded quickstart: `recipes/ntrenet/quickstart_synthetic.yaml`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from hf_fss.cli import (
    IMAGE_SIDE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    OneLineErrors,
    Range,
    check_ranges,
)
from hf_fss.evaluation.arguments import BenchmarkArguments
from hf_fss.utils import set_num_threads

__all__ = [
    "QUICKSTART_RECIPE",
    "RECIPES_DIR",
    "TRAIN_GROUPS",
    "EpisodicArguments",
    "LoopArguments",
    "apply_num_threads",
    "arguments_dict",
    "build_parser",
    "load_recipe",
    "parse_args",
    "parse_groups",
    "resolve_recipe_path",
]

# The packaged recipes (`hf_fss/recipes`), a real folder for a checkout, an editable or a wheel install.
RECIPES_DIR = Path(str(resources.files("hf_fss") / "recipes"))
QUICKSTART_RECIPE = RECIPES_DIR / "ntrenet" / "quickstart_synthetic.yaml"

# Flags that pick the experiment: when one is given, the quickstart recipe is not applied underneath.
_SELECTION_FLAGS = ("--config", "--model-type", "--model_type", "--dataset", "--benchmark")
# Recipe keys that are spelt differently from the field they set.
_RECIPE_ALIASES = {"model": "model_kwargs"}
_SCHEDULERS = ("poly", "polynomial", "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts")


_MOMENTUM = Range(0, 1, high_open=True)
_FRACTION = Range(0, 1, high_open=True)
_ROTATION = Range(-180, 180)
# Random scales beyond 10x make images of tens of thousands of pixels a side (OpenCV's resize then fails).
_SCALE = Range(0, 10, low_open=True)


def _check_choices(group: Any, choices: dict[str, tuple]) -> None:
    # argparse checks `choices` on the command line only, not on values that come from a recipe.
    for name, allowed in choices.items():
        if getattr(group, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(group, name)!r}")


def _model_kwargs(value: Any) -> dict[str, Any]:
    """`--model-kwargs` / the recipe's `model:` as a dict; a JSON text is parsed; anything but an object refused."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model-kwargs must be a JSON object, got {value!r} ({err})") from err
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"--model-kwargs (recipe key model) must be a JSON object of model-config fields such as "
            f"'{{\"reduce_dim\": 64}}', got {type(value).__name__} {value!r}"
        )
    if not all(isinstance(k, str) for k in value):
        raise ValueError(f"--model-kwargs keys must be model-config field names, got {list(value)}")
    return dict(value)


@dataclass
class LoopArguments:
    """The generic training loop: run folder, seed, optimisation, batches, precision, checkpoints, logging, hub."""

    output_dir: str | None = field(
        default=None, metadata={"help": "run folder (default outputs/<model_type>-<benchmark>-fold<F>-<K>shot)"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow writing into a folder that already holds a run"}
    )
    seed: int = field(
        default=321, metadata={"range": SEED, "help": "seed of weights, data order, augmentation and dropout"}
    )
    num_workers: int = field(
        default=0, metadata={"range": NON_NEGATIVE_INT, "help": "DataLoader worker processes per training process"}
    )

    # --- optimisation --------------------------------------------------------------------------------------------
    optimizer: Literal["sgd", "adamw"] = field(default="sgd", metadata={"help": "sgd (the papers) or adamw"})
    learning_rate: float = field(default=0.01, metadata={"range": POSITIVE, "help": "initial learning rate"})
    momentum: float = field(default=0.9, metadata={"range": _MOMENTUM, "help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"range": NON_NEGATIVE, "help": "weight decay"})
    lr_scheduler: str = field(
        default="poly",
        metadata={"help": "poly: lr * (1 - step / max_steps) ** lr_power (the papers); or a transformers schedule"},
    )
    lr_power: float = field(default=0.9, metadata={"range": POSITIVE, "help": "power of the poly schedule"})
    warmup_steps: int = field(default=0, metadata={"range": NON_NEGATIVE_INT, "help": "linear warm-up steps"})
    batch_size: int = field(
        default=8, metadata={"range": POSITIVE_INT, "help": "items (episodes) per process per forward pass"}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"range": POSITIVE_INT, "help": "forward passes per optimizer step"}
    )
    epochs: int = field(
        default=50, metadata={"range": NON_NEGATIVE_INT, "help": "passes over the training items (unless --max-steps)"}
    )
    max_steps: int | None = field(
        default=None, metadata={"range": POSITIVE_INT, "help": "optimizer steps; overrides --epochs"}
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"range": POSITIVE, "help": "clip gradients to this norm"}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "no / fp16 / bf16 (default: what `accelerate launch` was given)"}
    )
    sync_batchnorm: bool = field(
        default=False, metadata={"help": "multi-GPU: SyncBatchNorm for the trainable batch norms"}
    )
    ddp_find_unused_parameters: bool = field(
        default=False, metadata={"help": "DistributedDataParallel(find_unused_parameters=True)"}
    )
    cpu: bool = field(default=False, metadata={"help": "train on CPU even when an accelerator is available"})
    num_threads: int | None = field(
        default=None,
        metadata={
            "range": POSITIVE_INT,
            "help": "torch threads per process (default: OMP_NUM_THREADS when set, which `accelerate launch` makes 1 "
            "for several processes, else the cores / processes on this machine)",
        },
    )

    # --- checkpoints, logging, hub -------------------------------------------------------------------------------
    checkpointing_steps: int | None = field(
        default=None,
        metadata={
            "range": POSITIVE_INT,
            "help": "save the training state (safetensors + JSON, verified on resume) every N steps",
        },
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"range": POSITIVE_INT, "help": "keep only the newest N"}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "checkpoint folder, or 'latest' for the newest one of --output-dir that verifies"},
    )
    stop_after_steps: int | None = field(
        default=None,
        metadata={
            "range": POSITIVE_INT,
            "help": "debug: stop as if killed after N steps (after that step's checkpoint)",
        },
    )
    logging_steps: int = field(
        default=10, metadata={"range": POSITIVE_INT, "help": "log loss terms and learning rate every N steps"}
    )
    report_to: str = field(
        default="auto",
        metadata={
            "help": "trackers, comma-separated (tensorboard, wandb, ...), 'all', 'none'; auto: tensorboard "
            "if installed"
        },
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "upload the selected model to this Hub repo"})

    def __post_init__(self):
        _check_choices(self, {"optimizer": ("sgd", "adamw"), "mixed_precision": (None, "no", "fp16", "bf16")})
        if self.lr_scheduler not in _SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; choose one of {list(_SCHEDULERS)}")
        check_ranges(self)
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("give --epochs >= 1 or --max-steps")


def apply_num_threads(args: LoopArguments, argv: Sequence[str] | None) -> int | None:
    """
    Set torch's intra-op threads for a run from the command line (`argv` None): `--num-threads`, else
    `hf_fss.utils.default_num_threads()` (`OMP_NUM_THREADS` when set, which `accelerate launch` makes 1 per process
    of a multi-process run; else the cores shared among the processes of this machine). A call from Python with its
    own `argv` keeps the caller's threads unless `--num-threads` is given. Returns the count set, or None.
    """
    if argv is None or args.num_threads is not None:
        return set_num_threads(args.num_threads)
    return None


@dataclass
class EpisodicArguments(BenchmarkArguments):
    """
    Episodic few-shot training: what to train, on which benchmark fold and shot (the fields of `BenchmarkArguments`,
    shared with evaluate.py and compare.py), and how to select and test it.
    """

    config: str | None = field(
        default=None, metadata={"help": "YAML recipe (e.g. recipes/ntrenet/pascal5i_resnet50.yaml); flags override it"}
    )
    model_type: str = field(default="ntrenet", metadata={"help": "registered method (hf_fss.MODEL_CLASSES)"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "start from a saved model (folder or Hub id) instead of a fresh config"}
    )
    model_kwargs: dict | str | None = field(
        default=None, metadata={"help": "model config fields, JSON (the recipe's `model:` mapping, updated per key)"}
    )

    # --- data (besides BenchmarkArguments' dataset, benchmark, fold, fold_convention, shot, synthetic_*) ---------
    image_size: int = field(
        default=473, metadata={"range": IMAGE_SIDE, "help": "training crop side and the model's test image size"}
    )
    novel_class_policy: Literal["background", "ignore", "exclude"] = field(
        default="background", metadata={"help": "novel-class pixels in training images: background / ignore / drop"}
    )
    scale_min: float = field(default=0.9, metadata={"range": _SCALE, "help": "augmentation: smallest random scale"})
    scale_max: float = field(default=1.1, metadata={"range": _SCALE, "help": "augmentation: largest random scale"})
    rotate_min: float = field(
        default=-10.0, metadata={"range": _ROTATION, "help": "augmentation: rotation range, degrees (symmetric)"}
    )
    rotate_max: float = field(
        default=10.0, metadata={"range": _ROTATION, "help": "augmentation: rotation range, degrees (symmetric)"}
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "augmentation: random horizontal flips"})
    gaussian_blur: bool = field(default=True, metadata={"help": "augmentation: random 5x5 Gaussian blur"})

    # --- validation (model selection) and final evaluation -------------------------------------------------------
    validation_every_epochs: int = field(
        default=1,
        metadata={
            "range": NON_NEGATIVE_INT,
            "help": "validate every N epochs (0: never)",
            "aliases": ["--eval-every-epochs"],
        },
    )
    validation_steps: int | None = field(
        default=None, metadata={"range": POSITIVE_INT, "help": "also validate every N optimizer steps"}
    )
    num_validation_episodes: int = field(
        default=1000, metadata={"range": NON_NEGATIVE_INT, "help": "validation episodes (base classes)"}
    )
    validation_fraction: float = field(
        default=0.05, metadata={"range": _FRACTION, "help": "share of the training images held out for validation"}
    )
    validation_min_images: int = field(
        default=100, metadata={"range": NON_NEGATIVE_INT, "help": "hold out at least this many images"}
    )
    select_on_test_fold: bool = field(
        default=False,
        metadata={"help": "select the best model on the test fold's novel classes, as the papers did (not advised)"},
    )
    eval_protocol: str = field(default="pfenet", metadata={"help": "pfenet, hsnet or panet"})
    num_eval_episodes: int | None = field(
        default=None,
        metadata={"range": POSITIVE_INT, "help": "final novel-class test episodes (default: the protocol's count)"},
    )
    eval_seed: int | None = field(
        default=None, metadata={"range": SEED, "help": "test episode seed (default: the protocol's)"}
    )
    eval_batch_size: int = field(
        default=1, metadata={"range": POSITIVE_INT, "help": "episodes per forward pass in evaluation"}
    )
    evaluate_at_end: bool = field(default=True, metadata={"help": "test the final (and best) model on novel classes"})
    compare_baseline: bool = field(
        default=False,
        metadata={"help": "also test the training-free cosine prior with the initial backbone on the same episodes"},
    )

    def __post_init__(self):
        import hf_fss
        from hf_fss.data.folds import COCO_CONVENTIONS, fold_classes
        from hf_fss.data.loading import resolve_benchmark
        from hf_fss.evaluation.protocols import PROTOCOLS

        if self.model_type not in hf_fss.MODEL_CLASSES:
            raise ValueError(f"unknown model type {self.model_type!r}; registered: {sorted(hf_fss.MODEL_CLASSES)}")
        if not hf_fss.MODEL_CLASSES[self.model_type][1].supports_training:
            raise ValueError(
                f"--model-type {self.model_type} cannot be trained by hf_fss (an adapter of pretrained weights); "
                "evaluate it with scripts/evaluate.py or scripts/compare.py"
            )
        self.model_kwargs = _model_kwargs(self.model_kwargs)
        check_ranges(self)
        # What a prepare_dataset.py folder (or "synthetic") recorded; a contradicting --benchmark is refused.
        self.benchmark = resolve_benchmark(self.dataset, self.benchmark)
        if self.fold_convention is not None:
            if self.benchmark != "coco20i":
                raise ValueError(f"fold_convention applies to coco20i only, not to {self.benchmark}")
            if self.fold_convention not in COCO_CONVENTIONS:
                raise ValueError(f"fold_convention must be one of {COCO_CONVENTIONS}, got {self.fold_convention!r}")
            if self.fold_convention == "canet_40_20_20":
                fold_classes("coco20i", self.fold, self.fold_convention)  # a single split: any fold but 0 raises
        if self.eval_protocol.lower() not in PROTOCOLS:
            raise ValueError(f"unknown eval_protocol {self.eval_protocol!r}; presets are {sorted(PROTOCOLS)}")
        self.eval_protocol = self.eval_protocol.lower()
        _check_choices(self, {"novel_class_policy": ("background", "ignore", "exclude")})
        if not self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        if not math.isclose(-self.rotate_min, self.rotate_max) or self.rotate_max < 0:
            raise ValueError(
                f"the rotation range must be symmetric, [-r, r]; got [{self.rotate_min}, {self.rotate_max}]"
            )

    @property
    def wants_validation(self) -> bool:
        return (self.validation_every_epochs > 0 or self.validation_steps is not None) and (
            self.num_validation_episodes > 0
        )

    def default_output_dir(self) -> str:
        return f"outputs/{self.model_type}-{self.benchmark}-fold{self.fold}-{self.shot}shot"


# The groups of `scripts/train.py`, in the order `parse_args` returns them.
TRAIN_GROUPS: tuple[type, ...] = (LoopArguments, EpisodicArguments)


def arguments_dict(*groups: Any) -> dict[str, Any]:
    """The resolved arguments of every group as one flat, JSON-serialisable dict (field names are unique)."""
    out: dict[str, Any] = {}
    for group in groups:
        out.update(dataclasses.asdict(group))
    return out


def resolve_recipe_path(path: str | Path) -> Path:
    """
    A recipe path as given when it exists on disk; else, for a relative path, the packaged recipe of that name
    (`recipes/ntrenet/x.yaml`, `ntrenet/x.yaml`), so the README's commands work from any folder and a wheel install.
    """
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "recipes" else path.parts
    packaged = RECIPES_DIR.joinpath(*parts) if parts else RECIPES_DIR
    return packaged if packaged.is_file() else path


def load_recipe(path: str | Path, groups: Sequence[type] = TRAIN_GROUPS) -> dict[str, Any]:
    """Read a YAML recipe into field values of `groups`; unknown keys raise a `ValueError` naming them."""
    path = resolve_recipe_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)  # PyYAML's message spans lines: one line, with the position
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ValueError(f"config file {str(path)!r} is not valid YAML{at}: {problem}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of argument names to values")
    names = {f.name for group in groups for f in dataclasses.fields(group)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = _RECIPE_ALIASES.get(key, str(key).replace("-", "_"))
        if name == "warmup":  # the recipes' `warmup: false` (PFENet's flag); a number is a step count
            if value is True:
                raise ValueError(f"{path}: `warmup: true` is ambiguous; set `warmup_steps: N`")
            name, value = "warmup_steps", int(value or 0)
        if name not in names or name == "config":
            raise ValueError(f"config file {str(path)!r}: unknown key {key!r}")
        out[name] = value
    return out


TRAIN_DESCRIPTION = (
    "Train a few-shot segmentation model episodically. `accelerate launch scripts/train.py` with no argument "
    "runs the quickstart (recipes/ntrenet/quickstart_synthetic.yaml); precedence: defaults < --config < flags."
)


class _Parser(OneLineErrors, HfArgumentParser):
    """`HfArgumentParser` with one-line usage errors, taking each field's `"range"` metadata into its `--help`."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        # argparse's add_argument takes no "range" keyword (checked by check_ranges) and no "evaluation" one (what
        # evaluate.py / compare.py declare differently, see hf_fss.evaluation.arguments).
        if "range" in field.metadata or "evaluation" in field.metadata:
            allowed = field.metadata.get("range")
            field = copy.copy(field)
            metadata = {k: v for k, v in field.metadata.items() if k not in ("range", "evaluation")}
            if allowed is not None:
                metadata["help"] = f"{metadata.get('help', '')} ({allowed.describe()})".lstrip()
            field.metadata = types.MappingProxyType(metadata)
        HfArgumentParser._parse_dataclass_field(parser, field)


def build_parser(
    groups: Sequence[type] = TRAIN_GROUPS, prog: str = "train.py", description: str = TRAIN_DESCRIPTION
) -> HfArgumentParser:
    """The parser of `groups`, named `prog` in its usage line (the script, also under `accelerate launch`)."""
    parser = _Parser(list(groups))
    parser.prog, parser.description = prog, description
    return parser


def parse_groups(
    argv: Sequence[str] | None,
    groups: Sequence[type],
    default_recipe: str | Path | None = None,
    prog: str = "train.py",
    description: str = TRAIN_DESCRIPTION,
) -> tuple[Any, ...]:
    """
    One dataclass per group, filled from the command line `argv` (default `sys.argv[1:]`) over the recipe of
    `--config` (or `default_recipe` when no experiment-selecting flag is given) over the dataclass defaults. One
    group must define `config`; a `model_kwargs` field is updated key by key by its flag. `prog` and
    `description` head `--help` and the error messages.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(groups, prog, description)
    # A first pass only to find the recipe; the full parse below reports unknown flags.
    pre, _ = parser.parse_known_args(argv)
    config = pre.config
    if config is None and default_recipe is not None and not any(a.split("=", 1)[0] in _SELECTION_FLAGS for a in argv):
        config = str(default_recipe)
    if config is not None:
        config = str(resolve_recipe_path(config))
    recipe = load_recipe(config, groups) if config is not None else {}
    recipe_model = _model_kwargs(recipe.pop("model_kwargs", None))
    parser.set_defaults(**recipe, config=config)
    _, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's wording, not HfArgumentParser's "not used by the HfArgumentParser"
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see --help for the flags)")
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    for group in parsed:
        _limit_recipe_overwrite(group, recipe, argv)
        if hasattr(group, "config"):
            group.config = config  # the recipe actually read (a packaged one for a relative name not on disk)
        if hasattr(group, "model_kwargs"):  # --model-kwargs updates the recipe's model mapping
            group.model_kwargs = {**recipe_model, **group.model_kwargs}
    return tuple(parsed)


def _limit_recipe_overwrite(group: Any, recipe: dict, argv: list[str]) -> None:
    """A recipe's `overwrite_output_dir: true` (the quickstarts', so that they can be run again) covers only the
    folder the recipe names: with another `--output-dir` a finished run there is refused unless the flag is given."""
    if not (recipe.get("overwrite_output_dir") and getattr(group, "overwrite_output_dir", False)):
        return
    flagged = any(a.split("=", 1)[0] in ("--overwrite-output-dir", "--overwrite_output_dir") for a in argv)
    if not flagged and str(group.output_dir) != str(recipe.get("output_dir")):
        group.overwrite_output_dir = False


def parse_args(
    argv: Sequence[str] | None = None, quickstart_recipe: str | Path | None = None
) -> tuple[LoopArguments, EpisodicArguments]:
    """
    `(loop_args, episodic_args)` of `scripts/train.py` (see `parse_groups`); without an experiment-selecting flag
    the recipe is `quickstart_recipe` (default `QUICKSTART_RECIPE`). The run folder defaults to
    `outputs/<model_type>-<benchmark>-fold<F>-<K>shot`.

    Raises:
        ValueError / FileNotFoundError: a missing or malformed config file, an unknown key or model type, a bad value.
    """
    loop_args, episodic_args = parse_groups(argv, TRAIN_GROUPS, default_recipe=quickstart_recipe or QUICKSTART_RECIPE)
    if loop_args.output_dir is None:
        loop_args.output_dir = episodic_args.default_output_dir()
    return loop_args, episodic_args
