"""PASCAL-5i from the raw PASCAL VOC 2012 release plus SBD (or a ready SegmentationClassAug folder)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import scipy.io
from datasets import DatasetDict

from ..schema import IGNORE_INDEX, VOC_CLASSES
from ._common import (
    SkipRow,
    build_split,
    check_ids,
    file_signature,
    make_row,
    read_id_list,
    read_index_png,
    report_entry,
    require_dir,
    require_file,
)


def resolve_voc_root(voc_root: str | os.PathLike) -> Path:
    """The VOC2012 folder (holding JPEGImages/), given it or the VOCdevkit folder above it."""
    root = require_dir(voc_root, "PASCAL VOC 2012 root")
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        root = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        require_dir(root / sub, "PASCAL VOC 2012 folder")
    return root


def resolve_aug_dir(aug_label_dir: str | os.PathLike) -> dict[str, Path]:
    """
    {id: label path} of a SegmentationClassAug folder's `{id}.png` maps, given it or the folder it was unzipped
    into (holding SegmentationClassAug/). The suffix is matched in any case (`.PNG`); hidden files (macOS's
    `._{id}.png` AppleDouble copies, which would be taken for ids) are ignored.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no `{id}.png` label (one line naming it).
    """
    root = require_dir(aug_label_dir, "SegmentationClassAug folder")
    labels = _png_labels(root)
    if not labels and (root / "SegmentationClassAug").is_dir():
        root = root / "SegmentationClassAug"
        labels = _png_labels(root)
    if not labels:
        raise ValueError(
            f"SegmentationClassAug folder {root} holds no {{id}}.png label maps; pass --aug-label-dir the folder "
            "holding them (e.g. VOC2012/SegmentationClassAug)"
        )
    return labels


def _png_labels(folder: Path) -> dict[str, Path]:
    paths = (p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
    return {p.stem: p for p in sorted(paths) if p.is_file()}


def resolve_sbd_root(sbd_root: str | os.PathLike) -> Path:
    """The SBD `dataset` folder (holding cls/, train.txt, val.txt), given it or benchmark_RELEASE/ above it."""
    root = require_dir(sbd_root, "SBD root")
    if not (root / "cls").is_dir() and (root / "dataset" / "cls").is_dir():
        root = root / "dataset"
    require_dir(root / "cls", "SBD folder")
    require_file(root / "train.txt", "SBD list")
    require_file(root / "val.txt", "SBD list")
    return root


def _struct_field(struct, name: str):
    """
    Field `name` of a MATLAB struct as scipy.io.loadmat returns it: a `mat_struct` (struct_as_record=False), a
    record ndarray (struct_as_record=True, possibly wrapped in 1x1 object arrays when squeeze_me=False), or a
    dict (simplify_cells=True).
    """
    while isinstance(struct, np.ndarray) and struct.dtype == object and struct.size == 1:
        struct = struct.item()
    if isinstance(struct, dict):
        value = struct[name]
    elif isinstance(struct, np.ndarray) and struct.dtype.names is not None:
        if name not in struct.dtype.names:
            raise KeyError(name)
        value = struct[name].reshape(-1)[0] if struct.size == 1 else struct[name]
    elif hasattr(struct, "_fieldnames") or hasattr(struct, name):
        value = getattr(struct, name)
    else:
        raise KeyError(name)
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.item()
    return value


def read_sbd_segmentation(path: Path, fixes: list | None = None) -> np.ndarray:
    """
    The class-id map (`GTcls.Segmentation`, uint8 HxW) of an SBD `cls/{id}.mat` file. A map stored as floats or
    wider integers holding only whole ids 0..255 is cast to uint8 (noted in `fixes`); anything else is a ValueError.
    """
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError, NotImplementedError) as err:
        raise ValueError(f"cannot read SBD annotation {path}: {err}") from err
    if "GTcls" not in mat:
        raise ValueError(
            f"SBD annotation {path} has no GTcls struct (variables: {sorted(k for k in mat if k[0] != '_')})"
        )
    try:
        segmentation = np.asarray(_struct_field(mat["GTcls"], "Segmentation"))
    except KeyError as err:
        raise ValueError(f"SBD annotation {path}: GTcls has no Segmentation field") from err
    numeric = np.issubdtype(segmentation.dtype, np.integer) or np.issubdtype(segmentation.dtype, np.floating)
    if segmentation.ndim != 2 or not numeric or segmentation.size == 0:
        raise ValueError(f"SBD annotation {path}: GTcls.Segmentation is {segmentation.dtype} {segmentation.shape}")
    if not np.isfinite(segmentation).all() or (segmentation != np.round(segmentation)).any():
        raise ValueError(f"SBD annotation {path}: GTcls.Segmentation holds values that are not whole class ids")
    if segmentation.min() < 0 or segmentation.max() > 255:
        raise ValueError(f"SBD annotation {path}: ids outside 0..255")
    if segmentation.dtype != np.uint8 and fixes is not None:
        fixes.append(f"SBD annotation {path} stores its ids as {segmentation.dtype}: cast to uint8")
    return segmentation.astype(np.uint8)


def voc_colormap() -> np.ndarray:
    """(256, 3) uint8: the colour of each index in VOC's label palette (bits of the index spread over R, G, B)."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, rgb = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        colors[index] = rgb
    return colors


def read_voc_label(path: Path, fixes: list) -> np.ndarray:
    """
    A VOC-style label PNG as class ids: palette / grayscale PNGs by index (`read_index_png`); an RGB rendering
    of VOC's palette (what some conversions write) mapped back through the palette (a fix, noted in `fixes`).
    An RGB label with colours outside the palette's classes is a SkipRow.
    """
    try:
        with PIL.Image.open(path) as image:
            mode = image.mode
            rgb = np.array(image.convert("RGB")) if mode in ("RGB", "RGBA") else None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's "image file is truncated" does not name the file
        raise ValueError(f"cannot read label {path}: {err}") from err
    if rgb is None:
        return read_index_png(path)
    colors = voc_colormap()
    ids = [*range(len(VOC_CLASSES)), IGNORE_INDEX]
    keys = {int(c[0]) << 16 | int(c[1]) << 8 | int(c[2]): i for i, c in ((i, colors[i]) for i in ids)}
    packed = rgb[..., 0].astype(np.int64) << 16 | rgb[..., 1].astype(np.int64) << 8 | rgb[..., 2]
    values, inverse = np.unique(packed, return_inverse=True)
    unknown = [f"#{int(v):06x}" for v in values if int(v) not in keys]
    if unknown:
        raise SkipRow(f"label {path} is a mode {mode} image with colours {unknown[:5]} outside VOC's palette")
    fixes.append(f"label {path} is a mode {mode} rendering of VOC's palette: colours mapped back to class ids")
    return np.array([keys[int(v)] for v in values], dtype=np.uint8)[inverse.reshape(packed.shape)]


def _pascal_row(item, fixes: list) -> dict:
    """The row of an (image_id, image_path, label_path, label_format) item; label_format is "png" or "mat"."""
    image_id, image_path, label_path, label_format = item
    image_path = require_file(image_path, f"image of {image_id}")
    label_path = require_file(label_path, f"label of {image_id}")
    label = read_sbd_segmentation(label_path, fixes) if label_format == "mat" else read_voc_label(label_path, fixes)
    check_ids(label, len(VOC_CLASSES), label_path)
    return make_row(image_id, image_path, label, label_path, fixes)


def _image_path(image_id: str, voc: Path, sbd: Path | None) -> Path:
    """VOC's JPEG of `image_id`, else SBD's img/ copy; a missing one is reported when the row is built."""
    path = voc / "JPEGImages" / f"{image_id}.jpg"
    if not path.is_file() and sbd is not None and (sbd / "img" / f"{image_id}.jpg").is_file():
        path = sbd / "img" / f"{image_id}.jpg"
    return path


def _in_both(train_ids: list[str], val_ids: set[str], train_file: Path, val_file: Path) -> list[dict]:
    """Listing entries for the ids of a train list that the val list also holds: they stay in validation only."""
    return [
        report_entry(
            image_id,
            "train_id_in_val",
            f"{image_id} is listed in both {train_file} and {val_file}: kept in validation only",
        )
        for image_id in train_ids
        if image_id in val_ids
    ]


def _voc_item(voc: Path, image_id: str, sbd: Path | None = None) -> tuple:
    """A row source labelled by VOC's SegmentationClass (the image from VOC, else SBD's img/)."""
    label = voc / "SegmentationClass" / f"{image_id}.png"
    return image_id, str(_image_path(image_id, voc, sbd)), str(label), "png"


def _sbd_train_items(sbd: Path, voc: Path, voc_train: list, val_set: set, listing: list) -> tuple[list, str]:
    """The training rows from SBD: (SBD train + SBD val + VOC train) - VOC val, VOC's labels where VOC has them."""
    # SBD's lists hold VOC val images by design (they are left out of train silently, as in PFENet's list).
    sbd_ids = read_id_list(sbd / "train.txt", listing) + read_id_list(sbd / "val.txt", listing)
    voc_labelled = set(voc_train)  # VOC val ids never reach train
    items = []
    for image_id in sorted((set(sbd_ids) | voc_labelled) - val_set):
        if image_id in voc_labelled:
            items.append(_voc_item(voc, image_id, sbd))
        else:
            label = sbd / "cls" / f"{image_id}.mat"
            items.append((image_id, str(_image_path(image_id, voc, sbd)), str(label), "mat"))
    source = (
        f"train = (SBD train + SBD val + VOC train) - VOC val from {sbd} and {voc} "
        "(labels: VOC SegmentationClass where VOC has them, else SBD cls/*.mat)"
    )
    return items, source


def _aug_train_items(aug_label_dir, train_list, voc: Path, val_set: set, listing: list) -> tuple[list, str]:
    """The training rows from a SegmentationClassAug folder: `train_list`'s ids (else every label) minus VOC val."""
    aug_labels = resolve_aug_dir(aug_label_dir)
    aug = next(iter(aug_labels.values())).parent
    if train_list is not None:
        listed = read_id_list(train_list, listing)
        listing += _in_both(listed, val_set, Path(train_list), voc / "ImageSets" / "Segmentation" / "val.txt")
        train_ids, origin = sorted(set(listed) - val_set), f"the ids of {Path(train_list)}"
    else:
        train_ids, origin = sorted(set(aug_labels) - val_set), f"every label in {aug}"
    items = []
    for image_id in train_ids:
        label = aug_labels.get(image_id, aug / f"{image_id}.png")  # a missing one is reported with its row
        items.append((image_id, str(_image_path(image_id, voc, None)), str(label), "png"))
    return items, f"train = {origin} minus VOC val, labels from {aug}, images from {voc}"


def build_pascal5i(
    voc_root: str | os.PathLike,
    sbd_root: str | os.PathLike | None = None,
    aug_label_dir: str | os.PathLike | None = None,
    *,
    train_list: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> DatasetDict:
    """
    PASCAL-5i (all 20 VOC classes; folds are chosen at sampling time) from the raw releases.

    `voc_root` is VOC2012/ (or VOCdevkit/): `JPEGImages/{id}.jpg`, `SegmentationClass/{id}.png` (palette PNGs,
    255 = boundary / ignore) and `ImageSets/Segmentation/{train,val}.txt`. Pass exactly one training source:

    - `sbd_root`: SBD's benchmark_RELEASE/dataset (or benchmark_RELEASE/): `cls/{id}.mat`, `img/{id}.jpg`,
      `train.txt`, `val.txt`. train = (SBD train + SBD val + VOC train) minus VOC val, the 10582 "aug" images.
      Labels come from VOC's SegmentationClass for ids in VOC's segmentation lists and from SBD otherwise, which
      is how SegmentationClassAug was made (so SBD-only images have no 255 boundary).
    - `aug_label_dir`: a ready SegmentationClassAug/ folder of single-channel `{id}.png` maps (or the folder it
      was unzipped into; hidden `._{id}.png` files ignored, see `resolve_aug_dir`). train = the ids of
      `train_list` (e.g. train_aug.txt; bare ids or DeepLab "image label" path lines) if given, else every
      `{id}.png` in the folder, minus VOC val in both cases; labels from that folder.

    validation = VOC val (1449 images) with VOC's own labels. Images come from VOC's JPEGImages (SBD's img/ when
    an SBD-only id is missing there). Rows are in sorted id order; ids survive exactly (palette PNGs are read as
    indices). A missing root folder or list is a FileNotFoundError naming it.

    Defects of single files do not stop the build (see `build_split`): fixed and reported are a label that is an
    exact scale of its image (resized nearest), an RGB rendering of VOC's palette (mapped back to ids) and an SBD
    map stored as floats (cast); skipped and reported are a listed id whose image or label is missing, an
    unreadable or truncated file, a label of another shape than its image, and ids outside the 20 classes. The
    lists are read as editors save them (BOM, CRLF, UTF-16 with a BOM; see `read_id_list`); an id listed twice,
    or in a train list and VOC val, is reported (it is kept once, in validation).
    """
    if (sbd_root is None) == (aug_label_dir is None):
        raise ValueError("pass exactly one of sbd_root (SBD benchmark_RELEASE/dataset) and aug_label_dir")
    if train_list is not None and aug_label_dir is None:
        raise ValueError("train_list only applies with aug_label_dir")
    voc = resolve_voc_root(voc_root)
    voc_sets = voc / "ImageSets" / "Segmentation"
    train_listing, val_listing = [], []  # what reading the lists found, reported with each split
    voc_train = read_id_list(require_file(voc_sets / "train.txt", "VOC segmentation list"), train_listing)
    voc_val = read_id_list(require_file(voc_sets / "val.txt", "VOC segmentation list"), val_listing)
    val_set = set(voc_val)
    train_listing += _in_both(voc_train, val_set, voc_sets / "train.txt", voc_sets / "val.txt")

    if sbd_root is not None:
        train_items, source = _sbd_train_items(resolve_sbd_root(sbd_root), voc, voc_train, val_set, train_listing)
    else:
        train_items, source = _aug_train_items(aug_label_dir, train_list, voc, val_set, train_listing)

    val_items = [_voc_item(voc, image_id) for image_id in sorted(val_set)]

    def signature(items):
        return [[i, file_signature(Path(im)), file_signature(Path(lb)), fmt] for i, im, lb, fmt in items]

    header = "PASCAL-5i (PASCAL VOC 2012 + SBD augmentation, 20 classes, 255 = ignore), built by hf_fss: "
    splits = {
        "train": (train_items, header + source, train_listing),
        "validation": (
            val_items,
            header + f"validation = VOC2012 val from {voc} with VOC SegmentationClass labels",
            val_listing,
        ),
    }
    return DatasetDict(
        {
            name: build_split(
                _pascal_row,
                items,
                VOC_CLASSES,
                split=name,
                signature=["pascal5i", signature(items)],
                description=description,
                cache_dir=cache_dir,
                num_proc=num_proc,
                listing_report=listing,
            )
            for name, (items, description, listing) in splits.items()
        }
    )
