"""
A user's own images and masks as a benchmark (`scripts/prepare_dataset.py folder`): the same schema as the
releases, with a train / validation / test split of the classes, so `train.py`, `evaluate.py` and `compare.py`
work on it unchanged (benchmark `"folder"`, see `hf_fss.data.folds`).

Two layouts are read:

- label maps (default): `IMAGES/<name>.jpg` (also `.jpeg`, `.png`, in sub-folders too) and `MASKS/<name>.png`, a
  palette ("P") or grayscale PNG whose pixel values are class ids (0 = background, 255 = ignore). Class names come
  from `--class-names FILE` (line k names class id k, line 0 the background) or are `class_<id>` for the ids found.
- per-class folders (`--class-folders`, the FSS-1000 layout): `IMAGES/<class>/<name>.jpg` with a black / white
  mask `MASKS/<class>/<name>.png` (MASKS may be IMAGES itself); white (>= 128) is the folder's class.

Bad input is found before any row is written and raised as one ValueError listing the problems (an image without
its mask, a mask whose size is not a scale of its image's, class ids the names do not cover, too few classes for
the split); `skip_invalid=True` leaves those images out instead and reports them like the releases' defects
(`build_report`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import DatasetDict

from ..text import read_text_lines
from ._common import (
    SkipRow,
    build_split,
    file_signature,
    make_row,
    read_index_png,
    report_entry,
    require_dir,
    require_file,
)
from ._layout import class_folders as list_class_folders
from ._layout import is_duplicate_link, normalized_names, read_name_list, real_files, refuse_duplicate_names
from .fss import fallback_split, read_fss_mask

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# --split-dir: class names of each split, one per line.
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
DESCRIPTION_PREFIX = "Custom folder"
# The class split is recorded in every split's DatasetInfo.description after this marker (before the build
# report), as JSON {"train": [ids], "validation": [ids], "test": [ids]}: `recorded_class_split` reads it.
CLASS_SPLIT_MARKER = "\n\nClass split (JSON): "
_MAX_LISTED_PROBLEMS = 10
# Class ids a dense uint8 label map can hold (255 is ignore); with more classes rows store binary masks.
_MAX_DENSE_ID = 254


def recorded_class_split(split_description: str) -> dict[str, tuple[int, ...]] | None:
    """The {split: class ids} a folder build recorded in a split's `info.description`; None when there is none."""
    if CLASS_SPLIT_MARKER not in (split_description or ""):
        return None
    text = split_description.split(CLASS_SPLIT_MARKER, 1)[1]
    decoded, _ = json.JSONDecoder().raw_decode(text)
    return {name: tuple(int(c) for c in ids) for name, ids in decoded.items()}


def _list_images(
    root: Path, notes: list, suffixes: Sequence[str] = IMAGE_SUFFIXES, targets: dict | None = None
) -> dict[str, Path]:
    """
    Image files under `root` (recursively, hidden entries skipped) by their path relative to it, without suffix.

    Symlinks are not followed into duplicates (`_layout`): a symlinked sub-folder is not read (a link to a parent
    or sibling folder would list its images twice), and a symlinked file whose target is a real file of the tree
    (or the target of an earlier link) is left out. Both are appended to `notes` as "symlink_skipped" report
    entries. `targets` ({resolved path: the path that owns it}, default `real_files(root)`) is shared across calls
    so that duplicates across class folders are found too.
    """
    found: dict[str, Path] = {}
    targets = real_files(root) if targets is None else targets
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        where = path.relative_to(root.parent).as_posix()
        if path.is_symlink() and path.is_dir():
            problem = f"{path} is a symlinked folder: not followed (its images would repeat)"
            notes.append(report_entry(where, "symlink_skipped", problem))
            continue
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        key = relative.with_suffix("").as_posix()
        if key in found:
            raise ValueError(f"two images share the name {key!r}: {found[key]} and {path}; rename one")
        if not is_duplicate_link(path, targets, notes, where):
            found[key] = path
    return found


def read_class_names(path: str | os.PathLike, notes: list | None = None) -> list[str]:
    """
    Class names by id from a text file: line k names class id k, line 0 the background (blank lines are not
    allowed inside the list: they would shift the ids). Read as editors save it (`read_text_lines`: BOM, CRLF,
    UTF-16 with a BOM), names in Unicode NFC; with `notes`, a file so normalised ("list_normalised") and each name
    that was not in NFC ("name_normalised") are appended there as report entries. ValueError for duplicate (also
    up to normalisation) or missing names.
    """
    notes = [] if notes is None else notes
    require_file(path, "class names file")
    texts: list[str] = []
    lines = read_text_lines(path, "class names file", texts)
    notes.extend(report_entry(Path(path).name, "list_normalised", text) for text in texts)
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) < 2:
        raise ValueError(f"class names file {path} must name the background (line 0) and at least one class")
    if "" in lines:
        raise ValueError(f"class names file {path}: line {lines.index('')} is blank; line k names class id k")
    refuse_duplicate_names(lines, f"class names file {path}")
    if len(lines) > _MAX_DENSE_ID + 1:
        raise ValueError(f"class names file {path} names {len(lines) - 1} classes; label maps hold at most 254")
    return normalized_names(lines, f"class names file {path}", notes)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with PIL.Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as err:
        raise SkipRow(f"cannot read image {path}: {err}") from err


def _check_size(image_path: Path, mask_path: Path, mask_shape: tuple[int, int]) -> None:
    """SkipRow when the mask is neither the image's size nor an exact scale of it (which the build resizes)."""
    width, height = _image_size(image_path)
    mh, mw = mask_shape
    if (mh, mw) != (height, width) and (mh == 0 or mw == 0 or Fraction(height, mh) != Fraction(width, mw)):
        raise SkipRow(f"image {image_path} is {width}x{height} but its mask {mask_path} is {mw}x{mh}")


def _scan_label_maps(images: Path, masks: Path, names: list[str] | None, notes: list):
    """(entries [(id, image, mask, present ids)], problems, class names) of the label-map layout; symlinks not
    followed into duplicates are noted in `notes` (see `_list_images`)."""
    if images == masks:
        raise ValueError(
            "label maps need their own --masks folder (the images folder is only one with --class-folders)"
        )
    entries, problems = [], []
    for key, image_path in _list_images(images, notes).items():
        mask_path = masks / f"{key}.png"
        if not mask_path.is_file():
            problems.append((key, f"image {image_path} has no mask {mask_path}"))
            continue
        try:
            label = read_index_png(mask_path)
            _check_size(image_path, mask_path, label.shape)
        except ValueError as err:  # SkipRow is a ValueError
            problems.append((key, str(err)))
            continue
        present = [int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=256)) if v not in (0, 255)]
        if names is not None:
            unknown = [v for v in present if v >= len(names)]
            if unknown:
                problems.append(
                    (
                        key,
                        f"mask {mask_path} has class ids {unknown} that the class names (ids 0..{len(names) - 1}) "
                        "do not cover; add their names or fix the mask",
                    )  # fmt: skip
                )
                continue
        entries.append((key, image_path, mask_path, present))
    if names is None:
        top = max((max(e[3]) for e in entries if e[3]), default=0)
        names = ["background", *(f"class_{i}" for i in range(1, top + 1))]
    return entries, problems, names


def _scan_class_folders(images: Path, masks: Path, notes: list):
    """(entries, problems, class names) of the per-class folder layout; a row's ids are [its folder's id] and its id
    "<class>/<name>" with the class name in NFC. Duplicates by symlink are left out (a symlinked class folder
    outside the tree is followed), folder names are read in NFC, and a folder holding no image is a class without
    rows: each noted in `notes` (see `_layout.class_folders`)."""
    by_name = list_class_folders(images, f"--images {images}, its class folders", notes)
    names = ["background", *by_name]
    if len(names) - 1 > _MAX_DENSE_ID:
        logger.info("%d classes: rows store binary masks (1 = the row's class), as FSS-1000", len(names) - 1)
    entries, problems, targets = [], [], real_files(images)
    for class_id, (name, folder) in enumerate(by_name.items(), start=1):
        # The FSS-1000 layout (masks in the images' folders): the .png files beside the images are the masks.
        suffixes = (".jpg", ".jpeg") if images == masks else IMAGE_SUFFIXES
        listed = _list_images(folder, notes, suffixes, targets)
        if not listed and not any(p.suffix.lower() in suffixes for p in folder.rglob("*")):
            # Nothing to skip or fix in it, so no other entry would say why the class has no rows.
            problem = f"class folder {folder} holds no image ({', '.join(suffixes)}): class {name!r} has no rows"
            notes.append(report_entry(name, "empty_class_folder", problem))
        for key, image_path in listed.items():
            mask_path = masks / folder.name / f"{key}.png"
            row_id = f"{name}/{key}"
            if not mask_path.is_file():
                problems.append((row_id, f"image {image_path} has no mask {mask_path}"))
                continue
            try:
                mask = read_fss_mask(mask_path)
                _check_size(image_path, mask_path, mask.shape)
            except ValueError as err:
                problems.append((row_id, str(err)))
                continue
            entries.append((row_id, image_path, mask_path, [class_id] if mask.any() else []))
    if not entries and not problems:
        raise ValueError(f"no class folders holding images found in {images} (expected {images}/<class>/<name>.jpg)")
    return entries, problems, names


def _split_of_image(present: Sequence[int], class_split: Mapping[str, Sequence[int]]) -> str:
    """An image goes to the test split when it shows a test class, else validation, else train: train images never
    show a held-out class, so the held-out classes are truly unseen in training."""
    for split in ("test", "validation"):
        if set(present) & set(class_split[split]):
            return split
    return "train"


def _class_split(names: list[str], present: set[int], split_dir, seed: int, notes: list) -> dict[str, list[int]]:
    """Class ids of train / validation / test: from split lists of names (read by `_layout.read_name_list`, what
    it normalised noted in `notes`), or seeded over the classes present."""
    if split_dir is not None:
        root = require_dir(split_dir, "class split folder")
        by_name = {name: i for i, name in enumerate(names)}
        out, seen = {}, {}
        for split, filename in SPLIT_FILES.items():
            listed = read_name_list(require_file(root / filename, f"class list of the {split} split"), notes)
            unknown = [n for n in listed if n not in by_name or by_name[n] == 0]
            if unknown:
                raise ValueError(f"{root / filename} lists classes {unknown} that are not class names {names[1:]}")
            for n in listed:
                if seen.setdefault(n, split) != split:
                    raise ValueError(f"class {n!r} is listed in both the {seen[n]} and the {split} split")
            out[split] = sorted(by_name[n] for n in listed)
        for split, ids in out.items():
            if not set(ids) & present:
                raise ValueError(f"no image shows a class of the {split} split ({[names[i] for i in ids]})")
        return out
    if len(present) < 3:
        raise ValueError(
            f"the masks show {len(present)} class(es) ({[names[i] for i in sorted(present)]}); a train / validation "
            "/ test class split needs at least 3 (one each), better 10 or more: add classes, or give the split "
            "with --split-dir"
        )
    by_name = fallback_split([names[i] for i in present], seed)
    lookup = {name: i for i, name in enumerate(names)}
    return {split: sorted(lookup[n] for n in chosen) for split, chosen in by_name.items()}


def _folder_row(item, fixes: list) -> dict:
    """The row of an (image id, image path, mask path, layout, class id) item."""
    image_id, image_path, mask_path, layout, class_id = item
    image_path, mask_path = Path(image_path), Path(mask_path)
    if layout == "labels":
        label = read_index_png(mask_path)
    else:
        binary = read_fss_mask(mask_path, fixes)
        label = binary if class_id > _MAX_DENSE_ID else (binary * class_id).astype(np.uint8)
    row = make_row(image_id, image_path, label, mask_path, fixes)
    if layout == "folders" and row["class_ids"]:
        row["class_ids"] = [class_id]  # binary rows: the 1s are the folder's class
    return row


def _raise_or_report(problems: list[tuple[str, str]], skip_invalid: bool) -> list[dict]:
    """The "file_skipped" report entries of `problems` ([(row id, problem)]) with `skip_invalid`; else a ValueError
    listing the first of them on one line, each quoted and separated by "; ", and the fix."""
    if problems and not skip_invalid:
        listed = "; ".join(f'"{p}"' for _, p in problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        raise ValueError(
            f"{len(problems)} image(s) cannot be used: {listed}"
            + (f"; ... and {more} more" if more > 0 else "")
            + "; fix them, or pass --skip-invalid to leave them out (they are then listed in the build report)"
        )
    return [report_entry(key, "file_skipped", problem, row=True) for key, problem in problems]


def build_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    *,
    class_names_file: str | os.PathLike | None = None,
    class_folders: bool = False,
    split_dir: str | os.PathLike | None = None,
    seed: int = 0,
    skip_invalid: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> DatasetDict:
    """
    A user's images and masks as a DatasetDict with splits train / validation / test of disjoint classes.

    Args:
        images_dir: the images (see the module docstring for both layouts).
        masks_dir: the masks; default `images_dir` (only sensible with `class_folders`, the FSS-1000 layout).
        class_names_file: label maps only: line k names class id k, line 0 the background.
        class_folders: the per-class folder layout (binary masks) instead of label maps.
        split_dir: `train.txt`, `val.txt`, `test.txt` of class names (one per line); without it the classes the
            masks show are split by `fss.fallback_split(names, seed)` (52 / 24 / 24 %, at least one each).
        seed: seed of that split.
        skip_invalid: leave out (and report) images with bad input instead of raising.

    Symlinks are not followed into duplicates: a symlinked class folder whose target lies outside the tree is a class
    (followed, reported), one into the tree is not (nor is a symlinked sub-folder read); a symlinked image whose
    target is already listed is left out. Class names (folders, names file, split lists) are compared in Unicode
    NFC, so a folder name macOS wrote decomposed matches its typed form. Each of these, a list saved with a BOM /
    CRLF / as UTF-16 and a class listed twice in a split list are in the train split's build report, counted by
    kind (`REPORT_KINDS`).

    Rows: an image is in the test split when it shows a test class, else in validation when it shows a validation
    class, else in train. The class split is recorded in each split's `info.description` (`recorded_class_split`),
    which `hf_fss.data.folds.fold_classes("folder", dataset=...)` reads: novel = the test classes, base = the
    train classes. Class ids are those of the masks (label maps) or 1 + index of the sorted folder names.

    Raises:
        FileNotFoundError: a missing folder or file.
        ValueError: bad input (listed), fewer than 3 classes shown without `split_dir`, bad split lists.
    """
    images = require_dir(images_dir, "--images folder")
    masks = require_dir(masks_dir if masks_dir is not None else images_dir, "--masks folder")
    if class_folders and class_names_file is not None:
        raise ValueError("--class-names applies to label maps; with --class-folders the folder names are the classes")
    notes: list[dict] = []  # symlinks skipped, names and lists normalised: reported, never an error
    if class_folders:
        entries, problems, names = _scan_class_folders(images, masks, notes)
    else:
        names = read_class_names(class_names_file, notes) if class_names_file is not None else None
        entries, problems, names = _scan_label_maps(images, masks, names, notes)
    listing = _raise_or_report(problems, skip_invalid)
    if not entries:
        raise ValueError(f"no usable image with a mask in {images} (masks looked up in {masks})")
    present = {c for entry in entries for c in entry[3]}
    class_split = _class_split(names, present, split_dir, seed, notes)
    listing += notes
    layout = "folders" if class_folders else "labels"
    items: dict[str, list] = {split: [] for split in SPLIT_FILES}
    signature: dict[str, list] = {split: [] for split in SPLIT_FILES}
    for image_id, image_path, mask_path, ids in entries:
        split = _split_of_image(ids, class_split)
        items[split].append(
            (image_id, str(image_path), str(mask_path), layout, ids[0] if class_folders and ids else 0)
        )
        signature[split].append([file_signature(image_path), file_signature(mask_path)])
    how = f"class split from {split_dir}" if split_dir is not None else f"seeded class split (seed {seed})"
    recorded = CLASS_SPLIT_MARKER + json.dumps(class_split)
    for split in SPLIT_FILES:
        if not items[split]:
            raise ValueError(
                f"no image lands in the {split} split: its classes {[names[i] for i in class_split[split]]} only "
                "appear in images that show a test class (an image goes to test when it shows a test class, else "
                "to validation, else to train); give the split with --split-dir or another --seed"
            )
    dd = {}
    for split in SPLIT_FILES:
        shown = [names[i] for i in class_split[split]]
        description = (
            f"{DESCRIPTION_PREFIX} {split} ({len(items[split])} images; classes {shown}), built by hf_fss from "
            f"{images} ({'per-class folders' if class_folders else 'label maps'}, masks in {masks}); {how}" + recorded
        )
        dd[split] = build_split(
            _folder_row,
            items[split],
            names,
            split=split,
            signature=["folder", layout, class_split, signature[split]],
            description=description,
            cache_dir=cache_dir,
            num_proc=num_proc,
            listing_report=[e for e in listing if split == "train"],
        )
    return DatasetDict(dd)
