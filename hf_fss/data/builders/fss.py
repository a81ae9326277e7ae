"""FSS-1000 from its raw release: one folder per class holding `N.jpg` images and `N.png` masks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import DatasetDict

from ..text import read_text_lines
from ._common import SkipRow, build_split, file_signature, make_row, require_dir, require_file

logger = logging.getLogger(__name__)

SPLIT_FILES = {"train": "trn.txt", "validation": "val.txt", "test": "test.txt"}
# Class counts of the published split (HSNet's data/splits/fss): 520 train / 240 val / 240 test of 1000.
SPLIT_PROPORTIONS = {"train": 520, "validation": 240, "test": 240}


# A mask image is binary when at least this share of its pixels is near black or near white (<= 32 or >= 223):
# anti-aliased edges and JPEG-like noise stay well under the rest.
BINARY_SHARE = 0.9


def _decisive_share(gray: np.ndarray) -> float:
    return float(np.mean((gray <= 32) | (gray >= 223))) if gray.size else 0.0


def read_fss_mask(path: Path, fixes: list | None = None) -> np.ndarray:
    """
    A binary uint8 mask (1 = the class): grayscale >= 128, as HSNet reads them. FSS masks are plain white-on-
    black images (grayscale, or RGB with equal channels), not palettes, so converting to grayscale is right here.

    A colour mask (channels differ, e.g. red on black) that is still binary is binarised on its brightest channel
    (a fix, noted in `fixes`); a mask image that is not binary (a photo saved as the mask, as
    `peregine_falcon/8.png` of the release) is a SkipRow.
    """
    try:
        with PIL.Image.open(path) as image:
            image.load()
            mode = image.mode
            gray = np.array(image.convert("L"))
            rgb = np.array(image.convert("RGB")) if mode not in ("1", "L", "I", "I;16", "F") else None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    colour = rgb is not None and int(np.ptp(rgb.astype(np.int16), axis=2).max(initial=0)) > 32
    if not colour:
        if _decisive_share(gray) < BINARY_SHARE:
            share = _decisive_share(gray)
            raise SkipRow(f"mask {path} is not a black / white image (only {share:.0%} of its pixels are)")
        return (gray >= 128).astype(np.uint8)
    brightest = rgb.max(axis=2)
    if _decisive_share(brightest) < BINARY_SHARE:
        raise SkipRow(f"mask {path} is a colour image (mode {mode}), not a black / white mask")
    if fixes is not None:
        fixes.append(f"mask {path} is a binary colour (mode {mode}) image: binarised on its brightest channel")
    return (brightest >= 128).astype(np.uint8)


def _fss_row(item, fixes: list) -> dict:
    """The row of an (image_id, image_path, mask_path, class_id) item; the label is binary, class_ids = [class_id]."""
    image_id, image_path, mask_path, class_id = item
    image_path = require_file(image_path, f"image of {image_id}")
    mask_path = require_file(mask_path, f"mask of {image_path}")
    row = make_row(image_id, image_path, read_fss_mask(mask_path, fixes), mask_path, fixes)
    if row["class_ids"]:  # the mask's 1s are the row's class
        row["class_ids"] = [class_id]
    return row


def _is_class_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith((".", "__")) and any(_images(path))


def _images(class_dir: Path):
    return (p for p in class_dir.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())


def _stray_files(class_dir: Path, images: list[Path]) -> list[Path]:
    """Entries of a class folder that are neither an N.jpg image nor its N.png mask (e.g. `beam_bridge/10.jpeg`)."""
    expected = {p.name for p in images} | {p.with_suffix(".png").name for p in images}
    return sorted(p for p in class_dir.iterdir() if p.name not in expected)


def _image_order(path: Path):
    # Numeric order (1, 2, ..., 10), not lexicographic; non-numeric stems after, by name.
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def read_class_list(path: Path) -> list[str]:
    """Class names, one per line (HSNet's split files); blank lines ignored, surrounding whitespace stripped; read
    as editors save it (BOM, CRLF, UTF-16 with a BOM; else a ValueError naming the file)."""
    require_file(path, "FSS-1000 split list")
    return [line for line in read_text_lines(path, "FSS-1000 split list") if line]


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

    Known defects of the release (HKUSTCV/FSS-1000 issues 8, 17, 23) do not stop the build (see `build_split`).
    Fixed and reported: a mask that is an exact scale of its image (resized nearest), a binary colour mask
    (binarised). Skipped and reported: an image without its mask, an unreadable or truncated file, a mask that is
    a photo rather than a black / white image or whose size is not a scale of the image's; stray files in a
    class folder (`10.jpeg`, a `.png` without its `.jpg`) are reported as not used.
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
        items, signature, listing = [], [], []
        for name in classes:
            images = sorted(_images(root / name), key=_image_order)
            if not images:
                raise ValueError(f"FSS-1000 class folder {root / name} holds no .jpg images")
            for image_path in images:
                mask_path = image_path.with_suffix(".png")  # a missing mask is reported when the row is built
                items.append((f"{name}/{image_path.stem}", str(image_path), str(mask_path), class_id[name]))
                signature.append([file_signature(image_path), file_signature(mask_path)])
            for stray in _stray_files(root / name, images):
                problem = f"{stray} is not an N.jpg image or the N.png mask of one: not used"
                listing.append({"id": f"{name}/{stray.name}", "action": "skipped", "problem": problem, "row": False})
        description = (
            f"FSS-1000 {split} ({len(classes)} of {len(names)} classes; binary labels, 1 = the row's class), built "
            f"by hf_fss from {root}; {how}; class id = 1 + index in the sorted class names"
        )
        dd[split] = build_split(
            _fss_row,
            items,
            ["background", *names],
            split=split,
            signature=["fss1000", class_id, signature],
            description=description,
            cache_dir=cache_dir,
            num_proc=num_proc,
            listing_report=listing,
        )
    return DatasetDict(dd)
