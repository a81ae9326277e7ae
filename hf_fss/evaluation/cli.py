"""
The command line of `scripts/evaluate.py`: `main(argv)` parses, checks and runs `run_evaluation`, which scores a
model with `hf_fss.evaluation.loop.evaluate_model` on fixed, seeded episodes (one run per seed) and writes
`metrics.json`. Model loading with config overrides (`--model-kwargs`, `--shot-fusion`, ...) is shared with
`scripts/compare.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hf_fss.backbones.feature_cache import FeatureCache
from hf_fss.cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    ScriptArgumentParser,
    os_error_line,
)
from hf_fss.data.episodes import ANNOTATION_KINDS, load_episodes_jsonl, make_test_episodes, save_episodes_jsonl
from hf_fss.data.folds import has_class_split
from hf_fss.evaluation.arguments import (
    add_arguments,
    checked_fold_convention,
    class_names_of,
    load_test_split,
    protocol_for,
)
from hf_fss.evaluation.loop import combine_seed_runs, default_feature_cache_bytes, evaluate_model, needs_cpu_fallback
from hf_fss.evaluation.protocols import PROTOCOLS, get_protocol
from hf_fss.utils import check_model_path, resolve_model_path, set_num_threads
from hf_fss.utils.io import OutputLock, check_output_path, hold_on_main_process, write_json_atomic
from hf_fss.utils.precision import PRECISIONS, check_precision

__all__ = [
    "add_runtime_arguments",
    "add_scoring_arguments",
    "build_parser",
    "check_outputs",
    "load_model_with_overrides",
    "main",
    "model_config_overrides",
    "run_evaluation",
    "write_json_atomic",
]

# `--dtype` choices (declared in `PrecisionArguments`): float32, or the autocast dtype of the evaluation.
DTYPES = PRECISIONS


# ------------------------------------------------------------------------------------------------ command line


def build_parser() -> ScriptArgumentParser:
    parser = ScriptArgumentParser(
        prog="evaluate.py",
        description=(
            "Evaluate a few-shot segmentation model on fixed, seeded test episodes and write metrics.json. "
            "Run with `python scripts/evaluate.py ...` or `accelerate launch [--multi_gpu --num_processes N] "
            "scripts/evaluate.py ...`: the numbers are the same with 1 or N processes."
        ),
    )
    parser.add_argument("--model", required=True, help="folder written by save_pretrained, or a Hub model id")
    add_arguments(parser)  # --dataset, --benchmark, --fold, --fold-convention, --shot, --synthetic-*
    _add_episode_arguments(parser)
    _add_model_arguments(parser)
    parser.add_argument("--output", default="metrics.json", help="where to write the metrics (default metrics.json)")
    return parser


def _add_episode_arguments(parser: ScriptArgumentParser) -> None:
    """Which episodes (split, protocol, count, seeds, file), their support annotation, and how they are batched."""
    parser.add_argument(
        "--split", default=None, help="split of the test episodes (default: validation; fss1000, folder: test)"
    )
    add_scoring_arguments(parser)
    parser.add_argument("--seed", allowed=SEED, default=None, help="episode seed (default: the protocol's seeds)")
    parser.add_argument("--seeds", allowed=SEED, nargs="+", default=None, help="several seeds: mean and std over runs")
    parser.add_argument("--episodes-file", default=None, help="JSON Lines episode list to evaluate instead")
    parser.add_argument("--save-episodes", default=None, help="export the episode list (JSON Lines) to this file")
    parser.add_argument("--num-workers", allowed=NON_NEGATIVE_INT, default=0, help="DataLoader workers (default 0)")


def add_scoring_arguments(parser: ScriptArgumentParser) -> None:
    """`--protocol`, `--num-episodes`, `--annotation`, `--batch-size`: how episodes are scored (evaluate.py and
    compare.py)."""
    parser.add_argument(
        "--protocol",
        type=str.lower,
        choices=sorted(PROTOCOLS),
        default="pfenet",
        help="pfenet (default), hsnet or panet",
    )
    parser.add_argument(
        "--num-episodes", allowed=POSITIVE_INT, default=None, help="episodes per seed (default: the protocol's)"
    )
    parser.add_argument(
        "--annotation",
        default="mask",
        choices=ANNOTATION_KINDS,
        help="support annotation derived from the mask (default mask)",
    )
    parser.add_argument("--batch-size", allowed=POSITIVE_INT, default=1, help="episodes per forward pass (default 1)")


def _add_model_arguments(parser: ScriptArgumentParser) -> None:
    """How the model runs: config overrides, the feature cache, dtype and device."""
    parser.add_argument(
        "--model-kwargs",
        default=None,
        help="JSON object of model-config fields to override for this evaluation, e.g. '{\"refinement_steps\": 5}'; "
        "any field of the model's config (a field it lacks is an error naming it)",
    )
    parser.add_argument(
        "--shot-fusion",
        default=None,
        help="override the model's `shot_fusion` config field (CRCNet: average, finetune, finetune+average)",
    )
    parser.add_argument(
        "--inference-scales",
        allowed=POSITIVE,
        nargs="+",
        default=None,
        help="override the model's `inference_scales` config field (CRCNet: e.g. 1.0 for single scale)",
    )
    add_runtime_arguments(parser)


def add_runtime_arguments(parser: ScriptArgumentParser, subject: str = "the model") -> None:
    """`--num-threads`, `--feature-cache-mb` and `--cpu` (evaluate.py, and compare.py for `subject` "every model");
    `--dtype` and `--channels-last` come with the benchmark arguments (`PrecisionArguments`)."""
    parser.add_argument(
        "--num-threads",
        allowed=POSITIVE_INT,
        default=None,
        help="torch threads per process (default: the cores available divided by the processes on this machine)",
    )
    parser.add_argument(
        "--feature-cache-mb",
        allowed=NON_NEGATIVE,
        default=None,
        help=(
            "memory for the frozen extractors' features of the images already seen, reused across episodes and "
            "seeds (same metrics, bit for bit, at --batch-size 1); default: half the free GPU memory, or a quarter "
            "of the available RAM up to 4 GiB on CPU; 0 turns it off"
        ),
    )
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when an accelerator is available")


def model_config_overrides(args: Any) -> dict[str, Any]:
    """
    The model-config fields the command line overrides: `--model-kwargs` (a JSON object), then the shorthands
    `--shot-fusion` and `--inference-scales` for the fields of the same name.

    Raises:
        `ValueError`: `--model-kwargs` is not a JSON object.
    """
    overrides: dict[str, Any] = {}
    if getattr(args, "model_kwargs", None):
        try:
            overrides = json.loads(args.model_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r} ({err})") from err
        if not isinstance(overrides, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    for field_name in ("shot_fusion", "inference_scales"):
        value = getattr(args, field_name, None)
        if value is not None:
            overrides[field_name] = value
    return overrides


def load_model_with_overrides(name_or_path: str, overrides: dict[str, Any] | None = None, dtype: str = "float32"):
    """
    `AutoModel.from_pretrained` with some config fields changed (evaluation settings such as CRCNet's
    `shot_fusion`), in `dtype` (one of `DTYPES`); the weights are unchanged. Works for any model type: a field its
    config lacks is refused.

    Raises:
        `ValueError`: a field the model's config does not have (named, with the closest field) or a bad value.
    """
    import dataclasses

    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModel

    from hf_fss.configuration_fss import check_unknown_config_fields

    if not overrides:
        return AutoModel.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
    config = AutoConfig.from_pretrained(name_or_path)
    known = {f.name for f in dataclasses.fields(type(config))}
    check_unknown_config_fields(type(config), {k: v for k, v in overrides.items() if k not in known})
    try:
        config = type(config).from_dict({**config.to_dict(), **overrides})
    except StrictDataclassError as err:
        raise ValueError(f"config override {overrides} rejected by {type(config).__name__}: {err}") from None
    return AutoModel.from_pretrained(name_or_path, config=config, dtype=getattr(torch, dtype))


def _load_model_and_processor(
    name_or_path: str, overrides: dict[str, Any] | None = None, dtype: str = "float32"
) -> tuple[Any, Any]:
    # hf_fss is imported (this module is part of it), so its model types are registered with the Auto classes.
    from hf_fss.image_processing_fss import load_image_processor
    from hf_fss.loading import check_fss_model, check_fss_model_folder

    check_model_path(name_or_path)
    name_or_path = resolve_model_path(name_or_path)  # a training run folder: its best/, else final/ (logged)
    check_fss_model_folder(name_or_path)  # a plain transformers folder (SegGPT, DINOv2) is named before loading
    model = load_model_with_overrides(name_or_path, overrides, dtype)
    check_fss_model(model)  # the same for a Hub id, known only once loaded
    # A converted checkpoint may come without preprocessor_config.json (the config's image_size is used); a broken
    # one is an error naming the file, as with AutoImageProcessor, never replaced by defaults.
    return model, load_image_processor(
        name_or_path, model.config.image_size, max(model.min_input_size()), model.fss_image_processor_class
    )


def _seeds_and_episode_count(args: argparse.Namespace, base, fixed, fold) -> tuple[list[int], int]:
    """The seeds to run and the episodes per seed: from `--episodes-file` (checked against the fold and `--shot`),
    else `--seeds` / `--seed` / the protocol's seeds and `--num-episodes` / the protocol's count."""
    if args.episodes_file is not None:
        if not fixed:
            raise ValueError(f"--episodes-file {args.episodes_file!r} holds no episode")
        unknown = sorted({e.class_id for e in fixed} - set(fold.novel))
        if unknown:
            raise ValueError(
                f"--episodes-file has class ids {unknown} outside fold {args.fold}'s classes {fold.novel}"
            )
        shots = {len(e.supports) for e in fixed}
        if shots != {args.shot}:
            raise ValueError(f"--episodes-file has episodes with {sorted(shots)} supports but --shot is {args.shot}")
        seeds, num_episodes = [args.seed if args.seed is not None else base.seeds[0]], len(fixed)
    else:
        # Default: every seed of the protocol (PANet's five runs), one run for PFENet / HSNet.
        seeds = args.seeds or ([args.seed] if args.seed is not None else list(base.seeds))
        num_episodes = args.num_episodes if args.num_episodes is not None else base.num_episodes
    if args.save_episodes and len(seeds) > 1:
        raise ValueError("--save-episodes exports one episode list: give a single --seed")
    return seeds, num_episodes


def _feature_cache(feature_cache_mb: float | None, device) -> FeatureCache | None:
    """`--feature-cache-mb` (default: `default_feature_cache_bytes`; 0 = off) as a cache, or None."""
    if feature_cache_mb is not None and feature_cache_mb < 0:
        raise ValueError(f"--feature-cache-mb must be >= 0, got {feature_cache_mb}")
    cache_bytes = default_feature_cache_bytes(device) if feature_cache_mb is None else int(feature_cache_mb * 2**20)
    return FeatureCache(cache_bytes) if cache_bytes > 0 else None


def _unadapted_note(result: Mapping[str, Any]) -> str:
    """The log's note on the episodes predicted by an unadapted model (its adaptation diverged), or ''."""
    count = result.get("unadapted_support_sets", 0)
    if not count:
        return ""
    return f"; {count} of {result['num_episodes']} support sets kept the unadapted model (their adaptation diverged)"


def check_outputs(args: argparse.Namespace) -> None:
    """
    Check, before any work, that `--output` (and `--save-episodes`) can be written: a file path, not a folder, in a
    place one may write.

    Raises:
        `ValueError`: one line naming the flag, the path and what to do.
    """
    check_output_path(args.output, "--output", folder=False)
    if args.save_episodes:
        check_output_path(args.save_episodes, "--save-episodes", folder=False)


def run_evaluation(args: argparse.Namespace, held: contextlib.ExitStack) -> dict[str, Any]:
    """
    Everything `scripts/evaluate.py` does after parsing; returns the metrics dict (also written to `--output`). The
    main process holds `--output` (`hf_fss.utils.io.OutputLock`) until `held` closes, so two evaluations writing
    the same file do not silently lose one result: the second is refused naming the first.
    """
    from accelerate import Accelerator

    from hf_fss.data.loading import resolve_benchmark

    if args.seed is not None and args.seeds is not None:
        raise ValueError("give either --seed or --seeds, not both")
    benchmark = resolve_benchmark(args.dataset, args.benchmark)  # a contradicting --benchmark is refused
    convention = checked_fold_convention(args.fold_convention, benchmark, args.fold)
    if args.shot < 1:
        raise ValueError(f"--shot must be >= 1, got {args.shot}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_path(args.model)  # before building any data
    set_num_threads(args.num_threads)

    accelerator = Accelerator(cpu=args.cpu or needs_cpu_fallback())
    check_precision(args.dtype, accelerator.device)  # before any data is built
    hold_on_main_process(OutputLock(args.output, "--output", beside=True), accelerator, held)
    split_name, split, fold = load_test_split(args, benchmark, convention)
    # The episode file is checked against the split before the model is loaded.
    fixed = load_episodes_jsonl(args.episodes_file, split=split) if args.episodes_file is not None else None
    overrides = model_config_overrides(args)
    model, processor = _load_model_and_processor(args.model, overrides)
    model.to(accelerator.device)

    base = get_protocol(args.protocol, benchmark=benchmark)
    seeds, num_episodes = _seeds_and_episode_count(args, base, fixed, fold)
    protocol = protocol_for(
        base, benchmark, num_episodes=num_episodes, seeds=seeds, fold_convention=args.fold_convention
    )
    feature_cache = _feature_cache(args.feature_cache_mb, accelerator.device)
    runs = []
    for seed in seeds:
        episodes = fixed or make_test_episodes(split, fold.novel, num_episodes, args.shot, seed)
        if args.save_episodes and accelerator.is_main_process:
            save_episodes_jsonl(episodes, args.save_episodes)
        started = time.perf_counter()
        result = evaluate_model(
            model,
            processor,
            split,
            episodes,
            class_ids=fold.novel,
            class_names=class_names_of(split),
            protocol=protocol,
            annotation=args.annotation,
            seed=seed,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            accelerator=accelerator,
            description=f"seed {seed}",
            feature_cache=feature_cache,
            precision=args.dtype,
            channels_last=args.channels_last,
        )
        accelerator.print(
            f"seed {seed}: mIoU {100 * result['miou']:.2f}  FB-IoU {100 * result['fbiou']:.2f}  "
            f"precision {100 * result['precision']:.2f}  ({result['num_episodes']} episodes, "
            f"{time.perf_counter() - started:.1f} s){_unadapted_note(result)}"
        )
        runs.append(result)

    setting = {"model": model.name_or_path, "benchmark": benchmark, "split": split_name, "model_overrides": overrides}
    metrics = _metrics_record(args, runs, setting, accelerator.num_processes)
    _report(args, metrics, protocol, feature_cache, accelerator)
    accelerator.end_training()
    return metrics


def _metrics_record(
    args: argparse.Namespace, runs: Sequence[Mapping[str, Any]], setting: Mapping[str, Any], num_processes: int
) -> dict[str, Any]:
    """The metrics of the seed runs with what produced them: the contents of metrics.json."""
    metrics = combine_seed_runs(runs)
    metrics.update(
        {
            "model": setting["model"],  # the folder taken for a run folder
            "dataset": args.dataset,
            "benchmark": setting["benchmark"],
            "split": setting["split"],
            "fold": args.fold,
            "shot": args.shot,
            "annotation": args.annotation,
            "model_overrides": setting["model_overrides"],
            "dtype": args.dtype,
            "channels_last": args.channels_last,
            "episodes_file": args.episodes_file,
            "num_processes": num_processes,
        }
    )
    return metrics


def _report(args: argparse.Namespace, metrics: Mapping[str, Any], protocol, feature_cache, accelerator) -> None:
    """On the main process: the feature cache's use, then metrics.json written and its one-line summary."""
    if not accelerator.is_main_process:
        return
    if feature_cache is not None:
        # Not written into metrics.json: the counts depend on the number of processes, the metrics do not.
        stats = feature_cache.stats()
        print(
            f"feature cache: {stats['hits']} images served, {stats['misses']} computed; support encodings: "
            f"{stats['support_hits']} served, {stats['support_misses']} computed; query encodings: "
            f"{stats['query_hits']} served, {stats['query_misses']} computed; "
            f"{stats['bytes'] / 2**20:.1f} of {stats['max_bytes'] / 2**20:.0f} MiB held"
        )
    write_json_atomic(metrics, args.output)
    std = f" ± {100 * metrics['miou_std']:.2f}" if "miou_std" in metrics else ""
    # FSS-1000 and folder datasets have one recorded class split: --fold does not apply to them (ignored).
    fold = f"{metrics['split']} split" if has_class_split(metrics["benchmark"]) else f"fold {args.fold}"
    print(
        f"{metrics['benchmark']} {fold} {args.shot}-shot ({protocol.name} protocol, "
        f"{len(protocol.seeds)} seed(s)): mIoU {100 * metrics['miou']:.2f}{std}, FB-IoU {100 * metrics['fbiou']:.2f}"
        f" -> {args.output}"
    )


def run_command(prog: str, work: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """
    `work(*args)` as a command's body: `(0, its result)`, or `(2, None)` after one line `<prog>: error: ...` on
    stderr for bad input (a `ValueError`) or an operating-system error (an `OSError`: its path and what to do).
    """
    try:
        return 0, work(*args)
    except OSError as err:
        print(f"{prog}: error: {os_error_line(err) if err.errno else err}", file=sys.stderr)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
    return 2, None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scripts/evaluate.py`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser.prog, _checked_run, parser, args)[0]


def _checked_run(parser: ScriptArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    parser.check_ranges(args)
    check_outputs(args)
    with contextlib.ExitStack() as held:
        return run_evaluation(args, held)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
