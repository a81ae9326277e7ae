"""
Several models scored on one identical episode list, and paired statistics that tell a real difference from noise.

`compare_models` draws (or re-reads) one episode list per seed of the protocol, writes it once as JSON Lines with
its sha256 in the results, and evaluates every model on exactly those episodes with `evaluate_model` (same metric,
same protocol). Per model it records the metrics (mean and std over seeds), episodes per second, parameters and
peak memory, and every episode's pixel counts. `paired_test` compares two models episode by episode: the mean
per-episode IoU difference and the mIoU difference, each with a bootstrap confidence interval over episodes
(resampled within each seed), so a 0.8-point gain can be checked against the episode-sampling noise.

`main(argv)` is the command line of `scripts/compare.py`; it writes `comparison.json`, `comparison.md` (a Markdown
table) and `comparison.png` (per-class IoU bars per model) into `--output-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import itertools
import json
import math
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_fss.backbones.feature_cache import FeatureCache
from hf_fss.cli import POSITIVE_INT, SEED, Range, ScriptArgumentParser
from hf_fss.data.episodes import load_episodes_jsonl, make_test_episodes, save_episodes_jsonl
from hf_fss.evaluation.arguments import (
    add_arguments,
    checked_fold_convention,
    class_names_of,
    load_test_split,
    protocol_for,
)
from hf_fss.evaluation.cli import (
    _load_model_and_processor,
    add_runtime_arguments,
    add_scoring_arguments,
    run_command,
)
from hf_fss.evaluation.loop import combine_seed_runs, default_feature_cache_bytes, evaluate_model
from hf_fss.utils import check_model_path, set_num_threads
from hf_fss.utils.io import OutputLock, atomic_write_text, check_output_path, write_json_atomic
from hf_fss.utils.precision import check_precision

__all__ = ["compare_models", "episode_lists", "main", "paired_test"]


# ------------------------------------------------------------------------------------------------ episodes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def episode_lists(
    split: Any, classes: Sequence[int], shot: int, seeds: Sequence[int], num_episodes: int | None, folder: Path
) -> dict[int, dict[str, Any]]:
    """
    One episode list per seed, written once to `folder/episodes_seed{seed}.jsonl` and re-read (checked against the
    split, the classes and the shot) when that file exists, so every model and every later run use the same list.

    Returns:
        `{seed: {"path", "sha256", "episodes"}}`.

    Raises:
        ValueError: an existing file whose episodes do not fit (other classes, shot or count).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lists = {}
    for seed in seeds:
        path = folder / f"episodes_seed{seed}.jsonl"
        if path.exists():
            episodes = load_episodes_jsonl(path, split=split)
            problems = []
            if {len(e.supports) for e in episodes} != {shot}:
                problems.append(f"shots {sorted({len(e.supports) for e in episodes})} instead of {shot}")
            if not {e.class_id for e in episodes} <= set(classes):
                problems.append(f"classes {sorted({e.class_id for e in episodes} - set(classes))} outside the fold")
            if num_episodes is not None and len(episodes) != num_episodes:
                problems.append(f"{len(episodes)} episodes instead of {num_episodes}")
            if problems:
                raise ValueError(
                    f"{path} was written for another comparison ({'; '.join(problems)}): remove it or pick another "
                    "--output-dir"
                )
        else:
            episodes = make_test_episodes(split, classes, num_episodes, shot, seed)
            save_episodes_jsonl(episodes, path)
        lists[seed] = {"path": str(path), "sha256": _sha256(path), "episodes": episodes}
    return lists


# ------------------------------------------------------------------------------------------------ statistics


def _records_array(records: Sequence[Mapping[str, int]]) -> np.ndarray:
    return np.array([[r["class_id"], r["intersection"], r["union"]] for r in records], dtype=np.int64)


def _miou(classes: np.ndarray, inter: np.ndarray, union: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """mIoU (sum-over-episodes class IoU, mean over classes with a union) for each row of `weights` (counts)."""
    ids, position = np.unique(classes, return_inverse=True)
    weights = np.ones((1, len(classes))) if weights is None else weights
    onehot = np.zeros((len(classes), len(ids)))
    onehot[np.arange(len(classes)), position] = 1.0
    class_inter = (weights * inter) @ onehot
    class_union = (weights * union) @ onehot
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(class_union > 0, class_inter / class_union, np.nan)
    return np.nanmean(iou, axis=1)


def paired_test(
    runs_a: Mapping[int, Sequence[Mapping[str, int]]],
    runs_b: Mapping[int, Sequence[Mapping[str, int]]],
    *,
    num_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """
    Paired comparison of two models on the same episodes.

    Args:
        runs_a / runs_b: per seed, the episode records of `evaluate_model(..., episode_records=...)` (class id and
            foreground intersection / union pixel counts), in the same episode order for both models.
        num_bootstrap: bootstrap resamples; each resamples the episodes of every seed with replacement.
        confidence: level of the two-sided percentile intervals.
        seed: seed of the resampling.

    Returns:
        `episode_iou_difference` (mean over episodes with a non-empty union in both of IoU_a - IoU_b) and
        `miou_difference` (mIoU_a - mIoU_b, averaged over seeds), each with its `*_ci` interval; `a_better` /
        `b_better` / `ties` episode counts and `significant` (the mIoU interval excludes 0). Identical predictions
        give differences and intervals of exactly 0.

    Raises:
        ValueError: the runs do not cover the same seeds and episodes (class ids) in the same order.
    """
    if sorted(runs_a) != sorted(runs_b):
        raise ValueError(f"the runs cover different seeds: {sorted(runs_a)} and {sorted(runs_b)}")
    rng = np.random.default_rng(seed)
    alpha = (1.0 - confidence) / 2.0
    differences, miou_diffs, boot_episode, boot_miou = [], [], [], []
    for s in sorted(runs_a):
        a, b = _records_array(runs_a[s]), _records_array(runs_b[s])
        if a.shape != b.shape or not np.array_equal(a[:, 0], b[:, 0]):
            raise ValueError(
                f"seed {s}: the two runs are not on the same episodes (class ids differ or counts differ)"
            )
        both = (a[:, 2] > 0) & (b[:, 2] > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            diff = np.where(both, a[:, 1] / np.maximum(a[:, 2], 1) - b[:, 1] / np.maximum(b[:, 2], 1), 0.0)
        differences.append(diff[both])
        miou_diffs.append(float(_miou(a[:, 0], a[:, 1], a[:, 2])[0] - _miou(b[:, 0], b[:, 1], b[:, 2])[0]))
        n = len(a)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(num_bootstrap)])
        boot_miou.append(_miou(a[:, 0], a[:, 1], a[:, 2], counts) - _miou(b[:, 0], b[:, 1], b[:, 2], counts))
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_episode.append((counts * (diff * both)).sum(1) / (counts * both).sum(1))
    every = np.concatenate(differences)
    boot_miou_mean = np.mean(boot_miou, axis=0)
    boot_episode_mean = np.nanmean(boot_episode, axis=0)

    def interval(values: np.ndarray) -> list[float]:
        values = values[np.isfinite(values)]
        return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))] if values.size else [0, 0]

    miou_ci = interval(boot_miou_mean)
    return {
        "episodes": int(sum(len(r) for r in runs_a.values())),
        "paired_episodes": int(every.size),
        "episode_iou_difference": float(every.mean()) if every.size else 0.0,
        "episode_iou_difference_ci": interval(boot_episode_mean),
        "miou_difference": float(np.mean(miou_diffs)),
        "miou_difference_ci": miou_ci,
        "a_better": int((every > 0).sum()),
        "b_better": int((every < 0).sum()),
        "ties": int((every == 0).sum()),
        "significant": bool(miou_ci[0] > 0 or miou_ci[1] < 0),
        "confidence": confidence,
        "num_bootstrap": num_bootstrap,
    }


# ------------------------------------------------------------------------------------------------ one model


class PeakMemory:
    """
    Peak memory of a block, above its value when the block started: on CUDA `torch.cuda.max_memory_allocated`;
    elsewhere the process's resident memory (/proc/self/statm) sampled every 5 ms by a thread.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max allocated above start" if device.type == "cuda" else "CPU resident (sampled) above start"
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * 4096
        except (OSError, ValueError, IndexError):
            return 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self._start)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device)) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self._start)


def _score(model, processor, context: Mapping[str, Any], args: argparse.Namespace, seed: int, episodes, **kwargs):
    """`evaluate_model` on `episodes` of the prepared split and fold (kwargs: feature_cache, episode_records, ...)."""
    return evaluate_model(
        model,
        processor,
        context["split"],
        episodes,
        class_ids=context["fold"].novel,
        class_names=context["class_names"],
        protocol=context["protocol"],
        annotation=args.annotation,
        seed=seed,
        batch_size=args.batch_size,
        precision=args.dtype,
        channels_last=args.channels_last,
        **kwargs,
    )


def _warm_up(model, processor, context: Mapping[str, Any], args: argparse.Namespace) -> None:
    """One untimed batch of the first seed's episodes, without the feature cache: lazy initialisation, kernel
    selection and allocator growth are paid here, not by the timed run (the first of --models used to pay them:
    4.91 vs 18.94 episodes/s for the same model)."""
    seed, listed = next(iter(context["episodes"].items()))
    _score(model, processor, context, args, seed, listed["episodes"][: args.batch_size], description="warm-up")


def _release_memory(device: torch.device) -> None:
    """Free what earlier models left (garbage, CUDA's cached blocks, glibc's free lists), so every model's memory
    is measured from the same state whatever its position in --models."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _warm_up_process(name_or_path: str, context: Mapping[str, Any], args: argparse.Namespace) -> None:
    """Pay the process's one-time costs (imports, thread pools, first allocations) before any model is measured."""
    model, processor = _load_model_and_processor(name_or_path)
    _warm_up(model.to(context["device"]), processor, context, args)
    del model, processor
    _release_memory(context["device"])


def _evaluate_one(name_or_path: str, context: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Load one model and score it on every seed's episodes; metrics, records, speed, size and memory. Memory covers
    loading, the warm-up and the scoring; the time only the scoring, after the warm-up."""
    device = context["device"]
    _release_memory(device)
    with PeakMemory(device) as memory:
        model, processor = _load_model_and_processor(name_or_path)
        model.to(device)
        _warm_up(model, processor, context, args)
        cache_bytes = context["cache_bytes"]
        cache = FeatureCache(cache_bytes) if cache_bytes > 0 else None
        runs, records, seconds = [], {}, 0.0
        for seed, listed in context["episodes"].items():
            records[seed] = []
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = _score(
                model,
                processor,
                context,
                args,
                seed,
                listed["episodes"],
                description=f"{Path(name_or_path).name} seed {seed}",
                feature_cache=cache,
                episode_records=records[seed],
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
            runs.append(result)
    metrics = combine_seed_runs(runs)
    episodes = sum(len(listed["episodes"]) for listed in context["episodes"].values())
    return {
        "model": model.name_or_path,  # the folder taken for a run folder
        "model_type": model.config.model_type,
        "metrics": metrics,
        "records": records,
        "seconds": seconds,
        "episodes_per_second": episodes / seconds if seconds > 0 else math.inf,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_memory_bytes": memory.peak,
        "peak_memory_kind": memory.kind,
        "image_size": getattr(processor, "image_size", None),
    }


# ------------------------------------------------------------------------------------------------ outputs


def _names(models: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(models):
            raise ValueError(f"--names gives {len(names)} names for {len(models)} --models")
        if len(set(names)) != len(names):
            raise ValueError(f"--names must be distinct, got {list(names)}")
        return list(names)
    out, seen = [], {}
    for model in models:
        base = Path(model.rstrip("/")).name or model
        if Path(model).name in ("best", "final") and Path(model).parent.name:
            base = f"{Path(model).parent.name}/{Path(model).name}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    return out


def _pct(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown_table(comparison: Mapping[str, Any]) -> str:
    """The comparison as Markdown: one row per model (metrics, speed, size, memory, per-class IoU), then the paired
    tests."""
    results = comparison["results"]
    classes = list(next(iter(results.values()))["metrics"]["per_class_iou"])
    head = ["model", "mIoU", "FB-IoU", "precision", "episodes/s", "parameters", "peak memory (MiB)", *classes]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, result in results.items():
        m = result["metrics"]
        std = f" ± {_pct(m['miou_std'])}" if "miou_std" in m else ""
        row = [
            name,
            _pct(m["miou"]) + std,
            _pct(m["fbiou"]) + (f" ± {_pct(m['fbiou_std'])}" if "fbiou_std" in m else ""),
            _pct(m["precision"]),
            f"{result['episodes_per_second']:.2f}",
            f"{result['parameters'] / 1e6:.2f} M",
            f"{result['peak_memory_bytes'] / 2**20:.0f}",
            *(_pct(m["per_class_iou"].get(c)) for c in classes),
        ]
        lines.append("| " + " | ".join(row) + " |")
    setup = comparison["setup"]
    lines += [
        "",
        f"{setup['benchmark']} fold {setup['fold']}, {setup['shot']}-shot, protocol {setup['protocol']['name']}, "
        f"seeds {setup['seeds']}, {setup['episodes_per_seed']} episodes per seed, models in "
        f"{setup.get('dtype', 'float32')}{' channels_last' if setup.get('channels_last') else ''}; episode list sha256 "
        f"`{comparison['episode_hash']}`. mIoU, FB-IoU, precision and class IoU in %; ± is the std over seeds.",
    ]
    if comparison["paired"]:
        lines += [
            "",
            "| A vs B | mIoU A - B [CI] | episode IoU A - B [CI] | A better / B better / ties | significant |",
        ]
        lines.append("| --- | --- | --- | --- | --- |")
        for pair in comparison["paired"]:
            lo, hi = pair["miou_difference_ci"]
            elo, ehi = pair["episode_iou_difference_ci"]
            lines.append(
                f"| {pair['a']} vs {pair['b']} | {100 * pair['miou_difference']:+.2f} [{100 * lo:+.2f}, "
                f"{100 * hi:+.2f}] | {100 * pair['episode_iou_difference']:+.2f} [{100 * elo:+.2f}, {100 * ehi:+.2f}]"
                f" | {pair['a_better']} / {pair['b_better']} / {pair['ties']} | {'yes' if pair['significant'] else 'no'} |"
            )
        level = int(round(100 * comparison["paired"][0]["confidence"]))
        lines.append(f"\nIntervals: {level}% paired bootstrap over episodes (resampled within each seed).")
    return "\n".join(lines) + "\n"


def per_class_chart(comparison: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: per-class IoU (%) of every model, one group per class, mIoU as the last group."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    results = comparison["results"]
    classes = list(next(iter(results.values()))["metrics"]["per_class_iou"])
    groups = [*classes, "mIoU"]
    width = 0.8 / max(1, len(results))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(results)) / 2), 4.0))
    for index, (name, result) in enumerate(results.items()):
        metrics = result["metrics"]
        values = [metrics["per_class_iou"].get(c) for c in classes] + [metrics["miou"]]
        heights = [0.0 if v is None or math.isnan(v) else 100 * v for v in values]
        axis.bar(np.arange(len(groups)) + (index - (len(results) - 1) / 2) * width, heights, width, label=name)
    axis.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right")
    axis.set_ylabel("IoU (%)")
    setup = comparison["setup"]
    axis.set_title(f"{setup['benchmark']} fold {setup['fold']}, {setup['shot']}-shot ({setup['protocol']['name']})")
    axis.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ command line

_CONFIDENCE = Range(0, 1, low_open=True, high_open=True)


def build_parser() -> ScriptArgumentParser:
    parser = ScriptArgumentParser(
        prog="compare.py",
        description=(
            "Score several few-shot segmentation models on one identical episode list (per seed of the protocol) and "
            "write comparison.json, comparison.md and comparison.png, with paired bootstrap tests between them."
        ),
    )
    parser.add_argument("--models", nargs="+", required=True, help="save_pretrained folders or Hub model ids")
    parser.add_argument("--names", nargs="+", default=None, help="labels of the models (default: folder names)")
    add_arguments(parser)  # --dataset, --benchmark, --fold, --fold-convention, --shot, --synthetic-* (as evaluate.py)
    parser.add_argument("--split", default=None, help="split of the test episodes (default: as evaluate.py)")
    parser.add_argument(
        "--seeds", allowed=SEED, nargs="+", default=None, help="episode seeds (default: the protocol's)"
    )
    add_scoring_arguments(parser)  # --protocol, --num-episodes, --annotation, --batch-size
    parser.add_argument(
        "--num-bootstrap", allowed=POSITIVE_INT, default=2000, help="bootstrap resamples (default 2000)"
    )
    parser.add_argument("--confidence", allowed=_CONFIDENCE, default=0.95, help="confidence level (default 0.95)")
    add_runtime_arguments(parser, "every model")  # --num-threads, --feature-cache-mb, --cpu
    parser.add_argument(
        "--output-dir", default="comparison", help="where the episode lists and results go (default comparison/)"
    )
    return parser


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, data, fold, protocol, episode lists: what every model is scored with."""
    from hf_fss.data.loading import resolve_benchmark
    from hf_fss.evaluation.protocols import get_protocol

    if len(args.models) < 2:
        raise ValueError(
            f"compare.py needs at least two --models, got {len(args.models)}; score one model with evaluate.py"
        )
    for model in args.models:
        check_model_path(model)  # before any data is built
    benchmark = resolve_benchmark(args.dataset, args.benchmark)  # a contradicting --benchmark is refused
    convention = checked_fold_convention(args.fold_convention, benchmark, args.fold)
    check_precision(args.dtype, "cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    for model in dict.fromkeys(args.models):
        # Every model loads (config.json, weights, preprocessor_config.json) before the episode lists are written:
        # a broken last model must not fail after the others ran and left files behind. Loaded again when scored.
        _load_model_and_processor(model)
    split_name, split, fold = load_test_split(args, benchmark, convention)
    base = get_protocol(args.protocol, benchmark=benchmark)
    seeds = args.seeds or list(base.seeds)
    num_episodes = args.num_episodes if args.num_episodes is not None else base.num_episodes
    protocol = protocol_for(base, benchmark, num_episodes=num_episodes, seeds=seeds, fold_convention=convention)
    episodes = episode_lists(split, fold.novel, args.shot, seeds, num_episodes, Path(args.output_dir))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    cache_bytes = (
        default_feature_cache_bytes(device) if args.feature_cache_mb is None else int(args.feature_cache_mb * 2**20)
    )
    return {
        "benchmark": benchmark,
        "split_name": split_name,
        "split": split,
        "fold": fold,
        "protocol": protocol,
        "seeds": seeds,
        "episodes": episodes,
        "class_names": class_names_of(split),
        "device": device,
        "cache_bytes": cache_bytes,
    }


def compare_models(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `scripts/compare.py` does after parsing; returns the comparison dict (also written to disk)."""
    names = _names(args.models, args.names)
    set_num_threads(args.num_threads)
    context = _prepare(args)
    results = {}
    _warm_up_process(args.models[0], context, args)
    for name, model in tqdm(list(zip(names, args.models)), desc="models", dynamic_ncols=True):
        results[name] = _evaluate_one(model, context, args)
        m = results[name]["metrics"]
        tqdm.write(f"{name}: mIoU {_pct(m['miou'])}  FB-IoU {_pct(m['fbiou'])}  "
                   f"{results[name]['episodes_per_second']:.2f} episodes/s")  # fmt: skip
    paired = []
    for a, b in itertools.combinations(names, 2):
        test = paired_test(
            results[a]["records"], results[b]["records"], num_bootstrap=args.num_bootstrap, confidence=args.confidence
        )
        paired.append({"a": a, "b": b, **test})
    hashes = [context["episodes"][s]["sha256"] for s in context["seeds"]]
    comparison = {
        "episode_hash": hashlib.sha256("".join(hashes).encode()).hexdigest(),
        "episode_files": {
            str(s): {k: v for k, v in context["episodes"][s].items() if k != "episodes"} for s in context["seeds"]
        },  # fmt: skip
        "setup": {
            "dataset": args.dataset,
            "benchmark": context["benchmark"],
            "split": context["split_name"],
            "fold": args.fold,
            "shot": args.shot,
            "annotation": args.annotation,
            "seeds": context["seeds"],
            "episodes_per_seed": len(next(iter(context["episodes"].values()))["episodes"]),
            "protocol": context["protocol"].to_dict(),
            "device": str(context["device"]),
            "dtype": args.dtype,
            "channels_last": args.channels_last,
            "batch_size": args.batch_size,
        },
        "results": {name: {k: v for k, v in r.items() if k != "records"} for name, r in results.items()},
        "paired": paired,
    }
    out = Path(args.output_dir)
    write_json_atomic(comparison, out / "comparison.json")
    atomic_write_text(out / "comparison.md", markdown_table(comparison))
    per_class_chart(comparison, out / "comparison.png")
    records = {name: {str(s): rec for s, rec in r["records"].items()} for name, r in results.items()}
    atomic_write_text(out / "episode_records.json", json.dumps(records))  # per-episode counts: redo the tests
    return comparison


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scripts/compare.py`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    status, comparison = run_command(parser.prog, _checked_compare, parser, args)
    if status == 0:
        print(markdown_table(comparison))
        print(f"-> {Path(args.output_dir) / 'comparison.json'}, comparison.md, comparison.png")
    return status


def _checked_compare(parser: ScriptArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    parser.check_ranges(args)
    check_output_path(args.output_dir, "--output-dir")  # before any work: a file there, an unwritable place
    # Two comparisons into one folder would mix episode lists and results: the second is refused naming the first.
    with OutputLock(args.output_dir):
        return compare_models(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
