"""
The generic training loop under Accelerate, in the spirit of Accelerate's `examples/by_feature/checkpointing.py`:
prepare, accumulate, clip, step, log, checkpoint, resume mid-epoch with `skip_first_batches`. It knows nothing of
episodes: what a kind of training adds (validation and model selection for episodic training, a momentum encoder
for contrastive pretraining) comes in through `LoopCallback`s:

- `on_optimizer_step(loop)`: after every optimizer step (a momentum encoder updates here);
- `on_step_end(loop)`: after the step is counted and logged, before its checkpoint (validation, best model);
- `state_objects()`: objects with `state_dict` / `load_state_dict` checkpointed with the run.

What a checkpoint holds: weights, optimizer, scheduler, RNG states (`accelerator.save_state`), the loop's counter
(`LoopState`), the model's own training state (`model.training_state_objects()`, e.g. NTRENet's contrastive bank),
then the callbacks' state, registered in that order with `accelerator.register_for_checkpointing`.

Checkpoints are `checkpoints/step_XXXXXXXX/` (named by optimizer step, which is what `--resume-from-checkpoint` and
`--stop-after-steps` speak; Accelerate's automatic naming counts saves instead), written to a temporary folder and
renamed once every process wrote, so a run killed while saving never leaves a half checkpoint that `latest` would
pick; `checkpoints_total_limit` keeps the newest N.

Data order is reproducible and resumable: a shuffling sampler seeded by `(seed, epoch)` (`EpochShuffleSampler`)
gives every process the same permutation (Accelerate shards it), a dataset with `set_epoch` is told the epoch (the
episodic dataset seeds each item's augmentation by `(seed, epoch, index)`), and a resumed run skips the batches
already seen in its epoch, so on CPU a resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
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
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from hf_fss.evaluation.runner import needs_cpu_fallback
from hf_fss.training.arguments import LoopArguments

__all__ = [
    "EpochShuffleSampler",
    "LoopCallback",
    "LoopState",
    "TrainingLoop",
    "create_accelerator",
    "create_dataloader",
    "create_optimizer",
    "create_scheduler",
    "find_latest_checkpoint",
    "prepare_output_dir",
    "resolve_checkpoint",
]

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
class LoopState:
    """The loop's counter; checkpointed with `accelerator.register_for_checkpointing`."""

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


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoints/step_N` folder of `output_dir` with the largest N, or None."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(steps)[1] if steps else None


def resolve_checkpoint(args: LoopArguments) -> Path | None:
    """The checkpoint `--resume-from-checkpoint` names (`latest`: the newest of the run folder), or None."""
    if args.resume_from_checkpoint == "latest":
        checkpoint = find_latest_checkpoint(args.output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume-from-checkpoint latest: no checkpoint in {args.output_dir}/checkpoints")
        return checkpoint
    if args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise ValueError(f"--resume-from-checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder")
        return checkpoint
    return None


def prepare_output_dir(args: LoopArguments, accelerator: Accelerator) -> Path:
    """Create the run folder; refuse one holding another run unless resuming or `--overwrite-output-dir`."""
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


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
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


# ------------------------------------------------------------------------------------------------------- loop


class TrainingLoop:
    """
    `prepare(model, optimizer, dataloader)`, optionally `resume(checkpoint)`, then `run()`. Callbacks read the
    loop's attributes: `accelerator`, `args`, `model` (prepared; `unwrapped_model` for saving or evaluating),
    `state.global_step`, `max_steps`, `updates_per_epoch`, `output_dir`, `say(message)`.
    """

    def __init__(
        self, accelerator: Accelerator, args: LoopArguments, output_dir: Path, callbacks: Sequence[LoopCallback] = ()
    ):
        self.accelerator, self.args, self.output_dir = accelerator, args, Path(output_dir)
        self.callbacks = list(callbacks)
        self.state = LoopState()
        self.stopped = False
        self.progress = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataloader: DataLoader) -> None:
        """Wrap for the run's devices and processes; size the run; register what a checkpoint holds."""
        accelerator, args = self.accelerator, self.args
        self.dataset = dataloader.dataset
        self.model, self.optimizer, self.dataloader = accelerator.prepare(model, optimizer, dataloader)
        self.updates_per_epoch = math.ceil(len(self.dataloader) / args.gradient_accumulation_steps)
        self.max_steps = args.max_steps if args.max_steps is not None else args.epochs * self.updates_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.updates_per_epoch)
        scheduler = create_scheduler(self.optimizer, args, self.max_steps, accelerator.num_processes)
        self.lr_scheduler = accelerator.prepare(scheduler)
        model_state = getattr(self.unwrapped_model, "training_state_objects", dict)()
        callback_state = [obj for callback in self.callbacks for obj in callback.state_objects()]
        accelerator.register_for_checkpointing(self.state, *model_state.values(), *callback_state)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def resume(self, checkpoint: Path) -> None:
        # Weights, optimizer, scheduler, RNG states, the loop's counter, model and callback state.
        self.accelerator.load_state(str(checkpoint))
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.global_step}")

    def say(self, message: str) -> None:
        if self.accelerator.is_local_main_process:
            (self.progress.write if self.progress is not None else print)(message)

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
                    save_checkpoint(accelerator, self.output_dir, state.global_step, args.checkpoints_total_limit)
                if args.stop_after_steps is not None and state.global_step >= args.stop_after_steps:
                    self.stopped = True
                    break
                if state.global_step >= self.max_steps:
                    break
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
