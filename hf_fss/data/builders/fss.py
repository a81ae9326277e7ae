"""FSS-1000 from its raw release: one folder per class holding `N.jpg` images and `N.png` masks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import DatasetDict

from ._common import build_split, file_signature, make_row, require_dir, require_file

logger = logging.getLogger(__name__)

SPLIT_FILES = {"train": "trn.txt", "validation": "val.txt", "test": "test.txt"}
# Class counts of the published split (HSNet's data/splits/fss): 520 train / 240 val / 240 test of 1000.
SPLIT_PROPORTIONS = {"train": 520, "validation": 240, "test": 240}


def read_fss_mask(path: Path) -> np.ndarray:
    """A binary uint8 mask (1 = the class): grayscale >= 128, as HSNet reads them. FSS masks are plain white-on-
    black images, not palettes, so converting to grayscale is right here."""
    try:
        with PIL.Image.open(path) as image:
            gray = np.array(image.convert("L"))
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    return (gray >= 128).astype(np.uint8)


def _fss_rows(items):
    """Rows of (image_id, image_path, mask_path, class_id) items; the label is binary, class_ids = [class_id]."""
    for image_id, image_path, mask_path, class_id in items:
        row = make_row(image_id, Path(image_path), read_fss_mask(Path(mask_path)), mask_path)
        if row["class_ids"]:  # the mask's 1s are the row's class
            row["class_ids"] = [class_id]
        yield row


def _is_class_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith((".", "__")) and any(_images(path))


def _images(class_dir: Path):
    return (p for p in class_dir.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())


def _image_order(path: Path):
    # Numeric order (1, 2, ..., 10), not lexicographic; non-numeric stems after, by name.
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def read_class_list(path: Path) -> list[str]:
    """Class names, one per line (HSNet's split files); blank lines ignored, surrounding whitespace stripped."""
    return [
        line.strip() for line in require_file(path, "FSS-1000 split list").read_text().splitlines() if line.strip()
    ]


def fallback_split(class_names: list[str], seed: int = 0) -> dict[str, list[str]]:
    """
    Deterministic train / validation / test class split when no split lists are given: validation and test get
    max(1, floor(n * 240 / 1000)) classes each and train the rest (520 / 240 / 240 for the 1000 classes), chosen
    by `numpy.random.default_rng(seed).permutation` of the sorted names: the first classes of the permutation go
    to train, the next to validation, the rest to test. Needs at least 3 classes.
    """
    names = sorted(class_names)
    n = len(names)
    if n < 3:
        raise ValueError(f"the fallback split needs at least 3 classes, found {n}")
    n_held = max(1, n * SPLIT_PROPORTIONS["validation"] // sum(SPLIT_PROPORTIONS.values()))
    n_train = n - 2 * n_held
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    return {
        "train": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_held]),
        "test": sorted(order[n_train + n_held :]),
    }


def build_fss1000(
    fss_root: str | os.PathLike,
    split_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> DatasetDict:
    """
    FSS-1000 with splits train / validation / test of disjoint classes; one row per image.

    `fss_root` holds one folder per class with `N.jpg` + `N.png` (white = class). With `split_dir`, the classes
    of each split are read from `trn.txt`, `val.txt` and `test.txt` (one class name per line: the lists HSNet
    publishes in data/splits/fss), every listed class must have a folder, and the class names are all listed
    classes (folders not listed are skipped with a warning). Without it, the class names are the folders holding
    `.jpg` files (hidden and `__*` folders ignored) and the split is `fallback_split(names, seed)`.

    Class ids are global: 1 + index in the sorted class names, the `class_ids` ClassLabel being
    ["background", *sorted names] (HSNet numbers classes per split instead). `label` is binary (1 = the row's
    class, mask >= 128); `class_ids` = [the class id], or [] when a mask has no foreground pixel. `image_id` is
    "class/N"; rows go by sorted class name, then image number.
    """
    root = require_dir(fss_root, "FSS-1000 root")
    if split_dir is not None:
        split_root = require_dir(split_dir, "FSS-1000 split folder")
        split_classes = {split: read_class_list(split_root / name) for split, name in SPLIT_FILES.items()}
        seen: dict[str, str] = {}
        for split, classes in split_classes.items():
            for name in classes:
                if name in seen and seen[name] != split:
                    raise ValueError(f"class {name!r} is listed in both the {seen[name]} and the {split} split")
                seen[name] = split
                require_dir(root / name, f"FSS-1000 class folder of {name!r} (listed in {split_root})")
        names = sorted(seen)
        unlisted = sorted(p.name for p in root.iterdir() if _is_class_dir(p) and p.name not in seen)
        if unlisted:
            logger.warning("%d class folders of %s are in no split list and are skipped", len(unlisted), root)
        split_classes = {split: sorted(set(classes)) for split, classes in split_classes.items()}
        how = f"class splits from {split_root}/{{trn,val,test}}.txt"
    else:
        names = sorted(p.name for p in root.iterdir() if _is_class_dir(p))
        if not names:
            raise ValueError(f"no class folders (holding N.jpg + N.png) found in {root}")
        split_classes = fallback_split(names, seed)
        how = f"fallback class split: 520/240/240 proportions, numpy default_rng({seed}) permutation of sorted names"

    class_id = {name: i + 1 for i, name in enumerate(names)}
    dd = {}
    for split, classes in split_classes.items():
        items, signature = [], []
        for name in classes:
            images = sorted(_images(root / name), key=_image_order)
            if not images:
                raise ValueError(f"FSS-1000 class folder {root / name} holds no .jpg images")
            for image_path in images:
                mask_path = require_file(image_path.with_suffix(".png"), f"mask of {image_path}")
                items.append((f"{name}/{image_path.stem}", str(image_path), str(mask_path), class_id[name]))
                signature.append([file_signature(image_path), file_signature(mask_path)])
        description = (
            f"FSS-1000 {split} ({len(classes)} of {len(names)} classes; binary labels, 1 = the row's class), built "
            f"by hf_fss from {root}; {how}; class id = 1 + index in the sorted class names"
        )
        dd[split] = build_split(
            _fss_rows,
            items,
            ["background", *names],
            split=split,
            signature=["fss1000", class_id, signature],
            description=description,
            cache_dir=cache_dir,
            num_proc=num_proc,
        )
    return DatasetDict(dd)
