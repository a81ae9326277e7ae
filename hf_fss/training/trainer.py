"""
Episodic training of any hf_fss method under Accelerate: one loop for a laptop CPU, one GPU, N GPUs and several
nodes (the loop follows Accelerate's `examples/complete_cv_example.py`).

What the loop relies on instead of doing itself:

- Accelerate: device placement, DistributedDataParallel, batch sharding across processes, gradient accumulation
  (`accelerator.accumulate`), mixed precision (`accelerator.autocast` / gradient scaling), checkpoints with RNG
  states (`save_state` / `load_state`, plus `register_for_checkpointing` for method state such as NTRENet's
  contrastive bank and the loop's own counters), resuming mid-epoch (`skip_first_batches`), trackers (`log`).
- transformers: the learning-rate schedules (`get_scheduler`; the papers' poly decay is `"polynomial"` with
  `lr_end=0`), `save_pretrained` / `from_pretrained`, the argument parser.
- datasets / hf_fss.data: benchmarks, folds, episodic training items seeded per (seed, epoch, index), fixed test
  episode lists.

Data order is reproducible and resumable: a shuffling sampler seeded by `(seed, epoch)` (`EpochShuffleSampler`)
gives every process the same permutation (Accelerate shards it), each item's augmentation is seeded by
`(seed, epoch, index)`, and a resumed run skips the batches already seen in its epoch, so on CPU a resumed run ends
with the same weights, bit for bit, as an uninterrupted one.

Run folder (`--output-dir`):

    final/            the model after the last step (save_pretrained + image processor + model card + metrics.json)
    best/             the model with the best validation mIoU (held-out base-class episodes by default)
    checkpoints/      step_XXXXXXXX/ training states (accelerator.save_state), written to a temp folder and renamed
    logs/             tracker output (tensorboard), when a tracker is on
    run.json          the run record: resolved arguments, data, batch sizes, processes, steps, metrics
    baseline_metrics.json   with --compare-baseline: the cosine prior with the initial backbone, same test episodes
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import AutoModel

from hf_fss.evaluation.runner import (
    class_names_of,
    default_test_split,
    evaluate_model,
    needs_cpu_fallback,
    protocol_for,
    write_json_atomic,
)
from hf_fss.training.arguments import TrainingArguments

__all__ = ["EpochShuffleSampler", "TrainerState", "find_latest_checkpoint", "save_model_folder", "train"]

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


class EpochShuffleSampler(Sampler[int]):
    """
    A permutation of `range(num_items)` drawn from `np.random.default_rng([seed, epoch])`: identical on every process
    and for every run with the same seed, independent of any global RNG, and stateless apart from `epoch`, so a
    checkpoint needs nothing from it (Accelerate shards the batches it yields across processes).
    """

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        yield from np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items).tolist()


@dataclass
class TrainerState:
    """The loop's counters and model-selection record; checkpointed with `accelerator.register_for_checkpointing`."""

    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    validation_history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "validation_history": copy.deepcopy(self.validation_history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.best_metric = state["best_metric"]
        self.best_step = state["best_step"]
        self.validation_history = list(state["validation_history"])


# ----------------------------------------------------------------------------------------------------- helpers


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoints/step_N` folder of `output_dir` with the largest N, or None."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(steps)[1] if steps else None


def _resolve_trackers(report_to: str) -> list[str] | None:
    from accelerate.utils import is_tensorboard_available

    value = report_to.strip().lower()
    if value == "auto":
        return ["tensorboard"] if is_tensorboard_available() else None
    if value in ("none", ""):
        return None
    if value == "all":
        return ["all"]
    return [name.strip() for name in value.split(",") if name.strip()]


def _method_state_objects(model: torch.nn.Module) -> list[Any]:
    """
    Training state a method keeps outside its parameters and buffers (e.g. NTRENet's contrastive bank): plain
    attributes of the model's modules that have `state_dict` / `load_state_dict`, in a fixed order.
    """
    found = []
    for _, module in model.named_modules():
        for _, value in sorted(vars(module).items()):
            if isinstance(value, (torch.nn.Module, torch.Tensor)) or isinstance(value, type):
                continue
            if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
                found.append(value)
    return found


def _hub_savers() -> tuple[Any, Any]:
    """`hf_fss.hub.save_pretrained_with_card` and `push_to_hub`, or None where the module is not there yet."""
    try:
        from hf_fss import hub
    except ImportError:
        return None, None
    return getattr(hub, "save_pretrained_with_card", None), getattr(hub, "push_to_hub", None)


def save_model_folder(
    model: Any,
    processor: Any,
    folder: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """
    `save_pretrained` of model + image processor, `metrics.json`, `training.json` and a rendered model card, written
    atomically by `hf_fss.hub.save_pretrained_with_card`. Main process only.
    """
    folder = Path(folder)
    save_with_card, _ = _hub_savers()
    if save_with_card is not None:
        # Writes metrics.json and training.json too, so that push_to_hub can re-render the card.
        return save_with_card(model, processor, folder, metrics=metrics, training=training, repo_id=repo_id)
    else:
        # hf_fss.hub is not available: the same files without the model card, also written to a temp folder first.
        logging.getLogger(__name__).warning("hf_fss.hub is not available: saving %s without a model card", folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if metrics is not None:
        write_json_atomic(metrics, folder / "metrics.json")
    return folder


def _scalar_config(values: dict[str, Any]) -> dict[str, Any]:
    """Tracker hyper-parameters: scalars only (TensorBoard's hparams rejects lists and dicts)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif value is None:
            out[key] = "None"
        else:
            out[key] = json.dumps(value, default=str)
    return out


# ---------------------------------------------------------------------------------------------- construction


def build_model(args: TrainingArguments) -> tuple[Any, Any]:
    """The model to train (a fresh config of `args.model_type`, or `args.model_name_or_path`) and its processor."""
    import hf_fss
    from hf_fss.image_processing_fss import FewShotSegmentationImageProcessor

    config_class, model_class = hf_fss.MODEL_CLASSES[args.model_type]
    kwargs = dict(args.model_kwargs)
    if "image_size" in kwargs and kwargs["image_size"] != args.image_size:
        raise ValueError(
            f"model_kwargs image_size={kwargs['image_size']} disagrees with image_size={args.image_size}; set only "
            "image_size"
        )
    kwargs["image_size"] = args.image_size
    if hasattr(config_class, "shot"):
        kwargs.setdefault("shot", args.shot)  # recorded in the config for the model card
    if args.model_name_or_path is not None:
        model = model_class.from_pretrained(args.model_name_or_path, **kwargs)
    else:
        # Configs accept unknown keys silently; a misspelt recipe key must not.
        known = set(config_class().to_dict())
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown {args.model_type} config field(s) {unknown} in model_kwargs")
        model = model_class(config_class(**kwargs))
    processor = FewShotSegmentationImageProcessor(image_size=model.config.image_size)
    return model, processor


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


def build_data(args: TrainingArguments) -> TrainingData:
    """Benchmark, fold, episodic training set, validation episodes and test episodes (identical on every process)."""
    from hf_fss.data import EpisodicTrainDataset, TrainAugmentation, fold_classes, load_benchmark, make_test_episodes

    synthetic = {}
    if args.dataset == "synthetic":
        synthetic = {"synthetic_seed": args.synthetic_seed}
        for name in ("num_train", "num_val", "image_size"):
            if getattr(args, f"synthetic_{name}") is not None:
                synthetic[name] = getattr(args, f"synthetic_{name}")
    dataset = load_benchmark(args.dataset, **synthetic)
    if "train" not in dataset:
        raise ValueError(f"dataset {args.dataset!r} has no 'train' split (splits: {sorted(dataset)})")
    fold = fold_classes(
        args.benchmark, args.fold, args.fold_convention, dataset=dataset if args.benchmark == "fss1000" else None
    )
    holdout = args.wants_validation and not args.select_on_test_fold
    augmentation = TrainAugmentation(
        size=args.image_size,
        scale_range=(args.scale_min, args.scale_max),
        rotate_limit=args.rotate_max,
        rotate_p=0.5 if args.rotate_max > 0 else 0.0,
        blur_p=0.5 if args.gaussian_blur else 0.0,
        flip_p=0.5 if args.horizontal_flip else 0.0,
    )
    train_dataset = EpisodicTrainDataset(
        dataset["train"],
        fold,
        shot=args.shot,
        size=args.image_size,
        seed=args.seed,
        novel_class_policy=args.novel_class_policy,
        augmentation=augmentation,
        holdout_fraction=args.validation_fraction if holdout else 0.0,
        holdout_seed=args.seed,
        holdout_min_images=args.validation_min_images,
    )

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
        else:
            split, classes, what = train_dataset.validation_split(), fold.base, "held-out train images, base classes"
        protocol = protocol_for(
            base_protocol, args.benchmark, num_episodes=args.num_validation_episodes, seeds=[args.seed]
        )
        validation = EpisodeSet(
            split=split,
            episodes=make_test_episodes(split, classes, args.num_validation_episodes, args.shot, args.seed),
            class_ids=tuple(classes),
            class_names=class_names_of(split),
            protocol=protocol,
            seed=args.seed,
            description=f"validation ({what})",
        )
    return TrainingData(dataset, fold, train_dataset, validation, test)


def create_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """SGD (the papers) or AdamW over the trainable parameters only: the frozen backbone never enters it."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"{args.model_type} has no trainable parameter; there is nothing to train")
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)


def create_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, max_steps: int, num_processes: int):
    """
    transformers' schedule, `"poly"` = `"polynomial"` with `power=lr_power`, `lr_end=0`: `lr * (1 - step / max) **
    power`. Accelerate steps a prepared scheduler `num_processes` times per optimizer step (it assumes lengths of a
    single-process data loader), so the schedule is laid out over `max_steps * num_processes` scheduler steps.
    """
    from transformers import get_scheduler

    name = "polynomial" if args.lr_scheduler in ("poly", "polynomial") else args.lr_scheduler
    specific = {"power": args.lr_power, "lr_end": 0.0} if name == "polynomial" else None
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=args.warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
        scheduler_specific_kwargs=specific,
    )


# ----------------------------------------------------------------------------------------------------- training


def _prepare_output_dir(args: TrainingArguments, accelerator: Accelerator) -> Path:
    output_dir = Path(args.output_dir)
    previous_run = (output_dir / "run.json").exists() or (output_dir / "checkpoints").exists()
    if previous_run and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds a run; pass --resume-from-checkpoint latest to continue it "
            "or --overwrite-output-dir to start over"
        )
    if accelerator.is_main_process:
        if previous_run and args.overwrite_output_dir and not args.resume_from_checkpoint:
            # Stale checkpoints of the old run must not be picked up by a later `--resume-from-checkpoint latest`.
            shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return output_dir


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoints/step_N` once every process wrote."""
    checkpoints = output_dir / "checkpoints"
    final = checkpoints / f"step_{step:08d}"
    tmp = checkpoints / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            done = sorted(
                (int(m.group(1)), p) for p in checkpoints.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
            )
            for _, old in done[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _format_metrics(metrics: dict[str, Any]) -> str:
    return (
        f"mIoU {100 * metrics['miou']:.2f}  FB-IoU {100 * metrics['fbiou']:.2f}  "
        f"precision {100 * metrics['precision']:.2f}  ({metrics['num_episodes']} episodes)"
    )


def train(args: TrainingArguments) -> dict[str, Any]:
    """
    Run the training described by `args` and return the run record (also written to `<output_dir>/run.json`).

    Raises `ValueError` for bad input (unknown dataset, too few images, an output folder holding another run)
    before anything is written.
    """
    started = time.time()
    trackers = _resolve_trackers(args.report_to)
    accelerator = Accelerator(
        cpu=args.cpu or needs_cpu_fallback(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
    )
    try:
        return _train(args, accelerator, trackers, started)
    finally:
        accelerator.end_training()


def _train(args: TrainingArguments, accelerator: Accelerator, trackers: list[str] | None, started: float) -> dict:
    main = accelerator.is_main_process
    # Same seed on every process: identical initial weights and, with the seeded sampler, identical data order.
    set_seed(args.seed)

    # Everything that can fail on bad input happens before the output folder is touched.
    data = build_data(args)
    model, processor = build_model(args)
    checkpoint = None
    if args.resume_from_checkpoint == "latest":
        checkpoint = find_latest_checkpoint(args.output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume-from-checkpoint latest: no checkpoint in {args.output_dir}/checkpoints")
    elif args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise ValueError(f"--resume-from-checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder")
    if len(data.train_dataset) // args.batch_size < accelerator.num_processes:
        raise ValueError(
            f"{len(data.train_dataset)} training episodes per epoch do not fill one batch of {args.batch_size} on "
            f"each of {accelerator.num_processes} process(es); lower --batch-size"
        )
    initial_backbone = None
    if args.compare_baseline and hasattr(model, "backbone"):
        initial_backbone = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    output_dir = _prepare_output_dir(args, accelerator)

    if args.sync_batchnorm and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            logger.warning("sync_batchnorm: SyncBatchNorm needs GPUs; keeping BatchNorm on CPU")
        else:
            model.convert_sync_batchnorm()

    train_dataset = data.train_dataset
    sampler = EpochShuffleSampler(len(train_dataset), seed=args.seed)
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,  # PFENet: full batches only
        num_workers=args.num_workers,
        # A private generator, so that creating an iterator never draws from the global RNG (dropout's, restored
        # by load_state): a resumed run then continues the exact random stream of an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = create_optimizer(model, args)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = accelerator.prepare(create_scheduler(optimizer, args, max_steps, accelerator.num_processes))

    state = TrainerState()
    unwrapped = accelerator.unwrap_model(model)
    method_state = _method_state_objects(unwrapped)
    accelerator.register_for_checkpointing(state, *method_state)

    effective_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    record: dict[str, Any] = {
        "model_type": args.model_type,
        "dataset": args.dataset,
        "benchmark": args.benchmark,
        "fold": args.fold,
        "fold_convention": args.fold_convention,
        "shot": args.shot,
        "novel_classes": list(data.fold.novel),
        "base_classes": list(data.fold.base),
        "num_training_images": train_dataset.num_items,
        "num_validation_images": len(train_dataset.holdout_indices),
        "image_size": args.image_size,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "lr_power": args.lr_power,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "batch_size_per_process": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "effective_batch_size": effective_batch,
        "max_steps": max_steps,
        "epochs": max_steps / updates_per_epoch,
        "steps_per_epoch": updates_per_epoch,
        "seed": args.seed,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": accelerator.distributed_type.value,
        "sync_batchnorm": args.sync_batchnorm,
        "augmentation": {
            "scale": [args.scale_min, args.scale_max],
            "rotate": [args.rotate_min, args.rotate_max],
            "horizontal_flip": args.horizontal_flip,
            "gaussian_blur": args.gaussian_blur,
        },
        "novel_class_policy": args.novel_class_policy,
        "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        "validation": None
        if data.validation is None
        else {
            "episodes": len(data.validation.episodes),
            "classes": list(data.validation.class_ids),
            "source": data.validation.description,
        },
        "arguments": args.to_dict(),
    }
    if accelerator.is_main_process:
        logger.info(
            f"{args.model_type} on {args.benchmark} fold {args.fold}, {args.shot}-shot: {train_dataset.num_items} "
            f"training images, {accelerator.num_processes} process(es) x {args.batch_size} x "
            f"{args.gradient_accumulation_steps} accumulation = {effective_batch} episodes per step, {max_steps} "
            f"steps ({num_epochs} epoch(s) of {updates_per_epoch} steps)",
            main_process_only=True,
        )
    if trackers:
        accelerator.init_trackers(Path(args.output_dir).name or "hf_fss", config=_scalar_config(args.to_dict()))

    resume_batches = 0
    if checkpoint is not None:
        # Weights, optimizer, scheduler, RNG states, the loop's state and method state (e.g. the contrastive bank).
        accelerator.load_state(str(checkpoint))
        resume_batches = (state.global_step % updates_per_epoch) * args.gradient_accumulation_steps
        accelerator.print(f"resumed from {checkpoint} at step {state.global_step}")

    progress = tqdm(
        total=max_steps,
        initial=state.global_step,
        desc="training",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )

    def say(message: str) -> None:
        if accelerator.is_local_main_process:
            progress.write(message)

    def validate() -> None:
        metrics = evaluate_model(
            accelerator.unwrap_model(model),
            processor,
            data.validation.split,
            data.validation.episodes,
            class_ids=data.validation.class_ids,
            class_names=data.validation.class_names,
            protocol=data.validation.protocol,
            seed=data.validation.seed,
            batch_size=args.eval_batch_size,
            num_workers=args.num_workers,
            accelerator=accelerator,
            description="validation",
        )
        step = state.global_step
        improved = state.best_metric is None or metrics["miou"] > state.best_metric
        state.validation_history.append({"step": step, "miou": metrics["miou"], "fbiou": metrics["fbiou"]})
        if improved:
            state.best_metric, state.best_step = metrics["miou"], step
            if main:
                save_model_folder(
                    accelerator.unwrap_model(model),
                    processor,
                    output_dir / "best",
                    metrics=None,
                    training={
                        **record,
                        "steps": step,
                        "validation_metrics": {k: metrics[k] for k in ("miou", "fbiou", "num_episodes")},
                    },
                )
            accelerator.wait_for_everyone()
        accelerator.log({"validation/miou": metrics["miou"], "validation/fbiou": metrics["fbiou"]}, step=step)
        say(
            f"step {step}/{max_steps} (epoch {step / updates_per_epoch:.2f}) validation: {_format_metrics(metrics)}"
            f"  best {100 * state.best_metric:.2f} at step {state.best_step}"
        )

    stopped = False
    running: dict[str, list[torch.Tensor]] = {}
    starting_epoch = state.global_step // updates_per_epoch
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        if state.global_step >= max_steps or stopped:
            break
        # The sampler's permutation and the items' augmentation both follow the epoch.
        train_dataloader.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        active_dataloader = train_dataloader
        if epoch == starting_epoch and resume_batches:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            for name, value in {"loss": outputs.loss, **(outputs.losses or {})}.items():
                running.setdefault(name, []).append(value.detach().float())
            if not accelerator.sync_gradients:
                continue

            state.global_step += 1
            step = state.global_step
            progress.update(1)
            if step % args.logging_steps == 0 or step == max_steps:
                means = {name: torch.stack(values).mean() for name, values in running.items()}
                means = {name: accelerator.reduce(value, reduction="mean").item() for name, value in means.items()}
                running.clear()
                learning_rate = lr_scheduler.get_last_lr()[0]
                accelerator.log({**{f"train/{k}": v for k, v in means.items()}, "train/lr": learning_rate}, step=step)
                progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{learning_rate:.2e}")

            epoch_done = step % updates_per_epoch == 0
            if data.validation is not None and (
                (args.validation_steps is not None and step % args.validation_steps == 0)
                or (
                    epoch_done
                    and args.validation_every_epochs > 0
                    and (step // updates_per_epoch) % args.validation_every_epochs == 0
                )
                or step == max_steps  # the best model always covers the final weights
            ):
                validate()
            if args.checkpointing_steps is not None and step % args.checkpointing_steps == 0:
                _save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit)
            if args.stop_after_steps is not None and step >= args.stop_after_steps:
                stopped = True
                break
            if step >= max_steps:
                break
    progress.close()
    record["steps"] = state.global_step
    record["best_step"] = state.best_step
    record["best_validation_miou"] = state.best_metric
    record["validation_history"] = state.validation_history
    if stopped:
        accelerator.print(f"stopped after step {state.global_step} (--stop-after-steps); nothing else is saved")
        record["stopped_early"] = True
        return record

    # --- final evaluation and saving ---------------------------------------------------------------------------
    final_model = accelerator.unwrap_model(model)
    best_model = None
    if state.best_step is not None:
        # The best weights are those of the last validation that improved, saved then in best/.
        same = state.best_step == state.global_step
        best_model = final_model if same else AutoModel.from_pretrained(output_dir / "best").to(accelerator.device)
    results: dict[str, Any] = {}
    if data.test is not None and args.evaluate_at_end:
        results["final"] = _test(final_model, processor, data.test, args, accelerator)
        accelerator.print(
            f"final model (step {state.global_step}) on {data.test.description}: {_format_metrics(results['final'])}"
        )
        if best_model is final_model:
            results["best"] = results["final"]
        elif best_model is not None:
            results["best"] = _test(best_model, processor, data.test, args, accelerator)
            accelerator.print(
                f"best model (step {state.best_step}) on {data.test.description}: {_format_metrics(results['best'])}"
            )
        if initial_backbone is not None:
            results["baseline"] = _test_baseline(
                final_model, initial_backbone, processor, data.test, args, accelerator
            )
        accelerator.log(
            {f"test/{name}_miou": value["miou"] for name, value in results.items()}, step=state.global_step
        )

    record["wall_time_s"] = round(time.time() - started, 1)
    record["test"] = {
        name: {k: v[k] for k in ("miou", "fbiou", "precision", "num_episodes")} for name, v in results.items()
    }
    if main:
        save_model_folder(final_model, processor, output_dir / "final", metrics=results.get("final"), training=record)
        if best_model is not None:
            save_model_folder(
                best_model,
                processor,
                output_dir / "best",
                metrics=results.get("best"),
                training={**record, "steps": state.best_step},
            )
        if "baseline" in results:
            write_json_atomic(results["baseline"], output_dir / "baseline_metrics.json")
        write_json_atomic(record, output_dir / "run.json")
        selected = output_dir / ("best" if state.best_step is not None else "final")
        if args.push_to_hub:
            _, push = _hub_savers()
            if push is None:
                raise RuntimeError("--push-to-hub needs hf_fss.hub.push_to_hub, which is not available")
            push(selected, args.push_to_hub)
            accelerator.print(f"pushed {selected} to https://huggingface.co/{args.push_to_hub}")
        _print_summary(args, record, results, output_dir, selected)
    accelerator.wait_for_everyone()
    return record


def _test(model, processor, episodes: EpisodeSet, args: TrainingArguments, accelerator: Accelerator) -> dict:
    return evaluate_model(
        model,
        processor,
        episodes.split,
        episodes.episodes,
        class_ids=episodes.class_ids,
        class_names=episodes.class_names,
        protocol=episodes.protocol,
        seed=episodes.seed,
        batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        accelerator=accelerator,
        description="test",
    )


def _test_baseline(model, initial_backbone, processor, episodes, args, accelerator) -> dict:
    """The training-free cosine prior (threshold 0.5) with the backbone the trained model started from."""
    from hf_fss.models.cosine_prior import CosinePriorConfig, CosinePriorModel

    config = model.config
    baseline = CosinePriorModel(
        CosinePriorConfig(
            backbone=config.backbone, backbone_kwargs=config.backbone_kwargs, image_size=config.image_size
        )
    )
    baseline.backbone.load_state_dict(initial_backbone)
    baseline.to(accelerator.device)
    metrics = _test(baseline, processor, episodes, args, accelerator)
    accelerator.print(
        f"cosine prior baseline (initial backbone) on {episodes.description}: {_format_metrics(metrics)}"
    )
    return metrics


def _print_summary(args, record, results, output_dir: Path, selected: Path) -> None:
    lines = [
        f"{args.model_type} | {args.benchmark} fold {args.fold} | {args.shot}-shot | {record['steps']} steps x "
        f"{record['effective_batch_size']} episodes ({record['num_processes']} process(es)) | "
        f"{record['wall_time_s']:.0f} s",
    ]
    for name, label in (("final", "final model"), ("best", "best on validation"), ("baseline", "cosine prior")):
        if name in results:
            lines.append(f"  novel-class mIoU, {label:<20} {100 * results[name]['miou']:6.2f}")
    lines.append(f"  model: {selected}  (run record: {output_dir / 'run.json'})")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None, quickstart_recipe: str | os.PathLike | None = None) -> int:
    """
    Entry point of `scripts/train.py`: parse, train, and turn bad input into one clear line and exit status 2.
    `quickstart_recipe` is the recipe of a run without arguments (see `parse_args`).
    """
    import sys

    import datasets
    import transformers

    from hf_fss.training.arguments import parse_args

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING
    )
    # hf_fss's own messages (training set size, run summary) at INFO on one process per node; libraries at WARNING.
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        logging.getLogger("hf_fss").setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # the per-save "Writing model shards" bars
    datasets.utils.logging.set_verbosity_warning()
    try:
        args = parse_args(argv, quickstart_recipe=quickstart_recipe)
        train(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0
