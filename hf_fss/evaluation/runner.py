"""
The few-shot evaluation loop shared by `scripts/evaluate.py` and the validation of `scripts/train.py`.

`evaluate_model` runs a model over a fixed list of test episodes and returns the metric dict of `metrics.json`.
Under N processes (an `accelerate.Accelerator` with `num_processes > 1`) every process takes one contiguous shard
of the list (`hf_fss.data.episodes.shard_bounds`, with `episode_offset` so annotations and episode indices match
the unsharded run) and the per-class counts are summed across processes, so the numbers equal those of one process
that saw every episode.

Predictions follow the PFENet protocol: logits -> `processor.post_process_semantic_segmentation(outputs,
target_sizes=original sizes)` -> metric at the original label resolution. Protocols with a fixed `label_size`
(HSNet: 400) resize both the prediction and the label with `resize_label` (nearest neighbour) before counting.

`main(argv)` is the command line of `scripts/evaluate.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hf_fss.backbones.feature_cache import FeatureCache
from hf_fss.cli import (
    IMAGE_SIDE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    ScriptArgumentParser,
    os_error_line,
)
from hf_fss.data.episodes import (
    ANNOTATION_KINDS,
    Episode,
    EpisodicTestDataset,
    collate_test_batch,
    load_episodes_jsonl,
    make_test_episodes,
    save_episodes_jsonl,
    shard_bounds,
)
from hf_fss.data.folds import COCO_CONVENTIONS
from hf_fss.evaluation.metrics import FewShotSegmentationMetric, aggregate_seeds, resize_label
from hf_fss.evaluation.protocols import EvaluationProtocol, get_protocol
from hf_fss.utils import check_model_path, resolve_model_path, set_num_threads
from hf_fss.utils.io import OutputLock, check_output_path, hold_on_main_process, write_json_atomic

__all__ = [
    "class_names_of",
    "default_test_split",
    "evaluate_model",
    "main",
    "needs_cpu_fallback",
    "protocol_for",
    "check_model_path",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

# `--dtype` choices: the weights' and images' dtype during evaluation.
DTYPES = ("float32", "bfloat16", "float16")

# The inputs every model takes; the other keys of a test batch (targets, sizes, ids) stay on the host unless the
# model declares them (`model.query_inputs` / `model.support_inputs`, e.g. `class_ids`).
_MODEL_INPUTS = ("pixel_values", "support_pixel_values", "support_masks")


def model_input_names(model: torch.nn.Module, available: Collection[str]) -> tuple[str, ...]:
    """The standard inputs plus the extra inputs `model` declares that a batch with keys `available` can provide."""
    declared = tuple(getattr(model, "query_inputs", ())) + tuple(getattr(model, "support_inputs", ()))
    return _MODEL_INPUTS + tuple(name for name in declared if name in available and name not in _MODEL_INPUTS)


def needs_cpu_fallback() -> bool:
    """
    Whether this process was launched as one of several (`WORLD_SIZE > 1`) on a machine without accelerator.

    `accelerate launch --multi_gpu --num_processes N` on such a machine starts N processes, but Accelerate only
    joins them in a (gloo) process group when told to run on CPU; otherwise each process silently trains alone.
    Passing `cpu=True` to the `Accelerator` in that case makes the same command work on a laptop and on a GPU node.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return world_size > 1 and not has_accelerator


def class_names_of(split: Any) -> list[str] | None:
    """Class names indexed by class id (entry 0 = background) from a split's `class_ids` ClassLabel, if any."""
    feature = split.features.get("class_ids") if hasattr(split, "features") else None
    feature = getattr(feature, "feature", feature)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def default_test_split(dataset: Mapping[str, Any], benchmark: str) -> str:
    """The split test episodes come from: `test` for FSS-1000 and folder (when present), `validation` otherwise."""
    if benchmark in ("fss1000", "folder") and "test" in dataset:
        return "test"
    if "validation" in dataset:
        return "validation"
    raise ValueError(f"the dataset has no 'validation' split to draw test episodes from (splits: {sorted(dataset)})")


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


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _segment(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, int | None]:
    """
    `model(**inputs)` in two calls, `encode_support` then the forward with the encoding (the same computation), to
    read the encoding's `finetune_diverged` flags: returns the outputs and how many support sets of the batch kept
    an unadapted head, None for a model whose encoding has no such flags (it does not adapt to its support set).
    """
    query_side = set(getattr(model, "query_inputs", ())) | {"pixel_values"}
    support = {k: v for k, v in inputs.items() if k not in query_side}
    encoding = model.encode_support(**support)
    outputs = model(**{k: v for k, v in inputs.items() if k in query_side}, support_encoding=encoding)
    diverged = getattr(encoding, "finetune_diverged", None)
    return outputs, None if diverged is None else int(diverged.sum())


def _model_input(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch tensor on `device`; images (floating point) in the model's `dtype`, masks and ids unchanged."""
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


class _ImageKeys:
    """Feature-cache keys of a test batch's images: (split fingerprint, image id, processor settings, tensor shape)."""

    def __init__(self, split: Any, processor: Any, episodes: Sequence[Episode]):
        to_json = getattr(processor, "to_json_string", None)
        settings = to_json() if callable(to_json) else repr(processor)
        fingerprint = getattr(split, "_fingerprint", None) or str(id(split))
        self.prefix = (fingerprint, hashlib.sha256(settings.encode()).hexdigest())
        self.episodes = episodes

    def of(self, batch: Mapping[str, Any], inputs: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, list]]:
        episodes = [self.episodes[int(i)] for i in batch["episode_index"]]
        query, support = inputs["pixel_values"], inputs["support_pixel_values"]
        geometry = (tuple(query.shape[-3:]), str(query.dtype))
        return [
            (query, [(*self.prefix, e.query, geometry) for e in episodes]),
            (support, [(*self.prefix, image_id, geometry) for e in episodes for image_id in e.supports]),
        ]


def default_feature_cache_bytes(device: torch.device) -> int:
    """
    The feature cache's default bound: half the free memory of a CUDA device, else a quarter of the memory the
    operating system reports available, at most 4 GiB (0 when it cannot be read).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0
    return min(available // 4, 4 << 30)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    processor: Any,
    split: Any,
    episodes: Sequence[Episode],
    *,
    class_ids: Sequence[int],
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    protocol: EvaluationProtocol | str = "pfenet",
    annotation: str = "mask",
    seed: int = 0,
    batch_size: int = 1,
    num_workers: int = 0,
    accelerator: Any = None,
    progress: bool = True,
    description: str = "evaluating",
    feature_cache: FeatureCache | None = None,
    episode_records: list[dict[str, int]] | None = None,
) -> dict[str, Any]:
    """
    Evaluate `model` on fixed `episodes` of `split`; returns `FewShotSegmentationMetric.compute()`.

    Args:
        model: an hf_fss model (unwrapped: not inside DistributedDataParallel). Put in eval mode for the loop and
            restored to its previous mode afterwards.
        processor: the model's `FewShotSegmentationImageProcessor` (test geometry and post-processing).
        split: the `datasets.Dataset` the episodes were drawn from.
        episodes: the full episode list, identical on every process (each process evaluates its shard).
        class_ids: classes of the metric, usually `fold.novel` (`fold.base` for base-class validation).
        class_names: names for `per_class_iou` (a sequence indexed by class id, or a dict).
        protocol: `EvaluationProtocol` or preset name; its `label_size` is applied here.
        annotation: support annotation, `"mask"`, `"bbox"` or `"scribble"`.
        seed: the episodes' seed: seeds the weak annotations and is written into the result.
        batch_size: episodes per forward pass. With 1 (the default, as PFENet tests) every episode is computed
            alone, so results are bit-identical whatever the number of processes.
        num_workers: DataLoader workers decoding and preprocessing episodes.
        accelerator: an `accelerate.Accelerator`; with several processes the episodes are sharded and the counts
            summed with `accelerator.reduce`. Its `autocast()` applies the run's mixed precision.
        progress: show a tqdm bar (on the local main process only).
        feature_cache: a `hf_fss.backbones.FeatureCache`: every frozen extractor of the model serves the images it
            has already seen (keyed by split fingerprint, image id and processor geometry) from it instead of
            recomputing them; the metrics are bit-identical at batch size 1 (see `hf_fss.backbones.feature_cache`).
            Pass the same cache to several calls (seeds) on one split to reuse it across them.
        episode_records: a list to extend with one dict per episode (`episode_index`, `class_id`, foreground
            `intersection` / `union`, `bg_intersection` / `bg_union` pixel counts), in episode order; one process
            only (ValueError under several).

    Runs under `torch.no_grad()`, not `torch.inference_mode()`, so that a model may adapt to its support set with
    gradients inside `encode_support`; the model gets the standard inputs plus the extra inputs it declares that a
    test batch holds (`class_ids`), never an undeclared one. Images are fed in the model's dtype (a model loaded in
    bfloat16 / float16 runs in it); post-processing and the metric are float32 and integer counts whatever it is.

    For a model whose support encoding flags support sets whose adaptation diverged (`finetune_diverged`, CRCNet's
    K-shot finetuning), the result also holds `unadapted_support_sets`: how many episodes were predicted with the
    unadapted model (0 when none).
    """
    if isinstance(protocol, str):
        protocol = get_protocol(protocol)
    num_processes = accelerator.num_processes if accelerator is not None else 1
    process_index = accelerator.process_index if accelerator is not None else 0
    start, stop = shard_bounds(len(episodes), num_processes, process_index)
    dataset = EpisodicTestDataset(
        split, list(episodes[start:stop]), processor, annotation=annotation, seed=seed, episode_offset=start
    )
    # A private generator: creating the loader's iterator must not draw from the global RNG, which training
    # (dropout) consumes and checkpoints restore.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_test_batch,
        generator=torch.Generator().manual_seed(0),
    )
    device = accelerator.device if accelerator is not None else _model_device(model)
    dtype = _model_dtype(model)
    if episode_records is not None and num_processes > 1:
        raise ValueError("episode_records needs a single process (each process would only see its shard)")
    record = episode_records is not None
    metric = FewShotSegmentationMetric(
        class_ids, class_names, protocol, device=device, seed=seed, record_episodes=record
    )
    indices: list[int] = []
    label_size = protocol.label_size
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()

    image_keys = _ImageKeys(split, processor, episodes)
    cached = feature_cache.attach(model) if feature_cache is not None else contextlib.nullcontext()
    was_training = model.training
    unadapted = None  # support sets whose adaptation diverged (None: the model does not adapt to them)
    model.eval()
    try:
        with autocast, cached:
            for batch in tqdm(loader, desc=description, disable=not show, leave=False, dynamic_ncols=True):
                names = model_input_names(model, batch)
                inputs = {key: _model_input(batch[key], device, dtype) for key in names}
                registered = (
                    feature_cache.images(image_keys.of(batch, inputs))
                    if feature_cache is not None
                    else contextlib.nullcontext()
                )
                with registered:
                    outputs, diverged = _segment(model, inputs)
                if diverged is not None:
                    unadapted = (unadapted or 0) + diverged
                sizes = [tuple(int(v) for v in size) for size in batch["original_size"]]
                predictions = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
                targets = batch["target"]
                if isinstance(label_size, int):
                    predictions = [resize_label(p.cpu(), label_size) for p in predictions]
                    targets = [resize_label(t, label_size) for t in targets]
                metric.update(predictions, targets, batch["class_ids"])
                indices.extend(int(i) for i in batch["episode_index"])
    finally:
        model.train(was_training)
    if num_processes > 1:
        metric.reduce(accelerator.reduce)
        # Every process reduces (a shard may hold no episode, hence no encoding): [count, adapts].
        counts = torch.tensor([unadapted or 0, unadapted is not None], device=device)
        total, adapts = (int(v) for v in accelerator.reduce(counts, reduction="sum"))
        unadapted = total if adapts else None
    if record:
        episode_records.extend({"episode_index": i, **r} for i, r in zip(indices, metric.episode_records))
    result = metric.compute()
    if unadapted is not None:
        result["unadapted_support_sets"] = unadapted
    return result


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
    # Required: a default would score the synthetic benchmark when a user forgot the flag, and overwrite metrics.json.
    parser.add_argument(
        "--dataset", required=True, help="'synthetic' (the embedded benchmark), a prepare_dataset.py folder or Hub id"
    )
    parser.add_argument(
        "--benchmark", default=None, help="pascal5i, coco20i, fss1000, synthetic, folder (default: inferred)"
    )
    parser.add_argument(
        "--fold", allowed=NON_NEGATIVE_INT, default=0, help="fold whose novel classes are tested (default 0)"
    )
    parser.add_argument(
        "--fold-convention",
        default=None,
        choices=COCO_CONVENTIONS,
        help="COCO-20i only: interleaved (default), contiguous or canet_40_20_20 (CANet's 40/20/20 split, fold 0)",
    )
    parser.add_argument("--shot", allowed=POSITIVE_INT, default=1, help="support images per episode (default 1)")
    parser.add_argument(
        "--split", default=None, help="split of the test episodes (default: validation; fss1000, folder: test)"
    )
    parser.add_argument("--protocol", default="pfenet", help="pfenet (default), hsnet or panet")
    parser.add_argument(
        "--num-episodes", allowed=POSITIVE_INT, default=None, help="episodes per seed (default: the protocol's)"
    )
    parser.add_argument("--seed", allowed=SEED, default=None, help="episode seed (default: the protocol's seeds)")
    parser.add_argument("--seeds", allowed=SEED, nargs="+", default=None, help="several seeds: mean and std over runs")
    parser.add_argument("--episodes-file", default=None, help="JSON Lines episode list to evaluate instead")
    parser.add_argument("--save-episodes", default=None, help="export the episode list (JSON Lines) to this file")
    parser.add_argument(
        "--annotation",
        default="mask",
        choices=ANNOTATION_KINDS,
        help="support annotation derived from the mask (default mask)",
    )
    parser.add_argument("--batch-size", allowed=POSITIVE_INT, default=1, help="episodes per forward pass (default 1)")
    parser.add_argument("--num-workers", allowed=NON_NEGATIVE_INT, default=0, help="DataLoader workers (default 0)")
    parser.add_argument(
        "--num-threads",
        allowed=POSITIVE_INT,
        default=None,
        help="torch threads per process (default: the cores available divided by the processes on this machine)",
    )
    parser.add_argument(
        "--synthetic-num-train", allowed=NON_NEGATIVE_INT, default=None, help="synthetic benchmark: train images"
    )
    parser.add_argument(
        "--synthetic-num-val", allowed=NON_NEGATIVE_INT, default=None, help="synthetic benchmark: validation images"
    )
    parser.add_argument(
        "--synthetic-image-size", allowed=IMAGE_SIDE, default=None, help="synthetic benchmark: image side"
    )
    parser.add_argument(
        "--synthetic-seed", allowed=SEED, default=0, help="synthetic benchmark: generation seed (default 0)"
    )
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
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype the model runs in (default float32); the metric is computed in float32 whatever it is",
    )
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when an accelerator is available")
    parser.add_argument("--output", default="metrics.json", help="where to write the metrics (default metrics.json)")
    return parser


def _synthetic_kwargs(args: Any) -> dict[str, Any]:
    kwargs = {"synthetic_seed": args.synthetic_seed}
    for name in ("num_train", "num_val", "image_size"):
        value = getattr(args, f"synthetic_{name}")
        if value is not None:
            kwargs[name] = value
    return kwargs


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

    check_model_path(name_or_path)
    name_or_path = resolve_model_path(name_or_path)  # a training run folder: its best/, else final/ (logged)
    model = load_model_with_overrides(name_or_path, overrides, dtype)
    # A converted checkpoint may come without preprocessor_config.json (the config's image_size is used); a broken
    # one is an error naming the file, as with AutoImageProcessor, never replaced by defaults.
    return model, load_image_processor(name_or_path, model.config.image_size, max(model.min_input_size()))


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


def combine_seed_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    The result of one or several seeds' `evaluate_model` runs: a copy of the only run, else `aggregate_seeds` with
    the `runs` and, for a model that adapts to its support sets, the total `unadapted_support_sets`.
    """
    if len(runs) == 1:
        return dict(runs[0])
    metrics = {**aggregate_seeds(runs), "runs": list(runs)}
    if "unadapted_support_sets" in runs[0]:
        metrics["unadapted_support_sets"] = sum(run["unadapted_support_sets"] for run in runs)
    return metrics


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

    from hf_fss.data import fold_classes, load_benchmark
    from hf_fss.data.folds import has_class_split

    if args.seed is not None and args.seeds is not None:
        raise ValueError("give either --seed or --seeds, not both")
    from hf_fss.data.loading import resolve_benchmark

    benchmark = resolve_benchmark(args.dataset, args.benchmark)  # a contradicting --benchmark is refused
    convention = checked_fold_convention(args.fold_convention, benchmark, args.fold)
    if args.shot < 1:
        raise ValueError(f"--shot must be >= 1, got {args.shot}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_path(args.model)  # before building any data
    set_num_threads(args.num_threads)

    accelerator = Accelerator(cpu=args.cpu or needs_cpu_fallback())
    hold_on_main_process(OutputLock(args.output, "--output", beside=True), accelerator, held)
    dataset = load_benchmark(args.dataset, **(_synthetic_kwargs(args) if args.dataset == "synthetic" else {}))
    split_name = args.split or default_test_split(dataset, benchmark)
    if split_name not in dataset:
        raise ValueError(f"--split {split_name!r} is not in the dataset (splits: {sorted(dataset)})")
    split = dataset[split_name]
    fold = fold_classes(benchmark, args.fold, convention, dataset=dataset if has_class_split(benchmark) else None)

    # The episode file is checked against the split before the model is loaded.
    fixed = load_episodes_jsonl(args.episodes_file, split=split) if args.episodes_file is not None else None
    overrides = model_config_overrides(args)
    model, processor = _load_model_and_processor(args.model, overrides, args.dtype)
    model.to(accelerator.device)

    base = get_protocol(args.protocol, benchmark=benchmark)
    seeds, num_episodes = _seeds_and_episode_count(args, base, fixed, fold)
    protocol = protocol_for(
        base, benchmark, num_episodes=num_episodes, seeds=seeds, fold_convention=args.fold_convention
    )
    names = class_names_of(split)
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
            class_names=names,
            protocol=protocol,
            annotation=args.annotation,
            seed=seed,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            accelerator=accelerator,
            description=f"seed {seed}",
            feature_cache=feature_cache,
        )
        accelerator.print(
            f"seed {seed}: mIoU {100 * result['miou']:.2f}  FB-IoU {100 * result['fbiou']:.2f}  "
            f"precision {100 * result['precision']:.2f}  ({result['num_episodes']} episodes, "
            f"{time.perf_counter() - started:.1f} s){_unadapted_note(result)}"
        )
        runs.append(result)

    metrics = combine_seed_runs(runs)
    metrics.update(
        {
            "model": model.name_or_path,  # the folder taken for a run folder
            "dataset": args.dataset,
            "benchmark": benchmark,
            "split": split_name,
            "fold": args.fold,
            "shot": args.shot,
            "annotation": args.annotation,
            "model_overrides": overrides,
            "dtype": args.dtype,
            "episodes_file": args.episodes_file,
            "num_processes": accelerator.num_processes,
        }
    )
    if feature_cache is not None and accelerator.is_main_process:
        # Not written into metrics.json: the counts depend on the number of processes, the metrics do not.
        stats = feature_cache.stats()
        print(
            f"feature cache: {stats['hits']} images served, {stats['misses']} computed, "
            f"{stats['bytes'] / 2**20:.1f} of {stats['max_bytes'] / 2**20:.0f} MiB held"
        )
    if accelerator.is_main_process:
        write_json_atomic(metrics, args.output)
        std = f" ± {100 * metrics['miou_std']:.2f}" if "miou_std" in metrics else ""
        print(
            f"{benchmark} fold {args.fold} {args.shot}-shot ({protocol.name} protocol, {len(seeds)} seed(s)): "
            f"mIoU {100 * metrics['miou']:.2f}{std}, FB-IoU {100 * metrics['fbiou']:.2f} -> {args.output}"
        )
    accelerator.end_training()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scripts/evaluate.py`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parser.check_ranges(args)
        check_outputs(args)
        with contextlib.ExitStack() as held:
            run_evaluation(args, held)
    except OSError as err:
        print(f"{parser.prog}: error: {os_error_line(err) if err.errno else err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
