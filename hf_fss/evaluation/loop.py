"""
The few-shot evaluation loop shared by `scripts/evaluate.py`, `scripts/compare.py` and the validation of
`scripts/train.py`.

`evaluate_model` runs a model over a fixed list of test episodes and returns the metric dict of `metrics.json`.
Under N processes (an `accelerate.Accelerator` with `num_processes > 1`) every process takes one contiguous shard
of the list (`hf_fss.data.episodes.shard_bounds`, with `episode_offset` so annotations and episode indices match
the unsharded run) and the per-class counts are summed across processes, so the numbers equal those of one process
that saw every episode.

Predictions follow the PFENet protocol: logits -> `processor.post_process_semantic_segmentation(outputs,
target_sizes=original sizes)` -> metric at the original label resolution. Protocols with a fixed `label_size`
(HSNet: 400) resize both the prediction and the label with `resize_label` (nearest neighbour) before counting.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hf_fss.backbones.feature_cache import FeatureCache, autocast_state
from hf_fss.data.episodes import Episode, EpisodicTestDataset, collate_test_batch, shard_bounds
from hf_fss.evaluation.metrics import FewShotSegmentationMetric, aggregate_seeds, resize_label
from hf_fss.evaluation.protocols import EvaluationProtocol, get_protocol
from hf_fss.evaluation.support_cache import encode_support as cached_encode_support
from hf_fss.utils.precision import channels_last_input, inference_precision

__all__ = [
    "combine_seed_runs",
    "default_feature_cache_bytes",
    "evaluate_model",
    "model_input_names",
    "needs_cpu_fallback",
]

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


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _segment(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    cache: FeatureCache | None = None,
    support_keys: Sequence[Any] | None = None,
    annotation: str = "mask",
) -> tuple[Any, int | None]:
    """
    `model(**inputs)` in two calls, `encode_support` (served per support image from `cache` where that is exact, see
    `hf_fss.evaluation.support_cache`) then the forward with the encoding (the same computation), to read the
    encoding's `finetune_diverged` flags: returns the outputs and how many support sets of the batch kept an
    unadapted head, None for a model whose encoding has no such flags (it does not adapt to its support set).
    """
    query_side = set(getattr(model, "query_inputs", ())) | {"pixel_values"}
    support = {k: v for k, v in inputs.items() if k not in query_side}
    encoding = cached_encode_support(model, support, cache, support_keys, annotation)
    outputs = model(**{k: v for k, v in inputs.items() if k in query_side}, support_encoding=encoding)
    diverged = getattr(encoding, "finetune_diverged", None)
    return outputs, None if diverged is None else int(diverged.sum())


def _model_input(value: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """A batch tensor on `device`; images (floating point) in the model's `dtype` (4-D ones in channels_last memory
    format when asked), masks and ids unchanged."""
    if not value.is_floating_point():
        return value.to(device)
    return channels_last_input(value.to(device, dtype), channels_last)


class _ImageKeys:
    """Feature-cache keys of a test batch's images: (split fingerprint, image id, processor settings, tensor shape);
    `annotation` is the support annotation kind, part of the support encodings' keys."""

    def __init__(self, split: Any, processor: Any, episodes: Sequence[Episode], annotation: str = "mask"):
        to_json = getattr(processor, "to_json_string", None)
        settings = to_json() if callable(to_json) else repr(processor)
        fingerprint = getattr(split, "_fingerprint", None) or str(id(split))
        self.prefix = (fingerprint, hashlib.sha256(settings.encode()).hexdigest())
        self.episodes = episodes
        self.annotation = annotation

    def of(self, batch: Mapping[str, Any], inputs: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, list]]:
        episodes = [self.episodes[int(i)] for i in batch["episode_index"]]
        query, support = inputs["pixel_values"], inputs["support_pixel_values"]
        geometry = (tuple(query.shape[-3:]), str(query.dtype), autocast_state(query.device))
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
    precision: str = "float32",
    channels_last: bool = False,
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
        feature_cache: a `hf_fss.backbones.FeatureCache`: frozen extractors serve the images they have seen (keyed
            by split fingerprint, image id and processor geometry), each (support image, mask, annotation) is encoded
            once (`hf_fss.evaluation.support_cache`) and, with `num_workers=0`, each image decoded once; metrics are
            bit-identical at batch size 1. Give several calls (seeds) on one split the same cache to share it.
        episode_records: a list to extend with one dict per episode (`episode_index`, `class_id`, foreground
            `intersection` / `union`, `bg_intersection` / `bg_union` pixel counts), in episode order; one process
            only (ValueError under several).
        precision: `"float32"`, or `"bfloat16"` / `"float16"`: the model runs under `torch.autocast` of that dtype
            (`hf_fss.utils.inference_precision`; its weights stay as they are).
        channels_last: the model's weights and the query images in channels_last memory format for the loop.

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
    image_keys = _ImageKeys(split, processor, episodes, annotation)
    # Decoded and preprocessed images from the cache too, in this process only (a worker would fill its own copy).
    data_cache = (feature_cache, image_keys.prefix) if feature_cache is not None and num_workers == 0 else (None, ())
    loader = _shard_loader(
        split, episodes, processor, annotation, seed, batch_size, num_workers, accelerator, data_cache
    )
    device = accelerator.device if accelerator is not None else _model_device(model)
    if episode_records is not None and num_processes > 1:
        raise ValueError("episode_records needs a single process (each process would only see its shard)")
    record = episode_records is not None
    metric = FewShotSegmentationMetric(
        class_ids, class_names, protocol, device=device, seed=seed, record_episodes=record
    )
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    batches = tqdm(loader, desc=description, disable=not show, leave=False, dynamic_ncols=True)
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    cached = feature_cache.attach(model) if feature_cache is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with autocast, cached, inference_precision(model, precision, channels_last):
            indices, unadapted = _score_batches(
                model, processor, batches, metric, device, protocol, feature_cache, image_keys, channels_last
            )
    finally:
        model.train(was_training)
    if num_processes > 1:
        metric.reduce(accelerator.reduce)
        unadapted = _reduce_unadapted(unadapted, accelerator, device)
    if record:
        episode_records.extend({"episode_index": i, **r} for i, r in zip(indices, metric.episode_records))
    result = metric.compute()
    if unadapted is not None:
        result["unadapted_support_sets"] = unadapted
    return result


def _shard_loader(
    split, episodes, processor, annotation, seed, batch_size, num_workers, accelerator, data_cache=(None, ())
) -> DataLoader:
    """The DataLoader of this process's contiguous shard of `episodes` (all of them on one process); `data_cache`:
    the dataset's `(cache, cache_prefix)`."""
    num_processes = accelerator.num_processes if accelerator is not None else 1
    process_index = accelerator.process_index if accelerator is not None else 0
    start, stop = shard_bounds(len(episodes), num_processes, process_index)
    cache, prefix = data_cache
    dataset = EpisodicTestDataset(
        split,
        list(episodes[start:stop]),
        processor,
        annotation=annotation,
        seed=seed,
        episode_offset=start,
        cache=cache,
        cache_prefix=prefix,
    )
    # A private generator: creating the loader's iterator must not draw from the global RNG, which training
    # (dropout) consumes and checkpoints restore.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_test_batch,
        generator=torch.Generator().manual_seed(0),
    )


def _score_batches(
    model: torch.nn.Module,
    processor: Any,
    batches: Any,
    metric: FewShotSegmentationMetric,
    device: torch.device,
    protocol: EvaluationProtocol,
    feature_cache: FeatureCache | None,
    image_keys: _ImageKeys,
    channels_last: bool = False,
) -> tuple[list[int], int | None]:
    """
    Segment every batch and count it into `metric`; returns the episode indices seen, in order, and how many
    support sets kept an unadapted model (None: the model does not adapt to its support sets).
    """
    dtype = _model_dtype(model)
    indices: list[int] = []
    unadapted = None
    for batch in batches:
        names = model_input_names(model, batch)
        inputs = {key: _model_input(batch[key], device, dtype, channels_last) for key in names}
        keys = image_keys.of(batch, inputs) if feature_cache is not None else None
        registered = feature_cache.images(keys) if feature_cache is not None else contextlib.nullcontext()
        with registered:
            support_keys = keys[1][1] if keys is not None else None
            outputs, diverged = _segment(model, inputs, feature_cache, support_keys, image_keys.annotation)
        if diverged is not None:
            unadapted = (unadapted or 0) + diverged
        sizes = [tuple(int(v) for v in size) for size in batch["original_size"]]
        predictions = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        targets = batch["target"]
        if isinstance(protocol.label_size, int):
            predictions = [resize_label(p.cpu(), protocol.label_size) for p in predictions]
            targets = [resize_label(t, protocol.label_size) for t in targets]
        metric.update(predictions, targets, batch["class_ids"])
        indices.extend(int(i) for i in batch["episode_index"])
    return indices, unadapted


def _reduce_unadapted(unadapted: int | None, accelerator: Any, device: torch.device) -> int | None:
    """The unadapted support sets summed over the processes; None when the model does not adapt to them. Every
    process takes part (a shard may hold no episode, hence no encoding to tell): [count, adapts]."""
    counts = torch.tensor([unadapted or 0, unadapted is not None], device=device)
    total, adapts = (int(v) for v in accelerator.reduce(counts, reduction="sum"))
    return total if adapts else None


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
