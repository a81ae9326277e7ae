"""
The benchmark arguments: which dataset, benchmark, fold and shot a run uses, and the `--synthetic-*` group that
sizes the embedded benchmark. Declared once (`BenchmarkArguments`) for training (`EpisodicArguments` extends it,
parsed by `HfArgumentParser`), evaluation and compare (`add_arguments` adds the same fields to their
`ScriptArgumentParser`), with each field's range in its `"range"` metadata (`hf_fss.cli.Range`, the one range
check). What the chosen arguments select (the dataset, its test split, the fold, the protocol) is computed here too.

A field's `"help"` is the training help (`HfArgumentParser` appends the default itself); its `"evaluation"` metadata
holds what `evaluate.py` and `compare.py` declare differently: their help (with the default in words), `required`
or `choices`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hf_fss.cli import IMAGE_SIDE, NON_NEGATIVE_INT, POSITIVE_INT, SEED, ScriptArgumentParser, check_ranges
from hf_fss.data.folds import COCO_CONVENTIONS
from hf_fss.evaluation.protocols import EvaluationProtocol, get_protocol
from hf_fss.utils.precision import PRECISIONS, check_precision

__all__ = [
    "BenchmarkArguments",
    "PrecisionArguments",
    "SyntheticArguments",
    "add_arguments",
    "checked_fold_convention",
    "class_names_of",
    "default_test_split",
    "load_benchmark_dataset",
    "protocol_for",
    "synthetic_kwargs",
    "load_test_split",
]

_SYNTHETIC = ("num_train", "num_val", "image_size")


@dataclass
class SyntheticArguments:
    """The `--synthetic-*` group: the size and seed of the embedded synthetic benchmark (`load_benchmark("synthetic",
    ...)`), shared by the benchmark arguments and the prior pretraining's."""

    synthetic_num_train: int | None = field(
        default=None, metadata={"range": NON_NEGATIVE_INT, "help": "synthetic benchmark: train images"}
    )
    synthetic_num_val: int | None = field(
        default=None, metadata={"range": NON_NEGATIVE_INT, "help": "synthetic benchmark: validation images"}
    )
    synthetic_image_size: int | None = field(
        default=None, metadata={"range": IMAGE_SIDE, "help": "synthetic benchmark: image side"}
    )
    synthetic_seed: int = field(
        default=0,
        metadata={
            "range": SEED,
            "help": "synthetic benchmark: generation seed",
            "evaluation": {"help": "synthetic benchmark: generation seed (default 0)"},
        },
    )


@dataclass
class PrecisionArguments:
    """`--dtype` and `--channels-last`: the precision the model is evaluated in (`hf_fss.utils.precision`), shared by
    evaluate.py, compare.py, benchmark.py and train.py's validation and end-of-run tests."""

    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={
            "help": "evaluation (validation, end-of-run tests) in float32 or under bfloat16 / float16 autocast; the "
            "weights, the methods' similarities and priors, and the metric stay float32 (training precision is "
            "accelerate's --mixed_precision)",
            "evaluation": {
                "choices": PRECISIONS,
                "help": "float32 (default), or bfloat16 / float16 autocast; the weights, the methods' similarities "
                "and priors, the logits and the metric stay float32 (docs/precision.md)",
            },
        },
    )
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "evaluation with the model's weights and the query images in channels_last memory format",
            "evaluation": {
                "action": "store_true",
                "help": "model weights and query images in channels_last memory format (same values; faster "
                "convolutions with bfloat16 on CPU)",
            },
        },
    )


@dataclass
class BenchmarkArguments(PrecisionArguments, SyntheticArguments):
    """The benchmark of a run: dataset, benchmark, fold (and COCO-20i's fold convention), shot, synthetic sizes."""

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic', a prepare_dataset.py folder, or a Hub dataset id",
            # Required: a default would score the synthetic benchmark when a user forgot the flag, and overwrite
            # metrics.json.
            "evaluation": {
                "required": True,
                "help": "'synthetic' (the embedded benchmark), a prepare_dataset.py folder or Hub id",
            },
        },
    )
    benchmark: str | None = field(
        default=None,
        metadata={
            "help": "pascal5i, coco20i, fss1000, synthetic or folder (default: inferred)",
            "evaluation": {"help": "pascal5i, coco20i, fss1000, synthetic, folder (default: inferred)"},
        },
    )
    fold: int = field(
        default=0,
        metadata={
            "range": NON_NEGATIVE_INT,
            "help": "fold whose novel classes are held out",
            "evaluation": {"help": "fold whose novel classes are tested (default 0)"},
        },
    )
    fold_convention: str | None = field(
        default=None,
        metadata={
            "help": "COCO-20i folds: interleaved (default), contiguous or canet_40_20_20 (fold 0 only)",
            # Training checks the value in EpisodicArguments.__post_init__, so a recipe's value is checked too.
            "evaluation": {
                "choices": COCO_CONVENTIONS,
                "help": "COCO-20i only: interleaved (default), contiguous or canet_40_20_20 (CANet's 40/20/20 split, "
                "fold 0)",
            },
        },
    )
    shot: int = field(
        default=1,
        metadata={
            "range": POSITIVE_INT,
            "help": "K, support images per training episode",
            "evaluation": {"help": "support images per episode (default 1)"},
        },
    )

    def __post_init__(self):
        check_ranges(self)
        check_precision(self.dtype, "cpu")  # a recipe's value too; the device's own check comes when it runs


def add_arguments(parser: ScriptArgumentParser, group: type = BenchmarkArguments) -> None:
    """Add every field of the dataclass `group` to `parser` as `--field-name`, with its range, default and help."""
    synthetic = {spec.name for spec in dataclasses.fields(SyntheticArguments)}
    specs = dataclasses.fields(group)  # the inherited --synthetic-* group listed last, as it reads in --help
    for spec in [s for s in specs if s.name not in synthetic] + [s for s in specs if s.name in synthetic]:
        options = {"default": spec.default, "help": spec.metadata.get("help")}
        options.update(spec.metadata.get("evaluation", {}))
        if options.get("required"):
            del options["default"]
        parser.add_argument("--" + spec.name.replace("_", "-"), allowed=spec.metadata.get("range"), **options)


def synthetic_kwargs(args: Any) -> dict[str, Any]:
    """The `load_benchmark` keywords of the `--synthetic-*` flags: none unless `args.dataset` is 'synthetic'."""
    if args.dataset != "synthetic":
        return {}
    kwargs = {"synthetic_seed": args.synthetic_seed}
    for name in _SYNTHETIC:
        value = getattr(args, f"synthetic_{name}")
        if value is not None:
            kwargs[name] = value
    return kwargs


def load_benchmark_dataset(args: Any) -> Any:
    """
    `hf_fss.data.load_benchmark` of `args.dataset` (a `BenchmarkArguments`, or the parsed flags of evaluate.py /
    compare.py), the synthetic benchmark sized by its `--synthetic-*` flags.
    """
    from hf_fss.data import load_benchmark  # looked up at call time: tests replace it

    return load_benchmark(args.dataset, **synthetic_kwargs(args))


def checked_fold_convention(fold_convention: str | None, benchmark: str, fold: int) -> str | None:
    """
    The `--fold-convention` to use for `benchmark` (the given one for COCO-20i; None = the protocol's default),
    checked together with `fold` before any data is built (benchmarks with a fixed class split need their data).

    Raises:
        `ValueError`: a convention given for another benchmark (it would otherwise be silently ignored), or a fold
            the benchmark / convention does not have.
    """
    from hf_fss.data import fold_classes
    from hf_fss.data.folds import has_class_split

    if fold_convention is not None and benchmark != "coco20i":
        raise ValueError(
            f"--fold-convention {fold_convention} applies to COCO-20i only, not to the {benchmark} benchmark; "
            "drop the flag"
        )
    if not has_class_split(benchmark):
        fold_classes(benchmark, fold, fold_convention)
    return fold_convention


def default_test_split(dataset: Mapping[str, Any], benchmark: str) -> str:
    """The split test episodes come from: `test` for FSS-1000 and folder (when present), `validation` otherwise."""
    if benchmark in ("fss1000", "folder") and "test" in dataset:
        return "test"
    if "validation" in dataset:
        return "validation"
    raise ValueError(f"the dataset has no 'validation' split to draw test episodes from (splits: {sorted(dataset)})")


def load_test_split(args: argparse.Namespace, benchmark: str, convention: str | None) -> tuple[str, Any, Any]:
    """
    The data a command line scores on: `(split name, split, fold)` of `args.dataset` (`--split`, else
    `default_test_split`), the fold of `args.fold` under `convention`.

    Raises:
        `ValueError`: a `--split` the dataset does not have.
    """
    from hf_fss.data import fold_classes
    from hf_fss.data.folds import has_class_split

    dataset = load_benchmark_dataset(args)
    split_name = args.split or default_test_split(dataset, benchmark)
    if split_name not in dataset:
        raise ValueError(f"--split {split_name!r} is not in the dataset (splits: {sorted(dataset)})")
    fold = fold_classes(benchmark, args.fold, convention, dataset=dataset if has_class_split(benchmark) else None)
    return split_name, dataset[split_name], fold


def class_names_of(split: Any) -> list[str] | None:
    """Class names indexed by class id (entry 0 = background) from a split's `class_ids` ClassLabel, if any."""
    feature = split.features.get("class_ids") if hasattr(split, "features") else None
    feature = getattr(feature, "feature", feature)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def protocol_for(
    name: str | EvaluationProtocol,
    benchmark: str,
    *,
    num_episodes: int | None = None,
    seeds: Sequence[int] | None = None,
    fold_convention: str | None = None,
) -> EvaluationProtocol:
    """A protocol preset for `benchmark` with the episode count, seeds and fold convention actually used."""
    protocol = get_protocol(name, benchmark=benchmark)
    overrides: dict[str, Any] = {}
    if num_episodes is not None:
        overrides["num_episodes"] = int(num_episodes)
    if seeds is not None:
        overrides["seeds"] = tuple(int(s) for s in seeds)
    if fold_convention is not None and protocol.benchmark == "coco20i":
        overrides["fold_convention"] = fold_convention
    return get_protocol(protocol, **overrides) if overrides else protocol
