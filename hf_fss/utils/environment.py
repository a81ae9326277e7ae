"""The environment of a command: its thread count (`default_num_threads`, `set_num_threads`) and how a path given
on the command line is read (a local folder or a Hub id, a model folder or a training run folder)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = [
    "RUN_FOLDER_MODELS",
    "RUN_FOLDER_MODEL_TYPE",
    "check_model_path",
    "default_num_threads",
    "is_model_folder",
    "looks_local",
    "resolve_model_path",
    "run_folder_model",
    "set_num_threads",
]

logger = logging.getLogger(__name__)

# The models a training run folder (`train.py --output-dir`) holds, in the order one is taken for the folder:
# best/ (selected on validation episodes, never on the test classes), else final/ (the last step; a run without
# validation has only it). checkpoints/ hold training states for resuming, not models.
RUN_FOLDER_MODELS = ("best", "final")
# `model_type` of the marker `config.json` that training writes into a run folder (`hf_fss.run_folder`): with it,
# `AutoModel.from_pretrained` and `pipeline()` take the run folder too. A folder holding it is a run, not a model.
RUN_FOLDER_MODEL_TYPE = "fss_run"


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cgroups' cpusets)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _processes_on_this_machine() -> int:
    # `accelerate launch` / torchrun export LOCAL_WORLD_SIZE (processes on this node) and WORLD_SIZE (all nodes).
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_num_threads() -> int:
    """
    Intra-op threads for one process: `OMP_NUM_THREADS` when it is set to a positive integer (the user's choice, and
    what `accelerate launch` gives each process), else the cores available to it (`os.sched_getaffinity`) divided by
    the processes running on this machine (`LOCAL_WORLD_SIZE`, else `WORLD_SIZE`), at least 1. Oversubscribed cores
    make CPU runs several times slower, and another thread count can change the last bits of the results.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, _available_cores() // _processes_on_this_machine())


def set_num_threads(num_threads: int | None = None) -> int:
    """
    Set torch's intra-op thread count to `num_threads` (a `--num-threads` flag), or to `default_num_threads()` when
    None. Returns the count set.

    Raises:
        `ValueError`: `num_threads` < 1.
    """
    import torch

    if num_threads is not None and num_threads < 1:
        raise ValueError(f"--num-threads must be >= 1, got {num_threads}")
    count = default_num_threads() if num_threads is None else num_threads
    torch.set_num_threads(count)
    return count


def looks_local(name_or_path: str) -> bool:
    """
    True when `name_or_path` is meant as a path rather than a Hub id `org/name`: it starts with `.`, `/`, `~` (or a
    drive / backslash path), has more than one `/`, or its first component exists here (`data/pascal5i` when
    `data/` exists). Such a path that does not exist is "folder not found", never a Hub look-up.
    """
    value = name_or_path
    if value.startswith((".", "/", "~", "\\")) or "\\" in value or (len(value) > 1 and value[1] == ":"):
        return True
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        return len(parts) > 1
    return Path(parts[0]).exists()


def check_model_path(name_or_path: str) -> None:
    """
    A `--model` that looks like a local path (`looks_local`, or an existing file) must be an existing folder: it
    never falls through to a Hub look-up that ends in "Repo id must be in the form ...".

    Raises:
        `FileNotFoundError`: "model folder not found: ...".
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    if path.exists() or looks_local(name_or_path):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"model folder not found: {name_or_path} ({what}); give a folder written by save_pretrained or a Hub "
            "model id ORG/NAME"
        )


def is_model_folder(folder: str | os.PathLike) -> bool:
    """`folder` holds a model's `config.json` (not a training run folder's marker one)."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):  # unreadable: a model folder whose loading will say what is wrong
        return True
    return model_type != RUN_FOLDER_MODEL_TYPE


def run_folder_model(folder: str | os.PathLike) -> Path | None:
    """The model a training run folder stands for: `folder/best`, else `folder/final` (the first of
    `RUN_FOLDER_MODELS` holding a `config.json`); None when `folder` is itself a model folder or holds neither.
    A run folder is recognised by its marker `config.json` (`model_type` "fss_run") or, for runs from before the
    marker, by having no `config.json`."""
    folder = Path(folder).expanduser()
    if is_model_folder(folder):
        return None
    return next((folder / n for n in RUN_FOLDER_MODELS if (folder / n / "config.json").is_file()), None)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """
    The `from_pretrained` argument for a `--model` (scripts), `FSS_MODELS` entry (Space) or pipeline model: a
    training run folder becomes its `best/` (else `final/`), logged as a warning naming the folder taken; a model
    folder or a Hub id is returned unchanged.

    Raises:
        `FileNotFoundError`: an existing local folder that is neither a model folder (no model `config.json`) nor a
            run folder holding `best/` or `final/`.
    """
    path = Path(name_or_path).expanduser()
    if not path.is_dir() or is_model_folder(path):
        return str(name_or_path)
    model = run_folder_model(path)
    if model is None and (path / "config.json").is_file():  # the marker: a run that has saved no model yet
        raise FileNotFoundError(
            f"{name_or_path} is a training run folder that holds no model yet: no best/ (saved at the first "
            "validation) and no final/ (saved at the end); resume the run or give another model folder"
        )
    if model is None:
        raise FileNotFoundError(
            f"{name_or_path} holds no model: no config.json, and no best/ or final/ model folder as a training run "
            "folder has; give a folder written by save_pretrained (e.g. outputs/RUN/best) or a Hub model id ORG/NAME"
        )
    logger.warning("hf_fss: %s is a training run folder: using its %s/", name_or_path, model.name)
    return str(model)
