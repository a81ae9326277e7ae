"""Helpers every raw-release builder shares: file checks, image / label encoding and streaming split creation."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
from datasets import Dataset

from ..schema import IGNORE_INDEX, benchmark_features
from ..text import read_user_text

logger = logging.getLogger("hf_fss.data.builders")

# Bump when the rows a builder writes change, so that cached builds (cache_dir=None) are not reused.
BUILDER_VERSION = "2"

# The build report (what was fixed, what was skipped) is appended to each split's DatasetInfo.description after
# this marker, as JSON: `save_to_disk` / `load_from_disk` / `push_to_hub` keep it. Read it with `build_report`.
REPORT_MARKER = "\n\nBuild report (JSON): "
# A split where more than this share of the rows is skipped is a wrong source folder, not a few bad files.
MAX_SKIPPED_SHARE = 0.5
_REPORT_LOG_LINES = 20

# What a build-report entry is: {kind: (action, meaning)}. The report and prepare_dataset.py's summary count the
# entries of each kind, so a build that normalised lists or dropped symlinks says so in numbers.
REPORT_KINDS = {
    "list_normalised": ("fixed", "a list / annotation file saved with a BOM, CRLF or CR line ends, or as UTF-16"),
    "duplicate_id": ("fixed", "an id or class name listed again: kept once"),
    "train_id_in_val": ("fixed", "an id listed for train and for validation: kept in validation only"),
    "name_normalised": ("fixed", "a class name in another Unicode form (e.g. NFD): compared and stored in NFC"),
    "coco_category_missing": ("fixed", "a COCO category missing from the file: its class keeps its id"),
    "coco_category_unknown": ("fixed", "a category outside COCO's 80: its pixels are ignore (255)"),
    "unknown_category_annotation": ("fixed", "an annotation of a category outside COCO's 80: painted ignore (255)"),
    "file_fixed": ("fixed", "a raw file with a defect that has an obvious fix (resized, mapped back, cast, ...)"),
    "symlink_followed": ("fixed", "a symlinked class folder or image whose target lies outside the tree: followed"),
    "symlink_skipped": ("skipped", "a symlink into the tree, or to a file already used: not followed (a duplicate)"),
    "empty_class_folder": ("skipped", "a class folder holding no image: the class has no rows"),
    "stray_file": ("skipped", "a file of a class folder that is no image or mask: not used"),
    "unlisted_class": ("skipped", "a class folder in no split list: not used"),
    "orphan_annotation": ("skipped", "an annotation of an image the file does not list"),
    "file_skipped": ("skipped", "a missing, unreadable or unfixable file: its row is left out"),
}


class SkipRow(ValueError):
    """A raw file with a defect that has no obvious fix: its row is left out and reported."""


def report_entry(entry_id: str, kind: str, problem: str, *, row: bool = False) -> dict:
    """
    An entry of a `build_split` listing report: `kind` is one of `REPORT_KINDS` (which says whether it was fixed
    or skipped); `row=True` when it stands for a row of the split left out (counted against MAX_SKIPPED_SHARE).
    """
    action = REPORT_KINDS[kind][0]
    return {"id": str(entry_id), "action": action, "kind": kind, "problem": problem, "row": row}


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


def read_id_list(path: str | os.PathLike, listing: list | None = None) -> list[str]:
    """
    Ids listed one per line in `path`, in file order, without duplicates.

    The file is read as users save it (`hf_fss.data.text.read_user_text`: a BOM, CRLF line ends or UTF-16 with a
    BOM are fine; other encodings are a ValueError naming the file); blank lines, tabs and trailing whitespace are
    ignored. Besides bare ids (VOC / SBD lists) this accepts the DeepLab list format, whose lines hold paths such as
    `/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`: the first token's file stem is the id.
    An id listed again is dropped and, with `listing`, reported there (a `build_split` listing entry), as is a
    file saved with a BOM, CRLF line ends or as UTF-16 (kind "list_normalised").
    """
    path = require_file(path, "id list")
    ids, seen, notes = [], set(), []
    text = read_user_text(path, "id list", notes)
    if listing is not None:
        listing.extend(report_entry(path.name, "list_normalised", note) for note in notes)
    for number, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        name = tokens[0].replace("\\", "/").rsplit("/", 1)[-1]
        stem, dot, suffix = name.rpartition(".")
        if dot and suffix.lower() in {"jpg", "jpeg", "png", "mat"}:
            name = stem
        if name in seen:
            if listing is not None:
                problem = f"{path} lists {name} again on line {number}: listed once"
                listing.append(report_entry(name, "duplicate_id", problem))
            continue
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
    try:
        data = path.read_bytes()
        image = PIL.Image.open(io.BytesIO(data))
        image.load()  # decodes everything: a truncated or corrupt file fails here, not later in training
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


def fit_label(
    label: np.ndarray, size: tuple[int, int], label_source: str | os.PathLike, image_source: str | os.PathLike, fixes
) -> np.ndarray:
    """
    `label` on the image's `(width, height)` grid. A label that is an exact scale of the image (both sides by the same
    factor, e.g. a 448x448 mask of a 224x224 image) is resized nearest-neighbour and the fix appended to `fixes`;
    any other size is a SkipRow naming both files and sizes (no obvious fix).
    """
    width, height = size
    lh, lw = label.shape
    if (lh, lw) == (height, width):
        return label
    seen = f"image {image_source} is {width}x{height} but its label {label_source} is {lw}x{lh}"
    if lh == 0 or lw == 0 or Fraction(height, lh) != Fraction(width, lw):
        raise SkipRow(f"{seen}, not a scale of it")
    resized = np.array(PIL.Image.fromarray(label).resize((width, height), PIL.Image.NEAREST), dtype=np.uint8)
    fixes.append(f"{seen}: resized (nearest) to the image, an exact scale x{Fraction(height, lh)}")
    return resized


def make_row(
    image_id: str, image_path: Path, label: np.ndarray, label_source: str | os.PathLike, fixes: list | None = None
) -> dict:
    """
    One benchmark row. A label of another size than its image is fitted by `fit_label` (an exact scale is resized,
    noted in `fixes`; else SkipRow naming both files). Without `fixes` any size difference is a ValueError.
    """
    image, (width, height) = encode_image(image_path)
    if fixes is None and label.shape != (height, width):
        raise ValueError(
            f"image {image_path} is {width}x{height} but its label {label_source} is {label.shape[1]}x{label.shape[0]}"
        )
    label = fit_label(label, (width, height), label_source, image_path, fixes if fixes is not None else [])
    class_ids, class_areas = class_stats(label)
    return {
        "image_id": image_id,
        "image": image,
        "label": encode_label(label),
        "class_ids": class_ids,
        "class_areas": class_areas,
    }


def file_signature(path: Path) -> list:
    """What identifies a file's version for the cache fingerprint: path, size and modification time (None, None
    for a missing file: its row is skipped and reported when the split is built)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return [os.path.abspath(path), None, None]
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def rows_with_report(items: Sequence, row_fn: Callable[[tuple, list], dict], report_dir: str):
    """
    The generator `build_split` streams: `row_fn(item, fixes)` per item. A row whose files have a defect with an
    obvious fix is yielded and the fixes `row_fn` appended are reported; one that raises SkipRow, ValueError or
    OSError (a missing, unreadable or unfixable file) is left out and reported. The shard's report is written to
    `report_dir` (one JSON file per shard, so worker processes never share a file).
    """
    entries = []
    for item in items:
        fixes: list[str] = []
        try:
            row = row_fn(item, fixes)
        except (ValueError, OSError) as err:  # SkipRow is a ValueError
            entries.append(report_entry(item[0], "file_skipped", str(err), row=True))
            continue
        entries.extend(report_entry(item[0], "file_fixed", fix) for fix in fixes)
        yield row
    if items:
        report_path = Path(report_dir)
        report_path.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(json.dumps([str(items[0][0]), str(items[-1][0]), len(items)]).encode()).hexdigest()
        (report_path / f"{name[:24]}.json").write_text(json.dumps(entries))


def build_report(dataset: Dataset) -> dict:
    """
    What the build of this split fixed and skipped: `{"fixed": [...], "skipped": [...], "counts": {kind: n}}`,
    each entry `{"id": image id (or file), "kind": one of REPORT_KINDS, "problem": what was wrong and, for a fix,
    what was done}`, and `counts` the number of entries of each kind present (in `REPORT_KINDS` order). Read from
    the JSON that `build_split` appends to `dataset.info.description` (kept by `save_to_disk` /
    `load_from_disk`); empty for a dataset without one. Entries of builds older than the kinds count as
    "file_fixed" / "file_skipped".
    """
    description = dataset.info.description or ""
    if REPORT_MARKER not in description:
        return {"fixed": [], "skipped": [], "counts": {}}
    report = json.loads(description.split(REPORT_MARKER, 1)[1])
    for action in ("fixed", "skipped"):
        for entry in report[action]:
            entry.setdefault("kind", f"file_{action}")
    report.setdefault("counts", count_kinds(report))
    return report


def count_kinds(report: dict) -> dict[str, int]:
    """{kind: number of entries} of a report's "fixed" and "skipped" entries, in `REPORT_KINDS` order (others
    after), kinds without entries left out."""
    found = Counter(entry["kind"] for action in ("fixed", "skipped") for entry in report[action])
    order = {kind: i for i, kind in enumerate(REPORT_KINDS)}
    return {kind: found[kind] for kind in sorted(found, key=lambda k: (order.get(k, len(order)), k))}


def _collect_report(report_dir: Path, listing: Sequence[dict], items: Sequence) -> dict:
    """What listing found, then the shards' entries in row order, as {"fixed": [...], "skipped": [...],
    "counts": {kind: n}} (see `build_report`)."""
    order = {str(item[0]): i for i, item in enumerate(items)}
    entries, seen = [], set()
    for path in sorted(report_dir.glob("*.json")) if report_dir.is_dir() else []:
        for entry in [*json.loads(path.read_text())]:
            key = (entry["id"], entry["action"], entry["problem"])
            if key not in seen:
                seen.add(key)
                entries.append(entry)
    entries = [*listing, *sorted(entries, key=lambda e: order.get(e["id"], len(order)))]
    report = {
        action: [
            {"id": e["id"], "kind": e.get("kind", f"file_{action}"), "problem": e["problem"]}
            for e in entries
            if e["action"] == action
        ]
        for action in ("fixed", "skipped")
    }
    report["counts"] = count_kinds(report)
    return report


def _log_report(split: str, report: dict) -> None:
    for action in ("fixed", "skipped"):
        entries = report[action]
        for entry in entries[:_REPORT_LOG_LINES]:
            logger.warning("%s split, %s %s: %s", split, action, entry["id"], entry["problem"])
        if len(entries) > _REPORT_LOG_LINES:
            logger.warning(
                "%s split: %d more %s (all are in the dataset info: hf_fss.data.builders.build_report)",
                split,
                len(entries) - _REPORT_LOG_LINES,
                action,
            )
    if report["fixed"] or report["skipped"]:
        logger.warning(
            "%s split: %d defects of the release fixed, %d skipped (%s)",
            split,
            len(report["fixed"]),
            len(report["skipped"]),
            format_counts(report["counts"]),
        )


def format_counts(counts: dict[str, int]) -> str:
    """`counts` of `build_report` as one phrase, e.g. "list_normalised 2, duplicate_id 1"."""
    return ", ".join(f"{kind} {number}" for kind, number in counts.items())


def build_split(
    row_fn: Callable[[tuple, list], dict],
    items: Sequence,
    class_names: Sequence[str],
    *,
    split: str,
    signature: object,
    description: str,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    listing_report: Sequence[dict] = (),
) -> Dataset:
    """
    Stream `row_fn(item, fixes)` over `items` (see `rows_with_report`) into an Arrow-backed Dataset with the
    benchmark features.

    `items` (one picklable entry per row, in row order, the image id first) is what `num_proc` workers share out
    in contiguous shards, so the row order does not depend on `num_proc`. `signature` (JSON-serialisable: the
    source paths, ids, file sizes and times) fingerprints the build: an unchanged release reuses the cache in
    `cache_dir` (with its report), a changed one is rebuilt, and large annotation objects are never hashed.
    `listing_report` holds what the builder fixed or skipped while listing the release (`report_entry`s). The report is logged and appended to `info.description` (see `build_report`); a
    split without rows, or with more than half of them skipped, is a ValueError naming the first problems.
    """
    if not items:
        raise ValueError(f"the {split} split has no rows: {description}")
    payload = json.dumps([BUILDER_VERSION, split, list(class_names), signature], sort_keys=True, default=str)
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()[:32]
    cache_root = Path(cache_dir if cache_dir is not None else datasets.config.HF_DATASETS_CACHE)
    report_dir = cache_root / "hf_fss_build_reports" / fingerprint
    dataset = Dataset.from_generator(
        rows_with_report,
        features=benchmark_features(class_names),
        gen_kwargs={"items": list(items), "row_fn": row_fn, "report_dir": str(report_dir)},
        cache_dir=None if cache_dir is None else str(cache_dir),
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        split=split,
        fingerprint=fingerprint,
    )
    report = _collect_report(report_dir, listing_report, items)
    listed_skips = sum(1 for e in listing_report if e["action"] == "skipped" and e.get("row", True))
    total, lost = len(items) + listed_skips, len(items) - dataset.num_rows + listed_skips
    if dataset.num_rows == 0 or lost > MAX_SKIPPED_SHARE * total:
        first = "; ".join(e["problem"] for e in report["skipped"][:3])
        raise ValueError(
            f"the {split} split lost {lost} of its {total} rows to bad or missing files, which points to a wrong "
            f"source folder rather than a few damaged files; first problems: {first}"
        )
    _log_report(split, report)
    dataset.info.description = description + REPORT_MARKER + json.dumps(report)
    return dataset
