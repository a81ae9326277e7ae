"""Tests of the embedded synthetic benchmark (hf_fss/data/synthetic.py) and its episode picture script."""

import io
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import Image as ImageFeature
from PIL import Image

from hf_fss.data.folds import fold_classes
from hf_fss.data.schema import IGNORE_INDEX, benchmark_features
from hf_fss.data.synthetic import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    SYNTHETIC_CLASSES,
    build_synthetic,
    render_synthetic_example,
)
from hf_fss.data.synthetic import _class_appearance as class_appearance

ROOT = Path(__file__).resolve().parents[1]
# A fifth of the default benchmark, at the default image size: the statistics below are those of the default.
FRACTION = 5
NUM_TRAIN, NUM_VAL = DEFAULT_NUM_TRAIN // FRACTION, DEFAULT_NUM_VAL // FRACTION


@pytest.fixture(scope="module")
def synthetic():
    return build_synthetic(seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL)


def raw_bytes(split):
    """The stored PNG bytes of `image` and `label`, undecoded."""
    raw = split.cast_column("image", ImageFeature(decode=False)).cast_column("label", ImageFeature(decode=False))
    return [(row["image"]["bytes"], row["label"]["bytes"]) for row in raw]


def labels(split):
    return [np.asarray(Image.open(io.BytesIO(label))) for _, label in raw_bytes(split)]


def test_classes_and_folds():
    assert len(SYNTHETIC_CLASSES) == 21 and SYNTHETIC_CLASSES[0] == "background"
    assert len(set(SYNTHETIC_CLASSES)) == 21
    # Each class is its own (shape, texture) combination.
    appearances = [class_appearance(c)[:2] for c in range(1, 21)]
    assert len(set(appearances)) == 20
    assert len({class_appearance(c)[2] for c in range(1, 21)}) == 20  # and its own hue
    for i in range(4):
        fold = fold_classes("synthetic", i)
        assert list(fold.novel) == list(range(5 * i + 1, 5 * i + 6))
        # The novel classes of a fold are new combinations of shapes and textures all seen in its training classes.
        train = [class_appearance(c) for c in fold.base]
        for shape, texture, _ in (class_appearance(c) for c in fold.novel):
            assert shape in {a[0] for a in train} and texture in {a[1] for a in train}
        assert len({class_appearance(c)[0] for c in fold.novel}) == 5


def test_schema(synthetic):
    data = synthetic
    assert set(data) == {"train", "validation"}
    assert data["train"].num_rows == NUM_TRAIN and data["validation"].num_rows == NUM_VAL
    for split in data.values():
        assert split.features == benchmark_features(SYNTHETIC_CLASSES)
        assert split.features["class_ids"].feature.names == list(SYNTHETIC_CLASSES)
    row = data["validation"][0]
    assert row["image_id"] == "synthetic_validation_000000"
    assert row["image"].mode == "RGB" and row["image"].size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert row["label"].mode == "L" and row["label"].size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert len(set(data["train"]["image_id"])) == NUM_TRAIN


def test_labels_match_class_ids_and_areas(synthetic):
    data = synthetic
    for split in data.values():
        for label, ids, areas in zip(labels(split), split["class_ids"], split["class_areas"]):
            values, counts = np.unique(label, return_counts=True)
            assert set(values.tolist()) <= set(range(21)) | {IGNORE_INDEX}
            present = [(int(v), int(n)) for v, n in zip(values, counts) if v not in (0, IGNORE_INDEX)]
            assert ids == [v for v, _ in present]  # ascending, background and ignore excluded
            assert areas == [n for _, n in present]
            assert len(ids) >= 1  # every image has at least one object


def test_every_class_and_distractors(synthetic):
    data = synthetic
    for split in data.values():
        ids = split["class_ids"]
        # Image i has primary class i % 20 + 1: every class is in at least num / 20 images.
        for c in range(1, 21):
            assert sum(c in row for row in ids) >= split.num_rows // 20
        # Distractors: most images hold the target and other classes.
        assert np.mean([len(row) >= 2 for row in ids]) > 0.5
        assert max(len(row) for row in ids) >= 3


def test_primary_class_is_eligible_at_default_size(synthetic):
    # PFENet keeps (query, class) pairs whose class covers at least 2 * 32 * 32 px.
    data = synthetic
    for split in data.values():
        areas = [
            dict(zip(ids, a)).get(i % 20 + 1, 0)
            for i, (ids, a) in enumerate(zip(split["class_ids"], split["class_areas"]))
        ]
        assert np.mean(np.array(areas) >= 2 * 32 * 32) > 0.9


def test_ignore_boundary():
    for index in range(10):
        with_band = render_synthetic_example(0, 0, index)[1]
        image, without = render_synthetic_example(0, 0, index, ignore_boundary=0)
        assert (with_band == IGNORE_INDEX).any() and not (without == IGNORE_INDEX).any()
        # The band only replaces labels, along edges between labels, and leaves the image alone.
        assert np.all((with_band == without) | (with_band == IGNORE_INDEX))
        edges = np.zeros_like(without, bool)
        edges[:, 1:] |= without[:, 1:] != without[:, :-1]
        edges[1:, :] |= without[1:, :] != without[:-1, :]
        assert (with_band[edges] == IGNORE_INDEX).all()
        assert (with_band == IGNORE_INDEX).mean() < 0.15  # thin
        np.testing.assert_array_equal(image, render_synthetic_example(0, 0, index)[0])
    data = build_synthetic(num_train=20, num_val=0, ignore_boundary=0)
    assert not any((label == IGNORE_INDEX).any() for label in labels(data["train"]))


def test_deterministic():
    kwargs = {"num_train": 12, "num_val": 4, "image_size": 96}
    first = build_synthetic(seed=3, **kwargs)
    again = build_synthetic(seed=3, **kwargs)
    parallel = build_synthetic(seed=3, num_proc=2, **kwargs)
    other = build_synthetic(seed=4, **kwargs)
    for name in ("train", "validation"):
        assert raw_bytes(first[name]) == raw_bytes(again[name]) == raw_bytes(parallel[name])
        assert first[name]["class_areas"] == parallel[name]["class_areas"]
        different = [a != b for a, b in zip(raw_bytes(first[name]), raw_bytes(other[name]))]
        assert all(different)
    # Image i does not depend on how many images are built.
    assert (
        raw_bytes(build_synthetic(seed=3, num_train=5, num_val=0, image_size=96)["train"])
        == raw_bytes(first["train"])[:5]
    )
    # Train and validation are different images.
    assert not set(raw_bytes(first["train"])) & set(raw_bytes(first["validation"]))


@pytest.mark.slow
def test_prepare_dataset_builds_the_default_benchmark(tmp_path):
    """`prepare_dataset.py synthetic` writes the default benchmark (its build time is measured by hand, not asserted:
    a wall-clock bound fails on a loaded machine)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_dataset.py"), "synthetic", "--output-dir", str(tmp_path / "s")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    data = datasets.load_from_disk(str(tmp_path / "s"))
    assert data["train"].num_rows == DEFAULT_NUM_TRAIN and data["validation"].num_rows == DEFAULT_NUM_VAL


def test_visualize_episodes_script(tmp_path):
    output = tmp_path / "pictures" / "episodes.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "visualize_episodes.py"), "--output", str(output),
         "--num-episodes", "3", "--fold", "1", "--num-images", "80", "--seed", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    with Image.open(output) as picture:
        picture.verify()
    with Image.open(output) as picture:
        assert picture.format == "PNG" and picture.width >= 4 * DEFAULT_IMAGE_SIZE and picture.height >= 3 * 96
    assert sorted(p.name for p in output.parent.iterdir()) == ["episodes.png"]  # no temporary file left
