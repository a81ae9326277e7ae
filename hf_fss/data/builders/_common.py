"""Helpers every raw-release builder shares: file checks, image / label encoding and streaming split creation."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import Dataset

from ..schema import IGNORE_INDEX, benchmark_features

# Bump when the rows a builder writes change, so that cached builds (cache_dir=None) are not reused.
BUILDER_VERSION = "1"

_EXIF_ORIENTATION = 0x0112


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path; FileNotFoundError naming it (and what it should be) when it is not a directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} is not a directory")
    return path


def require_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path; FileNotFoundError naming it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_id_list(path: str | os.PathLike) -> list[str]:
    """
    Ids listed one per line in `path`, in file order, without duplicates.

    Besides bare ids (VOC / SBD lists) this accepts the DeepLab list format, whose lines hold paths such as
    `/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`: the first token's file stem is the id.
    """
    path = require_file(path, "id list")
    ids, seen = [], set()
    for line in path.read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        name = tokens[0].replace("\\", "/").rsplit("/", 1)[-1]
        stem, dot, suffix = name.rpartition(".")
        if dot and suffix.lower() in {"jpg", "jpeg", "png", "mat"}:
            name = stem
        if name not in seen:
            seen.add(name)
            ids.append(name)
    return ids


def encode_image(path: Path) -> tuple[dict, tuple[int, int]]:
    """
    The image at `path` as an Image-feature dict, and its (width, height).

    RGB JPEG / PNG files are stored as their original bytes (no re-encoding loss). Anything else is converted to
    RGB and stored as a lossless PNG: grayscale or CMYK JPEGs (COCO has some), and JPEGs with an EXIF orientation
    tag, because `datasets` applies that rotation when it decodes while the annotations are drawn on the stored
    pixel grid; the PNG carries no EXIF, so image and label stay aligned.
    """
    data = path.read_bytes()
    try:
        image = PIL.Image.open(io.BytesIO(data))
        rotated = image.getexif().get(_EXIF_ORIENTATION, 1) != 1
        if image.mode == "RGB" and image.format in ("JPEG", "PNG") and not rotated:
            return {"bytes": data, "path": None}, image.size
        image = image.convert("RGB")  # decodes the raw pixel grid; EXIF orientation is deliberately not applied
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}, image.size


def encode_label(label: np.ndarray) -> dict:
    """A 2-D uint8 array of class ids as an Image-feature dict holding a mode "L" PNG of exactly those values."""
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"label maps must be 2-D uint8, got {label.dtype} of shape {label.shape}")
    buffer = io.BytesIO()
    PIL.Image.fromarray(label).save(buffer, format="PNG")  # 2-D uint8 -> mode "L", no palette
    return {"bytes": buffer.getvalue(), "path": None}


def read_index_png(path: Path) -> np.ndarray:
    """
    The class ids stored in a label PNG, as 2-D uint8.

    Palette ("P") PNGs are read as their indices, never converted through the palette: `.convert("L")` would map
    each id to its colour's luminance and silently change the ids.
    """
    try:
        image = PIL.Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read label {path}: {err}") from err
    if image.mode in ("P", "L"):
        return np.array(image, dtype=np.uint8)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        array = np.array(image)
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"label {path} has ids outside 0..255")
        return array.astype(np.uint8)
    raise ValueError(f"label {path} is a mode {image.mode!r} image; expected a single-channel (L or P) id map")


def check_ids(label: np.ndarray, num_classes: int, source: str | os.PathLike) -> None:
    """ValueError naming `source` when `label` holds ids that are neither a class (< num_classes) nor 255."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in present if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise ValueError(f"label {source} has ids {bad} outside the {num_classes} classes (and 255 = ignore)")


def class_stats(label: np.ndarray) -> tuple[list[int], list[int]]:
    """Ids present in `label` (ascending, background 0 and 255 left out) and their pixel counts."""
    counts = np.bincount(label.ravel(), minlength=256)
    ids = [int(v) for v in np.flatnonzero(counts) if v not in (0, IGNORE_INDEX)]
    return ids, [int(counts[v]) for v in ids]


def make_row(image_id: str, image_path: Path, label: np.ndarray, label_source: str | os.PathLike) -> dict:
    """One benchmark row; ValueError naming both files when image and label sizes differ."""
    image, (width, height) = encode_image(image_path)
    if label.shape != (height, width):
        raise ValueError(
            f"image {image_path} is {width}x{height} but its label {label_source} is {label.shape[1]}x{label.shape[0]}"
        )
    class_ids, class_areas = class_stats(label)
    return {
        "image_id": image_id,
        "image": image,
        "label": encode_label(label),
        "class_ids": class_ids,
        "class_areas": class_areas,
    }


def file_signature(path: Path) -> list:
    """What identifies a file's version for the cache fingerprint: path, size and modification time."""
    stat = path.stat()
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def build_split(
    generator: Callable[..., Iterable[dict]],
    items: Sequence,
    class_names: Sequence[str],
    *,
    split: str,
    signature: object,
    description: str,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """
    Stream `generator(items=[...])` into an Arrow-backed Dataset with the benchmark features.

    `items` (one picklable entry per row, in row order) is what `num_proc` workers share out in contiguous
    shards, so the row order does not depend on `num_proc`. `signature` (JSON-serialisable: the source paths,
    ids, file sizes and times) fingerprints the build: an unchanged release reuses the cache in `cache_dir`, a
    changed one is rebuilt, and large annotation objects are never hashed.
    """
    if not items:
        raise ValueError(f"the {split} split has no rows: {description}")
    payload = json.dumps([BUILDER_VERSION, split, list(class_names), signature], sort_keys=True, default=str)
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:32]
    dataset = Dataset.from_generator(
        generator,
        features=benchmark_features(class_names),
        gen_kwargs={"items": list(items)},
        cache_dir=None if cache_dir is None else str(cache_dir),
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        split=split,
        fingerprint=fingerprint,
    )
    dataset.info.description = description
    return dataset
