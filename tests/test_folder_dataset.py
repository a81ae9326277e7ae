"""
`scripts/prepare_dataset.py folder`: a user's own images and masks in the real formats (JPEG images, palette PNG
label maps, or FSS-1000-style per-class folders of black / white PNG masks) become a benchmark with a recorded class
split that `train.py` / `evaluate.py` use unchanged (benchmark "folder"). The fast tests build in-process; the slow
one runs the commands of docs/data.md end to end in subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from hf_fss.data import fold_classes, load_benchmark, make_test_episodes
from hf_fss.data.builders.prepare import main as prepare_main
from hf_fss.data.loading import infer_benchmark

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["background", "cup", "leaf", "shoe", "key", "bottle", "lamp"]
HEIGHT, WIDTH = 72, 96
# Luminance of a palette entry is not monotone in its index, so reading through `.convert("L")` would change ids.
PALETTE = [(i * 97 + c * 61) % 256 for i in range(256) for c in range(3)]


def _object_pixels(rng, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background with a class-coloured rectangle, and the rectangle's mask (one third of the image)."""
    image = rng.integers(0, 80, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    top, left = int(rng.integers(0, HEIGHT - 48)), int(rng.integers(0, WIDTH - 56))
    mask[top : top + 48, left : left + 56] = True
    colour = np.array([(class_id * 53) % 256, (class_id * 101) % 256, 255 - class_id * 30], dtype=np.uint8)
    image[mask] = colour
    return image, mask


def write_label_folder(root: Path, per_class: int = 4, seed: int = 0) -> tuple[Path, Path, Path]:
    """images/<name>.jpg + masks/<name>.png (palette PNG of class ids, 255 on the top row) + classes.txt, the layout
    of docs/data.md's my_photos/."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for class_id in range(1, len(CLASS_NAMES)):
        for k in range(per_class):
            pixels, mask = _object_pixels(rng, class_id)
            ids = np.where(mask, class_id, 0).astype(np.uint8)
            ids[0, :] = 255
            name = f"{CLASS_NAMES[class_id]}_{k:02d}"
            PIL.Image.fromarray(pixels).save(images / f"{name}.jpg", quality=92)
            label = PIL.Image.fromarray(ids)
            label.putpalette(PALETTE)  # a "P" image whose indices are the ids, as annotation tools write them
            label.save(masks / f"{name}.png")
    names = root / "classes.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    return images, masks, names


def write_class_folders(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """The FSS-1000 layout: <class>/<n>.jpg with a black / white <class>/<n>.png mask beside it."""
    rng = np.random.default_rng(seed)
    for class_id, name in enumerate(CLASS_NAMES[1:], start=1):
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(1, per_class + 1):
            pixels, mask = _object_pixels(rng, class_id)
            PIL.Image.fromarray(pixels).save(folder / f"{k}.jpg", quality=92)
            PIL.Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{k}.png")
    return root


def _prepare(capsys, *argv) -> tuple[int, str]:
    status = prepare_main(["folder", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_label_maps_build_with_recorded_class_split(tmp_path, capsys):
    images, masks, names = write_label_folder(tmp_path / "raw")
    out = tmp_path / "mine"
    status, text = _prepare(capsys, "--images", images, "--masks", masks, "--class-names", names, "--output-dir", out)
    assert status == 0, text
    assert infer_benchmark(str(out)) == "folder"
    dataset = load_benchmark(str(out))
    assert sorted(dataset) == ["test", "train", "validation"]
    fold = fold_classes("folder", dataset=dataset)
    val_fold = fold_classes("folder", dataset=dataset, novel_split="validation")
    # 6 classes: the seeded 52 / 24 / 24 split gives 4 / 1 / 1, disjoint, covering every class.
    assert len(fold.base) == 4 and len(fold.novel) == 1 and len(val_fold.novel) == 1
    assert sorted({*fold.base, *fold.novel, *val_fold.novel}) == list(range(1, 7))
    assert dataset["train"].features["class_ids"].feature.names == CLASS_NAMES
    for split in dataset.values():
        row = split[0]
        label = np.array(row["label"])
        name = row["image_id"].rsplit("_", 1)[0]
        assert set(np.unique(label)) == {0, 255, CLASS_NAMES.index(name)}  # palette ids survive, not luminance
        assert np.array(row["image"]).shape == (HEIGHT, WIDTH, 3)
    train_classes = {c for ids in dataset["train"]["class_ids"] for c in ids}
    assert not train_classes & set(fold.novel), "a test class leaked into the training images"
    assert len(make_test_episodes(dataset["test"], fold.novel, 5, 1, seed=0)) == 5
    # The same seed gives the same split; another seed may give another.
    again = tmp_path / "again"
    assert (
        _prepare(capsys, "--images", images, "--masks", masks, "--class-names", names, "--output-dir", again)[0] == 0
    )
    assert fold_classes("folder", dataset=load_benchmark(str(again))) == fold


def test_class_folders_and_split_lists(tmp_path, capsys):
    root = write_class_folders(tmp_path / "fss_like")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("cup\nleaf\nshoe\nkey\n")
    (lists / "val.txt").write_text("bottle\n")
    (lists / "test.txt").write_text("lamp\n")
    out = tmp_path / "mine"
    status, text = _prepare(capsys, "--images", root, "--class-folders", "--split-dir", lists, "--output-dir", out)
    assert status == 0, text
    dataset = load_benchmark(str(out))
    fold = fold_classes("folder", dataset=dataset)
    names = ["background", *sorted(CLASS_NAMES[1:])]  # class id = 1 + index of the sorted folder names
    assert dataset["test"].features["class_ids"].feature.names == names
    assert fold.novel == (names.index("lamp"),)
    assert fold.base == tuple(sorted(names.index(n) for n in ("cup", "leaf", "shoe", "key")))
    row = dataset["test"][0]
    assert row["image_id"] == "lamp/1" and row["class_ids"] == [names.index("lamp")]
    assert set(np.unique(np.array(row["label"]))) == {0, names.index("lamp")}


def _bad(tmp_path, capsys, breaker, *extra) -> str:
    images, masks, names = write_label_folder(tmp_path / "raw")
    breaker(images, masks, names)
    out = tmp_path / "out"
    status, text = _prepare(capsys, "--images", images, "--masks", masks, *extra, "--output-dir", out)
    assert status == 2 and not out.exists()
    return text


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    text = _bad(tmp_path / "b", capsys, lambda i, m, n: (m / "cup_00.png").unlink())
    assert "has no mask" in text and "cup_00.png" in text and "--skip-invalid" in text

    def shrink(images, masks, names):
        PIL.Image.new("P", (50, 50)).save(masks / "leaf_01.png")

    text = _bad(tmp_path / "c", capsys, shrink)
    assert "is 96x72 but its mask" in text and "50x50" in text

    def unknown(images, masks, names):
        names.write_text("\n".join(CLASS_NAMES[:-1]) + "\n")  # no name for id 6 (lamp)

    text = _bad(tmp_path / "d", capsys, unknown, "--class-names", tmp_path / "d" / "raw" / "classes.txt")
    assert "class ids [6]" in text and "do not cover" in text

    def two_classes(images, masks, names):
        for path in [*images.iterdir()]:
            if not path.name.startswith(("cup", "leaf")):
                path.unlink()
                (masks / f"{path.stem}.png").unlink()

    text = _bad(tmp_path / "e", capsys, two_classes)
    assert "needs at least 3" in text


def test_skip_invalid_reports_instead(tmp_path, capsys):
    images, masks, _ = write_label_folder(tmp_path / "raw")
    (masks / "cup_00.png").unlink()
    out = tmp_path / "out"
    status, text = _prepare(capsys, "--images", images, "--masks", masks, "--skip-invalid", "--output-dir", out)
    assert status == 0, text
    from hf_fss.data.builders import build_report

    dataset = load_benchmark(str(out))
    assert [e["id"] for e in build_report(dataset["train"])["skipped"]] == ["cup_00"]
    assert "cup_00" not in {i for split in dataset.values() for i in split["image_id"]}


def readme_commands() -> list[list[str]]:
    """The commands of the "Fine-tune on your own classes" bash block (docs/data.md, once the README's), as argument
    lists."""
    readme = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    section = readme.split("## Fine-tune on your own classes", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_section_is_the_tested_commands():
    scripts = [argv[1] for argv in readme_commands()]
    assert scripts == ["scripts/prepare_dataset.py", "scripts/train.py", "scripts/evaluate.py", "scripts/train.py",
                       "scripts/compare.py"]  # fmt: skip


@pytest.mark.slow
def test_readme_commands_end_to_end(tmp_path):
    """The "Fine-tune on your own classes" commands of docs/data.md as written: build, 20 training steps, evaluation, a
    second run with another seed and the comparison of both."""
    write_label_folder(tmp_path / "my_photos", per_class=6)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for argv in readme_commands():
        assert argv[0] == "python"
        result = subprocess.run(
            [sys.executable, str(ROOT / argv[1]), *argv[2:]],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["benchmark"] == "folder" and metrics["split"] == "test" and metrics["num_episodes"] == 10
    assert 0.0 <= metrics["miou"] <= 1.0
    comparison = json.loads((tmp_path / "comparison" / "comparison.json").read_text())
    assert list(comparison["results"]) == ["seed321", "seed1"] and comparison["setup"]["benchmark"] == "folder"
    assert (tmp_path / "comparison" / "comparison.png").is_file()


def test_symlinks_and_unicode_forms_of_class_folders(tmp_path, capsys):
    """A symlinked folder used to become a class made of every other class's images; a folder name macOS stored
    decomposed (NFD) did not match the name typed in a split list (NFC)."""
    from hf_fss.data.builders import build_report

    root = write_class_folders(tmp_path / "fss_like")
    (root / "cup").rename(root / "cafe\u0301")  # NFD, as macOS writes it
    (root / "everything").symlink_to(root, target_is_directory=True)
    (root / "leaf" / "9.jpg").symlink_to(root / "shoe" / "1.jpg")  # the same file under another class
    (root / "leaf" / "9.png").symlink_to(root / "shoe" / "1.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_bytes("\ufeffcaf\u00e9\r\nleaf\r\nshoe\r\nkey\r\n".encode())  # NFC, BOM, CRLF
    (lists / "val.txt").write_text("bottle\n", encoding="utf-16")
    (lists / "test.txt").write_text("lamp\n")
    out = tmp_path / "mine"
    status, text = _prepare(capsys, "--images", root, "--class-folders", "--split-dir", lists, "--output-dir", out)
    assert status == 0, text
    # Normalising the two lists and the NFD folder name is counted too (issue 22: the report counts each kind).
    counts = "list_normalised 2, name_normalised 1, symlink_skipped 2"
    assert f"train: 12 rows, 4 classes; defects of the release: 3 fixed, 2 skipped ({counts};" in text
    dataset = load_benchmark(str(out))
    names = dataset["train"].features["class_ids"].feature.names
    assert names == ["background", "bottle", "caf\u00e9", "key", "lamp", "leaf", "shoe"]
    assert fold_classes("folder", dataset=dataset).base == (2, 3, 5, 6)
    image_ids = {i for split in dataset.values() for i in split["image_id"]}
    assert len(image_ids) == 18 and not any(i.startswith("everything/") for i in image_ids)
    assert "leaf/9" not in image_ids and "caf\u00e9/1" in image_ids  # row ids carry the NFC name too
    report = build_report(dataset["train"])
    assert report["counts"] == {"list_normalised": 2, "name_normalised": 1, "symlink_skipped": 2}
    assert "'cafe\\u0301' is not in Unicode NFC" in report["fixed"][0]["problem"]
    skipped = {e["id"]: e["problem"] for e in report["skipped"]}
    assert "symlinked folder: not a class" in skipped["everything"]
    assert "is a symlink to" in skipped["leaf/9.jpg"] and "shoe/1.jpg" in skipped["leaf/9.jpg"]


def test_class_names_equal_up_to_unicode_normalisation_are_one_line_telling_them_apart(tmp_path, capsys):
    root = write_class_folders(tmp_path / "fss_like")
    (root / "cup").rename(root / "cafe\u0301")
    (root / "leaf").rename(root / "caf\u00e9")
    out = tmp_path / "mine"
    status, text = _prepare(capsys, "--images", root, "--class-folders", "--output-dir", out)
    assert status == 2 and not out.exists()
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in text
    assert (
        "class folders: 'cafe\\u0301' and 'caf\\xe9' name one class more than once" in lines[0]
        and "Unicode NFC" in lines[0]
        and "rename" in lines[0]
    )

    images, masks, names = write_label_folder(tmp_path / "raw")
    names.write_text("\n".join([*CLASS_NAMES, "caf\u00e9", "cafe\u0301"]) + "\n", encoding="utf-16")
    status, text = _prepare(capsys, "--images", images, "--masks", masks, "--class-names", names, "--output-dir", out)
    assert status == 2 and not out.exists()
    assert f"class names file {names}: 'cafe\\u0301' and 'caf\\xe9' name one class" in text


def test_a_class_listed_twice_is_recorded_once_and_counted(tmp_path, capsys):
    """A split list naming a class twice used to record it twice in the class split (base classes (1, 1, ...)),
    so episodes drew it twice as often; the names file's UTF-16 is counted too."""
    from hf_fss.data.builders import build_report

    images, masks, names = write_label_folder(tmp_path / "raw", per_class=2)
    names.write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-16")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("cup\nleaf\ncup\nshoe\nkey\n")
    (lists / "val.txt").write_text("bottle\n")
    (lists / "test.txt").write_text("lamp\n")
    out = tmp_path / "mine"
    argv = ["--images", images, "--masks", masks, "--class-names", names, "--split-dir", lists, "--output-dir", out]
    status, text = _prepare(capsys, *argv)
    assert status == 0, text
    assert "defects of the release: 2 fixed, 0 skipped (list_normalised 1, duplicate_id 1;" in text
    dataset = load_benchmark(str(out))
    assert fold_classes("folder", dataset=dataset).base == (1, 2, 3, 4)
    report = build_report(dataset["train"])
    assert report["counts"] == {"list_normalised": 1, "duplicate_id": 1}
    assert f"{lists / 'train.txt'} lists class 'cup' again" in report["fixed"][1]["problem"]
    assert f"class names file {names} is saved as UTF-16" in report["fixed"][0]["problem"]


def test_class_folders_kept_elsewhere_by_symlink_are_classes_and_empty_ones_are_reported(tmp_path, capsys):
    """Issue 22 E10 / E11: a symlinked class folder (or image) whose target lies outside the tree used to be skipped
    as "its images would repeat another's", and an empty class folder was dropped without a word."""
    from hf_fss.data.builders import build_report

    elsewhere = write_class_folders(tmp_path / "elsewhere")  # cup, leaf, ... kept outside the tree
    root = tmp_path / "fss_like"
    root.mkdir()
    for name in ("cup", "leaf", "shoe"):
        (elsewhere / name).rename(root / name)
    (root / "lamp").symlink_to(elsewhere / "lamp", target_is_directory=True)  # outside: a class, followed
    (root / "bottle").symlink_to(elsewhere / "bottle", target_is_directory=True)
    (root / "lamp_again").symlink_to(elsewhere / "lamp", target_is_directory=True)  # the same target: a duplicate
    (root / "mug").symlink_to(root / "cup", target_is_directory=True)  # into the tree: a duplicate
    for suffix in (".jpg", ".png"):  # a symlinked image outside the tree is an image
        (root / "leaf" / f"7{suffix}").symlink_to(elsewhere / "key" / f"1{suffix}")
    (root / "empty").mkdir()
    out = tmp_path / "mine"
    status, text = _prepare(capsys, "--images", root, "--class-folders", "--output-dir", out)
    assert status == 0, text
    counts = "symlink_followed 2, symlink_skipped 2, empty_class_folder 1"
    assert f"({counts};" in text
    dataset = load_benchmark(str(out))
    names = dataset["train"].features["class_ids"].feature.names
    assert names == ["background", "bottle", "cup", "empty", "lamp", "leaf", "shoe"]
    image_ids = {i for split in dataset.values() for i in split["image_id"]}
    assert {"lamp/1", "bottle/3", "leaf/7"} <= image_ids and len(image_ids) == 16
    assert not any(i.startswith(("mug/", "lamp_again/", "empty/")) for i in image_ids)
    report = build_report(dataset["train"])
    entries = {(e["kind"], e["id"]): e["problem"] for e in report["fixed"] + report["skipped"]}
    assert f"symlink to {elsewhere / 'lamp'}, outside the tree: followed" in entries["symlink_followed", "lamp"]
    assert "symlinked folder: not a class" in entries["symlink_skipped", "mug"]
    assert "linked already" in entries["symlink_skipped", "lamp_again"]
    assert f"class folder {root / 'empty'} holds no image" in entries["empty_class_folder", "empty"]


def test_unusable_images_are_listed_readably_on_one_line(tmp_path, capsys):
    """Issue 22 E12: the problems were joined with bare spaces ("...fix the mask mask p_short/masks/im004.png")."""

    def two_missing(images, masks, names):
        (masks / "cup_00.png").unlink()
        (masks / "leaf_01.png").unlink()

    text = _bad(tmp_path, capsys, two_missing).strip()
    assert len(text.splitlines()) == 1, text
    first, second = (
        f"image {tmp_path}/raw/images/{n}.jpg has no mask {tmp_path}/raw/masks/{n}.png" for n in ("cup_00", "leaf_01")
    )
    assert f'2 image(s) cannot be used: "{first}"; "{second}"; fix them, or pass --skip-invalid' in text


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_evaluate_result_line_of_a_folder_dataset_names_its_split_not_the_ignored_fold(tmp_path, capsys):
    """Issue 22 F1: `evaluate.py --dataset data/mine --fold 3` printed "folder fold 3 ..." though folds are ignored."""
    import torch

    from hf_fss import FewShotSegmentationImageProcessor
    from hf_fss.evaluation.runner import main as evaluate_main
    from hf_fss.models.ntrenet import NTRENetConfig, NTRENetModel

    images, masks, _ = write_label_folder(tmp_path / "raw", per_class=2)
    data = tmp_path / "mine"
    assert _prepare(capsys, "--images", images, "--masks", masks, "--output-dir", data)[0] == 0
    torch.manual_seed(0)
    model = tmp_path / "model"
    config = NTRENetConfig(backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]}, reduce_dim=16,
                           background_prototype_dim=16, pyramid_bins=[1.0, 0.5], image_size=65)  # fmt: skip
    NTRENetModel(config).save_pretrained(model)
    FewShotSegmentationImageProcessor(image_size=65).save_pretrained(model)
    out = tmp_path / "metrics.json"
    argv = ["--model", str(model), "--dataset", str(data), "--fold", "3", "--num-episodes", "2", "--output", str(out)]
    assert evaluate_main(argv) == 0
    result = capsys.readouterr().out.strip().splitlines()[-1]
    assert result.startswith("folder test split 1-shot (") and "fold 3" not in result, result
