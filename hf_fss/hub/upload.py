"""
Upload a saved hf_fss model folder to the Hugging Face Hub: safetensors weights, `config.json`,
`preprocessor_config.json`, the model card and the evaluation / training records, never pickle files.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .model_card import CARD_MARKER, render_model_card

__all__ = ["PICKLE_SUFFIXES", "REQUIRED_FILES", "UPLOADED_FILES", "check_model_folder", "push_to_hub"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files read with pickle; a folder holding one is never uploaded."""
REQUIRED_FILES = ("model.safetensors", "config.json", "preprocessor_config.json")
# Top-level files uploaded when present (besides the safetensors weights and their shard index).
UPLOADED_FILES = ("config.json", "preprocessor_config.json", "README.md", "metrics.json", "training.json")


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    if index.is_file():  # sharded weights: the index and every shard it names
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors shard index ({err})") from err
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(
                f"model folder {str(folder)!r} lacks the safetensors shards {missing} named in {index.name}"
            )
        return ["model.safetensors.index.json", *shards]
    return []


def check_model_folder(model_dir: str | os.PathLike) -> list[str]:
    """
    Check that a folder is an uploadable hf_fss model and list the files to upload.

    Raises a `ValueError` when the folder holds pickle weights (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.pickle`,
    `*.ckpt`) or lacks `model.safetensors` (or a shard index with its shards), `config.json` or
    `preprocessor_config.json`. Sub-folders (training checkpoints, logs) are never uploaded and not checked.

    Returns:
        The top-level file names to upload: weights, `config.json`, `preprocessor_config.json`, and `README.md`,
        `metrics.json`, `training.json` when present.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"model_dir {str(folder)!r} is not a folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"model folder {str(folder)!r} holds pickle weight files {pickles}; hf_fss uploads safetensors only. "
            "Re-save the model with `save_pretrained` (safetensors) or `hf_fss.hub.save_pretrained_with_card`, "
            "and remove the pickle files"
        )
    weights = _weight_files(folder)
    missing = [name for name in REQUIRED_FILES[1:] if name not in names]
    if not weights:
        missing.insert(0, "model.safetensors")
    if missing:
        raise ValueError(
            f"model folder {str(folder)!r} lacks {missing}; save it with `hf_fss.hub.save_pretrained_with_card"
            "(model, processor, output_dir)` (or `model.save_pretrained` + `processor.save_pretrained`)"
        )
    from safetensors import safe_open

    for name in weights:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(folder / name), framework="pt"):
                    pass
            except Exception as err:  # a truncated or foreign file: say which one
                raise ValueError(f"{folder / name} is not a readable safetensors file ({err})") from err
    return weights + [name for name in UPLOADED_FILES if name in names]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def _needs_card(readme: Path) -> bool:
    if not readme.is_file():
        return True
    return CARD_MARKER in readme.read_text(encoding="utf-8")


def _render_card_for(folder: Path, repo_id: str) -> None:
    """Render the card of `folder` for `repo_id` and write it as README.md (atomically)."""
    from transformers import AutoConfig  # hf_fss's configs are registered: this module is part of hf_fss

    config = AutoConfig.from_pretrained(folder)
    card = render_model_card(
        config,
        metrics=_read_json(folder / "metrics.json"),
        training=_read_json(folder / "training.json"),
        repo_id=repo_id,
    )
    handle, tmp = tempfile.mkstemp(prefix=".README.", suffix=".md", dir=folder)
    os.close(handle)
    try:
        card.save(tmp)
        os.replace(tmp, folder / "README.md")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
    update_card: bool | None = None,
    api: HfApi | None = None,
):
    """
    Upload an hf_fss model folder to the Hub with `HfApi.create_repo(exist_ok=True)` and `HfApi.upload_folder`.

    Only the weights as safetensors, `config.json`, `preprocessor_config.json`, `README.md`, `metrics.json` and
    `training.json` are uploaded (see [`check_model_folder`], which refuses folders with pickle weights).

    Args:
        model_dir: folder written by `save_pretrained_with_card` (or `save_pretrained` of model and processor).
        repo_id: `"org/name"` on the Hub.
        private: create the repo private (None: the Hub's default; an existing repo keeps its visibility).
        revision: branch to push to (created from main when missing); None = main.
        commit_message: defaults to `"Upload <model_type> model with hf_fss"`.
        token: Hub token; None uses the logged-in one (`HF_TOKEN` / `hf auth login`).
        create_pr: open a pull request instead of committing to the branch.
        update_card: re-render `README.md` for `repo_id` from the folder's config, metrics.json and training.json.
            None (default): when README.md is missing or is a generated hf_fss card (it still holds the
            `<!-- hf_fss:generated-card` line); a card without that line is uploaded as it is. The rendered card is
            also written into `model_dir`.
        api: an `HfApi` to use (default: a new one with `token`).

    Returns:
        The `CommitInfo` of the upload.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id: {err}") from err
    if "/" not in repo_id:
        raise ValueError(f"repo_id must be 'org/name' (or 'user/name'), got {repo_id!r}")
    folder = Path(model_dir)
    check_model_folder(folder)
    if update_card or (update_card is None and _needs_card(folder / "README.md")):
        _render_card_for(folder, repo_id)
    files = check_model_folder(folder)  # again: README.md may be new
    config = _read_json(folder / "config.json") or {}
    message = commit_message or f"Upload {config.get('model_type', 'hf_fss')} model with hf_fss"

    api = api or HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=message,
        token=token,
        create_pr=create_pr,
        allow_patterns=files,
    )
