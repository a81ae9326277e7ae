"""
A training run folder (`train.py --output-dir`: `best/`, `final/`, `checkpoints/`, `run.json`) as the argument of
`AutoModel.from_pretrained` and `pipeline("few-shot-segmentation", model=...)`, by the rule the scripts and the Space
follow (`hf_fss.utils.resolve_model_path`): its `best/` model, else `final/`, with a warning naming the one taken.

transformers reads `config.json` of whatever folder it is given, so training writes a marker `config.json`
(`{"model_type": "fss_run"}`) into the run folder. `import hf_fss` registers `RunFolderConfig` for that type with
`AutoConfig` and `RunFolderModel` with `AutoModel`, whose `from_pretrained` loads the run's model folder instead and
returns that model (an `NTRENetModel`, ...). The pipeline then takes the image processor saved beside those weights
(`FewShotSegmentationPipeline`). The marker names no model: `best/` is replaced during training and `final/` comes
last, so which one exists is read from the folder when loading.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .utils import RUN_FOLDER_MODEL_TYPE, resolve_model_path
from .utils.io import atomic_write_text

__all__ = ["RunFolderConfig", "RunFolderModel", "write_run_folder_marker"]


@strict(accept_kwargs=True)
class RunFolderConfig(PreTrainedConfig):
    """The marker `config.json` of a training run folder: not a model, a pointer to its `best/` / `final/` model."""

    model_type = RUN_FOLDER_MODEL_TYPE


class RunFolderModel:
    """What `AutoModel` maps `RunFolderConfig` to: `from_pretrained` returns the model of the run's `best/` or
    `final/` folder; it is never instantiated itself."""

    config_class = RunFolderConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, config=None, **kwargs):
        """
        Load the model a run folder stands for with `AutoModel.from_pretrained(<run>/best or <run>/final, ...)`
        (the other arguments are passed on; `config`, the marker's, is dropped).

        Raises:
            `FileNotFoundError`: the run folder holds neither `best/` nor `final/` yet.
            `ValueError`: the marker came from a Hub repo: a run folder is only read locally.
        """
        if not Path(pretrained_model_name_or_path).expanduser().is_dir():
            raise ValueError(
                f"{pretrained_model_name_or_path} is a training run folder (config.json model_type "
                f"{RUN_FOLDER_MODEL_TYPE!r}), not a model; upload and load its best/ or final/ model folder instead"
            )
        from transformers import AutoModel  # imported here: this module is imported when AutoConfig first is

        model_dir = resolve_model_path(pretrained_model_name_or_path)  # logs which one it took
        kwargs.pop("_from_auto", None)  # AutoModel's own marker, which it sets again in the call below
        return AutoModel.from_pretrained(model_dir, *model_args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """`AutoModel.from_config(RunFolderConfig())`: there is no model to build from a run folder's marker."""
        raise ValueError(
            f"a {RUN_FOLDER_MODEL_TYPE!r} config is a training run folder's marker, not a model configuration; "
            "use AutoModel.from_pretrained(run_folder) or the config of its best/ model"
        )


def write_run_folder_marker(output_dir: str | os.PathLike) -> Path:
    """Write the marker `config.json` into a training run folder (atomically), unless it is already there: a resume
    that is then refused must leave the folder as it was."""
    path, text = Path(output_dir) / "config.json", RunFolderConfig().to_json_string()
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path
