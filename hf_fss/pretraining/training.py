"""
The pretraining run of `scripts/pretrain_prior.py` on the generic loop (`hf_fss.training.loop`): the momentum
update of the key encoder and the logging of the positives' accuracy come in through a `LoopCallback`, the queues
are the model's training state (checkpointed and resumed with the run), MoCo's per-epoch cosine schedule replaces
the loop's. At the end the key encoder's backbone is exported into `--output-dir` (`hf_fss.pretraining.export`)
with a card, optionally probed (`hf_fss.pretraining.probe`) and pushed to the Hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from hf_fss.cli import command_prog, os_error_line
from hf_fss.training.arguments import LoopArguments, apply_num_threads, arguments_dict, parse_groups
from hf_fss.training.loop import (
    LoopCallback,
    NonFiniteError,
    TrainingLoop,
    create_accelerator,
    create_dataloader,
    create_optimizer,
    prepare_output_dir,
    resolve_checkpoint,
    scalar_config,
)
from hf_fss.utils.io import check_output_path

from .arguments import PRETRAIN_DESCRIPTION, PRETRAIN_GROUPS, PRETRAIN_QUICKSTART, PretrainingArguments
from .data import PretrainingImages, load_unlabeled_images
from .export import backbone_description, export_moco_checkpoint, export_prior_extractor
from .modeling import GlobalLocalContrastiveModel, PretrainingConfig
from .superpixels import SuperpixelCache, SuperpixelSettings
from .views import ContrastiveViews

__all__ = ["MomentumCallback", "main", "parse_pretraining_args", "pretrain", "render_card"]

logger = logging.getLogger(__name__)
UPLOADED = ("model.safetensors", "config.json", "README.md", "probe.json", "run.json")


class MomentumCallback(LoopCallback):
    """
    After every optimizer step: the key encoder's momentum update (MoCo updates it before computing the next keys,
    which is the same order); every `logging_steps`, the positives' top-1 accuracy averaged over processes. With
    `digest_file`, a hash of each queue after every step (the 2-process test compares them across processes).
    """

    def __init__(self, digest_file: str | None = None):
        self.running: dict[str, list[torch.Tensor]] = {}
        self.digest_file, self.digests = digest_file, []

    def on_optimizer_step(self, loop: TrainingLoop) -> None:
        model = loop.unwrapped_model
        model.momentum_update()
        for name, value in model.last_metrics.items():
            self.running.setdefault(name, []).append(value.detach().float())
        if self.digest_file is not None:
            self.digests.append(
                {name: _digest(queue) for name, queue in sorted(model.training_state_objects().items())}
            )

    def on_step_end(self, loop: TrainingLoop) -> None:
        step = loop.state.global_step
        if self.running and (step % loop.args.logging_steps == 0 or step == loop.max_steps):
            means = {k: torch.stack(v).mean() for k, v in self.running.items()}
            logs = {f"train/{k}": loop.accelerator.reduce(v, reduction="mean").item() for k, v in means.items()}
            self.running.clear()
            loop.accelerator.log(logs, step=step)
        if self.digest_file is not None:
            path = Path(f"{self.digest_file}.{loop.accelerator.process_index}.json")
            path.write_text(json.dumps(self.digests))


def _digest(queue) -> str:
    state = queue.keys.detach().cpu().contiguous()
    return hashlib.sha1(state.numpy().tobytes() + str(queue.pointer).encode()).hexdigest()


def _cosine_per_epoch(loop: TrainingLoop) -> None:
    """MoCo's `lr * 0.5 * (1 + cos(pi * epoch / epochs))`, set at the start of each epoch (no warm-up)."""
    from torch.optim.lr_scheduler import LambdaLR

    processes, per_epoch, epochs = loop.accelerator.num_processes, loop.updates_per_epoch, loop.num_epochs

    def factor(scheduler_step: int) -> float:
        # A prepared scheduler is stepped once per process per optimizer step (see create_scheduler).
        epoch = (scheduler_step // processes) // per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))

    loop.lr_scheduler = loop.accelerator.prepare(LambdaLR(loop.optimizer, factor))


def build_model(loop_args: LoopArguments, args: PretrainingArguments, num_processes: int):
    config = PretrainingConfig(
        backbone_kwargs=args.backbone_kwargs,
        head_hidden_dim=args.head_hidden_dim,
        embedding_dim=args.embedding_dim,
        queue_size=args.queue_size,
        patch_queue_size=args.patch_queue_size,
        temperature=args.temperature,
        momentum=args.key_momentum,
        global_weight=args.global_weight,
        local_weight=args.local_weight,
        local_form=args.local_form,
        symmetric=args.symmetric,
        bn_splits=args.bn_splits or (8 if num_processes == 1 else 1),
        seed=loop_args.seed,
    )
    if loop_args.batch_size % config.bn_splits:
        raise ValueError(f"--batch-size {loop_args.batch_size} is not divisible by bn_splits={config.bn_splits}")
    model = GlobalLocalContrastiveModel(config)
    if args.init_weights:
        model.encoder_q.backbone.load_weights(args.init_weights)
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    return model


def build_dataset(loop_args: LoopArguments, args: PretrainingArguments) -> tuple[PretrainingImages, list[str]]:
    images, splits = load_unlabeled_images(args.dataset, args.include_eval_images, **args.synthetic_kwargs())
    cache = None
    if args.uses_local:
        settings = SuperpixelSettings(
            method=args.superpixels,
            slic_segments=args.slic_segments,
            slic_compactness=args.slic_compactness,
            slic_sigma=args.slic_sigma,
            felzenszwalb_scale=args.felzenszwalb_scale,
            felzenszwalb_sigma=args.felzenszwalb_sigma,
            felzenszwalb_min_size=args.felzenszwalb_min_size,
            min_area_fraction=args.superpixel_min_area,
        )
        cache_dir = args.superpixel_cache_dir or str(Path(loop_args.output_dir) / "superpixels")
        cache = SuperpixelCache(settings, cache_dir=cache_dir)
    views = ContrastiveViews(
        size=args.image_size,
        local_form=args.local_form if args.uses_local else None,
        patch_size=args.patch_size,
        min_area_fraction=args.superpixel_min_area,
    )
    return PretrainingImages(images, views, cache, seed=loop_args.seed), splits


def resume_settings(args: PretrainingArguments) -> dict[str, Any]:
    """What a resumed run may not change: everything of the pretraining group but the export / probe / debug flags."""
    free = {"config", "export_encoder", "export_moco", "probe", "probe_fold", "probe_train_images"}
    free |= {"probe_test_images", "queue_digest_file", "superpixel_cache_dir"}
    return {k: v for k, v in arguments_dict(args).items() if k not in free}


def pretrain(loop_args: LoopArguments, args: PretrainingArguments) -> dict[str, Any]:
    """Run the pretraining described by the two groups; returns the run record (also `<output_dir>/run.json`)."""
    started = time.time()
    check_output_path(loop_args.output_dir, "--output-dir")  # before any work: a file there, a read-only folder
    accelerator = create_accelerator(loop_args)
    held = contextlib.ExitStack()  # the output folder's lock, released however the run ends
    try:
        set_seed(loop_args.seed)  # identical initial weights and queues on every process
        dataset, splits = build_dataset(loop_args, args)
        global_batch = loop_args.batch_size * accelerator.num_processes * loop_args.gradient_accumulation_steps
        loop_args.learning_rate = args.base_learning_rate * global_batch / 256  # MoCo's linear scaling rule
        if len(dataset) // loop_args.batch_size < accelerator.num_processes:
            raise ValueError(f"{len(dataset)} images do not fill one batch of {loop_args.batch_size} per process")
        model = build_model(loop_args, args, accelerator.num_processes)
        checkpoint = resolve_checkpoint(loop_args, say=accelerator.print)
        output_dir = prepare_output_dir(loop_args, accelerator, held)
        callback = MomentumCallback(args.queue_digest_file)
        loop = TrainingLoop(accelerator, loop_args, output_dir, [callback], settings=resume_settings(args))
        loop.prepare(model, create_optimizer(model, loop_args), create_dataloader(dataset, loop_args))
        if args.lr_schedule == "cosine_epoch":
            _cosine_per_epoch(loop)
        if checkpoint is not None:
            loop.resume(checkpoint)
        record = _record(loop_args, args, loop, len(dataset), splits, global_batch)
        if accelerator.log_with:
            accelerator.init_trackers(output_dir.name or "hf_fss", config=scalar_config(record["arguments"]))
        first_step, training_started = loop.state.global_step, time.time()
        loop.run()
        seconds = time.time() - training_started
        record.update(steps=loop.state.global_step, training_seconds=round(seconds, 2))
        record["images_per_second"] = round(
            (loop.state.global_step - first_step) * global_batch / max(seconds, 1e-9), 2
        )
        if loop.stopped:
            accelerator.print(f"stopped after step {loop.state.global_step} (--stop-after-steps); nothing exported")
            return record
        return _finish(loop, loop_args, args, record, started)
    finally:
        held.close()
        accelerator.end_training()


def _record(loop_args, args, loop: TrainingLoop, num_images: int, splits: list[str], global_batch: int) -> dict:
    name, kwargs = backbone_description(loop.unwrapped_model)
    return {
        "dataset": args.dataset,
        "splits": splits,
        "include_eval_images": args.include_eval_images,
        "num_images": num_images,
        "num_processes": loop.accelerator.num_processes,
        "distributed_type": str(loop.accelerator.distributed_type.value),
        "batch_size_per_process": loop_args.batch_size,
        "gradient_accumulation_steps": loop_args.gradient_accumulation_steps,
        "global_batch_size": global_batch,
        "learning_rate": loop_args.learning_rate,
        "max_steps": loop.max_steps,
        "epochs": loop.num_epochs,
        "backbone": name,
        "backbone_kwargs": kwargs,
        "model": loop.unwrapped_model.config.to_dict(),
        "arguments": arguments_dict(loop_args, args),
    }


def _finish(loop: TrainingLoop, loop_args, args: PretrainingArguments, record: dict, started: float) -> dict:
    accelerator, output_dir = loop.accelerator, loop.output_dir
    loop.check_finite("the exported prior extractor")
    model = loop.unwrapped_model
    if accelerator.is_main_process:
        export_prior_extractor(model, output_dir, encoder=args.export_encoder, training=record)
        if args.export_moco:
            export_moco_checkpoint(model, args.export_moco, epoch=loop.num_epochs)
        if args.probe:
            from .probe import run_probe

            record["probe"] = run_probe(output_dir, args, seed=loop_args.seed)
            (output_dir / "probe.json").write_text(json.dumps(record["probe"], indent=2) + "\n")
        record["wall_time_s"] = round(time.time() - started, 1)
        export_prior_extractor(
            model, output_dir, encoder=args.export_encoder, training=record, card=render_card(record)
        )
        (output_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if loop_args.push_to_hub:
            push_prior_extractor(output_dir, loop_args.push_to_hub)
            accelerator.print(f"pushed {output_dir} to https://huggingface.co/{loop_args.push_to_hub}")
        _print_summary(record, output_dir)
    accelerator.wait_for_everyone()
    return record


def push_prior_extractor(folder: Path, repo_id: str) -> None:
    """Upload the exported files (safetensors, config, card, probe and run records; never a pickle) to `repo_id`."""
    from huggingface_hub import HfApi

    from hf_fss.hub.upload import HubUploadError, describe_hub_error

    if repo_id.count("/") != 1:
        raise ValueError(f"--push-to-hub must be 'org/name', got {repo_id!r}")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            allow_patterns=[name for name in UPLOADED if (folder / name).is_file()],
            commit_message="Upload a QGNet prior extractor pretrained with hf_fss",
        )
    except Exception as err:
        reason = describe_hub_error(err, repo_id)
        if reason is None:
            raise
        raise HubUploadError(f"upload of {folder} to {repo_id} failed: {reason}") from err


def _print_summary(record: dict, output_dir: Path) -> None:
    lines = [
        f"prior extractor | {record['dataset']} ({', '.join(record['splits'])}, {record['num_images']} images) | "
        f"{record['steps']} steps x {record['global_batch_size']} images ({record['num_processes']} process(es)) | "
        f"{record['images_per_second']} images/s | {record['wall_time_s']:.0f} s"
    ]
    if "probe" in record:
        lines.append(format_probe(record["probe"]))
    lines.append(f"  exported to {output_dir} (load with DilatedResNet(...).load_weights({str(output_dir)!r}))")
    print("\n".join(lines), flush=True)


def format_probe(probe: dict) -> str:
    header = "  threshold              " + " ".join(f"{t:5.1f}" for t in probe["thresholds"])
    lines = [f"  probe on {probe['description']}", header]
    for name in ("pretrained", "random"):
        result = probe[name]
        lines.append(f"  recall    {name:<12} " + " ".join(f"{100 * v:5.1f}" for v in result["recall"]))
        lines.append(f"  precision {name:<12} " + " ".join(f"{100 * v:5.1f}" for v in result["precision"]))
    lines.append(
        f"  k-NN accuracy on {probe['num_classes']} base classes: pretrained {100 * probe['pretrained']['knn_accuracy']:.1f}"
        f" vs random {100 * probe['random']['knn_accuracy']:.1f} (chance {100 / probe['num_classes']:.1f})"
    )
    return "\n".join(lines)


def render_card(record: dict) -> str:
    from .card import render_prior_card

    return render_prior_card(record)


def parse_pretraining_args(argv=None) -> tuple[LoopArguments, PretrainingArguments]:
    """`(loop_args, pretraining_args)`; no experiment-selecting flag = the packaged quickstart recipe."""
    loop_args, args = parse_groups(
        argv, PRETRAIN_GROUPS, PRETRAIN_QUICKSTART, prog="pretrain_prior.py", description=PRETRAIN_DESCRIPTION
    )
    if loop_args.output_dir is None:
        loop_args.output_dir = args.default_output_dir()
    return loop_args, args


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/pretrain_prior.py`: bad input is one line on stderr and exit status 2."""
    import sys

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        logging.getLogger("hf_fss").setLevel(logging.INFO)
    try:
        loop_args, args = parse_pretraining_args(argv)
        apply_num_threads(loop_args, argv)
        pretrain(loop_args, args)
    except OSError as err:  # a full disk, a folder made read-only mid-run: what was saved before stays intact
        print(
            f"{command_prog('pretrain_prior.py')}: error: {os_error_line(err) if err.errno else err}", file=sys.stderr
        )
        return 2
    except ValueError as err:
        print(f"{command_prog('pretrain_prior.py')}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"{command_prog('pretrain_prior.py')}: error: {err}", file=sys.stderr)
        return 1
    return 0
