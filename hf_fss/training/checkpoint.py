"""
Training checkpoints that cannot execute code, carry a checksum manifest, and refuse settings that changed.

A checkpoint (`checkpoints/step_XXXXXXXX/`) holds:

    model.safetensors                 the weights (`accelerator.save_model`, safetensors)
    optimizer.json + .safetensors     `optimizer.state_dict()`
    scheduler.json + .safetensors     `lr_scheduler.state_dict()`
    scaler.json + .safetensors        the fp16 gradient scaler, when there is one
    training_state.json + .safetensors   the loop's counter, the model's training state (NTRENet's contrastive
                                      bank), the callbacks' state (model selection)
    rng_state_<process>.json + .safetensors   Python, NumPy, torch (CPU and CUDA) RNG states and Accelerate's
                                      accumulation counter, one pair per process
    checkpoint.json                   the manifest, written last: step, the sha256 of every file above, and the
                                      run settings that cannot change on resume

Every state is a tree of dicts, lists, tuples, numbers, strings, tensors and NumPy arrays: its structure goes to
JSON, its tensors to safetensors (`save_tree` / `load_tree`), so loading a checkpoint never unpickles anything
(Accelerate's `save_state` / `load_state` pickle the optimizer, scheduler, RNG states and custom objects, and
unpickle the latter without torch's weights-only restriction). A checkpoint is used only after every file in its manifest matched its
checksum (`verify_checkpoint`); `latest` is the newest checkpoint that verifies, and a damaged newer one is skipped
with a message naming the damaged file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "MANIFEST_NAME",
    "CheckpointError",
    "compare_settings",
    "find_latest_checkpoint",
    "load_tree",
    "save_tree",
    "verify_checkpoint",
    "write_manifest",
]

MANIFEST_NAME = "checkpoint.json"
FORMAT = "hf_fss-training-checkpoint"
VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, incomplete, of another format, or of different run settings."""


# ------------------------------------------------------------------------------------------- state <-> files


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        as_type = np.float64 if value.dtype.kind == "f" else np.int64
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).astype(as_type))
        return {"__ndarray__": key, "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {
            "__dict__": [
                [_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()
            ]
        }
    raise TypeError(
        f"cannot checkpoint {where} of type {type(value).__name__}: training state must be made of dicts, lists, "
        "tuples, numbers, strings, tensors and NumPy arrays"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    markers = [k for k in value if k.startswith("__")]
    if not markers:
        return {k: _decode(v, tensors, source) for k, v in value.items()}
    marker = markers[0]
    if marker == "__tuple__":
        return tuple(_decode(v, tensors, source) for v in value[marker])
    if marker == "__dict__":
        return {_decode(k, tensors, source): _decode(v, tensors, source) for k, v in value[marker]}
    if marker in ("__tensor__", "__ndarray__"):
        key = value[marker]
        if key not in tensors:
            raise CheckpointError(f"{source}: tensor {key!r} is missing from {source.with_suffix('.safetensors')}")
        if marker == "__tensor__":
            return tensors[key]
        return tensors[key].numpy().astype(np.dtype(value["dtype"]))
    raise CheckpointError(f"{source}: unknown entry {marker!r}")


def save_tree(state: Any, folder: str | os.PathLike, name: str) -> list[str]:
    """Write `state` as `<name>.json` (structure) + `<name>.safetensors` (tensors); returns the two file names."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"format": FORMAT, "state": structure}))
    return [f"{name}.json", f"{name}.safetensors"]


def load_tree(folder: str | os.PathLike, name: str) -> Any:
    """The state `save_tree` wrote; JSON and safetensors only, nothing is unpickled."""
    folder = Path(folder)
    structure_file, tensor_file = folder / f"{name}.json", folder / f"{name}.safetensors"
    for path in (structure_file, tensor_file):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
    try:
        document = json.loads(structure_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{structure_file} is not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{structure_file} is not an hf_fss training state file")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{tensor_file} is not a readable safetensors file ({err})") from None
    return _decode(document["state"], tensors, structure_file)


# ------------------------------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, step: int, settings: dict[str, Any]) -> Path:
    """Write `checkpoint.json` (last): the step, sha256 of every other file of `folder`, the run settings."""
    folder = Path(folder)
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "files": files, "settings": settings}
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME


def verify_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """
    The manifest of checkpoint `folder` once every file it lists exists with its recorded sha256; otherwise a
    `CheckpointError` naming the file. Files not in the manifest are never read.
    """
    folder = Path(folder)
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST_NAME}: it is incomplete or was written by an older hf_fss (whose checkpoints "
            "cannot be loaded safely); start the run again or resume from another checkpoint"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_file} is damaged (not valid JSON: {err})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"{manifest_file} is not an hf_fss checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{manifest_file}: checkpoint format version {manifest.get('version')!r} is unknown")
    for name, expected in manifest["files"].items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{path} is missing from checkpoint {folder}")
        if _sha256(path) != expected:
            raise CheckpointError(
                f"{path} is damaged (its sha256 differs from the one recorded in {MANIFEST_NAME}); resume from "
                "another checkpoint"
            )
    return manifest


def find_latest_checkpoint(output_dir: str | os.PathLike, say=print) -> Path | None:
    """
    The newest `checkpoints/step_N` of `output_dir` that verifies (`verify_checkpoint`), or None; each newer one
    that does not is reported with `say` (naming the damaged file) and skipped.
    """
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    skipped = []
    for _, path in sorted(steps, reverse=True):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            skipped.append(path)
            say(f"skipping checkpoint {path}: {err}")
            continue
        if skipped:
            say(f"resuming from {path}, the newest checkpoint that verifies")
        return path
    return None


# ------------------------------------------------------------------------------------------------- settings


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare_settings(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse (`CheckpointError`) when a setting that cannot change on resume differs, listing both values."""
    # JSON turns tuples into lists: compare what JSON makes of the current values.
    current = json.loads(json.dumps(current))
    differ = [
        f"{name}: checkpoint {saved.get(name, '(unset)')!r}, now {current.get(name, '(unset)')!r}"
        for name in sorted(set(saved) | set(current))
        if not _same(saved.get(name, "(unset)"), current.get(name, "(unset)"))
    ]
    if differ:
        raise CheckpointError(
            f"cannot resume from {checkpoint} with different settings (they cannot change during a run): "
            + "; ".join(differ)
            + ". Resume with the checkpoint's values, or start a new run in another --output-dir"
        )
