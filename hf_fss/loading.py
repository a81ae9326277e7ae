"""
What the strict `FewShotSegmentationPreTrainedModel.from_pretrained` needs to refuse a checkpoint in one line: the file
it read, the keys that differ, the config field a size mismatch comes from, and transformers' load report kept quiet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME, cached_file

__all__ = [
    "check_fss_model",
    "check_fss_model_folder",
    "key_list",
    "not_fss_model_message",
    "quiet_load_report",
    "size_mismatch_message",
    "weights_file",
]


def not_fss_model_message(name_or_path, model_type) -> str | None:
    """
    Why `name_or_path`, whose config has `model_type` (None when it has none), is no hf_fss few-shot model, with the
    fix: a SegGPT checkpoint is wrapped by `SegGptFssModel.from_seggpt`, a backbone architecture (DINOv2, ResNet,
    ConvNeXt, ... : transformers' `MODEL_FOR_BACKBONE_MAPPING_NAMES`) goes into a method's `backbone` field. None
    when `model_type` is an hf_fss model type (or the training run folder's marker, resolved to its model).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

    from .models import CONFIG_CLASSES
    from .utils import RUN_FOLDER_MODEL_TYPE

    if model_type in CONFIG_CLASSES or model_type == RUN_FOLDER_MODEL_TYPE or _registered_method(model_type):
        return None
    expected = (
        f"hf_fss loads a folder or Hub id saved by an hf_fss model (model_type one of {sorted(CONFIG_CLASSES)}, or "
        "a method of your own registered with AutoConfig)"
    )
    if not model_type:
        return f"{name_or_path} holds no model_type in its config.json, so no hf_fss few-shot model; {expected}"
    if model_type not in CONFIG_MAPPING_NAMES:
        return f"{name_or_path} holds a model of type {model_type!r}, not an hf_fss few-shot model; {expected}"
    what = f"{name_or_path} holds a {model_type!r} model (transformers), not an hf_fss few-shot model"
    if model_type == "seggpt":
        return f"{what}; wrap it: SegGptFssModel.from_seggpt('{name_or_path}') then save_pretrained"
    if model_type in MODEL_FOR_BACKBONE_MAPPING_NAMES:
        return f"{what}; use it as a backbone: NTRENetConfig(backbone='{name_or_path}', use_pretrained_backbone=True)"
    return f"{what}; {expected}"


def _registered_method(model_type) -> bool:
    """A method of the user's own, registered with `AutoConfig` as a `FewShotSegmentationConfig` subclass."""
    from transformers import CONFIG_MAPPING

    from .configuration_fss import FewShotSegmentationConfig

    try:
        return isinstance(model_type, str) and issubclass(CONFIG_MAPPING[model_type], FewShotSegmentationConfig)
    except KeyError:
        return False


def check_fss_model_folder(name_or_path) -> None:
    """
    Refuse, before anything is loaded, a local folder whose `config.json` is not an hf_fss model's: a plain
    transformers checkpoint (SegGPT, a DINOv2 backbone, ...) or a `config.json` without `model_type`. A Hub id, a
    folder without `config.json` and an unreadable `config.json` are left to `from_pretrained` and its errors.

    Raises:
        `ValueError`: one line from `not_fss_model_message`.
    """
    config = Path(str(name_or_path)).expanduser() / CONFIG_NAME
    if not config.is_file():
        return
    try:
        config_dict = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if isinstance(config_dict, dict):
        message = not_fss_model_message(name_or_path, config_dict.get("model_type"))
        if message:
            raise ValueError(message)


def check_fss_model(model) -> None:
    """
    Refuse a loaded model that is not an hf_fss few-shot model (`FewShotSegmentationPreTrainedModel`), such as the
    `SegGptModel` transformers builds from a SegGPT folder or Hub id.

    Raises:
        `ValueError`: one line from `not_fss_model_message`, naming the model's `name_or_path` or class.
    """
    from .modeling_fss import FewShotSegmentationPreTrainedModel

    if isinstance(model, FewShotSegmentationPreTrainedModel):
        return
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    raise ValueError(
        not_fss_model_message(name, getattr(config, "model_type", None))
        or f"{name} is a {type(model).__name__}, not an hf_fss few-shot model"
    )


def weights_file(name_or_path, subfolder: str = "") -> str:
    """The weights file `from_pretrained` reads, for error messages: a local path, else `repo_id/model.safetensors`."""
    folder = os.path.join(str(name_or_path), subfolder)
    if os.path.isfile(str(name_or_path)):
        return str(name_or_path)
    if os.path.isdir(folder):
        return os.path.join(folder, SAFE_WEIGHTS_NAME)
    try:
        cached = cached_file(str(name_or_path), SAFE_WEIGHTS_NAME, subfolder=subfolder, local_files_only=True)
    except OSError:
        cached = None
    return cached or f"{SAFE_WEIGHTS_NAME} of {name_or_path}"


def key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (and {len(keys) - limit} more)" if len(keys) > limit else shown


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def quiet_load_report(quiet: bool):
    """
    Drop transformers' load report (one WARNING of `transformers.modeling_utils`) while loading. A filter, not a
    level: transformers runs extra checks and warnings of its own when that logger's level is WARNING or above.
    """
    logger, report_filter = logging.getLogger("transformers.modeling_utils"), _DropLoadReport()
    if quiet:
        logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def size_mismatch_message(config, mismatched: list) -> str:
    """
    Why a checkpoint's tensors do not fit the model built from `config`: the config field whose value is the size
    that differs when it can be told (the backbone's fields for `backbone.*`), else the first key with both shapes.
    """
    key, file_shape, model_shape = sorted(tuple(item) for item in mismatched)[0]
    file_shape, model_shape = tuple(file_shape), tuple(model_shape)
    shapes = f"{key} is {file_shape} in the file but {model_shape} in the model"
    count = f"{len(mismatched)} tensor(s) differ in shape"
    fix = "load the config.json saved with these weights"
    if key.split(".")[0] in ("backbone", "prior_extractor"):
        return f"does not fit the model's backbone / backbone_kwargs ({shapes}; {count}); {fix}"
    if len(file_shape) == len(model_shape):
        axis = next(i for i, (a, b) in enumerate(zip(file_shape, model_shape)) if a != b)
        own, needed = model_shape[axis], file_shape[axis]
        fields = [
            f.name
            for f in dataclasses.fields(config)
            if type(getattr(config, f.name, None)) is int and getattr(config, f.name) == own
        ]
        if len(fields) == 1:
            return f"needs {fields[0]}={needed} but the config has {fields[0]}={own} ({shapes}; {count}); {fix}"
    return f"does not fit the model ({shapes}; {count}); {fix}"
