"""
Episodic training of any hf_fss method: folds, the episodic training set, base-class validation episodes and the
best model, the final novel-class test, the cosine-prior baseline, run record and model cards, around the generic
loop of `hf_fss.training.loop` (one loop for a laptop CPU, one GPU, N GPUs and several nodes).

Run folder (`--output-dir`):

    final/            the model after the last step (save_pretrained + image processor + model card + metrics.json)
    best/             the model with the best validation mIoU (held-out base-class episodes by default; the
                      validation classes' episodes for a split that has them, COCO's canet_40_20_20)
    checkpoints/      step_XXXXXXXX/ training states (safetensors + JSON, checksum manifest), staged then renamed
    logs/             tracker output (tensorboard), when a tracker is on
    run.json          the run record: resolved arguments, data, batch sizes, processes, steps, metrics
    baseline_metrics.json   with --compare-baseline: the cosine prior with the initial backbone, same test episodes
    config.json       a marker (`model_type` "fss_run", `hf_fss.run_folder`): `AutoModel.from_pretrained(run folder)`
                      and `pipeline(model=run folder)` load best/, else final/

The training dataset emits the extra inputs the model declares (`model.query_inputs + model.support_inputs`, e.g.
NTRENet's `class_ids`) and the batch goes to the model as it is; it and the validation / test episodes are built by
`hf_fss.training.episodic_data.build_data` (re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel

from hf_fss import hub
from hf_fss.backbones.feature_cache import FeatureCache
from hf_fss.cli import command_prog, os_error_line
from hf_fss.evaluation.loop import default_feature_cache_bytes, evaluate_model
from hf_fss.hub.card_results import training_schedule
from hf_fss.run_folder import write_run_folder_marker
from hf_fss.training.arguments import EpisodicArguments, LoopArguments, apply_num_threads, arguments_dict
from hf_fss.training.episodic_data import EpisodeSet, TrainingData, build_data
from hf_fss.training.loop import (
    LoopCallback,
    NonFiniteError,
    TrainingLoop,
    checkpoint_bytes,
    create_accelerator,
    create_dataloader,
    create_optimizer,
    prepare_output_dir,
    resolve_checkpoint,
    scalar_config,
)
from hf_fss.utils.io import check_output_path, write_json_atomic

__all__ = ["EpisodeSet", "SelectionState", "TrainingData", "build_data", "build_model", "main", "train"]

logger = get_logger(__name__)

# Episodic arguments that may change when a run resumes (where things go, how often to validate, the final test);
# every other one, and the model config, must be the checkpoint's (`resume_settings`).
RESUMABLE_CHANGES = (
    "config",
    "model_kwargs",  # compared through the model config it makes
    "validation_every_epochs",
    "validation_steps",
    "eval_protocol",
    "num_eval_episodes",
    "eval_seed",
    "eval_batch_size",
    "evaluate_at_end",
    "compare_baseline",
)


def resume_settings(args: EpisodicArguments, model) -> dict[str, Any]:
    """What cannot change when an episodic run resumes: data, fold, shot, augmentation, selection, model config."""
    settings = {k: v for k, v in arguments_dict(args).items() if k not in RESUMABLE_CHANGES}
    config = model.config.to_dict()
    for key in sorted(config):
        if not key.startswith("_") and key not in ("transformers_version", "architectures", "torch_dtype", "dtype"):
            settings[f"model_config.{key}"] = config[key]
    return settings


# ---------------------------------------------------------------------------------------------- construction


def _config_kwargs(args: EpisodicArguments, fold=None) -> dict[str, Any]:
    """The model-config fields the run sets: `model_kwargs`, `image_size`, `shot`, SMCP's `num_base_classes`."""
    import hf_fss
    from hf_fss.configuration_fss import check_unknown_config_fields

    config_class = hf_fss.MODEL_CLASSES[args.model_type][0]
    kwargs = dict(args.model_kwargs)
    if "image_size" in kwargs and kwargs["image_size"] != args.image_size:
        raise ValueError(
            f"model_kwargs image_size={kwargs['image_size']} disagrees with image_size={args.image_size}; set only "
            "image_size"
        )
    kwargs["image_size"] = args.image_size
    if hasattr(config_class, "shot"):
        kwargs.setdefault("shot", args.shot)  # recorded in the config for the model card
    # A misspelt recipe key is refused by name (with the closest field) on both paths, as the config itself does.
    check_unknown_config_fields(config_class, kwargs)
    if fold is not None and hasattr(config_class, "num_base_classes") and args.model_name_or_path is None:
        kwargs.setdefault("num_base_classes", len(fold.base))
    return kwargs


@contextlib.contextmanager
def _model_kwargs_errors():
    """The config validator's refusal of a `--model-kwargs` / recipe `model:` value, as one line naming the field."""
    try:
        yield
    except StrictDataclassError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(f"--model-kwargs (recipe key model): {' '.join(str(cause).split())}") from err


def check_model_kwargs(args: EpisodicArguments) -> None:
    """
    Build (and drop) the config the run will use, so an unknown field or a value the config's validator refuses
    is reported before any data is built.

    Raises:
        `ValueError`: one line naming the field.
    """
    import hf_fss

    config_class = hf_fss.MODEL_CLASSES[args.model_type][0]
    kwargs = _config_kwargs(args)
    if args.model_name_or_path is None:
        with _model_kwargs_errors():
            config_class(**kwargs)


def build_model(args: EpisodicArguments, fold=None) -> tuple[Any, Any]:
    """
    The model to train and its processor: `args.model_name_or_path` (`from_pretrained`), or a fresh config of
    `args.model_type` whose extractors then load their pretrained weights (`load_pretrained_extractors`). A fresh
    config with a `num_base_classes` field (SMCP's multi-class head) gets the fold's number of base classes unless
    the recipe sets it.

    Raises:
        `ValueError`: a config field that does not exist or a value its validator refuses, naming the field.
    """
    import hf_fss
    from hf_fss.image_processing_fss import FewShotSegmentationImageProcessor

    config_class, model_class = hf_fss.MODEL_CLASSES[args.model_type]
    kwargs = _config_kwargs(args, fold)
    with _model_kwargs_errors():
        if args.model_name_or_path is not None:
            model = model_class.from_pretrained(args.model_name_or_path, **kwargs)
        else:
            model = model_class(config_class(**kwargs))
    if args.model_name_or_path is None:
        note = random_named_backbone_note(model.config)
        if note:
            logger.warning(note)
        model.load_pretrained_extractors()
    processor = FewShotSegmentationImageProcessor(image_size=model.config.image_size)
    return model, processor


def random_named_backbone_note(config) -> str | None:
    """
    One line when `backbone` names a checkpoint (Hub id or folder) whose weights will not be loaded because
    `use_pretrained_backbone` is false (the run then trains on the architecture alone, random weights); else None.
    """
    backbone = getattr(config, "backbone", None)
    if getattr(config, "backbone_config", None) is None or not backbone or config.use_pretrained_backbone:
        return None
    return (
        f"backbone: the architecture of {backbone} with random weights; set use_pretrained_backbone: true to start "
        "from its weights"
    )


# ------------------------------------------------------------------------------------- evaluation and saving


def _format_metrics(metrics: dict[str, Any]) -> str:
    return (
        f"mIoU {100 * metrics['miou']:.2f}  FB-IoU {100 * metrics['fbiou']:.2f}  "
        f"precision {100 * metrics['precision']:.2f}  ({metrics['num_episodes']} episodes)"
    )


def evaluate_episodes(model, processor, episodes: EpisodeSet, args: EpisodicArguments, accelerator, num_workers=0):
    """
    `evaluate_model` of `model` on a fixed `EpisodeSet`, sharded over the run's processes, with the evaluation
    caches (extractor features per image, support encodings per support image and class): a fresh cache per call,
    since the weights change between two validations, freed when the call returns. The metrics carry `dtype` and
    `channels_last` (`--dtype`, `--channels-last`), the keys of evaluate.py's metrics.json.
    """
    cache_bytes = default_feature_cache_bytes(accelerator.device)
    metrics = evaluate_model(
        model,
        processor,
        episodes.split,
        episodes.episodes,
        class_ids=episodes.class_ids,
        class_names=episodes.class_names,
        protocol=episodes.protocol,
        seed=episodes.seed,
        batch_size=args.eval_batch_size,
        num_workers=num_workers,
        accelerator=accelerator,
        description="test" if episodes.description.startswith("test") else "validation",
        feature_cache=FeatureCache(cache_bytes) if cache_bytes > 0 else None,
        precision=args.dtype,
        channels_last=args.channels_last,
    )
    # Recorded as evaluate.py records them (its metrics.json), so best/ and final/ say the precision they were tested in.
    metrics.update(dtype=args.dtype, channels_last=args.channels_last)
    return metrics


def _test_baseline(model, initial_backbone, processor, episodes, args, accelerator, num_workers=0) -> dict:
    """The training-free cosine prior (threshold 0.5) with the backbone the trained model started from."""
    from hf_fss.models.cosine_prior import CosinePriorConfig, CosinePriorModel

    config = model.config
    baseline = CosinePriorModel(
        CosinePriorConfig(
            backbone=config.backbone,
            backbone_config=config.backbone_config,
            backbone_kwargs=config.backbone_kwargs,
            image_size=config.image_size,
        )
    )
    baseline.backbone.load_state_dict(initial_backbone)
    baseline.to(accelerator.device)
    metrics = evaluate_episodes(baseline, processor, episodes, args, accelerator, num_workers)
    accelerator.print(
        f"cosine prior baseline (initial backbone) on {episodes.description}: {_format_metrics(metrics)}"
    )
    return metrics


@dataclass
class SelectionState:
    """Model selection on the validation episodes; checkpointed with the run."""

    best_metric: float | None = None
    best_step: int | None = None
    validation_history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "validation_history": copy.deepcopy(self.validation_history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric = state["best_metric"]
        self.best_step = state["best_step"]
        self.validation_history = list(state["validation_history"])


class ValidationCallback(LoopCallback):
    """At the end of a step: validate when due (every N steps / epochs, and at the last step); save `best/`."""

    def __init__(self, args: EpisodicArguments, validation: EpisodeSet, processor, record: dict, num_workers: int):
        self.args, self.validation, self.processor, self.record = args, validation, processor, record
        self.num_workers = num_workers
        self.selection = SelectionState()

    def state_objects(self) -> list[Any]:
        return [self.selection]

    def _due(self, loop: TrainingLoop) -> bool:
        step, args = loop.state.global_step, self.args
        epoch_done = step % loop.updates_per_epoch == 0
        every_epochs = args.validation_every_epochs
        return (
            (args.validation_steps is not None and step % args.validation_steps == 0)
            or (epoch_done and every_epochs > 0 and (step // loop.updates_per_epoch) % every_epochs == 0)
            or step == loop.max_steps  # the best model always covers the final weights
        )

    def on_step_end(self, loop: TrainingLoop) -> None:
        if not self._due(loop):
            return
        accelerator, selection, step = loop.accelerator, self.selection, loop.state.global_step
        model = loop.unwrapped_model
        loop.check_finite("best/")  # non-finite weights are neither validated nor saved
        metrics = evaluate_episodes(model, self.processor, self.validation, self.args, accelerator, self.num_workers)
        selection.validation_history.append({"step": step, "miou": metrics["miou"], "fbiou": metrics["fbiou"]})
        if selection.best_metric is None or metrics["miou"] > selection.best_metric:
            selection.best_metric, selection.best_step = metrics["miou"], step
            if accelerator.is_main_process:
                validation_metrics = {k: metrics[k] for k in ("miou", "fbiou", "num_episodes")}
                training = {**self.record, "steps": step, "validation_metrics": validation_metrics}
                hub.save_pretrained_with_card(model, self.processor, loop.output_dir / "best", training=training)
                write_run_folder_marker(loop.output_dir)  # AutoModel / pipeline() now take the folder (its best/)
            accelerator.wait_for_everyone()
        accelerator.log({"validation/miou": metrics["miou"], "validation/fbiou": metrics["fbiou"]}, step=step)
        loop.say(
            f"step {step}/{loop.max_steps} (epoch {step / loop.updates_per_epoch:.2f}) validation: "
            f"{_format_metrics(metrics)}  best {100 * selection.best_metric:.2f} at step {selection.best_step}"
        )


# ---------------------------------------------------------------------------------------------------- training


def _run_record(loop_args, args, data, loop: TrainingLoop) -> dict[str, Any]:
    """What the run record (`run.json`) and the model cards say about the run."""
    accelerator = loop.accelerator
    effective_batch = loop_args.batch_size * accelerator.num_processes * loop_args.gradient_accumulation_steps
    validation = data.validation
    return {
        "model_type": args.model_type,
        "dataset": args.dataset,
        "benchmark": args.benchmark,
        "fold": args.fold,
        "fold_convention": args.fold_convention,
        "shot": args.shot,
        "novel_classes": list(data.fold.novel),
        "base_classes": list(data.fold.base),
        "num_training_images": data.train_dataset.num_items,
        "num_validation_images": len(data.train_dataset.holdout_indices),
        "image_size": args.image_size,
        "optimizer": loop_args.optimizer,
        "learning_rate": loop_args.learning_rate,
        "lr_scheduler": loop_args.lr_scheduler,
        "lr_power": loop_args.lr_power,
        "momentum": loop_args.momentum,
        "weight_decay": loop_args.weight_decay,
        "batch_size_per_process": loop_args.batch_size,
        "gradient_accumulation_steps": loop_args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "effective_batch_size": effective_batch,
        "max_steps": loop.max_steps,
        "epochs": loop.max_steps / loop.updates_per_epoch,
        "steps_per_epoch": loop.updates_per_epoch,
        "seed": loop_args.seed,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": accelerator.distributed_type.value,
        "sync_batchnorm": loop_args.sync_batchnorm,
        "augmentation": {
            "scale": [args.scale_min, args.scale_max],
            "rotate": [args.rotate_min, args.rotate_max],
            "horizontal_flip": args.horizontal_flip,
            "gaussian_blur": args.gaussian_blur,
        },
        "novel_class_policy": args.novel_class_policy,
        "trainable_parameters": sum(p.numel() for p in loop.unwrapped_model.parameters() if p.requires_grad),
        "validation": None
        if validation is None
        else {
            "episodes": len(validation.episodes),
            "classes": list(validation.class_ids),
            "source": validation.description,
        },
        "arguments": arguments_dict(loop_args, args),
    }


def train(loop_args: LoopArguments, args: EpisodicArguments) -> dict[str, Any]:
    """
    Run the episodic training described by the two argument groups and return the run record (also written to
    `<output_dir>/run.json`).

    Raises `ValueError` for bad input (unknown dataset, too few images, an output folder holding another run)
    before anything is written.
    """
    started = time.time()
    check_output_path(loop_args.output_dir, "--output-dir")  # before any work: a file there, a read-only folder
    accelerator = create_accelerator(loop_args)
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, released however the run ends
            return _train(loop_args, args, accelerator, started, held)
    finally:
        accelerator.end_training()


def _train(loop_args, args: EpisodicArguments, accelerator: Accelerator, started: float, held) -> dict:
    # Same seed on every process: identical initial weights and, with the seeded sampler, identical data order.
    set_seed(loop_args.seed)
    # Everything that can fail on bad input happens before the output folder is touched. The training set emits
    # the extra inputs the method declares (class attributes, so the data can be checked before the model is built).
    import hf_fss

    model_class = hf_fss.MODEL_CLASSES[args.model_type][1]
    check_model_kwargs(args)
    data = build_data(args, loop_args.seed, extra_inputs=model_class.query_inputs + model_class.support_inputs)
    model, processor = build_model(args, fold=data.fold)
    checkpoint = resolve_checkpoint(loop_args, say=accelerator.print)
    if len(data.train_dataset) // loop_args.batch_size < accelerator.num_processes:
        raise ValueError(
            f"{len(data.train_dataset)} training episodes per epoch do not fill one batch of {loop_args.batch_size} "
            f"on each of {accelerator.num_processes} process(es); lower --batch-size"
        )
    initial_backbone = None
    if args.compare_baseline and hasattr(model, "backbone"):
        initial_backbone = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    needed = checkpoint_bytes(model, loop_args.optimizer)
    check_output_path(loop_args.output_dir, "--output-dir", needed_bytes=needed)
    # The run-folder marker config.json is written once a model is saved (best/ or final/): a run that fails
    # before leaves no marker that AutoModel would take for a model.
    output_dir = prepare_output_dir(loop_args, accelerator, held)
    if loop_args.sync_batchnorm and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            logger.warning("sync_batchnorm: SyncBatchNorm needs GPUs; keeping BatchNorm on CPU")
        else:
            model.convert_sync_batchnorm()

    record: dict[str, Any] = {}
    validation = None
    if data.validation is not None:
        validation = ValidationCallback(args, data.validation, processor, record, loop_args.num_workers)
    callbacks = [validation] if validation else []
    loop = TrainingLoop(accelerator, loop_args, output_dir, callbacks, settings=resume_settings(args, model))
    dataloader = create_dataloader(data.train_dataset, loop_args)
    loop.prepare(model, create_optimizer(model, loop_args), dataloader)
    record.update(_run_record(loop_args, args, data, loop))
    logger.info(
        f"{args.model_type} on {args.benchmark} fold {args.fold}, {args.shot}-shot: {data.train_dataset.num_items} "
        f"training images, {accelerator.num_processes} process(es) x {loop_args.batch_size} x "
        f"{loop_args.gradient_accumulation_steps} accumulation = {record['effective_batch_size']} episodes per step, "
        f"{training_schedule(loop.max_steps, loop.updates_per_epoch)}",  # as the card states it
        main_process_only=True,
    )
    if checkpoint is not None:  # verified, settings compared, loaded: before trackers write anything
        loop.resume(checkpoint)
    if accelerator.log_with:
        accelerator.init_trackers(output_dir.name or "hf_fss", config=scalar_config(record["arguments"]))
    loop.run()

    selection = validation.selection if validation is not None else SelectionState()
    record.update(
        steps=loop.state.global_step,
        best_step=selection.best_step,
        best_validation_miou=selection.best_metric,
        validation_history=selection.validation_history,
    )
    if loop.stopped:
        accelerator.print(f"stopped after step {loop.state.global_step} (--stop-after-steps); nothing else is saved")
        record["stopped_early"] = True
        return record
    return _finish(loop, loop_args, args, data, processor, record, selection, initial_backbone, started)


def _finish(loop, loop_args, args, data, processor, record, selection, initial_backbone, started) -> dict:
    """Novel-class test of the final and best models (and the baseline); save final/, best/, run.json; push."""
    accelerator, output_dir, step = loop.accelerator, loop.output_dir, loop.state.global_step
    final_model = loop.unwrapped_model
    loop.check_finite("final/")
    best_model = None
    if selection.best_step is not None:
        # The best weights are those of the last validation that improved, saved then in best/.
        same = selection.best_step == step
        best_model = final_model if same else AutoModel.from_pretrained(output_dir / "best").to(accelerator.device)
    results: dict[str, Any] = {}
    if data.test is not None and args.evaluate_at_end:
        results["final"] = evaluate_episodes(
            final_model, processor, data.test, args, accelerator, loop_args.num_workers
        )
        accelerator.print(f"final model (step {step}) on {data.test.description}: {_format_metrics(results['final'])}")
        if best_model is final_model:
            results["best"] = results["final"]
        elif best_model is not None:
            results["best"] = evaluate_episodes(
                best_model, processor, data.test, args, accelerator, loop_args.num_workers
            )
            accelerator.print(
                f"best model (step {selection.best_step}) on {data.test.description}: "
                f"{_format_metrics(results['best'])}"
            )
        if initial_backbone is not None:
            results["baseline"] = _test_baseline(
                final_model, initial_backbone, processor, data.test, args, accelerator, loop_args.num_workers
            )
        accelerator.log({f"test/{name}_miou": value["miou"] for name, value in results.items()}, step=step)

    record["wall_time_s"] = round(time.time() - started, 1)
    record["test"] = {
        name: {k: v[k] for k in ("miou", "fbiou", "precision", "num_episodes")} for name, v in results.items()
    }
    if accelerator.is_main_process:
        hub.save_pretrained_with_card(
            final_model, processor, output_dir / "final", metrics=results.get("final"), training=record
        )
        if best_model is not None:
            training = {**record, "steps": selection.best_step}
            hub.save_pretrained_with_card(
                best_model, processor, output_dir / "best", metrics=results.get("best"), training=training
            )
        write_run_folder_marker(output_dir)  # AutoModel / pipeline() take the run folder (its best/, else final/)
        if "baseline" in results:
            write_json_atomic(results["baseline"], output_dir / "baseline_metrics.json")
        write_json_atomic(record, output_dir / "run.json")
        selected = output_dir / ("best" if selection.best_step is not None else "final")
        if loop_args.push_to_hub:
            hub.push_to_hub(selected, loop_args.push_to_hub)
            accelerator.print(f"pushed {selected} to https://huggingface.co/{loop_args.push_to_hub}")
        _print_summary(args, record, results, output_dir, selected)
    accelerator.wait_for_everyone()
    return record


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
        loop_args, episodic_args = parse_args(argv, quickstart_recipe=quickstart_recipe)
        apply_num_threads(loop_args, argv)
        train(loop_args, episodic_args)
    except OSError as err:  # a full disk, a folder made read-only mid-run: what was saved before stays intact
        print(f"{command_prog('train.py')}: error: {os_error_line(err) if err.errno else err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"{command_prog('train.py')}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"{command_prog('train.py')}: error: {err}", file=sys.stderr)
        return 1
    return 0
