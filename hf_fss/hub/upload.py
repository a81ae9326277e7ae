"""
Upload a saved hf_fss model folder to the Hugging Face Hub: safetensors weights, `config.json`,
`preprocessor_config.json`, the model card and the evaluation / training records, never pickle files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..cli import ScriptArgumentParser, command_prog, os_error_line
from ..utils import resolve_model_path, run_folder_model
from ..utils.io import atomic_write_text
from .model_card import CARD_MARKER, render_model_card

__all__ = [
    "HubUploadError",
    "describe_hub_error",
    "PICKLE_SUFFIXES",
    "REQUIRED_FILES",
    "UPLOADED_FILES",
    "check_model_folder",
    "main",
    "parse_args",
    "push_to_hub",
]

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


def _render_card_for(folder: Path, repo_id: str) -> str:
    """The card of `folder` rendered for `repo_id`, as README.md text (nothing is written)."""
    from transformers import AutoConfig  # hf_fss's configs are registered: this module is part of hf_fss

    config = AutoConfig.from_pretrained(folder)
    card = render_model_card(
        config,
        metrics=_read_json(folder / "metrics.json"),
        training=_read_json(folder / "training.json"),
        repo_id=repo_id,
    )
    return str(card)


def _stage(folder: Path, files: list[str], staging: Path, card: str | None) -> None:
    """Lay out the upload in `staging`: links to the folder's files, and the rendered card when there is one."""
    for name in files:
        if card is not None and name == "README.md":
            continue
        try:
            os.symlink((folder / name).resolve(), staging / name)
        except OSError:  # no symlinks here (some Windows setups): copy
            shutil.copy2(folder / name, staging / name)
    if card is not None:
        (staging / "README.md").write_text(card, encoding="utf-8")


class HubUploadError(OSError):
    """An upload the Hub refused or could not receive; the message says why in one line."""


def describe_hub_error(error: BaseException, repo_id: str) -> str | None:
    """One line saying why a Hub call failed (no network, bad repo id, no token, ...), or None if not a Hub error."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return "no network: HF_HUB_OFFLINE is set; unset it to upload"
    if isinstance(error, LocalTokenNotFoundError) or status == 401:
        return "no valid Hub token: log in with `hf auth login`, set HF_TOKEN or pass --token"
    if status == 403:
        return f"the token may not write to {repo_id!r} (a token with write access to that namespace is needed)"
    if status == 404:
        return f"repo {repo_id!r} or its namespace does not exist on the Hub (check the repo id)"
    if isinstance(error, HfHubHTTPError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the Hub refused the upload ({first})"
    if isinstance(error, (HTTPError, ConnectionError, TimeoutError)):
        return f"no network: cannot reach the Hub ({type(error).__name__}: {' '.join(str(error).split())})"
    return None


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
            `<!-- hf_fss:generated-card` line); a card without that line is uploaded as it is. The card is rendered
            in a temporary staging folder and written into `model_dir` only after the upload succeeded.
        api: an `HfApi` to use (default: a new one with `token`).

    Returns:
        The `CommitInfo` of the upload.

    Raises:
        `ValueError`: a bad repo id or model folder (nothing is sent). `HubUploadError` (an `OSError`): the upload
        failed, with one line saying why (no network, no token, no write access, no such repo); `model_dir` is left
        as it was.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id: {err}") from err
    if "/" not in repo_id:
        raise ValueError(f"repo_id must be 'org/name' (or 'user/name'), got {repo_id!r}")
    folder = Path(model_dir)
    files = check_model_folder(folder)
    card = None
    if update_card or (update_card is None and _needs_card(folder / "README.md")):
        card = _render_card_for(folder, repo_id)
        files = [name for name in files if name != "README.md"] + ["README.md"]
    config = _read_json(folder / "config.json") or {}
    message = commit_message or f"Upload {config.get('model_type', 'hf_fss')} model with hf_fss"

    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_fss-upload-") as staging:
        _stage(folder, files, Path(staging), card)
        try:
            api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                repo_type="model",
                revision=revision,
                commit_message=message,
                token=token,
                create_pr=create_pr,
                allow_patterns=files,
            )
        except Exception as err:
            reason = describe_hub_error(err, repo_id)
            if reason is None:
                raise
            raise HubUploadError(f"upload of {folder} to {repo_id} failed: {reason}") from err
    if card is not None:  # only now that the Hub has it: the local card matches the uploaded one
        atomic_write_text(folder / "README.md", card)
    return commit


# ------------------------------------------------------------------------------------ command line

PUSH_USAGE = r"""
Upload a saved hf_fss model folder to the Hugging Face Hub: safetensors weights, config.json,
preprocessor_config.json, the model card (README.md) and metrics.json / training.json when present.

    python scripts/push_to_hub.py --model-dir outputs/ntrenet-pascal5i-fold0 \
        --repo-id my-org/ntrenet-r50-pascal5i-fold0 [--private] [--revision BRANCH] [--create-pr]

A training run folder (`train.py --output-dir`) uploads its best/ model, else final/, named in a warning.
A folder holding pickle weights (*.bin, *.pt, *.pth, *.pkl) or lacking model.safetensors, config.json or
preprocessor_config.json is refused. A missing README.md, or one generated by hf_fss, is rendered for the repo id
from config.json, metrics.json and training.json, in a temporary folder: the local README.md is updated only after
the upload succeeded. The token defaults to the logged-in one (HF_TOKEN / `hf auth login`). A failure (no network,
no token, bad repo id, a refused folder) is one line `push_to_hub.py: error: ...` with exit status 2, and changes
nothing on disk.
"""

PROG = "push_to_hub.py"


def _model_folder(model_dir: Path) -> Path:
    """`--model-dir` itself, or for a training run folder its best/ (else final/), as evaluate.py and the Space."""
    # Anything else goes to check_model_folder as it is, whose error names the files it lacks.
    return Path(resolve_model_path(model_dir)) if run_folder_model(model_dir) else model_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(
        prog=PROG,
        description=PUSH_USAGE.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=PUSH_USAGE.split("\n\n", 1)[1],  # the rest of the docstring: the description is not repeated
    )
    parser.add_argument("--model-dir", required=True, type=Path, help="folder written by save_pretrained_with_card")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created when missing); default main")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument(
        "--keep-card", action="store_true", help="upload README.md as it is, even a generated one (no re-rendering)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """`scripts/push_to_hub.py` / `hf-fss push`: upload; a failure is one line on stderr and exit status 2."""
    args = parse_args(argv)
    model_dir = _model_folder(args.model_dir)
    try:
        commit = push_to_hub(
            model_dir,
            args.repo_id,
            private=True if args.private else None,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            create_pr=args.create_pr,
            update_card=False if args.keep_card else None,
        )
    except (ValueError, OSError) as err:  # bad folder or repo id, or the Hub's HubUploadError: one line, status 2
        if isinstance(err, OSError) and err.errno is not None and err.filename is not None:
            message = os_error_line(err)  # a folder one may not read: the path and what to do
        else:
            message = " ".join(str(err).splitlines())
        print(f"{command_prog(PROG)}: error: {message}", file=sys.stderr)
        return 2
    url = (
        getattr(commit, "pr_url", None)
        or getattr(commit, "commit_url", None)
        or f"https://huggingface.co/{args.repo_id}"
    )
    print(f"uploaded {model_dir} to {args.repo_id}: {url}")
    return 0
