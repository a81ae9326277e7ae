"""FSS-1000 from its raw release: one folder per class holding `N.jpg` images and `N.png` masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import DatasetDict

from ._common import SkipRow, build_split, file_signature, make_row, report_entry, require_dir, require_file
from ._layout import class_folders as list_class_folders
from ._layout import is_duplicate_link, read_name_list, real_files

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


def _images(class_dir: Path, targets: dict[Path, Path] | None = None, listing: list | None = None) -> list[Path]:
    """The N.jpg images of a class folder. With `targets` (`_layout.real_files` of the root), a symlink to an image
    the tree already holds is left out and reported in `listing` (`_layout.is_duplicate_link`)."""
    images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())
    if targets is None:
        return images
    where = f"{class_dir.name}/{{}}"
    return [p for p in images if not is_duplicate_link(p, targets, listing, where.format(p.name))]


def _report_empty_folders(folders: dict[str, Path], listing: list) -> None:
    """Report each of `folders` ({name: class folder}, none of them a class) that holds no N.jpg image in `listing`
    ("empty_class_folder"), so a class the user meant to add is not dropped without a word."""
    for name, folder in folders.items():
        if not _images(folder):
            problem = f"class folder {folder} holds no N.jpg image: not a class; add its images or remove it"
            listing.append(report_entry(name, "empty_class_folder", problem))


def _stray_files(class_dir: Path, images: list[Path]) -> list[Path]:
    """Entries of a class folder that are neither an N.jpg image nor its N.png mask (e.g. `beam_bridge/10.jpeg`)."""
    expected = {p.name for p in images} | {p.with_suffix(".png").name for p in images}
    return sorted(p for p in class_dir.iterdir() if p.name not in expected)


def _image_order(path: Path):
    # Numeric order (1, 2, ..., 10), not lexicographic; non-numeric stems after, by name.
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def read_class_list(path: Path, listing: list | None = None) -> list[str]:
    """
    Class names, one per line (HSNet's split files), in Unicode NFC, each once; blank lines ignored, surrounding
    whitespace stripped; read as editors save it (BOM, CRLF, UTF-16 with a BOM; else a ValueError naming the file).
    With `listing`, what was normalised and names listed again are reported there (`_layout.read_name_list`).
    """
    require_file(path, "FSS-1000 split list")
    return read_name_list(path, [] if listing is None else listing, "FSS-1000 split list")


def _class_folders(root: Path, listing: list) -> dict[str, Path]:
    """{NFC name: folder} of the class folders of `root`, duplicates by symlink left out (`_layout.class_folders`)."""
    return list_class_folders(root, f"FSS-1000 root {root}, its class folders", listing)


def _listed_split(root: Path, split_root: Path, folders: dict[str, Path], listings: dict[str, list]):
    """
    The {split: sorted class names} of HSNet's split lists in `split_root` (what reading them normalised goes to
    `listings[split]`) and the train split's report of class folders in no list. ValueError for a class listed in
    two splits or whose folder is a symlink; FileNotFoundError for a listed class without a folder.
    """
    split_classes = {split: read_class_list(split_root / name, listings[split]) for split, name in SPLIT_FILES.items()}
    seen: dict[str, str] = {}
    for split, classes in split_classes.items():
        for name in classes:
            if seen.setdefault(name, split) != split:
                raise ValueError(f"class {name!r} is listed in both the {seen[name]} and the {split} split")
            if name not in folders and (root / name).is_symlink():
                raise ValueError(
                    f"class {name!r} (listed in {split_root / SPLIT_FILES[split]}) is a symlinked folder "
                    f"{root / name} into the tree (or to a folder linked already): not followed, its images would "
                    "repeat another's; copy the folder there"
                )
            if name not in folders:
                require_dir(root / name, f"FSS-1000 class folder of {name!r} (listed in {split_root})")
    for name in sorted(set(folders) - set(seen)):
        if any(_images(folders[name])):
            problem = f"class folder {folders[name]} is in no split list of {split_root}: not used"
            listings["train"].append(report_entry(name, "unlisted_class", problem))
    return {split: sorted(classes) for split, classes in split_classes.items()}


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
    classes (folders not listed are not used, and reported). Without it, the class names are the folders holding
    `.jpg` files (hidden and `__*` folders ignored) and the split is `fallback_split(names, seed)`.

    As in the own-folder builder (`_layout`), symlinks are not followed into duplicates: a symlinked class folder
    that resolves into the tree is not a class (reported; listing one is a ValueError), one whose target lies outside
    the tree is (followed, reported), and a symlinked image whose target the tree already holds
    is left out (reported). Class names, of folders and in the lists, are compared in Unicode NFC (a folder name
    macOS stored decomposed matches the list); names equal up to normalisation are a ValueError. Lists saved with
    a BOM, CRLF or as UTF-16 are read and reported, a class listed twice in a list is kept once and reported.

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
    listings: dict[str, list] = {split: [] for split in SPLIT_FILES}  # what listing found, reported per split
    folders = _class_folders(root, listings["train"])
    if split_dir is not None:
        split_root = require_dir(split_dir, "FSS-1000 split folder")
        split_classes = _listed_split(root, split_root, folders, listings)
        names = sorted(name for classes in split_classes.values() for name in classes)
        how = f"class splits from {split_root}/{{trn,val,test}}.txt"
    else:
        names = sorted(name for name, folder in folders.items() if any(_images(folder)))
        if not names:
            raise ValueError(f"no class folders (holding N.jpg + N.png) found in {root}")
        split_classes = fallback_split(names, seed)
        how = f"fallback class split: 520/240/240 proportions, numpy default_rng({seed}) permutation of sorted names"
    _report_empty_folders({name: folders[name] for name in sorted(set(folders) - set(names))}, listings["train"])

    class_id = {name: i + 1 for i, name in enumerate(names)}
    targets = real_files(root)
    dd = {}
    for split, classes in split_classes.items():
        items, signature, listing = [], [], listings[split]
        for name in classes:
            folder = folders.get(name, root / name)  # a listed hidden / `__*` folder is not in `folders`
            every = _images(folder)
            images = sorted(_images(folder, targets, listing), key=_image_order)
            if not every:
                raise ValueError(f"FSS-1000 class folder {folder} holds no .jpg images")
            for image_path in images:
                mask_path = image_path.with_suffix(".png")  # a missing mask is reported when the row is built
                items.append((f"{name}/{image_path.stem}", str(image_path), str(mask_path), class_id[name]))
                signature.append([file_signature(image_path), file_signature(mask_path)])
            for stray in _stray_files(folder, every):
                problem = f"{stray} is not an N.jpg image or the N.png mask of one: not used"
                listing.append(report_entry(f"{name}/{stray.name}", "stray_file", problem))
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
