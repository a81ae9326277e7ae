"""COCO-20i from the raw COCO 2014 release (train2014/, val2014/, annotations/instances_*2014.json)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
from datasets import DatasetDict
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..schema import COCO_CLASSES, IGNORE_INDEX
from ._common import build_split, file_signature, make_row, require_dir, require_file

logger = logging.getLogger(__name__)


def annotation_mask(segmentation, height: int, width: int, source: str = "annotation") -> np.ndarray:
    """
    Boolean HxW mask of a COCO `segmentation`: a list of polygons, an uncompressed RLE (`counts` a list) or a
    compressed RLE (`counts` a string). Polygons with fewer than 3 points are skipped: pycocotools would read a
    4-number polygon as a box.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(s) for s in segmentation["size"]] != [height, width]:
            raise ValueError(f"{source}: RLE size {segmentation['size']} is not the image's {[height, width]}")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
    else:
        raise ValueError(f"{source}: unknown segmentation format {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def rasterize(annotations, height: int, width: int, source: str = "image") -> np.ndarray:
    """
    Class-id map (uint8 HxW) of one image's annotations, given as (annotation_id, class_id, iscrowd, segmentation).

    - Overlaps: a pixel covered by several non-crowd instances takes the class of the smallest one (fewest mask
      pixels); equal sizes go to the lowest annotation id. Smaller objects are mostly the ones in front (a cup on
      a dining table, a person on a bench), and painting in annotation-id order would let a later large instance
      erase them. Implemented by painting in descending (pixel count, annotation id) order.
    - Crowd: pixels of any `iscrowd=1` region (whatever its category) that no non-crowd instance covers are 255
      (ignore); a crowd region never adds its category to the image's classes.
    - Everything else is 0 (background); an image without annotations is all background.
    """
    label = np.zeros((height, width), dtype=np.uint8)
    instances = []
    for annotation_id, class_id, iscrowd, segmentation in annotations:
        mask = annotation_mask(segmentation, height, width, f"{source}, annotation {annotation_id}")
        if iscrowd:
            label[mask] = IGNORE_INDEX
        else:
            instances.append((int(mask.sum()), annotation_id, class_id, mask))
    for _, _, class_id, mask in sorted(instances, key=lambda t: (-t[0], -t[1])):
        label[mask] = class_id
    return label


def _coco_rows(items):
    """Rows of (image_id, image_path, height, width, annotations) items; see `rasterize`."""
    for image_id, image_path, height, width, anns in items:
        label = rasterize(anns, height, width, f"COCO image {image_id}")
        yield make_row(image_id, Path(image_path), label, f"the annotations of COCO image {image_id}")


def _load_coco(path: Path) -> COCO:
    with path.open() as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path} is not a COCO instances file: no {key!r}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def coco_class_names(coco: COCO, source: Path) -> list[str]:
    """["background", *category names in ascending category-id order]; warns when they differ from COCO_CLASSES."""
    names = ["background"] + [coco.cats[c]["name"] for c in sorted(coco.cats)]
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"{source} has {len(names) - 1} categories; at most {IGNORE_INDEX - 1} fit in a label map")
    if tuple(names) != COCO_CLASSES:
        logger.warning(
            "categories of %s differ from the COCO 2014 ones; using the file's %d names", source, len(names) - 1
        )
    return names


def build_coco20i(
    coco_root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, num_proc: int | None = None
) -> DatasetDict:
    """
    COCO-20i (all 80 classes; folds are chosen at sampling time) from `coco_root` holding `train2014/`,
    `val2014/` and `annotations/instances_{train,val}2014.json`.

    Category ids map to class ids 1..80 in ascending category-id order, with the JSON's names (a warning when
    they differ from `COCO_CLASSES`; train and val must agree). Label maps are rasterised with pycocotools from
    polygons and RLEs (see `rasterize` for the overlap and crowd rules: the smallest instance wins, uncovered
    crowd pixels are 255). Every image listed in the JSON is kept, also those without annotations (all
    background, `class_ids` empty), so the splits are exactly train2014 and val2014. `image_id` is the COCO
    image id; rows are in ascending id order.
    """
    root = require_dir(coco_root, "COCO root")
    splits, names = {}, None
    for split, tag in (("train", "train2014"), ("validation", "val2014")):
        images_dir = require_dir(root / tag, "COCO image folder")
        ann_file = require_file(root / "annotations" / f"instances_{tag}.json", "COCO annotation file")
        coco = _load_coco(ann_file)
        split_names = coco_class_names(coco, ann_file)
        if names is not None and split_names != names:
            raise ValueError(f"the categories of {ann_file} differ from those of the train annotations")
        names = split_names
        class_of = {cat_id: i + 1 for i, cat_id in enumerate(sorted(coco.cats))}
        items, signature = [], [file_signature(ann_file)]
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            image_path = require_file(images_dir / info["file_name"], f"image of COCO id {image_id}")
            annotations = []
            for ann in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
                if ann["category_id"] not in class_of:
                    raise ValueError(f"{ann_file}: annotation {ann['id']} has unknown category {ann['category_id']}")
                annotations.append(
                    (ann["id"], class_of[ann["category_id"]], int(ann.get("iscrowd", 0)), ann["segmentation"])
                )
            items.append((str(image_id), str(image_path), int(info["height"]), int(info["width"]), annotations))
            signature.append(file_signature(image_path))
        description = (
            f"COCO-20i {split} (80 classes, category ids -> 1..80 in ascending id order, 255 = uncovered crowd), "
            f"built by hf_fss from {ann_file} and {images_dir}; overlaps go to the smallest instance"
        )
        splits[split] = (items, signature, description)
    return DatasetDict(
        {
            split: build_split(
                _coco_rows,
                items,
                names,
                split=split,
                signature=["coco20i", signature],
                description=description,
                cache_dir=cache_dir,
                num_proc=num_proc,
            )
            for split, (items, signature, description) in splits.items()
        }
    )
