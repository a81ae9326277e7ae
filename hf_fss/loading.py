"""
What the strict `FewShotSegmentationPreTrainedModel.from_pretrained` needs to refuse a checkpoint in one line: the file
it read, the keys that differ, the config field a size mismatch comes from, and transformers' load report kept quiet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

from transformers.utils import SAFE_WEIGHTS_NAME, cached_file

__all__ = ["key_list", "quiet_load_report", "size_mismatch_message", "weights_file"]


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
