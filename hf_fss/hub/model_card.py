"""
Model cards rendered from a model's real configuration, evaluation results and training record, and the folder
writer that saves weights, configs and card together.

The card of a method is its Jinja template `hf_fss/model_cards/<model_type>.md` (package data, found with
`importlib.resources`, so a wheel install has it), rendered with `huggingface_hub.ModelCard.from_template`.
Only what is known goes into a card: a field without a value (no metrics yet, an unknown fold) is left out, never
filled with a placeholder. Evaluation results become `model-index` metadata (`EvalResult`, task
`image-segmentation`, metrics mIoU / FB-IoU / precision in percent) so that the Hub shows them; `card_results.py`
derives them and the results sections from each `metrics.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from ..differences import read_differences
from ..utils.io import give_plain_file_modes, make_staging_dir, remove_stale_staging, replace_folder
from .card_results import (
    _BENCHMARK_NAMES,
    _as_metrics_list,
    _benchmark_key,
    _evaluation,
    _looks_like_hub_id,
    _lookup,
    _results,
    _split_name,
    _table,
    _training_rows,
)

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

logger = logging.get_logger(__name__)

_BACKBONE_NAMES = {
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "vgg16_bn": "VGG-16-BN",
    "vgg16_dilated": "dilated VGG-16",
}
# transformers backbones by model_type (`backbone_config`).
_TRANSFORMERS_BACKBONE_NAMES = {
    "dinov2": "DINOv2",
    "dinov2_with_registers": "DINOv2 with registers",
    "dinov3_vit": "DINOv3 ViT",
    "dinov3_convnext": "DINOv3 ConvNeXt",
    "convnext": "ConvNeXt",
    "convnextv2": "ConvNeXt V2",
    "resnet": "ResNet (transformers)",
}
_METHOD_NAMES = {
    "ntrenet": "NTRENet",
    "qgnet": "QGNet",
    "crcnet": "CRCNet",
    "smcp": "SMCP",
    "cosine_prior": "Cosine prior",
    "seggpt_fss": "SegGPT",
}


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


# ----------------------------------------------------------------------------------------------------- card


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
    # The record of loaded weights is the model's, stated in the card's weights line, not a setting.
    return [(name, getattr(config, name, None)) for name in names if name != "loaded_pretrained_weights"]


def _differences(model_type: str) -> list[str] | None:
    """The method's differences from its official code (or, without one, its paper): the list beside the templates,
    `hf_fss/model_cards/differences/<model_type>.md` (`DIFFERENCES_FROM_*` of the method's package)."""
    return list(read_differences(model_type)) or None


def _backbone_name(config) -> str:
    """The backbone's published name, marked as modified when `backbone_kwargs` change its widths or depths; a
    transformers backbone's family with its Hub id / folder (`backbone`) and the blocks / stages used."""
    seggpt = getattr(config, "seggpt_config", None)
    if seggpt is not None:  # SegGPT has no separate backbone: its whole ViT is the model
        return f"SegGPT ViT ({seggpt.num_hidden_layers} layers of width {seggpt.hidden_size})"
    backbone_config = getattr(config, "backbone_config", None)
    if backbone_config is not None:
        family = _TRANSFORMERS_BACKBONE_NAMES.get(backbone_config["model_type"], backbone_config["model_type"])
        source = f"{config.backbone}, " if config.backbone else "architecture from backbone_config, "
        return f"{family} ({source}stages ending at out_indices {list(backbone_config['out_indices'])})"
    name = _BACKBONE_NAMES.get(config.backbone, config.backbone)
    resized = {k: v for k, v in (config.backbone_kwargs or {}).items() if k in ("base_width", "depths", "fc_channels")}
    if resized:
        name += " (resized: " + ", ".join(f"{k}={v}" for k, v in sorted(resized.items())) + ")"
    return name


def _loaded_source(config, name: str, requested: str | None) -> str | None:
    """
    Where extractor `name`'s weights came from: the model's record (`loaded_pretrained_weights`, written by
    `load_pretrained_extractors()` and kept by save / `from_pretrained`), or, for a config without one (rendered on
    its own), the source the config asks for.
    """
    record = getattr(config, "loaded_pretrained_weights", None)
    return requested if record is None else record.get(name)


def _not_loaded(requested: str, flag: str) -> str:
    return (
        f"random initialisation. Warning: the config asks for the weights of {requested} ({flag}) but they were never "
        "loaded into this model; call model.load_pretrained_extractors() before saving"
    )


def _backbone_weights(config, training: Mapping[str, Any] | None) -> str:
    """
    Where the backbone's weights come from, from the model's record of what it loaded and the run record (never
    assumed from the config alone once a model exists): a converted checkpoint, weights loaded from the Hub id /
    folder recorded, or a random initialisation (with a warning when the config asked for weights that were not
    loaded). A converted checkpoint is called a checkpoint of the official code: who trained it is not in the file
    (QGNet's authors published none).
    """
    if _lookup(training, "converted_from") is not None:
        return "the weights of the converted official-code checkpoint"
    if getattr(config, "seggpt_config", None) is not None:
        requested = config.seggpt_name_or_path
        source = _loaded_source(config, "seggpt", requested)
        if source:
            return f"SegGPT weights from {source}"
        if requested:
            return _not_loaded(requested, "seggpt_name_or_path")
        return "random initialisation: no SegGPT weights were loaded"
    backbone_config = getattr(config, "backbone_config", None)
    if not getattr(config, "use_pretrained_backbone", False):
        source = _loaded_source(config, "backbone", None)  # loaded by hand (`load_pretrained_backbone(path)`)
        if not source:
            return "random initialisation: no pretrained weights were loaded (use_pretrained_backbone=False)"
    else:
        try:
            requested = config.backbone_weights
        except ValueError:
            requested = None
        source = _loaded_source(config, "backbone", requested)
        if not source and getattr(config, "loaded_pretrained_weights", None) is not None:
            return _not_loaded(requested or "the backbone's checkpoint", "use_pretrained_backbone=True")
    if backbone_config is not None:
        family = _TRANSFORMERS_BACKBONE_NAMES.get(backbone_config["model_type"], backbone_config["model_type"])
        return f"{family} weights from {source}" if source else f"pretrained {family} weights"
    return f"ImageNet-pretrained weights from {source}" if source else "ImageNet-pretrained weights"


def _prior_extractor_weights(config, training: Mapping[str, Any] | None) -> str | None:
    """QGNet's prior extractor weights, as `_backbone_weights` (None for a method without one)."""
    if not hasattr(config, "prior_extractor_weights"):
        return None
    if _lookup(training, "converted_from") is not None:
        return "weights from the converted checkpoint."
    requested = config.prior_extractor_weights
    source = _loaded_source(config, "prior_extractor", requested)
    if source:
        return f"weights loaded from `{source}` when training started."
    if requested:
        return _not_loaded(requested, "prior_extractor_weights") + "."
    return (
        "random initialisation: no pretrained prior extractor was loaded (`prior_extractor_weights` is unset), so its "
        "prior region map comes from random features, not from contrastive pretraining."
    )


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
    if getattr(config, "seggpt_config", None) is not None:
        text = f"{method} ({backbone}) as a few-shot segmenter"
    elif config.model_type == "cosine_prior":
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
    backbone = getattr(config, "backbone", None) or getattr(config, "backbone_config", None) or {"model_type": "vit"}
    backbone = backbone if isinstance(backbone, str) else backbone["model_type"]
    parts = [config.model_type.replace("_", "-"), backbone.split("/")[-1].replace("_", "-")]
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
    if base_model is None and getattr(config, "seggpt_config", None) is not None:
        # the SegGPT checkpoint this adapter holds unchanged, when it was loaded
        base_model = _loaded_source(config, "seggpt", config.seggpt_name_or_path)
    if base_model is None and getattr(config, "use_pretrained_backbone", False):
        with contextlib.suppress(ValueError):
            candidate = _loaded_source(config, "backbone", config.backbone_weights)
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

    eval_results, results = _results(metrics_list, training)

    card_data = _card_data(config, training, metrics_list, eval_results, model_name)
    model_id = repo_id or model_path
    training_rows = _training_rows(training) if training else []
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
        prior_extractor_weights=_prior_extractor_weights(config, training),
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
        processor: its image processor; None saves the model's default one (`fss_image_processor_class`) for
            `config.image_size`.
        output_dir: the model folder.
        metrics / training / repo_id: see [`render_model_card`].

    Returns:
        `Path` of the folder.
    """
    target = Path(output_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output_dir {str(target)!r} exists and is not a folder")
    if processor is None:  # the model's own processor class (SegGPT has its own preprocessing)
        processor = type(model).fss_image_processor_class(image_size=model.config.image_size)
    metrics_list = _as_metrics_list(metrics)  # validated before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    # A killed save leaves its staging folder; the next save removes those whose writer is gone. The folder has
    # a plain mkdir's mode (umask applied), which the saved model folder keeps after the rename.
    name = re.escape(target.name)
    remove_stale_staging(target, "tmp", legacy=[rf"\.{name}\.tmp-[A-Za-z0-9_]{{8}}"])
    if target.is_dir():  # a backup of the old folder is garbage only while the folder itself is in place
        remove_stale_staging(target, "old", legacy=[rf"\.{name}\.old-[A-Za-z0-9_]{{8}}"])
    loaded = model.config.loaded_pretrained_weights or {}
    unloaded = {name: src for name, src in model.pretrained_weight_sources().items() if name not in loaded}
    if unloaded and not (training and "converted_from" in training):
        # Saved as asked (transformers saves any weights), but the card says they are random, and so does this line.
        logger.warning(
            f"saving {type(model).__name__} with random {', '.join(unloaded)} weights: its config asks for "
            f"{', '.join(unloaded.values())} but model.load_pretrained_extractors() was never called; the card says so"
        )
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
