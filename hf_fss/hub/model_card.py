"""
Model cards rendered from a model's real configuration, evaluation results and training record, and the folder
writer that saves weights, configs and card together.

The card of a method is its Jinja template `hf_fss/model_cards/<model_type>.md` (package data, found with
`importlib.resources`, so a wheel install has it), rendered with `huggingface_hub.ModelCard.from_template`.
Only what is known goes into a card: a field without a value (no metrics yet, an unknown fold) is left out, never
filled with a placeholder. Evaluation results become `model-index` metadata (`EvalResult`, task
`image-segmentation`, metrics mIoU / FB-IoU / precision in percent) so that the Hub shows them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..differences import read_differences
from ..utils.io import give_plain_file_modes, make_staging_dir, remove_stale_staging, replace_folder

__all__ = [
    "CARD_MARKER",
    "MANAGED_FILES",
    "find_model_card_template",
    "model_card_templates_dir",
    "render_model_card",
    "save_pretrained_with_card",
]

CARD_MARKER = "<!-- hf_fss:generated-card"
"""First characters of the comment every rendered card carries. `push_to_hub` re-renders a card that still holds it
(so that the loading snippet names the Hub repo); delete that line from a README to keep hand edits."""

# Files `save_pretrained_with_card` owns in a model folder: a new save replaces all of them, so that a stale
# metrics.json or shard never describes new weights. Anything else in the folder is carried over untouched.
MANAGED_FILES = ("config.json", "preprocessor_config.json", "README.md", "metrics.json", "training.json")
_MANAGED_PATTERNS = (
    re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors"),
    re.compile(r"model\.safetensors\.index\.json"),
)

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


_BACKBONE_NAMES = {
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "vgg16_bn": "VGG-16-BN",
    "vgg16_dilated": "dilated VGG-16",
}
_METHOD_NAMES = {
    "ntrenet": "NTRENet",
    "qgnet": "QGNet",
    "crcnet": "CRCNet",
    "smcp": "SMCP",
    "cosine_prior": "Cosine prior",
}
# Keys of the training record that have a meaning of their own in the card (the rest is shown as it is).
_TRAINING_ALIASES = {
    "benchmark": ("benchmark",),
    "dataset": ("dataset", "dataset_name", "dataset_id"),
    "fold": ("fold",),
    "shot": ("shot", "train_shot"),
    "converted_from": ("converted_from", "original_checkpoint"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------------------ templates


def model_card_templates_dir() -> Path:
    """
    The folder holding the model-card templates: `$HF_FSS_MODEL_CARDS` when set (a user's own templates), else the
    package's `hf_fss/model_cards` (package data, present in a checkout, an editable and a wheel install).
    """
    candidates = []
    if os.environ.get("HF_FSS_MODEL_CARDS"):
        candidates.append(Path(os.environ["HF_FSS_MODEL_CARDS"]))
    candidates.append(Path(str(resources.files("hf_fss") / "model_cards")))
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.md")):
            return candidate
    raise FileNotFoundError(
        "hf_fss model-card templates not found; looked in " + ", ".join(str(c) for c in candidates) + ". Set "
        "HF_FSS_MODEL_CARDS to a folder of <model_type>.md templates."
    )


def find_model_card_template(model_type: str) -> Path:
    """The template of a method, `hf_fss/model_cards/<model_type>.md`."""
    folder = model_card_templates_dir()
    path = folder / f"{model_type}.md"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.md"))
        raise ValueError(f"no model-card template for model_type={model_type!r} in {folder}; templates: {available}")
    return path


# -------------------------------------------------------------------------------------------------- helpers


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


def _config_fields(config) -> list[tuple[str, Any]]:
    """The hf_fss fields of a config (those of `FewShotSegmentationConfig` and of the method), in declaration order."""
    from transformers import PreTrainedConfig

    base = (
        {f.name for f in dataclasses.fields(PreTrainedConfig)} if dataclasses.is_dataclass(PreTrainedConfig) else set()
    )
    if dataclasses.is_dataclass(config):
        names = [f.name for f in dataclasses.fields(config) if f.name not in base]
    else:  # pragma: no cover - every hf_fss config is a dataclass
        names = [k for k in config.to_dict() if k not in base]
    return [(name, getattr(config, name, None)) for name in names]


def _differences(model_type: str) -> list[str] | None:
    """The method's differences from its official code (or, without one, its paper): the list beside the templates,
    `hf_fss/model_cards/differences/<model_type>.md` (`DIFFERENCES_FROM_*` of the method's package)."""
    return list(read_differences(model_type)) or None


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
    }


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


# ----------------------------------------------------------------------------------------------------- card


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


def _backbone_name(config) -> str:
    """The backbone's published name, marked as modified when `backbone_kwargs` change its widths or depths."""
    name = _BACKBONE_NAMES.get(config.backbone, config.backbone)
    resized = {k: v for k, v in (config.backbone_kwargs or {}).items() if k in ("base_width", "depths", "fc_channels")}
    if resized:
        name += " (resized: " + ", ".join(f"{k}={v}" for k, v in sorted(resized.items())) + ")"
    return name


def _backbone_weights(config, training: Mapping[str, Any] | None) -> str:
    """
    Where the backbone's weights come from, from the config and the run record (never assumed): a converted
    checkpoint, ImageNet weights loaded from `config.backbone_weights`, or a random initialisation. A converted
    checkpoint is called a checkpoint of the official code: who trained it is not in the file (QGNet's authors
    published none).
    """
    if _lookup(training, "converted_from") is not None:
        return "the weights of the converted official-code checkpoint"
    if getattr(config, "use_pretrained_backbone", False):
        try:
            return f"ImageNet-pretrained weights from {config.backbone_weights}"
        except ValueError:
            return "ImageNet-pretrained weights"
    return "random initialisation: no pretrained weights were loaded (use_pretrained_backbone=False)"


def _training_data(training: Mapping[str, Any] | None) -> str:
    """What the weights were trained on, from the run record (never assumed), for the card's limitations."""
    benchmark = _benchmark_key(_lookup(training, "benchmark"))
    if benchmark == "synthetic":
        return (
            "the hf_fss synthetic benchmark (procedurally drawn shapes and textures), not on natural photos: a "
            "demonstration model; natural images are out of its distribution"
        )
    if benchmark is not None:
        return f"{_BENCHMARK_NAMES.get(benchmark, benchmark)}; other image domains are out of distribution"
    return "natural photos (PASCAL VOC / COCO) in the official code's setting; other domains are out of distribution"


def _summary(config, training: Mapping[str, Any] | None, method: str) -> str:
    backbone = _backbone_name(config)
    text = f"{method} with a {backbone} backbone"
    benchmark = _benchmark_key(_lookup(training, "benchmark"))
    fold, shot = _lookup(training, "fold"), _lookup(training, "shot")
    if config.model_type == "cosine_prior":
        pass  # nothing is trained
    elif _lookup(training, "converted_from") is not None:
        text += ", converted from a checkpoint of the official code"
    elif benchmark is not None:
        text += f", trained on the base classes of {_BENCHMARK_NAMES.get(benchmark, benchmark)}"
        if _split_name(_lookup(training, "fold_convention")):
            text += f", {_split_name(_lookup(training, 'fold_convention'))}"
        elif fold is not None:
            text += f" fold {fold}"
        if shot is not None:
            text += f" with {shot}-shot episodes"
    return text + "."


def _model_name(config, training: Mapping[str, Any] | None, repo_id: str | None) -> str:
    if repo_id:
        return repo_id.split("/")[-1]
    parts = [config.model_type.replace("_", "-"), config.backbone.replace("_", "-")]
    benchmark = _benchmark_key(_lookup(training, "benchmark"))
    if benchmark:
        parts.append(benchmark)
    if _lookup(training, "fold") is not None:
        parts.append(f"fold{_lookup(training, 'fold')}")
    if _lookup(training, "shot") is not None:
        parts.append(f"{_lookup(training, 'shot')}shot")
    return "-".join(str(p) for p in parts)


def _card_data(config, training, metrics_list, eval_results: list[EvalResult], model_name: str) -> ModelCardData:
    """The card's metadata: tags (method, benchmarks), Hub datasets, base model, license and the results."""
    model_type = config.model_type
    tags = [
        "hf_fss",
        "transformers",
        "few-shot-segmentation",
        "few-shot-semantic-segmentation",
        model_type.replace("_", "-"),
    ]
    benchmarks = {_benchmark_key(_lookup(training, "benchmark"))} | {
        _evaluation(m, training)["benchmark"] for m in metrics_list
    }
    tags.extend(sorted(b for b in benchmarks if b))
    datasets = sorted({d for d in [_lookup(training, "dataset")] if _looks_like_hub_id(d)})
    base_model = (training or {}).get("base_model")
    if base_model is None and getattr(config, "use_pretrained_backbone", False):
        with contextlib.suppress(ValueError):
            candidate = config.backbone_weights
            base_model = candidate if _looks_like_hub_id(candidate) else None
    return ModelCardData(
        library_name="hf_fss",  # the Hub shows its usage snippet (with `import hf_fss`), not a transformers one
        pipeline_tag="image-segmentation",
        license=(training or {}).get("license"),
        tags=tags,
        datasets=datasets or None,
        base_model=base_model if _looks_like_hub_id(base_model) else None,
        metrics=["mean_iou"] if eval_results else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )


def render_model_card(
    config,
    *,
    metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    training: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    model_path: str | None = None,
    num_parameters: int | None = None,
) -> ModelCard:
    """
    Render the model card of a configured model.

    Args:
        config: the model's config (an hf_fss `FewShotSegmentationConfig` subclass); its `model_type` picks the
            template `hf_fss/model_cards/<model_type>.md`.
        metrics: a `metrics.json` dict written by `scripts/evaluate.py` (`miou`, `fbiou`, `precision`,
            `per_class_iou`, `num_episodes`, `seed`, `protocol`, and when known `fold`, `shot`, `dataset`,
            `annotation`, `split`), or a list of them (one per setting, e.g. 1-shot and 5-shot). Fractions in [0, 1];
            the card shows percentages. Left out of the card when None.
        training: the training script's run record (hyper-parameters, `dataset`, `benchmark`, `fold`, `shot`,
            effective batch size, number of processes, steps, seed, ...), shown as a table; `converted_from` marks a
            converted official checkpoint; `license` and `base_model` go into the card metadata when present.
        repo_id: the Hub repo the card is for (used in the loading snippet and as the model name).
        model_path: the local folder to load from in the snippet when there is no `repo_id`.
        num_parameters: parameter count, shown when given.

    Returns:
        `huggingface_hub.ModelCard`; `card.save(path)` writes it, `card.data.eval_results` holds the results.
    """
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"config must be an hf_fss model config with a model_type, got {type(config).__name__}")
    template_path = find_model_card_template(model_type)
    training = dict(training) if training else None
    metrics_list = _as_metrics_list(metrics)
    method = _METHOD_NAMES.get(model_type, model_type)
    model_name = _model_name(config, training, repo_id)

    eval_results: list[EvalResult] = []
    results = []
    for item in metrics_list:
        setting = _evaluation(item, training)
        eval_results.extend(_eval_results(item, setting))
        section = _results_section(item, setting)
        if section is not None:
            results.append(section)

    card_data = _card_data(config, training, metrics_list, eval_results, model_name)
    model_id = repo_id or model_path
    training_rows = [(k, v) for k, v in _flatten(training)] if training else []
    config_rows = [(k, v) for k, v in _config_fields(config) if v is not None]
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        marker=CARD_MARKER,
        method=method,
        model_name=model_name,
        model_id=model_id,
        repo_id=repo_id,
        summary=_summary(config, training, method),
        backbone=f"{_backbone_name(config)} (weights: {_backbone_weights(config, training)})",
        backbone_weights=_backbone_weights(config, training),
        image_size=config.image_size,
        num_parameters=f"{num_parameters:,}" if num_parameters else None,
        config_table=_table(config_rows, ("field", "value")),
        training_table=_table(training_rows, ("setting", "value")),
        converted_from=_lookup(training, "converted_from"),
        training_data=_training_data(training),
        results=results,
        differences=_differences(model_type),
        config=config,  # method templates may state facts of their own fields (QGNet: the prior extractor)
    )
    text = re.sub(r"\n{3,}", "\n\n", str(card))  # the template's conditional blocks leave runs of blank lines
    leftover = re.findall(r"\{\{|\}\}|\{%|%\}", text)
    if leftover:  # pragma: no cover - a template bug, not a user error
        raise RuntimeError(f"template {template_path} left Jinja syntax in the card: {leftover}")
    return ModelCard(text)


# ------------------------------------------------------------------------------------------- folder writing


def _is_managed(name: str) -> bool:
    return name in MANAGED_FILES or any(p.fullmatch(name) for p in _MANAGED_PATTERNS)


def _json_dump(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def save_pretrained_with_card(
    model,
    processor,
    output_dir: str | os.PathLike,
    *,
    metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    training: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """
    Save a model folder with its card, atomically.

    Writes `model.safetensors`, `config.json`, `preprocessor_config.json`, `README.md` (the rendered card) and, when
    given, `metrics.json` and `training.json` (the run record, so that `push_to_hub` can re-render the card) into a
    hidden staging sibling folder (`hf_fss.utils.io`: umask-respecting mode, writer pid in its name, so the next
    save removes what a killed one left behind), then moves it into place. An existing `output_dir` is replaced only once the new folder
    is complete (two renames, `hf_fss.utils.io.replace_folder`); the files it holds that a save does not manage
    (checkpoint folders, logs, ...) are carried over, the model files, configs, card and metrics are not. A failure
    leaves the old folder as it was. Call it from one process only (the main process of a distributed run).

    Args:
        model: an hf_fss `PreTrainedModel`.
        processor: its `FewShotSegmentationImageProcessor`; None saves the default one for `config.image_size`.
        output_dir: the model folder.
        metrics / training / repo_id: see [`render_model_card`].

    Returns:
        `Path` of the folder.
    """
    target = Path(output_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output_dir {str(target)!r} exists and is not a folder")
    if processor is None:
        from ..image_processing_fss import FewShotSegmentationImageProcessor

        processor = FewShotSegmentationImageProcessor(image_size=model.config.image_size)
    metrics_list = _as_metrics_list(metrics)  # validated before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    # A killed save leaves its staging folder; the next save removes those whose writer is gone. The folder has
    # a plain mkdir's mode (umask applied), which the saved model folder keeps after the rename.
    name = re.escape(target.name)
    remove_stale_staging(target, "tmp", legacy=[rf"\.{name}\.tmp-[A-Za-z0-9_]{{8}}"])
    if target.is_dir():  # a backup of the old folder is garbage only while the folder itself is in place
        remove_stale_staging(target, "old", legacy=[rf"\.{name}\.old-[A-Za-z0-9_]{{8}}"])
    staging = make_staging_dir(target, "tmp")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if metrics is not None:
            _json_dump(metrics if isinstance(metrics, Mapping) else metrics_list, staging / "metrics.json")
        if training:
            _json_dump(dict(training), staging / "training.json")
        card = render_model_card(
            model.config,
            metrics=metrics_list or None,
            training=training,
            repo_id=repo_id,
            model_path=os.fspath(output_dir),  # the path the caller saved to, e.g. outputs/quickstart/final
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        card.save(staging / "README.md")
        missing = [
            name for name in ("config.json", "preprocessor_config.json", "README.md") if not (staging / name).is_file()
        ]
        if not (staging / "model.safetensors").is_file() and not (staging / "model.safetensors.index.json").is_file():
            missing.append("model.safetensors")
        pickles = sorted(p.name for p in staging.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if missing or pickles:
            raise RuntimeError(f"save_pretrained left an incomplete folder: missing {missing}, pickle files {pickles}")
        give_plain_file_modes(staging)
        # The old folder's entries a save does not manage (checkpoints, logs) stay in the new one.
        replace_folder(staging, target, carry=lambda name: not _is_managed(name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
