"""COCO-20i from the raw COCO 2014 release (train2014/, val2014/, annotations/instances_*2014.json)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import DatasetDict

try:  # the `coco` extra: only this builder needs it
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
except ModuleNotFoundError:
    mask_utils = COCO = None

from ..schema import COCO_CATEGORY_IDS, COCO_CLASSES, IGNORE_INDEX
from ..text import read_user_text
from ._common import SkipRow, build_split, file_signature, make_row, report_entry, require_dir, require_file


def _clean_polygons(segmentation: list, height: int, width: int, source: str, fixes: list) -> list[list[float]]:
    """
    The usable polygons of a COCO polygon list: polygons with fewer than 3 points (pycocotools would read a
    4-number polygon as a box; detectron2 drops them too), an odd number of coordinates or non-finite ones are
    dropped; points more than a pixel outside the image are clipped to it (pycocotools can crash on huge
    coordinates). Each change is noted in `fixes`.
    """
    kept = []
    for index, polygon in enumerate(segmentation):
        try:
            coords = np.asarray(polygon, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            coords = np.array([np.nan])
        if coords.size < 6 or coords.size % 2 or not np.isfinite(coords).all():
            fixes.append(f"{source}: polygon {index} ({coords.size} numbers) is not a polygon of >= 3 points: dropped")
            continue
        clipped = coords.copy()
        clipped[0::2] = np.clip(coords[0::2], 0, width)
        clipped[1::2] = np.clip(coords[1::2], 0, height)
        if np.abs(clipped - coords).max() > 1:
            fixes.append(f"{source}: polygon {index} reaches outside the {width}x{height} image: clipped to it")
        kept.append(clipped.tolist())
    return kept


def _scaled_rle_mask(rle: dict, height: int, width: int, source: str, fixes: list) -> np.ndarray:
    """Decode an RLE of another size than its image: an exact scale is resized (nearest), else SkipRow."""
    rh, rw = (int(v) for v in rle["size"])
    if rh <= 0 or rw <= 0 or Fraction(height, rh) != Fraction(width, rw):
        raise SkipRow(f"{source}: RLE size {[rh, rw]} is not the image's {[height, width]} nor a scale of it")
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, rh, rw)
    small = mask_utils.decode(rle).astype(np.uint8)
    fixes.append(f"{source}: RLE size {[rh, rw]} is an exact scale of the image's {[height, width]}: resized")
    return np.array(PIL.Image.fromarray(small).resize((width, height), PIL.Image.NEAREST)).astype(bool)


def annotation_mask(
    segmentation, height: int, width: int, source: str = "annotation", fixes: list | None = None
) -> np.ndarray:
    """
    Boolean HxW mask of a COCO `segmentation`: a list of polygons, an uncompressed RLE (`counts` a list) or a
    compressed RLE (`counts` a string). Degenerate polygons are dropped and stray points clipped (see
    `_clean_polygons`); an RLE of an exact scale of the image is resized; these fixes are appended to `fixes`.
    An RLE of any other size or an unknown format is a SkipRow (ValueError) naming `source`.
    """
    fixes = [] if fixes is None else fixes
    if isinstance(segmentation, list):
        polygons = _clean_polygons(segmentation, height, width, source, fixes)
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        try:
            size = [int(v) for v in segmentation["size"]]
        except (TypeError, ValueError):
            raise SkipRow(f"{source}: RLE size {segmentation['size']!r} is not [height, width]") from None
        if len(size) != 2:
            raise SkipRow(f"{source}: RLE size {segmentation['size']!r} is not [height, width]")
        if size != [height, width]:
            return _scaled_rle_mask(segmentation, height, width, source, fixes)
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
    else:
        raise SkipRow(f"{source}: unknown segmentation format {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def rasterize(annotations, height: int, width: int, source: str = "image", fixes: list | None = None) -> np.ndarray:
    """
    Class-id map (uint8 HxW) of one image's annotations, given as (annotation_id, class_id, iscrowd, segmentation).

    - Overlaps: a pixel covered by several non-crowd instances takes the class of the smallest one (fewest mask
      pixels); equal sizes go to the lowest annotation id. Smaller objects are mostly the ones in front (a cup on
      a dining table, a person on a bench), and painting in annotation-id order would let a later large instance
      erase them. Implemented by painting in descending (pixel count, annotation id) order.
    - Crowd: pixels of any `iscrowd=1` region (whatever its category) that no non-crowd instance covers are 255
      (ignore); a crowd region never adds its category to the image's classes. So are the pixels of an
      annotation whose category is unknown (class_id 255).
    - Everything else is 0 (background); an image without annotations is all background.
    - Defects (see `annotation_mask`) are fixed and noted in `fixes`; an instance without any pixel is noted.
    """
    fixes = [] if fixes is None else fixes
    label = np.zeros((height, width), dtype=np.uint8)
    instances = []
    for annotation_id, class_id, iscrowd, segmentation in annotations:
        where = f"{source}, annotation {annotation_id}"
        mask = annotation_mask(segmentation, height, width, where, fixes)
        if iscrowd or class_id == IGNORE_INDEX:
            label[mask] = IGNORE_INDEX
        elif not mask.any():
            fixes.append(f"{where} covers no pixel (zero area): nothing painted")
        else:
            instances.append((int(mask.sum()), annotation_id, class_id, mask))
    for _, _, class_id, mask in sorted(instances, key=lambda t: (-t[0], -t[1])):
        label[mask] = class_id
    return label


def _coco_row(item, fixes: list) -> dict:
    """The row of an (image_id, image_path, height, width, annotations) item; see `rasterize`."""
    image_id, image_path, height, width, anns = item
    if int(height) <= 0 or int(width) <= 0:
        raise SkipRow(f"COCO image {image_id}: the annotation file gives it a size of {width}x{height}")
    label = rasterize(anns, int(height), int(width), f"COCO image {image_id}", fixes)
    return make_row(image_id, Path(image_path), label, f"the annotations of COCO image {image_id}", fixes)


def _load_coco(path: Path, notes: list | None = None) -> COCO:
    """The instances file at `path` indexed by pycocotools; ValueError naming it when it is not one. A file saved
    with a BOM, CRLF line ends or as UTF-16 is read, and noted in `notes` (see `read_user_text`)."""
    try:
        data = json.loads(read_user_text(path, "COCO annotation file", notes))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{path} is not a COCO instances file: no {key!r} list")
        if not all(isinstance(entry, dict) and "id" in entry for entry in data[key]):
            raise ValueError(f"{path}: every entry of {key!r} must be an object with an 'id'")
        bad = next((e["id"] for e in data[key] if isinstance(e["id"], bool) or not isinstance(e["id"], int)), None)
        if bad is not None:  # pycocotools would index by it (a list is a TypeError deep inside) or never match it
            raise ValueError(f"{path}: an entry of {key!r} has id {bad!r}; COCO ids are whole numbers")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _coco_items(coco: COCO, images_dir: Path, ann_file: Path) -> tuple[list, list, list[dict]]:
    """
    The items of one split (image_id, image_path, height, width, annotations), the cache signature, and what
    listing found: categories missing or unknown (see `coco_class_of`), image ids listed twice (see
    `_repeated_images`), images absent from disk and annotations of unlisted image ids (skipped), annotations of
    unknown categories (painted as ignore).
    """
    class_of, listing = coco_class_of(coco, ann_file)
    conflicting, repeated = _repeated_images(coco, ann_file)
    listing += repeated
    items, signature = [], [file_signature(ann_file)]
    for image_id in sorted(set(coco.imgs) - conflicting):
        info = coco.imgs[image_id]
        image_path = images_dir / str(info.get("file_name", ""))
        if not info.get("file_name") or not image_path.is_file():
            problem = f"image of COCO id {image_id} not found: {image_path} (listed in {ann_file.name})"
            listing.append(report_entry(image_id, "file_skipped", problem, row=True))
            continue
        annotations = []
        for ann in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
            class_id = class_of.get(ann.get("category_id"), IGNORE_INDEX)
            if class_id == IGNORE_INDEX:
                problem = (
                    f"{ann_file.name}: annotation {ann['id']} has unknown category {ann.get('category_id')!r}: "
                    "its pixels are ignore (255)"
                )
                listing.append(report_entry(image_id, "unknown_category_annotation", problem))
            annotations.append((ann["id"], class_id, int(ann.get("iscrowd", 0)), ann.get("segmentation", [])))
        items.append((str(image_id), str(image_path), info.get("height", 0), info.get("width", 0), annotations))
        signature.append(file_signature(image_path))
    orphans = sorted(
        (
            (ann.get("id"), ann.get("image_id"))
            for ann in coco.dataset["annotations"]
            if ann.get("image_id") not in coco.imgs
        ),
        key=str,
    )
    for ann_id, image_id in orphans:
        problem = f"{ann_file.name}: annotation {ann_id} points to image id {image_id!r}, which the file does not list"
        listing.append(report_entry(f"annotation {ann_id}", "orphan_annotation", problem))
    return items, signature, listing


def _repeated_images(coco: COCO, ann_file: Path) -> tuple[set[int], list[dict]]:
    """
    Image ids `ann_file` lists more than once (pycocotools silently keeps the last entry): identical entries are
    kept once ("duplicate_id"); entries that differ are all left out ("file_skipped"), since which image the
    annotations belong to cannot be told. Returns the ids left out and the report entries.
    """
    entries: dict[int, list[dict]] = {}
    for info in coco.dataset["images"]:
        entries.setdefault(info["id"], []).append(info)
    conflicting, listing = set(), []
    for image_id, infos in sorted(entries.items()):
        if len(infos) < 2:
            continue
        where = f"{ann_file.name} lists image id {image_id} {len(infos)} times"
        if all(info == infos[0] for info in infos):
            listing.append(report_entry(image_id, "duplicate_id", f"{where}: listed once"))
            continue
        conflicting.add(image_id)
        names = [info.get("file_name") for info in infos]
        problem = f"{where}, as different images {names}: left out (which one its annotations are on is unknown)"
        listing.append(report_entry(image_id, "file_skipped", problem, row=True))
    return conflicting, listing


def coco_class_of(coco: COCO, source: Path) -> tuple[dict[int, int], list[dict]]:
    """
    {category id: class id} by the category id itself against COCO 2014's table (`COCO_CATEGORY_IDS`, class id =
    position + 1), never by position in the file, so a category the file lacks cannot renumber the later ones;
    and the listing entries that report each category of the table missing from `source` (its class then has
    no pixels) and each category of `source` outside the table (its annotations are ignore, 255).

    Raises:
        ValueError: a category of the table named differently in `source` (not COCO's categories), one line.
    """
    table = dict(zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:]))
    listing = []
    for cat_id, category in sorted(coco.cats.items(), key=lambda kv: str(kv[0])):
        name = category.get("name")
        if cat_id not in table:
            problem = f"{source.name}: category {cat_id!r} ({name!r}) is not one of COCO's 80: "
            problem += "its pixels are ignore (255)"
            listing.append(report_entry(f"category {cat_id}", "coco_category_unknown", problem))
        elif name != table[cat_id]:
            raise ValueError(
                f"{source}: category {cat_id} is named {name!r}, COCO 2014's is {table[cat_id]!r}; COCO-20i needs "
                "COCO's own instances_*2014.json"
            )
    for cat_id in sorted(set(table) - set(coco.cats)):
        problem = (
            f"{source.name}: COCO category {cat_id} ({table[cat_id]!r}) is missing from its categories: class "
            f"{COCO_CATEGORY_IDS.index(cat_id) + 1} keeps its id, and its annotations are read by that id"
        )
        listing.append(report_entry(f"category {cat_id}", "coco_category_missing", problem))
    return {cat_id: i + 1 for i, cat_id in enumerate(COCO_CATEGORY_IDS)}, listing


def build_coco20i(
    coco_root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, num_proc: int | None = None
) -> DatasetDict:
    """
    COCO-20i (all 80 classes; folds are chosen at sampling time) from `coco_root` holding `train2014/`,
    `val2014/` and `annotations/instances_{train,val}2014.json`.

    Category ids map to class ids 1..80 by the id itself against COCO 2014's table (`coco_class_of`): a
    category missing from the file's `categories` keeps its class id and is reported, one outside the table is
    reported and its annotations are ignore (255), one named differently from COCO's is a ValueError; the class
    names are `COCO_CLASSES`. Label maps are rasterised with pycocotools from
    polygons and RLEs (see `rasterize` for the overlap and crowd rules: the smallest instance wins, uncovered
    crowd pixels are 255). Every image listed in the JSON is kept, also those without annotations (all
    background, `class_ids` empty), so the splits are exactly train2014 and val2014. `image_id` is the COCO
    image id; rows are in ascending id order.

    Defects of single images or annotations do not stop the build (see `build_split`, `rasterize`). Fixed and
    reported: degenerate polygons (< 3 points, odd or non-finite coordinates) dropped, points far outside the
    image clipped, zero-area instances, an RLE of an exact scale of its image resized, an annotation of an unknown
    category painted 255 (ignore), a label resized to an image stored at an exact scale of the JSON's size.
    Skipped and reported: an image absent from disk, unreadable or truncated, or whose size or RLEs do not fit;
    annotations pointing to an image id the file does not list. Grayscale / CMYK images are converted to RGB.
    """
    if COCO is None:
        raise ImportError("COCO-20i needs pycocotools: pip install -e '.[coco]' (or pip install 'hf_fss[coco]')")
    root = require_dir(coco_root, "COCO root")
    splits = {}
    for split, tag in (("train", "train2014"), ("validation", "val2014")):
        images_dir = require_dir(root / tag, "COCO image folder")
        ann_file = require_file(root / "annotations" / f"instances_{tag}.json", "COCO annotation file")
        notes: list[str] = []
        coco = _load_coco(ann_file, notes)
        items, signature, listing = _coco_items(coco, images_dir, ann_file)
        listing[:0] = [report_entry(ann_file.name, "list_normalised", note) for note in notes]
        description = (
            f"COCO-20i {split} (80 classes, category ids -> 1..80 in ascending id order, 255 = uncovered crowd), "
            f"built by hf_fss from {ann_file} and {images_dir}; overlaps go to the smallest instance"
        )
        splits[split] = (items, signature, description, listing)
    return DatasetDict(
        {
            split: build_split(
                _coco_row,
                items,
                COCO_CLASSES,
                split=split,
                signature=["coco20i", signature],
                description=description,
                cache_dir=cache_dir,
                num_proc=num_proc,
                listing_report=listing,
            )
            for split, (items, signature, description, listing) in splits.items()
        }
    )
