"""
The results of a model card and the text helpers the card shares: what a `metrics.json` says about its episode
setting, its `model-index` metadata (`EvalResult`, task `image-segmentation`, metrics mIoU / FB-IoU / precision in
percent) and its results section (tables of metrics, per-class IoU and setting), plus the names, lookups and
Markdown tables the rest of the card (`model_card.py`) uses. Only what is known is shown: a value that is missing
or not finite is left out (a class without episode reads "undefined"), never filled with a placeholder.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult

_BENCHMARK_NAMES = {
    "pascal5i": "PASCAL-5i",
    "coco20i": "COCO-20i",
    "fss1000": "FSS-1000",
    "folder": "a custom image folder",
    "synthetic": "hf_fss synthetic benchmark",
}
# Class splits named instead of "fold N" in a card: a single split is not fold 0 of a folded benchmark.
_SPLIT_NAMES = {"canet_40_20_20": "40 / 20 / 20 class split (CANet's setting)"}


def _split_name(fold_convention: Any) -> str | None:
    return _SPLIT_NAMES.get(fold_convention) if isinstance(fold_convention, str) else None


# Keys of the training record that have a meaning of their own in the card (the rest is shown as it is).
_TRAINING_ALIASES = {
    "benchmark": ("benchmark",),
    "dataset": ("dataset", "dataset_name", "dataset_id"),
    "fold": ("fold",),
    "shot": ("shot", "train_shot"),
    "converted_from": ("converted_from", "original_checkpoint"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------- text helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _percent(value: float) -> float:
    return round(100.0 * float(value), 2)


def _format_value(value: Any) -> str:
    """Plain text for a table cell."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "undefined"
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items() if v is not None)
    return str(value)


def _cell(value: Any) -> str:
    return _format_value(value).replace("|", "\\|").replace("\n", " ")


def _flatten(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if value is None or (isinstance(value, (list, tuple, Mapping, str)) and len(value) == 0):
            continue
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, prefix=f"{name}."))
        else:
            rows.append((name, value))
    return rows


def training_schedule(max_steps: int, steps_per_epoch: int) -> str:
    """
    "120 steps = 1.79 epochs of 67 steps": the schedule as the training log and the card both state it (the last
    epoch may be partial, so the epochs are a fraction, never the loop's rounded-up count).
    """
    return f"{max_steps} steps = {max_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps"


def _training_rows(training: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The run record as table rows; `max_steps`, `epochs` and `steps_per_epoch` as one `schedule` row."""
    rows = _flatten(training)
    max_steps, per_epoch = training.get("max_steps"), training.get("steps_per_epoch")
    if not (_is_number(max_steps) and _is_number(per_epoch) and per_epoch > 0):
        return rows
    at = next(i for i, (k, _) in enumerate(rows) if k == "max_steps")
    rows = [(k, v) for k, v in rows if k not in ("max_steps", "epochs", "steps_per_epoch")]
    return [*rows[:at], ("schedule", training_schedule(max_steps, per_epoch)), *rows[at:]]


def _table(rows: Sequence[tuple[Any, Any]], header: tuple[str, str]) -> str | None:
    rows = [(k, v) for k, v in rows if v is not None]
    if not rows:
        return None
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines.extend(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows)
    return "\n".join(lines)


def _lookup(record: Mapping[str, Any] | None, name: str) -> Any:
    if not record:
        return None
    for key in _TRAINING_ALIASES.get(name, (name,)):
        value = record.get(key)
        if value is not None and value != "":
            return value
    return None


def _benchmark_key(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        from ..data.folds import normalize_benchmark_name

        return normalize_benchmark_name(value)
    except (ImportError, ValueError):
        return None


def _looks_like_hub_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_HUB_ID.match(value)) and not os.path.exists(value)


# -------------------------------------------------------------------------------------------------- results


def _evaluation(metrics: Mapping[str, Any], training: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a metrics.json says about the episode setting: benchmark, fold, shot, dataset, protocol."""
    protocol = metrics.get("protocol") if isinstance(metrics.get("protocol"), Mapping) else {}
    benchmark = _benchmark_key(metrics.get("benchmark")) or _benchmark_key(protocol.get("benchmark"))
    dataset = metrics.get("dataset")
    fold = metrics.get("fold")
    shot = metrics.get("shot")
    annotation = metrics.get("annotation")
    # Fold and dataset are the training run's when the evaluation does not name them (a model is tested on the novel
    # classes of the fold it was trained on); the shot is never borrowed, as it may differ between the two.
    if benchmark is None:
        benchmark = _benchmark_key(_lookup(training, "benchmark"))
    if fold is None and benchmark is not None and benchmark == _benchmark_key(_lookup(training, "benchmark")):
        fold = _lookup(training, "fold")
    if dataset is None and benchmark is not None and benchmark == _benchmark_key(_lookup(training, "benchmark")):
        dataset = _lookup(training, "dataset")
    return {
        "benchmark": benchmark,
        "dataset": dataset,
        "fold": fold,
        "shot": shot,
        "annotation": annotation,
        "protocol": protocol,
        "precision": _inference_precision(metrics),
    }


def _inference_precision(metrics: Mapping[str, Any]) -> str | None:
    """
    "bfloat16 autocast, channels_last" from a metrics.json's `dtype` / `channels_last` (evaluate.py's and train.py's
    `--dtype` / `--channels-last`, docs/precision.md); None for float32 without channels_last, or when not recorded.
    """
    dtype, channels_last = metrics.get("dtype"), metrics.get("channels_last") is True
    parts = [f"{dtype} autocast"] if isinstance(dtype, str) and dtype not in ("float32", "") else []
    return ", ".join(parts + (["channels_last"] if channels_last else [])) or None


def _result_title(setting: Mapping[str, Any]) -> str:
    benchmark = setting["benchmark"]
    parts = [_BENCHMARK_NAMES.get(benchmark, benchmark) if benchmark else "Few-shot segmentation benchmark"]
    if _split_name(setting["protocol"].get("fold_convention")):
        parts.append(_split_name(setting["protocol"]["fold_convention"]))
    elif setting["fold"] is not None:
        parts.append(f"fold {setting['fold']}")
    title = " ".join(parts)
    details = []
    if setting["shot"] is not None:
        details.append(f"{setting['shot']}-shot")
    if setting["annotation"] not in (None, "mask"):
        details.append(f"{setting['annotation']} supports")
    if setting["precision"]:
        details.append(setting["precision"])
    return f"{title} ({', '.join(details)})" if details else title


def _dataset_config(setting: Mapping[str, Any]) -> str | None:
    """`fold0-1shot-pfenet`: the Hub groups results by dataset type and config, so each setting needs its own."""
    parts = []
    if _split_name(setting["protocol"].get("fold_convention")):
        parts.append(str(setting["protocol"]["fold_convention"]))
    elif setting["fold"] is not None:
        parts.append(f"fold{setting['fold']}")
    if setting["shot"] is not None:
        parts.append(f"{setting['shot']}shot")
    if setting["annotation"] not in (None, "mask"):
        parts.append(str(setting["annotation"]))
    if setting["protocol"].get("name"):
        parts.append(str(setting["protocol"]["name"]))
    if setting["precision"]:  # a reduced-precision result is grouped apart from the float32 one
        parts.append(setting["precision"].replace(" autocast", "").replace(", ", "-"))
    return "-".join(parts) or None


def _eval_results(metrics: Mapping[str, Any], setting: Mapping[str, Any]) -> list[EvalResult]:
    benchmark = setting["benchmark"]
    dataset = setting["dataset"]
    dataset_type = dataset if _looks_like_hub_id(dataset) else (benchmark or "few-shot-segmentation")
    args = {
        "fold": setting["fold"],
        "shot": setting["shot"],
        "annotation": setting["annotation"],
        "protocol": setting["protocol"].get("name"),
        "num_episodes": metrics.get("num_episodes"),
        "seed": metrics.get("seed"),
        "dtype": metrics.get("dtype") if setting["precision"] else None,
        "channels_last": True if setting["precision"] and metrics.get("channels_last") is True else None,
    }
    args = {k: v for k, v in args.items() if v is not None and not isinstance(v, (list, Mapping))}
    common = {
        "task_type": "image-segmentation",
        "task_name": "Few-shot semantic segmentation",
        "dataset_type": dataset_type,
        "dataset_name": _result_title(setting),
        "dataset_config": _dataset_config(setting),
        "dataset_split": metrics.get("split"),
        "dataset_args": args or None,
    }
    results = []
    for key, metric_type, metric_name in (
        ("miou", "mean_iou", "mIoU"),
        ("fbiou", "fb_iou", "FB-IoU"),
        ("precision", "precision", "Precision"),
    ):
        value = metrics.get(key)
        if _finite(value):
            results.append(
                EvalResult(metric_type=metric_type, metric_name=metric_name, metric_value=_percent(value), **common)
            )
    return results


def _results_section(metrics: Mapping[str, Any], setting: Mapping[str, Any]) -> dict[str, Any] | None:
    rows = []
    for key, name in (("miou", "mIoU"), ("fbiou", "FB-IoU"), ("precision", "foreground precision")):
        value = metrics.get(key)
        if not _finite(value):
            continue
        text = f"{_percent(value):.2f}"
        std = metrics.get(f"{key}_std")
        if _finite(std):
            text += f" ± {_percent(std):.2f}"
        rows.append((name, text))
    if not rows:
        return None
    per_class = metrics.get("per_class_iou") or {}
    per_class_std = metrics.get("per_class_iou_std") or {}
    class_rows = []
    for name, value in per_class.items():
        if _finite(value):
            text = f"{_percent(value):.2f}"
            if _finite(per_class_std.get(name)):
                text += f" ± {_percent(per_class_std[name]):.2f}"
        else:
            text = "undefined (no episode)"
        class_rows.append((name, text))
    setting_rows = [
        ("benchmark", _BENCHMARK_NAMES.get(setting["benchmark"], setting["benchmark"])),
        ("dataset", setting["dataset"]),
        ("fold", setting["fold"]),
        ("shot", setting["shot"]),
        ("support annotation", setting["annotation"]),
        ("inference precision", setting["precision"]),
        ("episodes", metrics.get("num_episodes")),
        ("seed", metrics.get("seed")),
        ("seeds", metrics.get("seeds") if metrics.get("num_runs") else None),
        ("runs", metrics.get("num_runs")),
    ]
    setting_rows.extend((f"protocol.{k}", v) for k, v in _flatten(setting["protocol"]))
    return {
        "title": _result_title(setting),
        "table": _table(rows, ("metric", "value (%)")),
        "per_class_table": _table(class_rows, ("class", "IoU (%)")),
        "num_classes": len(class_rows),
        "setting_table": _table(setting_rows, ("setting", "value")),
    }


def _as_metrics_list(metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    if metrics is None:
        return []
    if isinstance(metrics, Mapping):
        return [metrics]
    if isinstance(metrics, Sequence) and not isinstance(metrics, (str, bytes)):
        items = list(metrics)
        if all(isinstance(m, Mapping) for m in items):
            return items
    raise ValueError(f"metrics must be a dict (a metrics.json) or a list of them, got {type(metrics).__name__}")


def _results(
    metrics_list: Sequence[Mapping[str, Any]], training: Mapping[str, Any] | None
) -> tuple[list[EvalResult], list[dict[str, Any]]]:
    """The `model-index` results and the card's results sections of every metrics.json given to a card."""
    eval_results: list[EvalResult] = []
    sections = []
    for metrics in metrics_list:
        setting = _evaluation(metrics, training)
        eval_results.extend(_eval_results(metrics, setting))
        section = _results_section(metrics, setting)
        if section is not None:
            sections.append(section)
    return eval_results, sections
