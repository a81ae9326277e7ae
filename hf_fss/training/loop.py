"""
The generic training loop under Accelerate, in the spirit of Accelerate's `examples/by_feature/checkpointing.py`:
prepare, accumulate, clip, step, log, checkpoint, resume mid-epoch with `skip_first_batches`. It knows nothing of
episodes: what a kind of training adds (validation and model selection for episodic training, a momentum encoder
for contrastive pretraining) comes in through `LoopCallback`s:

- `on_optimizer_step(loop)`: after every optimizer step (a momentum encoder updates here);
- `on_step_end(loop)`: after the step is counted and logged, before its checkpoint (validation, best model);
- `state_objects()`: objects with `state_dict` / `load_state_dict` checkpointed with the run.

A checkpoint (`checkpoints/step_XXXXXXXX/`, by optimizer step) holds weights, optimizer, scheduler, RNG states,
`LoopState`, the model's training state (`model.training_state_objects()`) and the callbacks' state as safetensors +
JSON with a checksum manifest written last (`hf_fss.training.checkpoint`; never a pickle): a damaged one is refused
naming the file, one whose run settings differ is refused listing both values. It is written to a staging folder
(`hf_fss.utils.io`) and renamed once every process wrote, so a killed run never leaves half a checkpoint; `latest` is
the newest whose manifest verifies. A non-finite loss stops the run naming the step and loss terms (`NonFiniteError`).

Data order is reproducible and resumable: a shuffling sampler seeded by `(seed, epoch)` (`EpochShuffleSampler`)
gives every process the same permutation (Accelerate shards it), a dataset with `set_epoch` is told the epoch (the
episodic dataset seeds each item's augmentation by `(seed, epoch, index)`), and a resumed run skips the batches
already seen in its epoch, so on CPU a resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from hf_fss.evaluation.loop import needs_cpu_fallback
from hf_fss.training.arguments import LoopArguments
from hf_fss.training.checkpoint import (
    CHECKPOINT_PATTERN,
    CheckpointError,
    compare_settings,
    find_latest_checkpoint,
    load_tree,
    save_tree,
    verify_checkpoint,
    write_manifest,
)
from hf_fss.utils.io import OutputLock, hold_on_main_process, make_staging_dir, remove_stale_staging

__all__ = [
    "CheckpointError",
    "EpochShuffleSampler",
    "LoopCallback",
    "NonFiniteError",
    "LoopState",
    "TrainingLoop",
    "create_accelerator",
    "create_dataloader",
    "create_optimizer",
    "create_scheduler",
    "find_latest_checkpoint",
    "load_checkpoint",
    "checkpoint_bytes",
    "prepare_output_dir",
    "run_traces",
    "remove_stale_checkpoint_staging",
    "resolve_checkpoint",
    "save_checkpoint",
]

logger = get_logger(__name__)

STAGING_TAG = "partial"
# Loop arguments that cannot change when a run resumes (with the resolved max_steps and the number of processes).
LOOP_RESUME_SETTINGS = (
    "seed",
    "optimizer",
    "learning_rate",
    "momentum",
    "weight_decay",
    "lr_scheduler",
    "lr_power",
    "warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "mixed_precision",
    "sync_batchnorm",
)


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
class LoopState:
    """The loop's counter; checkpointed with the run (`training_state.json`)."""

    global_step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])


class LoopCallback:
    """What a kind of training adds to `TrainingLoop`; every method is optional."""

    def state_objects(self) -> list[Any]:
        return []

    def on_optimizer_step(self, loop: TrainingLoop) -> None:
        pass

    def on_step_end(self, loop: TrainingLoop) -> None:
        pass


# ----------------------------------------------------------------------------------------------------- set-up


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


def scalar_config(values: dict[str, Any]) -> dict[str, Any]:
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


def create_accelerator(args: LoopArguments) -> Accelerator:
    """The run's `Accelerator`: precision, accumulation, trackers under `<output_dir>/logs`, DDP options."""
    return Accelerator(
        cpu=args.cpu or needs_cpu_fallback(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=_resolve_trackers(args.report_to),
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.ddp_find_unused_parameters)],
    )


def create_dataloader(dataset: Any, args: LoopArguments, collate_fn: Any = None) -> DataLoader:
    """Full batches of `args.batch_size` in `EpochShuffleSampler` order."""
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed=args.seed),
        drop_last=True,  # PFENet: full batches only
        num_workers=args.num_workers,
        collate_fn=collate_fn,
        # A private generator, so that creating an iterator never draws from the global RNG (dropout's, restored
        # by load_state): a resumed run then continues the exact random stream of an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )


def create_optimizer(model: torch.nn.Module, args: LoopArguments) -> torch.optim.Optimizer:
    """SGD (the papers) or AdamW over the trainable parameters only: frozen extractors never enter it."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"{type(model).__name__} has no trainable parameter; there is nothing to train")
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)


def create_scheduler(optimizer: torch.optim.Optimizer, args: LoopArguments, max_steps: int, num_processes: int):
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


# ------------------------------------------------------------------------------------------------ checkpoints


def resolve_checkpoint(args: LoopArguments, say=print) -> Path | None:
    """
    The checkpoint `--resume-from-checkpoint` names, verified against its manifest (`latest`: the newest of the run
    folder that verifies; damaged newer ones are reported with `say` and skipped), or None.
    """
    if args.resume_from_checkpoint == "latest":
        reasons: list[str] = []
        checkpoint = find_latest_checkpoint(
            args.output_dir, say=lambda message: (reasons.append(message), say(message))
        )
        if checkpoint is None:
            found = "; ".join(reasons) if reasons else "there is none"
            raise CheckpointError(
                f"--resume-from-checkpoint latest: no usable checkpoint in {args.output_dir}/checkpoints ({found})"
            )
        return checkpoint
    if args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise ValueError(f"--resume-from-checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder")
        verify_checkpoint(checkpoint)
        return checkpoint
    return None


# What a training or pretraining run leaves in its folder (models, records, the run-folder marker `config.json`).
RUN_TRACES = (
    "run.json", "config.json", "final", "best", "checkpoints", "baseline_metrics.json", "model.safetensors",
    "probe.json",
)  # fmt: skip


def run_traces(output_dir: str | os.PathLike) -> list[Path]:
    """The entries of `RUN_TRACES` in `output_dir` (empty: the folder holds no run, or does not exist)."""
    return [Path(output_dir) / name for name in RUN_TRACES if os.path.lexists(Path(output_dir) / name)]


def prepare_output_dir(args: LoopArguments, accelerator: Accelerator, held: contextlib.ExitStack) -> Path:
    """
    Create and hold the run folder (`hf_fss.utils.io.OutputLock`, by the main process, released when `held`
    closes); refuse one that another live run holds, or that holds another run unless resuming or
    `--overwrite-output-dir`. Nothing is changed before the folder is held.
    """
    output_dir = Path(args.output_dir)
    previous_run = run_traces(output_dir)
    if previous_run and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise ValueError(
            f"--output-dir {str(output_dir)!r} already holds a run ({', '.join(p.name for p in previous_run)}); "
            "pass --resume-from-checkpoint latest to continue it or --overwrite-output-dir to start over"
        )
    hold_on_main_process(OutputLock(output_dir), accelerator, held)  # every process stops when refused
    if accelerator.is_main_process:
        if previous_run and args.overwrite_output_dir and not args.resume_from_checkpoint:
            # The old run goes whole: its checkpoints would be taken by a later `--resume-from-checkpoint latest`,
            # and a best/ (or record) the new run does not rewrite would be taken for the new run's.
            for trace in previous_run:
                if trace.is_dir() and not trace.is_symlink():
                    shutil.rmtree(trace)
                else:
                    trace.unlink()
        remove_stale_checkpoint_staging(output_dir)
    accelerator.wait_for_everyone()
    return output_dir


def checkpoint_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """
    About the disk a run folder needs: one checkpoint (weights in float32 plus the optimizer's state: SGD's momentum
    buffer, AdamW's two moments, of the trainable weights) and two saved models (`final/`, `best/`).
    """
    weights = sum(p.numel() * 4 for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return 3 * weights + trainable * (2 if optimizer == "adamw" else 1)


def remove_stale_checkpoint_staging(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of checkpoints that killed runs left in `<output_dir>/checkpoints`."""
    checkpoints = Path(output_dir) / "checkpoints"
    if not checkpoints.is_dir():
        return []
    # Old runs named their staging `.tmp-step_N` (no writer pid): removed when untouched since this run started.
    removed = remove_stale_staging(checkpoints / "step", STAGING_TAG, legacy=[r"\.tmp-step_\d+"])
    targets = {
        m.group(1) for p in checkpoints.iterdir() if (m := re.match(rf"^\.(step_\d+)\.{STAGING_TAG}\.", p.name))
    }
    for target in sorted(targets):
        removed += remove_stale_staging(checkpoints / target, STAGING_TAG)
    return removed


def _rng_state(accelerator: Accelerator) -> dict[str, Any]:
    state = {
        "accelerator_step": accelerator.step,  # gradient accumulation's counter
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(accelerator: Accelerator, state: dict[str, Any]) -> None:
    accelerator.step = int(state["accelerator_step"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(loop: TrainingLoop, step: int) -> Path:
    """
    Write the checkpoint of `loop` at `step` into a staging folder beside `checkpoints/step_N` (`hf_fss.utils.io`),
    then, once every process wrote, its manifest (last) and the rename: a run killed while saving never leaves a
    folder that `latest` would pick. `checkpoints_total_limit` keeps the newest N.
    """
    accelerator = loop.accelerator
    checkpoints = loop.output_dir / "checkpoints"
    final = checkpoints / f"step_{step:08d}"
    staging = [None]
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        staging = [str(make_staging_dir(final, STAGING_TAG))]
    staging = Path(broadcast_object_list(staging)[0])
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            accelerator.save_model(loop.model, staging, max_shard_size="1000GB", safe_serialization=True)
            save_tree(loop.optimizer.state_dict(), staging, "optimizer")
            save_tree(loop.lr_scheduler.state_dict(), staging, "scheduler")
            if accelerator.scaler is not None:
                save_tree(accelerator.scaler.state_dict(), staging, "scaler")
            save_tree({name: obj.state_dict() for name, obj in loop.state_objects.items()}, staging, "training_state")
        save_tree(_rng_state(accelerator), staging, f"rng_state_{accelerator.process_index}")
    except OSError:
        # A full disk mid-save: drop the partial checkpoint, so the earlier ones stay the newest and nothing is lost.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(staging, step, loop.settings)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        total_limit = loop.args.checkpoints_total_limit
        if total_limit is not None:
            done = sorted(
                (int(m.group(1)), p) for p in checkpoints.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
            )
            for _, old in done[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(loop: TrainingLoop, checkpoint: Path) -> None:
    """Load what `save_checkpoint` wrote (already verified) into `loop`; safetensors and JSON only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    accelerator, checkpoint = loop.accelerator, Path(checkpoint)
    weights = checkpoint / "model.safetensors"
    try:
        # Read on CPU, copied into the parameters wherever they live.
        load_model(loop.unwrapped_model, str(weights), strict=True, device="cpu")
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{weights} cannot be loaded into the model being trained: {err}") from None
    loop.optimizer.load_state_dict(load_tree(checkpoint, "optimizer"))
    loop.lr_scheduler.load_state_dict(load_tree(checkpoint, "scheduler"))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(load_tree(checkpoint, "scaler"))
    states = load_tree(checkpoint, "training_state")
    if set(states) != set(loop.state_objects):
        raise CheckpointError(
            f"{checkpoint / 'training_state.json'} holds {sorted(states)}, the run expects {sorted(loop.state_objects)}"
        )
    for name, obj in loop.state_objects.items():
        obj.load_state_dict(states[name])
    _set_rng_state(accelerator, load_tree(checkpoint, f"rng_state_{accelerator.process_index}"))


# ------------------------------------------------------------------------------------------------------- loop


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weights; nothing non-finite is saved."""


class TrainingLoop:
    """
    `prepare(model, optimizer, dataloader)`, optionally `resume(checkpoint)`, then `run()`. Callbacks read the
    loop's attributes: `accelerator`, `args`, `model` (prepared; `unwrapped_model` for saving or evaluating),
    `state.global_step`, `max_steps`, `updates_per_epoch`, `output_dir`, `say(message)`.

    `settings` are what cannot change on resume (the caller's: data, model config, ...): they are stored in every
    checkpoint's manifest with the loop's own (`LOOP_RESUME_SETTINGS`, the number of processes, the resolved
    `max_steps`), and `resume` refuses a checkpoint whose settings differ, listing both values.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        args: LoopArguments,
        output_dir: Path,
        callbacks: Sequence[LoopCallback] = (),
        settings: dict[str, Any] | None = None,
    ):
        self.accelerator, self.args, self.output_dir = accelerator, args, Path(output_dir)
        self.callbacks = list(callbacks)
        self.settings = dict(settings or {})
        self.state = LoopState()
        self.stopped = False
        self.progress = None
        self.last_checkpoint: Path | None = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataloader: DataLoader) -> None:
        """Wrap for the run's devices and processes; size the run; gather what a checkpoint holds."""
        accelerator, args = self.accelerator, self.args
        self.dataset = dataloader.dataset
        self.model, self.optimizer, self.dataloader = accelerator.prepare(model, optimizer, dataloader)
        self.updates_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        self.max_steps = args.max_steps if args.max_steps is not None else args.epochs * self.updates_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.updates_per_epoch)
        scheduler = create_scheduler(self.optimizer, args, self.max_steps, accelerator.num_processes)
        self.lr_scheduler = accelerator.prepare(scheduler)
        # Saved as safetensors + JSON by `save_checkpoint` (no `register_for_checkpointing`: Accelerate pickles).
        self.state_objects: dict[str, Any] = {"loop": self.state}
        for name, obj in getattr(self.unwrapped_model, "training_state_objects", dict)().items():
            self.state_objects[f"model.{name}"] = obj
        for index, callback in enumerate(self.callbacks):
            for number, obj in enumerate(callback.state_objects()):
                self.state_objects[f"callback_{index}.{number}"] = obj
        self.settings.update({name: getattr(args, name) for name in LOOP_RESUME_SETTINGS})
        self.settings.update(max_steps=self.max_steps, num_processes=accelerator.num_processes)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def check_finite(self, what: str) -> None:
        """Raise `NonFiniteError` when a weight or buffer of the model is not finite (before saving `what`)."""
        for name, tensor in self.unwrapped_model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(
                    f"after step {self.state.global_step} the weights are not finite ({name}); {what} is not saved. "
                    f"{self._last_good()}"
                )

    def _last_good(self) -> str:
        if self.last_checkpoint is not None:
            return f"The last good checkpoint is {self.last_checkpoint}."
        return "No checkpoint was saved in this run."

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step_N` (see `hf_fss.training.checkpoint`) via a staging folder renamed when complete."""
        step = self.state.global_step
        self.check_finite(f"checkpoint step_{step:08d}")
        path = save_checkpoint(self, step)
        self.last_checkpoint = path
        return path

    def resume(self, checkpoint: Path) -> None:
        """Verify, compare settings, then load weights, optimizer, scheduler, scaler, RNG and training states."""
        manifest = verify_checkpoint(checkpoint)
        compare_settings(checkpoint, manifest.get("settings", {}), self.settings)
        load_checkpoint(self, checkpoint)
        self.last_checkpoint = Path(checkpoint)
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.global_step}")

    def say(self, message: str) -> None:
        if self.accelerator.is_local_main_process:
            (self.progress.write if self.progress is not None else print)(message)

    def _check_loss(self, outputs: Any) -> None:
        """Stop (on every process) when the loss of any process is not finite, naming the step and loss terms."""
        finite = torch.isfinite(outputs.loss.detach()).reshape(1)
        if bool(self.accelerator.gather(finite).all()):
            return
        terms = {"loss": outputs.loss, **(getattr(outputs, "losses", None) or {})}
        values = ", ".join(f"{name}={float(value.detach().float()):.6g}" for name, value in terms.items())
        raise NonFiniteError(
            f"step {self.state.global_step + 1}: the loss is not finite ({values}; learning rate "
            f"{self.lr_scheduler.get_last_lr()[0]:.6g}); training stopped and nothing more is saved. "
            f"{self._last_good()} Lower --learning-rate (or set --max-grad-norm) and resume or start again."
        )

    def run(self) -> LoopState:
        """Train until `max_steps` (or `--stop-after-steps`, then `self.stopped`); returns the loop state."""
        accelerator, args, state = self.accelerator, self.args, self.state
        model, optimizer, lr_scheduler = self.model, self.optimizer, self.lr_scheduler
        skip_batches = (state.global_step % self.updates_per_epoch) * args.gradient_accumulation_steps
        starting_epoch = state.global_step // self.updates_per_epoch
        self.progress = tqdm(
            total=self.max_steps,
            initial=state.global_step,
            desc="training",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        running: dict[str, list[torch.Tensor]] = {}
        model.train()
        try:
            for epoch in range(starting_epoch, self.num_epochs):
                if state.global_step >= self.max_steps or self.stopped:
                    break
                # The sampler's permutation and the dataset's per-item randomness both follow the epoch.
                self.dataloader.set_epoch(epoch)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch)
                batches = self.dataloader
                if epoch == starting_epoch and skip_batches:
                    batches = accelerator.skip_first_batches(self.dataloader, skip_batches)
                for batch in batches:
                    with accelerator.accumulate(model):
                        outputs = model(**batch)
                        self._check_loss(outputs)
                        accelerator.backward(outputs.loss)
                        if accelerator.sync_gradients and args.max_grad_norm is not None:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                    for name, value in {"loss": outputs.loss, **(getattr(outputs, "losses", None) or {})}.items():
                        running.setdefault(name, []).append(value.detach().float())
                    if not accelerator.sync_gradients:
                        continue
                    for callback in self.callbacks:
                        callback.on_optimizer_step(self)
                    state.global_step += 1
                    self.progress.update(1)
                    if state.global_step % args.logging_steps == 0 or state.global_step == self.max_steps:
                        self._log(running)
                    for callback in self.callbacks:
                        callback.on_step_end(self)
                    if args.checkpointing_steps is not None and state.global_step % args.checkpointing_steps == 0:
                        self.save_checkpoint()
                    if args.stop_after_steps is not None and state.global_step >= args.stop_after_steps:
                        self.stopped = True
                        break
                    if state.global_step >= self.max_steps:
                        break
        finally:
            # Closing ends the bar's line, so an error printed after it (a full disk, a non-finite loss) starts on
            # its own line instead of running on after the bar.
            self.progress.close()
            self.progress = None
        return state

    def _log(self, running: dict[str, list[torch.Tensor]]) -> None:
        """Log the mean of every loss term since the last log (averaged over processes) and the learning rate."""
        means = {name: torch.stack(values).mean() for name, values in running.items()}
        means = {name: self.accelerator.reduce(value, reduction="mean").item() for name, value in means.items()}
        running.clear()
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        logs = {**{f"train/{k}": v for k, v in means.items()}, "train/lr": learning_rate}
        self.accelerator.log(logs, step=self.state.global_step)
        self.progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{learning_rate:.2e}")
