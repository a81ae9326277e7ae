"""
scripts/prepare_dataset.py and the raw-release builders on tiny releases written in the real on-disk layouts:
PASCAL VOC 2012 + SBD (or SegmentationClassAug), COCO 2014 and FSS-1000. Every check reads the saved dataset back
with `datasets.load_from_disk`, so ids are proven to survive build, save, load and decode.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.io
import scipy.sparse

datasets = pytest.importorskip("datasets")
mask_utils = pytest.importorskip("pycocotools.mask")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_dataset.py"


# ----------------------------------------------------------------------------------------------- raw writers


def _rgb(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_jpeg(path: Path, pixels: np.ndarray, exif_orientation: int | None = None) -> np.ndarray:
    """Write a JPEG; return the pixels a decoder reads back (what the dataset must hold)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(pixels)
    kwargs = {"quality": 90}
    if exif_orientation is not None:
        exif = PIL.Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, format="JPEG", **kwargs)
    with PIL.Image.open(path) as written:
        return np.array(written.convert("RGB"))  # raw pixel grid, EXIF orientation not applied


# Luminance of a palette entry is not monotone in its index, so `.convert("L")` would scramble the ids.
PALETTE = [(i * 97 + c * 61) % 256 for i in range(256) for c in range(3)]


def write_palette_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(ids.astype(np.uint8))
    image.putpalette(PALETTE)  # makes it a "P" image whose indices are the ids
    image.save(path)


def write_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """The real SBD cls/*.mat layout: struct GTcls with Boundaries (20x1 cell of sparse), Segmentation,
    CategoriesPresent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=bool)
    present = np.array([c for c in np.unique(segmentation) if c not in (0, 255)], dtype=np.uint8)
    gtcls = {"Boundaries": boundaries, "Segmentation": segmentation.astype(np.uint8), "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": gtcls})


def _label(rng, height, width, classes, boundary=True):
    ids = np.zeros((height, width), dtype=np.uint8)
    for k, c in enumerate(classes):
        y, x = 2 + 3 * k, 1 + 4 * k
        ids[y : y + 5, x : x + 6] = c
    if boundary:
        ids[0, :] = 255
    return ids


def write_voc_sbd(root: Path) -> dict:
    """VOC2012 + SBD. VOC train {01,02}, VOC val {03,04}; SBD train {01,03,10}, SBD val {11,12}.
    01 is in both (VOC's label must win), 03 is VOC val (never in train), 12 has no VOC JPEG (SBD img/ is used)."""
    rng = np.random.default_rng(0)
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    sizes = {"2007_000001": (18, 22), "2007_000002": (20, 16), "2007_000003": (17, 23), "2007_000004": (21, 19)}
    sizes.update({"2008_000010": (19, 24), "2008_000011": (16, 16), "2008_000012": (22, 18)})
    classes = {"2007_000001": [15, 1], "2007_000002": [20], "2007_000003": [7, 12], "2007_000004": [3]}
    classes.update({"2008_000010": [9, 2], "2008_000011": [], "2008_000012": [18, 4, 11]})
    images, labels = {}, {}
    for image_id, (h, w) in sizes.items():
        folder = sbd / "img" if image_id == "2008_000012" else voc / "JPEGImages"
        images[image_id] = write_jpeg(folder / f"{image_id}.jpg", _rgb(rng, h, w))
        if image_id.startswith("2007"):  # in VOC's segmentation set: palette PNG with 255 boundary
            labels[image_id] = _label(rng, h, w, classes[image_id])
            write_palette_png(voc / "SegmentationClass" / f"{image_id}.png", labels[image_id])
        else:  # SBD only: no boundary
            labels[image_id] = _label(rng, h, w, classes[image_id], boundary=False)
            write_sbd_mat(sbd / "cls" / f"{image_id}.mat", labels[image_id])
    # SBD also annotates 01 (differently) and 03; neither may be used.
    write_sbd_mat(sbd / "cls" / "2007_000001.mat", np.full(sizes["2007_000001"], 5, np.uint8))
    write_sbd_mat(sbd / "cls" / "2007_000003.mat", np.full(sizes["2007_000003"], 6, np.uint8))
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000002\n2007_000001\n")
    (lists / "val.txt").write_text("2007_000003\n2007_000004\n")
    (sbd / "train.txt").write_text("2007_000001\n2007_000003\n2008_000010\n")
    (sbd / "val.txt").write_text("2008_000011\n2008_000012\n")
    return {"voc": voc, "sbd": sbd.parent, "images": images, "labels": labels}


def write_aug_dir(root: Path, voc: dict) -> Path:
    """A SegmentationClassAug folder (single-channel L PNGs) for 01, 02, 03 (VOC val) and 10."""
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    for image_id in ("2007_000001", "2007_000002", "2007_000003", "2008_000010"):
        ids = voc["labels"][image_id].copy()
        ids[-1, -1] = 13  # differs from the VOC / SBD labels, so the test sees where labels came from
        voc["labels"]["aug:" + image_id] = ids
        PIL.Image.fromarray(ids).save(aug / f"{image_id}.png")
    return aug


# COCO category ids (with the real gaps) of the 80 classes, in ascending order.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: column-major runs, starting with a (possibly empty) run of zeros."""
    flat, counts, current, run = mask.flatten(order="F"), [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def _box(h, w, y0, y1, x0, x1):
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_coco(root: Path) -> dict:
    """COCO 2014: train images 9 (overlaps, crowd, all segmentation formats), 25 (no annotation), 30 (grayscale
    JPEG); val image 42 (EXIF-rotated JPEG). Returns the expected label maps, computed here from the rules."""
    from hf_fss.data.schema import COCO_CLASSES

    rng = np.random.default_rng(1)
    categories = [{"id": c, "name": n, "supercategory": "x"} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    cls = {c: i + 1 for i, c in enumerate(COCO_CATEGORY_IDS)}
    expected, images = {}, {}

    h, w = 30, 40
    table_poly = [0.0, 0.0, 30.0, 0.0, 30.0, 20.0, 0.0, 20.0]
    person_poly = [5.0, 5.0, 10.0, 5.0, 10.0, 10.0, 5.0, 10.0]
    poly_mask = {
        k: mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([p], h, w))).astype(bool)
        for k, p in (("table", table_poly), ("person", person_poly))
    }
    crowd = _box(h, w, 15, 30, 25, 40)
    brush = _box(h, w, 22, 26, 2, 8)
    dog, cat = _box(h, w, 24, 28, 10, 14), _box(h, w, 26, 30, 12, 16)  # equal areas, overlapping
    bike = _box(h, w, 2, 6, 33, 38)
    bike_rle = mask_utils.encode(np.asfortranarray(bike.astype(np.uint8)))
    anns = [
        # The small person has the lower id: annotation-id painting would let the table erase it.
        {"id": 100, "category_id": 1, "iscrowd": 0, "segmentation": [person_poly]},
        {"id": 101, "category_id": 67, "iscrowd": 0, "segmentation": [[1.0, 1.0, 2.0, 2.0], table_poly]},
        {"id": 103, "category_id": 1, "iscrowd": 1, "segmentation": {"size": [h, w], "counts": _rle_counts(crowd)}},
        {"id": 104, "category_id": 90, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": _rle_counts(brush)}},
        {"id": 106, "category_id": 17, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": _rle_counts(cat)}},
        {"id": 105, "category_id": 18, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": _rle_counts(dog)}},
        {"id": 107, "category_id": 2, "iscrowd": 0, "segmentation": {"size": [h, w], "counts": bike_rle["counts"].decode()}},
    ]  # fmt: skip
    label = np.zeros((h, w), np.uint8)
    label[crowd] = 255
    label[poly_mask["table"]] = cls[67]
    label[poly_mask["person"]] = cls[1]
    label[brush], label[cat], label[dog], label[bike] = cls[90], cls[17], cls[18], cls[2]  # tie: lower id (dog) on top
    expected["9"] = label
    train_images = [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": h, "width": w}]
    images["9"] = write_jpeg(root / "train2014" / train_images[0]["file_name"], _rgb(rng, h, w))

    train_images.append({"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "height": 12, "width": 14})
    images["25"] = write_jpeg(root / "train2014" / train_images[1]["file_name"], _rgb(rng, 12, 14))
    expected["25"] = np.zeros((12, 14), np.uint8)

    gray_path = root / "train2014" / "COCO_train2014_000000000030.jpg"
    PIL.Image.fromarray(rng.integers(0, 256, (16, 10), dtype=np.uint8)).save(gray_path, format="JPEG")
    with PIL.Image.open(gray_path) as gray:
        assert gray.mode == "L"
        images["30"] = np.array(gray.convert("RGB"))
    train_images.append({"id": 30, "file_name": gray_path.name, "height": 16, "width": 10})
    anns.append({"id": 200, "category_id": 44, "iscrowd": 0, "segmentation": [[1.0, 1.0, 8.0, 1.0, 8.0, 9.0]]})
    anns[-1]["image_id"] = 30
    tri = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[1.0, 1.0, 8.0, 1.0, 8.0, 9.0]], 16, 10)))
    expected["30"] = tri.astype(np.uint8) * cls[44]
    for ann in anns[:-1]:
        ann["image_id"] = 9

    vh, vw = 10, 16  # stored grid; EXIF orientation 6 would show it as 16 x 10
    val_images = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": vh, "width": vw}]
    images["42"] = write_jpeg(root / "val2014" / val_images[0]["file_name"], _rgb(rng, vh, vw), exif_orientation=6)
    val_anns = [{"id": 300, "image_id": 42, "category_id": 18, "iscrowd": 0, "segmentation": {"size": [vh, vw], "counts": _rle_counts(_box(vh, vw, 1, 4, 2, 12))}}]  # fmt: skip
    expected["42"] = _box(vh, vw, 1, 4, 2, 12).astype(np.uint8) * cls[18]

    (root / "annotations").mkdir(parents=True)
    for tag, imgs, image_anns in (("train2014", train_images, anns), ("val2014", val_images, val_anns)):
        data = {"info": {}, "licenses": [], "images": imgs, "annotations": image_anns, "categories": categories}
        (root / "annotations" / f"instances_{tag}.json").write_text(json.dumps(data))
    return {"root": root, "labels": expected, "images": images}


FSS_CLASSES = ["abe's_flyingfish", "apple", "bus", "cat", "dog", "zebra"]


def write_fss(root: Path) -> dict:
    """FSS-1000 class folders of N.jpg + N.png (images 1, 2, 10 so that numeric order matters), RGB and L masks
    with values around the 128 threshold, a stray __MACOSX folder, and HSNet-style split lists."""
    rng = np.random.default_rng(2)
    data = root / "FSS-1000"
    masks, images = {}, {}
    for k, name in enumerate(FSS_CLASSES):
        for n in (1, 2, 10):
            h, w = 12 + k, 14
            images[f"{name}/{n}"] = write_jpeg(data / name / f"{n}.jpg", _rgb(rng, h, w))
            gray = np.zeros((h, w), np.uint8)
            gray[2 : 6 + n % 3, 3:9] = 255
            gray[0, 0], gray[0, 1] = 128, 127  # JPEG-ish noise: 128 is foreground, 127 is not
            masks[f"{name}/{n}"] = (gray >= 128).astype(np.uint8)
            mask = PIL.Image.fromarray(gray)
            (mask.convert("RGB") if k % 2 else mask).save(data / name / f"{n}.png")
    (data / "__MACOSX").mkdir()
    splits = root / "splits"
    splits.mkdir()
    (splits / "trn.txt").write_text("bus\napple\ncat\n")
    (splits / "val.txt").write_text("dog\n")
    (splits / "test.txt").write_text("zebra\nabe's_flyingfish\n")  # HSNet's files end with a newline
    return {"root": data, "splits": splits, "masks": masks, "images": images}


# ------------------------------------------------------------------------------------------------ running


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    voc = write_voc_sbd(root / "pascal")
    return {"root": root, "voc": voc, "coco": write_coco(root / "coco"), "fss": write_fss(root / "fss")}


@pytest.fixture(scope="module")
def script_runs(raw, tmp_path_factory):
    """The script as subprocesses, started together so that their start-up (imports) overlaps."""
    out = tmp_path_factory.mktemp("out")
    voc, coco, fss = raw["voc"], raw["coco"], raw["fss"]
    commands = {
        "pascal5i": ["pascal5i", "--voc-root", str(voc["voc"].parent), "--sbd-root", str(voc["sbd"])],
        "coco20i": ["coco20i", "--coco-root", str(coco["root"])],
        "fss1000": ["fss1000", "--fss-root", str(fss["root"]), "--split-dir", str(fss["splits"])],
        "missing": ["pascal5i", "--voc-root", str(out / "no_such_voc"), "--sbd-root", str(voc["sbd"])],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPT), *args, "--output-dir", str(out / name)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "dir": out / name}
    return results


def _loaded(run):
    assert run["rc"] == 0, run["stdout"] + run["stderr"]
    return datasets.load_from_disk(str(run["dir"]))


def _rows(split):
    return {row["image_id"]: row for row in split}


def _check_row(row, label, image=None):
    decoded = np.array(row["label"])
    assert row["label"].mode == "L"
    np.testing.assert_array_equal(decoded, label)
    ids = [int(c) for c in np.unique(label) if c not in (0, 255)]
    assert row["class_ids"] == ids
    assert row["class_areas"] == [int((label == c).sum()) for c in ids]
    if image is not None:
        assert row["image"].mode == "RGB"
        np.testing.assert_array_equal(np.array(row["image"]), image)


def _no_leftovers(output_dir: Path):
    assert not [p.name for p in output_dir.parent.iterdir() if p.name.startswith(f".{output_dir.name}.")]


# ------------------------------------------------------------------------------------------------ PASCAL-5i


def test_palette_fixture_would_be_scrambled_by_convert_l(raw):
    path = raw["voc"]["voc"] / "SegmentationClass" / "2007_000001.png"
    with PIL.Image.open(path) as image:
        assert image.mode == "P"
        assert not np.array_equal(np.array(image.convert("L")), raw["voc"]["labels"]["2007_000001"])


def test_pascal5i_sbd(raw, script_runs):
    run = script_runs["pascal5i"]
    dd = _loaded(run)
    voc = raw["voc"]
    assert set(dd) == {"train", "validation"}
    train, val = _rows(dd["train"]), _rows(dd["validation"])
    # (SBD train + SBD val + VOC train) - VOC val, sorted; 2007_000003 is in SBD train but is VOC val.
    assert list(train) == ["2007_000001", "2007_000002", "2008_000010", "2008_000011", "2008_000012"]
    assert list(val) == ["2007_000003", "2007_000004"]
    for image_id, row in {**train, **val}.items():
        _check_row(row, voc["labels"][image_id], voc["images"][image_id])
    assert train["2007_000001"]["class_ids"] == [1, 15]  # VOC's label, not SBD's all-5 map
    assert (np.array(train["2007_000001"]["label"]) == 255).any()  # VOC boundary kept
    assert train["2008_000011"]["class_ids"] == [] and train["2008_000011"]["class_areas"] == []
    names = dd["train"].features["class_ids"].feature.names
    assert names[15] == "person" and len(names) == 21
    assert "SBD" in dd["train"].info.description and "VOC" in dd["validation"].info.description
    assert "train: 5 rows, 8 classes" in run["stdout"] and "validation: 2 rows, 3 classes" in run["stdout"]
    _no_leftovers(run["dir"])


def _main(argv):
    from hf_fss.data.builders.prepare import main

    return main([str(a) for a in argv])


def test_pascal5i_aug_label_dir(raw, tmp_path):
    voc = raw["voc"]
    aug = write_aug_dir(tmp_path, voc)
    out = tmp_path / "all"
    assert _main(["pascal5i", "--voc-root", voc["voc"], "--aug-label-dir", aug, "--output-dir", out]) == 0
    dd = datasets.load_from_disk(str(out))
    train = _rows(dd["train"])
    assert list(train) == ["2007_000001", "2007_000002", "2008_000010"]  # every label in the folder but VOC val
    for image_id, row in train.items():
        _check_row(row, voc["labels"]["aug:" + image_id], voc["images"][image_id])
    for image_id, row in _rows(dd["validation"]).items():
        _check_row(row, voc["labels"][image_id])

    # DeepLab-format list; its VOC val id is dropped; 2007_000002 is not listed.
    listed = tmp_path / "train_aug.txt"
    lines = ["2007_000001", "2008_000010", "2007_000004"]
    listed.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in lines))
    out = tmp_path / "listed"
    argv = ["pascal5i", "--voc-root", voc["voc"], "--aug-label-dir", aug, "--train-list", listed, "--output-dir", out]
    assert _main(argv) == 0
    assert datasets.load_from_disk(str(out))["train"]["image_id"][:] == ["2007_000001", "2008_000010"]


def test_pascal5i_aug_label_dir_as_unzipped(tmp_path, capsys):
    """The folder SegmentationClassAug.zip was unzipped into, with macOS's `._{id}.png` AppleDouble files beside
    the labels and one `.PNG`: read right (the `._` files used to be ids of missing images, the `.PNG` was lost);
    an unreadable RGB label is skipped naming its file; a folder without labels is one line naming it."""
    from hf_fss.data.builders import build_report
    from hf_fss.data.builders.pascal import voc_colormap

    voc = write_voc_sbd(tmp_path / "pascal")
    (tmp_path / "unzipped").mkdir()
    aug = write_aug_dir(tmp_path / "unzipped", voc)
    for label in [*aug.iterdir()]:
        (aug / f"._{label.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (aug / "2008_000010.png").rename(aug / "2008_000010.PNG")
    voc_label = voc["voc"] / "SegmentationClass" / "2007_000004.png"
    PIL.Image.fromarray(voc_colormap()[voc["labels"]["2007_000004"]]).save(voc_label)
    _truncate(voc_label)
    out = tmp_path / "out"
    assert (
        _main(["pascal5i", "--voc-root", voc["voc"], "--aug-label-dir", tmp_path / "unzipped", "--output-dir", out])
        == 0
    )
    dd = datasets.load_from_disk(str(out))
    train = _rows(dd["train"])
    assert list(train) == ["2007_000001", "2007_000002", "2008_000010"]
    for image_id, row in train.items():
        _check_row(row, voc["labels"]["aug:" + image_id], voc["images"][image_id])
    assert dd["validation"]["image_id"][:] == ["2007_000003"]
    skipped = build_report(dd["validation"])["skipped"]
    assert [e["id"] for e in skipped] == ["2007_000004"] and f"cannot read label {voc_label}" in skipped[0]["problem"]
    assert build_report(dd["validation"])["counts"] == {"file_skipped": 1}
    assert "validation: 1 rows, 2 classes; defects of the release: 0 fixed, 1 skipped (file_skipped 1;" in (
        capsys.readouterr().out
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "._2007_000001.png").write_bytes(b"\x00\x05\x16\x07")
    bad = tmp_path / "bad"
    assert _main(["pascal5i", "--voc-root", voc["voc"], "--aug-label-dir", empty, "--output-dir", bad]) == 2
    _one_line_error(capsys.readouterr().err, f"SegmentationClassAug folder {empty} holds no", "--aug-label-dir")
    assert not bad.exists()
    _no_leftovers(bad)


def test_sbd_struct_access_styles(raw):
    from hf_fss.data.builders.pascal import _struct_field

    path = raw["voc"]["sbd"] / "dataset" / "cls" / "2008_000010.mat"
    expected = raw["voc"]["labels"]["2008_000010"]
    for kwargs in ({"squeeze_me": True, "struct_as_record": False}, {"squeeze_me": True, "struct_as_record": True},
                   {"squeeze_me": False, "struct_as_record": True}, {"squeeze_me": False, "struct_as_record": False},
                   {"simplify_cells": True}):  # fmt: skip
        gtcls = scipy.io.loadmat(path, **kwargs)["GTcls"]
        np.testing.assert_array_equal(np.asarray(_struct_field(gtcls, "Segmentation")), expected)


def test_pascal5i_missing_listed_file(raw, tmp_path, capsys):
    # A copy of the SBD folder without one listed .mat: that row is skipped, the build goes on, and the log, the
    # summary and the dataset info name the file (it used to abort the whole build).
    import shutil

    from hf_fss.data.builders import build_report

    sbd = tmp_path / "sbd"
    shutil.copytree(raw["voc"]["sbd"] / "dataset", sbd)
    (sbd / "cls" / "2008_000011.mat").unlink()
    out = tmp_path / "out"
    assert _main(["pascal5i", "--voc-root", raw["voc"]["voc"], "--sbd-root", sbd, "--output-dir", out]) == 0
    captured = capsys.readouterr()
    assert str(sbd / "cls" / "2008_000011.mat") in captured.err
    assert "train: 4 rows, 8 classes; defects of the release: 0 fixed, 1 skipped" in captured.out
    train = datasets.load_from_disk(str(out))["train"]
    assert "2008_000011" not in train["image_id"][:]
    report = build_report(train)
    assert report["fixed"] == [] and [e["id"] for e in report["skipped"]] == ["2008_000011"]
    assert "label of 2008_000011 not found" in report["skipped"][0]["problem"]
    _no_leftovers(out)

    # When most rows are lost, the source folder is wrong: the build fails and writes nothing.
    for mat in (sbd / "cls").glob("2008_*.mat"):
        mat.unlink()
    out = tmp_path / "out2"
    assert _main(["pascal5i", "--voc-root", raw["voc"]["voc"], "--sbd-root", sbd, "--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert "the train split lost 3 of its 5 rows" in err and "wrong source folder" in err
    assert not out.exists()
    _no_leftovers(out)


def test_missing_folder_exits_with_clear_error(script_runs):
    run = script_runs["missing"]
    assert run["rc"] == 2
    assert "no_such_voc" in run["stderr"] and "not found" in run["stderr"]
    assert "Traceback" not in run["stderr"]
    assert not run["dir"].exists()
    _no_leftovers(run["dir"])


# ------------------------------------------------------------------------------------------------ COCO-20i


def test_coco20i(raw, script_runs):
    from hf_fss.data.schema import COCO_CLASSES

    run = script_runs["coco20i"]
    dd = _loaded(run)
    coco = raw["coco"]
    train, val = _rows(dd["train"]), _rows(dd["validation"])
    assert list(train) == ["9", "25", "30"] and list(val) == ["42"]
    for image_id, row in {**train, **val}.items():
        _check_row(row, coco["labels"][image_id], coco["images"][image_id])
    label = np.array(train["9"]["label"])
    assert label[7, 7] == 1  # the small person stays on the large dining table
    assert label[18, 28] == 61 and label[25, 35] == 255  # table over crowd; uncovered crowd is ignore
    assert label[26, 12] == 17  # equal-area dog (id 105) and cat (id 106): the lower id wins
    assert train["9"]["class_ids"] == [1, 2, 16, 17, 61, 80]
    assert train["25"]["class_ids"] == [] and not np.array(train["25"]["label"]).any()  # kept, all background
    assert val["42"]["image"].size == (16, 10)  # EXIF orientation not applied: image stays on the label's grid
    assert tuple(dd["train"].features["class_ids"].feature.names) == COCO_CLASSES
    assert "instances_train2014.json" in dd["train"].info.description
    assert "train: 3 rows, 7 classes" in run["stdout"]


# ------------------------------------------------------------------------------------------------ FSS-1000


def _check_fss(dd, fss, expected_splits):
    names = sorted(FSS_CLASSES)
    assert set(dd) == {"train", "validation", "test"}
    for split, classes in expected_splits.items():
        rows = _rows(dd[split])
        expected_ids = [f"{c}/{n}" for c in sorted(classes) for n in (1, 2, 10)]
        assert list(rows) == expected_ids
        for image_id, row in rows.items():
            np.testing.assert_array_equal(np.array(row["label"]), fss["masks"][image_id])
            np.testing.assert_array_equal(np.array(row["image"]), fss["images"][image_id])
            assert row["class_ids"] == [1 + names.index(image_id.split("/")[0])]
            assert row["class_areas"] == [int(fss["masks"][image_id].sum())]
        assert dd[split].features["class_ids"].feature.names == ["background", *names]


def test_fss1000_split_lists(raw, script_runs):
    run = script_runs["fss1000"]
    dd = _loaded(run)
    splits = {"train": ["apple", "bus", "cat"], "validation": ["dog"], "test": ["abe's_flyingfish", "zebra"]}
    _check_fss(dd, raw["fss"], splits)
    assert "test: 6 rows, 2 classes" in run["stdout"]


def test_fss1000_fallback_split_and_overwrite(raw, tmp_path, capsys):
    from hf_fss.data.builders.fss import fallback_split

    out = tmp_path / "fss"
    assert _main(["fss1000", "--fss-root", raw["fss"]["root"], "--output-dir", out]) == 0
    names = sorted(FSS_CLASSES)
    order = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    expected = {"train": order[:4], "validation": order[4:5], "test": order[5:]}  # 6 classes: 4 / 1 / 1
    _check_fss(datasets.load_from_disk(str(out)), raw["fss"], expected)

    # An existing non-empty output is refused (usage error), and replaced with --overwrite.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _main(["fss1000", "--fss-root", raw["fss"]["root"], "--output-dir", out])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    argv = ["fss1000", "--fss-root", raw["fss"]["root"], "--split-dir", raw["fss"]["splits"], "--output-dir", out]
    assert _main([*argv, "--overwrite"]) == 0
    assert datasets.load_from_disk(str(out))["validation"]["image_id"][:] == ["dog/1", "dog/2", "dog/10"]
    _no_leftovers(out)

    sizes = {k: len(v) for k, v in fallback_split([f"c{i:04d}" for i in range(1000)]).items()}
    assert sizes == {"train": 520, "validation": 240, "test": 240}
    classes = [f"c{i}" for i in range(7)]
    split = fallback_split(classes, seed=3)
    assert sorted(sum(split.values(), [])) == classes  # a partition of the classes
    assert split == fallback_split(classes[::-1], seed=3)  # independent of listing order


def test_synthetic_subcommand(tmp_path, capsys):
    pytest.importorskip("hf_fss.data.synthetic")
    out = tmp_path / "synthetic"
    sizes = ["--num-train", "3", "--num-val", "2", "--image-size", "32"]
    assert _main(["synthetic", "--seed", "1", *sizes, "--output-dir", out]) == 0
    dd = datasets.load_from_disk(str(out))
    assert (dd["train"].num_rows, dd["validation"].num_rows) == (3, 2)
    assert "train: 3 rows" in capsys.readouterr().out


def test_stale_staging_of_killed_runs_is_removed_and_output_has_mkdir_mode(tmp_path):
    # Killed runs used to leave `.synthetic.*.partial` folders (24 MB each) that even --overwrite kept.
    pytest.importorskip("hf_fss.data.synthetic")
    from hf_fss.staging import _host

    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)  # fmt: skip
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "old.txt").write_text("previous build")
    killed = tmp_path / f".synthetic.partial.{_host()}.{dead_pid}.0badf00d"
    (killed / "dataset").mkdir(parents=True)
    legacy = tmp_path / ".synthetic.k3j4h5g6.partial"  # an earlier version's name (no pid), older than this run
    legacy.mkdir()
    os.utime(legacy, (0, 0))
    live = tmp_path / f".synthetic.partial.{_host()}.{os.getppid()}.0000cafe"  # a running writer's: kept
    live.mkdir()
    other = tmp_path / ".other.k3j4h5g6.partial"  # another output's: not ours to judge
    other.mkdir()
    os.utime(other, (0, 0))
    sizes = ["--num-train", "3", "--num-val", "2", "--image-size", "32"]
    old_umask = os.umask(0o022)
    try:
        assert _main(["synthetic", *sizes, "--output-dir", out, "--overwrite"]) == 0
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["synthetic", live.name, other.name])
    assert out.stat().st_mode & 0o777 == 0o755
    assert not (out / "old.txt").exists()


def test_label_png_round_trip_is_exact():
    from hf_fss.data.builders._common import encode_label

    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    with PIL.Image.open(io.BytesIO(encode_label(ids)["bytes"])) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.array(image), ids)


# ------------------------------------------------------------------------------- defects of the real releases
# Each test writes a tiny release in the real format, plants defects reported against the real one, and checks
# what the build fixes, skips and reports (in the log and in the dataset info, which load_from_disk keeps).


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial download: the header reads, the pixels do not


def _report_ids(split) -> tuple[list[str], list[str]]:
    from hf_fss.data.builders import build_report

    report = build_report(split)
    return [e["id"] for e in report["fixed"]], [e["id"] for e in report["skipped"]]


def _saved(dd, tmp_path):
    dd.save_to_disk(str(tmp_path / "saved"))
    return datasets.load_from_disk(str(tmp_path / "saved"))


def test_pascal5i_release_defects(tmp_path, caplog):
    from hf_fss.data.builders import build_pascal5i
    from hf_fss.data.builders.pascal import voc_colormap

    voc = write_voc_sbd(tmp_path / "pascal")
    labels = voc["labels"]
    # SBD map stored as double (fix: cast), VOC label written as an RGB rendering of the palette (fix: mapped
    # back), a VOC label at exactly twice its image's size (fix: resized).
    sbd_cls = voc["sbd"] / "dataset" / "cls"
    scipy.io.savemat(sbd_cls / "2008_000010.mat", {"GTcls": {"Segmentation": labels["2008_000010"].astype(float)}})
    PIL.Image.fromarray(voc_colormap()[labels["2007_000002"]]).save(
        voc["voc"] / "SegmentationClass" / "2007_000002.png"
    )
    write_palette_png(
        voc["voc"] / "SegmentationClass" / "2007_000004.png", np.kron(labels["2007_000004"], np.ones((2, 2)))
    )
    # A truncated JPEG, a label with an id outside the 20 classes, a label 1 px off its image (skipped).
    _truncate(voc["sbd"] / "dataset" / "img" / "2008_000012.jpg")
    bad_ids = labels["2008_000011"].copy()
    bad_ids[3, 3] = 42
    write_sbd_mat(sbd_cls / "2008_000011.mat", bad_ids)
    write_palette_png(voc["voc"] / "SegmentationClass" / "2007_000003.png", labels["2007_000003"][:-1])

    with caplog.at_level("WARNING", logger="hf_fss.data"):
        dd = _saved(build_pascal5i(voc["voc"], sbd_root=voc["sbd"], cache_dir=tmp_path / "cache"), tmp_path)
    train, val = _rows(dd["train"]), _rows(dd["validation"])
    assert list(train) == ["2007_000001", "2007_000002", "2008_000010"] and list(val) == ["2007_000004"]
    for image_id, row in {**train, **val}.items():
        _check_row(row, labels[image_id], voc["images"][image_id])
    assert _report_ids(dd["train"]) == (["2007_000002", "2008_000010"], ["2008_000011", "2008_000012"])
    assert _report_ids(dd["validation"]) == (["2007_000004"], ["2007_000003"])
    from hf_fss.data.builders import build_report

    problems = {e["id"]: e["problem"] for action in ("fixed", "skipped") for e in build_report(dd["train"])[action]}
    problems.update({e["id"]: e["problem"] for e in build_report(dd["validation"])["skipped"]})
    problems.update({e["id"]: e["problem"] for e in build_report(dd["validation"])["fixed"]})
    assert "as float64: cast to uint8" in problems["2008_000010"]
    assert "rendering of VOC's palette" in problems["2007_000002"]
    assert "exact scale x1/2" in problems["2007_000004"]
    assert "ids [42] outside the 21 classes" in problems["2008_000011"]
    assert "truncated" in problems["2008_000012"].lower() and "2008_000012.jpg" in problems["2008_000012"]
    assert "is 23x17 but its label" in problems["2007_000003"] and "not a scale" in problems["2007_000003"]
    logged = caplog.text
    assert all(image_id in logged for image_id in problems)
    assert dd["train"].info.description.startswith("PASCAL-5i")  # the benchmark stays recognisable


def test_coco20i_release_defects(tmp_path, caplog):
    from hf_fss.data.builders import build_coco20i
    from hf_fss.data.schema import COCO_CLASSES

    coco = write_coco(tmp_path / "coco")
    ann_path = coco["root"] / "annotations" / "instances_train2014.json"
    data = json.loads(ann_path.read_text())
    rng = np.random.default_rng(5)
    tif = "COCO_train2014_0000000000{}.jpg"
    data["images"] += [
        {"id": 50, "file_name": tif.format(50), "height": 8, "width": 8},  # listed, absent from disk
        {"id": 61, "file_name": tif.format(61), "height": 12, "width": 12},  # truncated on disk
        {"id": 62, "file_name": tif.format(62), "height": 12, "width": 12},  # its RLE has another, unscaled size
    ]
    write_jpeg(coco["root"] / "train2014" / tif.format(61), _rgb(rng, 12, 12))
    _truncate(coco["root"] / "train2014" / tif.format(61))
    write_jpeg(coco["root"] / "train2014" / tif.format(62), _rgb(rng, 12, 12))
    data["annotations"] += [
        {"id": 400, "image_id": 25, "category_id": 3, "iscrowd": 0, "segmentation": [[4.0, 4.0, 4.0, 4.0, 4.0, 4.0]]},
        {"id": 401, "image_id": 25, "category_id": 999, "iscrowd": 0, "segmentation": [[0.0, 0.0, 5.0, 0.0, 5.0, 5.0, 0.0, 5.0]]},
        {"id": 402, "image_id": 999, "category_id": 1, "iscrowd": 0, "segmentation": [[0.0, 0.0, 5.0, 0.0, 5.0, 5.0]]},
        {"id": 403, "image_id": 30, "category_id": 1, "iscrowd": 0, "segmentation": [[5.0, 10.0, 900.0, 10.0, 900.0, 16.0, 5.0, 16.0]]},
        {"id": 404, "image_id": 62, "category_id": 1, "iscrowd": 0, "segmentation": {"size": [5, 7], "counts": [35]}},
    ]  # fmt: skip
    ann_path.write_text(json.dumps(data))
    expected = coco["labels"]
    expected["25"] = expected["25"].copy()
    expected["25"][0:5, 0:5] = 255  # unknown category: ignore, not background
    poly = mask_utils.frPyObjects([[5.0, 10.0, 10.0, 10.0, 10.0, 16.0, 5.0, 16.0]], 16, 10)
    person = mask_utils.decode(mask_utils.merge(poly)).astype(bool)
    expected["30"] = expected["30"].copy()
    assert not (person & (expected["30"] > 0)).any()
    expected["30"][person] = 1  # the polygon clipped to the image (x <= 10), below the triangle

    with caplog.at_level("WARNING", logger="hf_fss.data"):
        dd = _saved(build_coco20i(coco["root"], cache_dir=tmp_path / "cache"), tmp_path)
    train = _rows(dd["train"])
    assert list(train) == ["9", "25", "30"]
    for image_id, row in train.items():
        _check_row(row, expected[image_id], coco["images"][image_id])
    fixed, skipped = _report_ids(dd["train"])
    assert fixed == ["25", "9", "25", "30"]  # listing (unknown category) first, then by id
    assert skipped == ["50", "annotation 402", "61", "62"]
    from hf_fss.data.builders import build_report

    report = build_report(dd["train"])
    text = json.dumps(report)
    assert "unknown category 999" in text and "covers no pixel" in text and "polygon 0 (4 numbers)" in text
    assert "clipped" in text and "not found" in text and "points to image id 999" in text
    assert "truncated" in text.lower() and "RLE size [5, 7] is not the image's [12, 12]" in text
    assert tuple(dd["train"].features["class_ids"].feature.names) == COCO_CLASSES
    assert "annotation 402" in caplog.text and "61" in caplog.text


def test_coco20i_canet_40_20_20_test_episodes_are_test_classes(tmp_path):
    """The raw COCO fixture, its val2014 extended with images of a test, a validation and a base class: under
    CANet's 40 / 20 / 20 split, test episodes are drawn only for the 20 test classes (61-80)."""
    from hf_fss.data import fold_classes, make_test_episodes
    from hf_fss.data.builders import build_coco20i

    coco = write_coco(tmp_path / "coco")
    ann_path = coco["root"] / "annotations" / "instances_val2014.json"
    data = json.loads(ann_path.read_text())
    rng = np.random.default_rng(6)
    vif = "COCO_val2014_0000000000{}.jpg"
    # (image id, category ids): 90 toothbrush (class 80, test), 67 dining table (61, test), 47 cup (42, validation),
    # 18 dog (17, base).
    contents = {43: (90, 47), 44: (90, 67), 45: (47, 18), 46: (67, 47), 47: (18,)}
    for image_id, categories in contents.items():
        data["images"].append({"id": image_id, "file_name": vif.format(image_id), "height": 12, "width": 16})
        write_jpeg(coco["root"] / "val2014" / vif.format(image_id), _rgb(rng, 12, 16))
        for k, category in enumerate(categories):
            box = _box(12, 16, 1, 11, 1 + 7 * k, 7 + 7 * k)
            segmentation = {"size": [12, 16], "counts": _rle_counts(box)}
            ann = {"id": 500 + 10 * image_id + k, "image_id": image_id, "category_id": category, "iscrowd": 0}
            data["annotations"].append({**ann, "segmentation": segmentation})
    ann_path.write_text(json.dumps(data))

    validation = _saved(build_coco20i(coco["root"], cache_dir=tmp_path / "cache"), tmp_path)["validation"]
    assert sorted(validation["image_id"], key=int) == ["42", "43", "44", "45", "46", "47"]
    fold = fold_classes("coco20i", 0, "canet_40_20_20")
    rows = _rows(validation)
    for classes, expected in ((fold.novel, {61, 80}), (fold.validation, {42})):
        episodes = make_test_episodes(validation, classes, 40, shot=1, seed=0, min_area=1)
        assert {e.class_id for e in episodes} == expected
        for episode in episodes:  # the class is in the query and the support
            assert all(episode.class_id in rows[i]["class_ids"] for i in (episode.query, *episode.supports))


def test_fss1000_release_defects(tmp_path, caplog):
    from hf_fss.data.builders import build_fss1000

    fss = write_fss(tmp_path / "fss")
    root, masks = fss["root"], fss["masks"]
    gray = {key: (mask * 255).astype(np.uint8) for key, mask in masks.items()}
    # An exact 2x mask (fixed), a red-on-black 3-channel mask (binarised), a photo saved as the mask at another
    # size (peregine_falcon/8.png of the release: skipped), a missing mask and an unscaled one (skipped), stray
    # files such as beam_bridge/10.jpeg (not used, reported).
    PIL.Image.fromarray(np.kron(gray["apple/1"], np.ones((2, 2), np.uint8))).save(root / "apple" / "1.png")
    red = np.zeros((*gray["bus/2"].shape, 3), np.uint8)
    red[..., 0] = gray["bus/2"]
    PIL.Image.fromarray(red).save(root / "bus" / "2.png")
    PIL.Image.fromarray(_rgb(np.random.default_rng(3), 30, 40)).save(root / "zebra" / "2.png")
    (root / "cat" / "2.png").unlink()
    PIL.Image.fromarray(gray["bus/10"][:, :-3]).save(root / "bus" / "10.png")
    write_jpeg(root / "cat" / "10.jpeg", _rgb(np.random.default_rng(4), 8, 8))
    (root / "apple" / "11.png").write_bytes((root / "apple" / "2.png").read_bytes())

    with caplog.at_level("WARNING", logger="hf_fss.data"):
        dd = _saved(build_fss1000(root, split_dir=fss["splits"], cache_dir=tmp_path / "cache"), tmp_path)
    train, test = _rows(dd["train"]), _rows(dd["test"])
    assert list(train) == ["apple/1", "apple/2", "apple/10", "bus/1", "bus/2", "cat/1", "cat/10"]
    assert list(test) == ["abe's_flyingfish/1", "abe's_flyingfish/2", "abe's_flyingfish/10", "zebra/1", "zebra/10"]
    for image_id, row in {**train, **test}.items():
        np.testing.assert_array_equal(np.array(row["label"]), masks[image_id])
    assert _report_ids(dd["train"]) == (["apple/1", "bus/2"], ["apple/11.png", "cat/10.jpeg", "bus/10", "cat/2"])
    assert _report_ids(dd["test"]) == ([], ["zebra/2"])
    text = json.dumps([_report_ids(dd["train"]), dd["train"].info.description, dd["test"].info.description])
    assert "exact scale x1/2" in text and "binarised on its brightest channel" in text
    assert "is a colour image" in text and "mask of" in text and "not a scale" in text
    assert "cat/10.jpeg" in caplog.text and "zebra/2" in caplog.text


# ------------------------------------------------------------------------------- lists as users save them


def _one_line_error(err: str, *names) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(str(name) in lines[0] for name in names), lines[0]


def test_pascal5i_lists_saved_by_windows_editors(tmp_path, capsys):
    """A BOM + CRLF val.txt used to turn its first id into an unknown one, so that image landed in train."""
    from hf_fss.data.builders import build_report

    voc = write_voc_sbd(tmp_path / "pascal")
    lists = voc["voc"] / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_bytes(b"\xef\xbb\xbf2007_000003\r\n2007_000004\r\n")
    # Tabs, trailing blanks, a blank line, a repeated id and a VOC val id in VOC train.
    (lists / "train.txt").write_bytes(b"2007_000002\t\r\n\r\n2007_000001  \r\n2007_000002\r\n2007_000004\r\n")
    (voc["sbd"] / "dataset" / "val.txt").write_text("2008_000011\n2008_000012\n", encoding="utf-16")  # with a BOM
    out = tmp_path / "out"
    assert _main(["pascal5i", "--voc-root", voc["voc"], "--sbd-root", voc["sbd"], "--output-dir", out]) == 0
    dd = datasets.load_from_disk(str(out))
    assert dd["train"]["image_id"][:] == ["2007_000001", "2007_000002", "2008_000010", "2008_000011", "2008_000012"]
    assert dd["validation"]["image_id"][:] == ["2007_000003", "2007_000004"]
    # Issue 22 (round two) has the report count the lists read with a BOM / CRLF / as UTF-16 too, one number a kind.
    report = build_report(dd["train"])
    assert report["counts"] == {"list_normalised": 2, "duplicate_id": 1, "train_id_in_val": 1}
    problems = {e["kind"]: e["problem"] for e in report["fixed"] if e["kind"] != "list_normalised"}
    assert len(problems) == 2
    assert "lists 2007_000002 again on line 4" in problems["duplicate_id"]
    assert "2007_000004 is listed in both" in problems["train_id_in_val"]
    assert "kept in validation only" in problems["train_id_in_val"]
    normalised = [e["problem"] for e in report["fixed"] if e["kind"] == "list_normalised"]
    assert f"{lists / 'train.txt'} is saved with CRLF line ends" in normalised[0]
    assert f"{voc['sbd'] / 'dataset' / 'val.txt'} is saved as UTF-16" in normalised[1]
    assert build_report(dd["validation"])["counts"] == {"list_normalised": 1}
    assert "UTF-8 byte-order mark and with CRLF" in build_report(dd["validation"])["fixed"][0]["problem"]
    out = capsys.readouterr().out
    counts = "list_normalised 2, duplicate_id 1, train_id_in_val 1"
    assert f"train: 5 rows, 8 classes; defects of the release: 4 fixed, 0 skipped ({counts};" in out
    assert "validation: 2 rows, 3 classes; defects of the release: 1 fixed, 0 skipped (list_normalised 1;" in out


@pytest.mark.parametrize(
    "data, expected",
    [
        ("caf\u00e9\n".encode("latin-1"), "is not utf-8 text"),
        ("2007_000003\n".encode("utf-16-le"), "NUL characters"),  # UTF-16 saved without a byte-order mark
    ],
    ids=["latin-1", "utf-16-without-bom"],
)
def test_pascal5i_list_in_another_encoding_is_one_line_naming_it(tmp_path, capsys, data, expected):
    voc = write_voc_sbd(tmp_path / "pascal")
    val = voc["voc"] / "ImageSets" / "Segmentation" / "val.txt"
    val.write_bytes(data)
    out = tmp_path / "out"
    assert _main(["pascal5i", "--voc-root", voc["voc"], "--sbd-root", voc["sbd"], "--output-dir", out]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, val, expected, "save it as UTF-8")
    assert not out.exists()
    _no_leftovers(out)


def test_coco20i_maps_categories_by_id_not_by_position(tmp_path, capsys):
    """A `categories` list without bicycle (id 2) used to renumber every later class (dog 17 -> 16) with only a
    warning, so the fixed-id COCO-20i folds picked the wrong classes."""
    from hf_fss.data.builders import build_report
    from hf_fss.data.schema import COCO_CLASSES

    coco = write_coco(tmp_path / "coco")
    ann_path = coco["root"] / "annotations" / "instances_train2014.json"
    data = json.loads(ann_path.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] != 2] + [{"id": 91, "name": "hat"}]
    ann_path.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())  # saved with a BOM, too
    out = tmp_path / "out"
    assert _main(["coco20i", "--coco-root", coco["root"], "--output-dir", out]) == 0
    # The BOM is counted as well (issue 22, round two: one number per kind in the summary and the report).
    counts = "list_normalised 1, coco_category_missing 1, coco_category_unknown 1, file_fixed 1"
    out_text = capsys.readouterr().out
    assert f"train: 3 rows, 7 classes; defects of the release: 4 fixed, 0 skipped ({counts};" in out_text
    dd = datasets.load_from_disk(str(out))
    for image_id, row in _rows(dd["train"]).items():
        _check_row(row, coco["labels"][image_id], coco["images"][image_id])  # bicycle still 2, toothbrush 80
    assert tuple(dd["train"].features["class_ids"].feature.names) == COCO_CLASSES
    report = build_report(dd["train"])
    kinds = ("list_normalised", "coco_category_missing", "coco_category_unknown", "file_fixed")
    assert report["counts"] == dict.fromkeys(kinds, 1)
    assert "instances_train2014.json is saved with a UTF-8 byte-order mark" in report["fixed"][0]["problem"]
    problems = [e["problem"] for e in report["fixed"] if e["kind"] != "list_normalised"]
    assert "category 91 ('hat') is not one of COCO's 80" in problems[0]
    assert "COCO category 2 ('bicycle') is missing" in problems[1] and "class 2 keeps its id" in problems[1]

    # A category renamed (not COCO's file) and a file that is not JSON: one line naming the file, nothing written.
    data["categories"][0]["name"] = "human"
    ann_path.write_text(json.dumps(data))
    assert _main(["coco20i", "--coco-root", coco["root"], "--output-dir", tmp_path / "renamed"]) == 2
    _one_line_error(capsys.readouterr().err, ann_path, "category 1 is named 'human', COCO 2014's is 'person'")
    ann_path.write_text(json.dumps(data)[:-10])
    assert _main(["coco20i", "--coco-root", coco["root"], "--output-dir", tmp_path / "broken"]) == 2
    _one_line_error(capsys.readouterr().err, ann_path, "is not valid JSON")
    assert not (tmp_path / "renamed").exists() and not (tmp_path / "broken").exists()
    _no_leftovers(tmp_path / "broken")


def test_coco20i_image_ids_listed_twice_or_not_whole_numbers(tmp_path, capsys):
    """pycocotools keeps the last of two entries with one image id, silently; an id that is a list was a TypeError
    from deep inside pycocotools."""
    from hf_fss.data.builders import build_report

    coco = write_coco(tmp_path / "coco")
    ann_path = coco["root"] / "annotations" / "instances_train2014.json"
    data = json.loads(ann_path.read_text())
    by_id = {entry["id"]: entry for entry in data["images"]}
    data["images"] += [dict(by_id[25]), {**by_id[30], "file_name": "COCO_train2014_000000000009.jpg"}]
    ann_path.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert _main(["coco20i", "--coco-root", coco["root"], "--output-dir", out]) == 0
    counts = "duplicate_id 1, file_fixed 1, file_skipped 1"  # the fixture's own defect is the fixed file
    assert (
        f"train: 2 rows, 6 classes; defects of the release: 2 fixed, 1 skipped ({counts};" in capsys.readouterr().out
    )
    train = datasets.load_from_disk(str(out))["train"]
    for image_id, row in _rows(train).items():
        _check_row(row, coco["labels"][image_id], coco["images"][image_id])
    assert train["image_id"][:] == ["9", "25"]  # 30 is listed as two different images: left out
    report = build_report(train)
    assert report["counts"] == {"duplicate_id": 1, "file_fixed": 1, "file_skipped": 1}
    assert "lists image id 25 2 times: listed once" in report["fixed"][0]["problem"]
    assert "lists image id 30 2 times, as different images" in report["skipped"][0]["problem"]

    data["images"][0]["id"] = [9]
    ann_path.write_text(json.dumps(data))
    bad = tmp_path / "bad"
    assert _main(["coco20i", "--coco-root", coco["root"], "--output-dir", bad]) == 2
    _one_line_error(capsys.readouterr().err, ann_path, "'images' has id [9]; COCO ids are whole numbers")
    assert not bad.exists()
    _no_leftovers(bad)


def test_an_empty_split_is_refused_before_anything_is_moved_into_place(tmp_path, capsys):
    """`synthetic --num-val 0` used to be saved, moved into place, and only then fail to load (a traceback)."""
    pytest.importorskip("hf_fss.data.synthetic")
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "old.txt").write_text("previous build")
    argv = ["synthetic", "--num-train", "3", "--num-val", "0", "--image-size", "32", "--output-dir", out]
    assert _main([*argv, "--overwrite"]) == 2
    _one_line_error(capsys.readouterr().err, "the validation split of the build has no rows", "--num-val")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the earlier output is untouched
    _no_leftovers(out)


# ------------------------------------------------------------------ FSS-1000 class folders as users lay them out


def test_fss1000_symlinks_unicode_names_and_lists_are_read_right_and_counted(tmp_path, capsys):
    """A symlinked class folder used to become a class of another's images, a symlinked image a duplicate row, and
    a class folder macOS named in NFD did not match its NFC name in the split list (a "not found" error)."""
    from hf_fss.data.builders import build_report

    fss = write_fss(tmp_path / "fss")
    root, splits = fss["root"], fss["splits"]
    (root / "dog").rename(root / "cre\u0300me")  # NFD, as macOS writes it; the list below names it in NFC
    (root / "everything").symlink_to(root, target_is_directory=True)  # in no list: not a class, reported
    (root / "apple" / "11.jpg").symlink_to(root / "bus" / "1.jpg")  # bus/1 again under apple
    (root / "apple" / "11.png").symlink_to(root / "bus" / "1.png")
    (root / "fish").mkdir()  # a class folder in no split list: not used, reported
    write_jpeg(root / "fish" / "1.jpg", _rgb(np.random.default_rng(7), 12, 14))
    (root / "fish" / "1.png").write_bytes((root / "bus" / "1.png").read_bytes())
    (splits / "trn.txt").write_bytes(b"\xef\xbb\xbfbus\t\r\napple  \r\n\r\ncat\r\nbus\r\n")  # BOM, CRLF, a repeat
    (splits / "val.txt").write_text("cr\u00e8me\n", encoding="utf-16")
    out = tmp_path / "out"
    assert _main(["fss1000", "--fss-root", root, "--split-dir", splits, "--output-dir", out]) == 0
    summary = capsys.readouterr().out
    dd = datasets.load_from_disk(str(out))
    names = ["background", *sorted(["abe's_flyingfish", "apple", "bus", "cat", "cr\u00e8me", "zebra"])]
    assert dd["train"].features["class_ids"].feature.names == names
    assert dd["validation"]["image_id"][:] == ["cr\u00e8me/1", "cr\u00e8me/2", "cr\u00e8me/10"]
    assert dd["validation"]["class_ids"][:] == [[names.index("cr\u00e8me")]] * 3
    for image_id, row in _rows(dd["validation"]).items():
        np.testing.assert_array_equal(np.array(row["label"]), fss["masks"]["dog/" + image_id.split("/")[1]])
    train_ids = dd["train"]["image_id"][:]
    assert train_ids == [f"{c}/{n}" for c in ("apple", "bus", "cat") for n in (1, 2, 10)]  # no apple/11, no fish
    assert not any(i.startswith("everything/") for split in dd.values() for i in split["image_id"])

    train, validation = build_report(dd["train"]), build_report(dd["validation"])
    kinds = {"list_normalised": 1, "duplicate_id": 1, "name_normalised": 1, "symlink_skipped": 2}
    assert train["counts"] == {**kinds, "unlisted_class": 1}
    assert validation["counts"] == {"list_normalised": 1}  # the folder's NFD name is in train's report
    problems = {(e["kind"], e["id"]): e["problem"] for e in train["fixed"] + train["skipped"]}
    assert (
        "trn.txt is saved with a UTF-8 byte-order mark and with CRLF line ends"
        in problems["list_normalised", "trn.txt"]
    )
    assert "lists class 'bus' again" in problems["duplicate_id", "bus"]
    assert "'cre\\u0300me' is not in Unicode NFC: read as 'cr\\xe8me'" in problems["name_normalised", "cr\u00e8me"]
    assert "symlinked folder: not a class" in problems["symlink_skipped", "everything"]
    assert f"is a symlink to {root / 'bus' / '1.jpg'}" in problems["symlink_skipped", "apple/11.jpg"]
    assert "in no split list" in problems["unlisted_class", "fish"]
    assert "saved as UTF-16" in validation["fixed"][0]["problem"]
    counts = "list_normalised 1, duplicate_id 1, name_normalised 1, symlink_skipped 2, unlisted_class 1"
    assert f"train: 9 rows, 3 classes; defects of the release: 3 fixed, 3 skipped ({counts};" in summary
    assert "validation: 3 rows, 1 classes; defects of the release: 1 fixed, 0 skipped" in summary

    # A listed class whose folder is a symlink, and two folders whose names differ only in their Unicode form, are
    # one line naming them; nothing is written.
    # (Issue 22 E10: a link to a folder outside the tree is a class now, so the listed link resolves into the tree.)
    (root / "zebra").rename(root / ".zebra")
    (root / "zebra").symlink_to(root / ".zebra", target_is_directory=True)
    bad = tmp_path / "bad"
    assert _main(["fss1000", "--fss-root", root, "--split-dir", splits, "--output-dir", bad]) == 2
    _one_line_error(capsys.readouterr().err, "class 'zebra'", splits / "test.txt", "is a symlinked folder")
    (root / "zebra").unlink()
    (root / ".zebra").rename(root / "zebra")
    (root / "cr\u00e8me").mkdir()
    assert _main(["fss1000", "--fss-root", root, "--split-dir", splits, "--output-dir", bad]) == 2
    _one_line_error(capsys.readouterr().err, root, "'cre\\u0300me' and 'cr\\xe8me' name one class more than once")
    assert not bad.exists()
    _no_leftovers(bad)


def test_fss1000_class_folder_kept_elsewhere_by_symlink_is_a_class_and_an_empty_one_is_reported(tmp_path, capsys):
    """Issue 22 E10 / E11 in FSS-1000's builder: a symlinked class folder outside the tree is a class (it was skipped
    as a duplicate), and an empty class folder in no list is reported (it was dropped without a word)."""
    from hf_fss.data.builders import build_report

    fss = write_fss(tmp_path / "fss")
    root, splits = fss["root"], fss["splits"]
    (root / "zebra").rename(tmp_path / "zebra")
    (root / "zebra").symlink_to(tmp_path / "zebra", target_is_directory=True)  # listed in test.txt
    (root / "owl").mkdir()
    out = tmp_path / "out"
    assert _main(["fss1000", "--fss-root", root, "--split-dir", splits, "--output-dir", out]) == 0
    summary = capsys.readouterr().out
    assert "(symlink_followed 1, empty_class_folder 1;" in summary, summary
    dd = datasets.load_from_disk(str(out))
    assert dd["test"]["image_id"][:3] == ["abe's_flyingfish/1", "abe's_flyingfish/2", "abe's_flyingfish/10"]
    assert dd["test"]["image_id"][3:] == ["zebra/1", "zebra/2", "zebra/10"]
    report = build_report(dd["train"])
    entries = {(e["kind"], e["id"]): e["problem"] for e in report["fixed"] + report["skipped"]}
    assert f"symlink to {tmp_path / 'zebra'}, outside the tree: followed" in entries["symlink_followed", "zebra"]
    assert f"class folder {root / 'owl'} holds no N.jpg image" in entries["empty_class_folder", "owl"]
