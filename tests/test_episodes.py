"""Tests for fold splits, episodic datasets, support annotations and the training augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image

from hf_fss.data.augmentation import IMAGENET_MEAN, TrainAugmentation, normalize_image
from hf_fss.data.episodes import (
    PFENET_MIN_AREA,
    Episode,
    EpisodicTestDataset,
    EpisodicTrainDataset,
    collate_test_batch,
    load_episodes_jsonl,
    make_test_episodes,
    save_episodes_jsonl,
    shard_bounds,
    shard_episodes,
    split_base_validation,
    support_annotation,
    target_mask,
)
from hf_fss.data.folds import FoldSplit, fold_classes
from hf_fss.data.schema import VOC_CLASSES, benchmark_features

SIDE = 100  # 50 x 50 quadrants: a 48 x 48 object (2304 px) is eligible, a 20 x 20 one (400 px) is not.
FOLD0 = fold_classes("pascal5i", 0)


# ------------------------------------------------------------------------------------------------ tiny datasets


def _rows_to_dataset(rows, names=VOC_CLASSES, prefix="img"):
    data = {"image_id": [], "image": [], "label": [], "class_ids": [], "class_areas": []}
    for i, (image, label) in enumerate(rows):
        values, counts = np.unique(label, return_counts=True)
        present = [(int(v), int(n)) for v, n in zip(values, counts) if v not in (0, 255)]
        data["image_id"].append(f"{prefix}_{i:04d}")
        data["image"].append(Image.fromarray(image))
        data["label"].append(Image.fromarray(label))
        data["class_ids"].append([c for c, _ in present])
        data["class_areas"].append([n for _, n in present])
    return Dataset.from_dict(data, features=benchmark_features(names))


def _random_row(rng, classes, side=SIDE):
    """An image with up to four objects (one per quadrant), big (eligible) or small, and a 255 border line."""
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    label = np.zeros((side, side), dtype=np.uint8)
    half = side // 2
    for q, c in enumerate(classes):
        y, x = (q // 2) * half, (q % 2) * half
        extent = 48 if rng.random() < 0.8 else 20
        label[y + 1 : y + 1 + extent, x + 1 : x + 1 + extent] = c
        label[y + 1 : y + 1 + extent, x + 1] = 255  # a void outline pixel column, as in VOC
    return image, label


def _pascal_like(num, seed, class_pool=range(1, 21), prefix="img"):
    rng = np.random.default_rng(seed)
    rows = []
    pool = list(class_pool)
    for _ in range(num):
        k = int(rng.integers(1, 4))
        rows.append(_random_row(rng, rng.choice(pool, size=k, replace=False).tolist()))
    return _rows_to_dataset(rows, prefix=prefix)


@pytest.fixture(scope="module")
def pascal():
    return DatasetDict({"train": _pascal_like(160, 0, prefix="trn"), "validation": _pascal_like(80, 1, prefix="val")})


@pytest.fixture(scope="module")
def processor():
    from hf_fss.image_processing_fss import FewShotSegmentationImageProcessor

    return FewShotSegmentationImageProcessor(image_size=64)


def _identity_augmentation(image, label, rng, target_value=1, require_target=False):
    """No geometry: lets tests compare labels with the stored label maps pixel for pixel."""
    return normalize_image(image), torch.from_numpy(label.astype(np.int64))


def _stored_label(split, row):
    return np.asarray(split[int(row)]["label"])


# ------------------------------------------------------------------------------------------------------ folds


def test_pascal_folds():
    assert FOLD0 == FoldSplit(novel=(1, 2, 3, 4, 5), base=tuple(range(6, 21)))
    for fold in range(4):
        split = fold_classes("PASCAL-5i", fold)
        assert split.novel == tuple(range(5 * fold + 1, 5 * fold + 6))
        assert sorted(split.novel + split.base) == list(range(1, 21))


def test_coco_folds_both_conventions():
    for fold in range(4):
        interleaved = fold_classes("coco20i", fold)
        assert interleaved == fold_classes("coco20i", fold, "interleaved")
        assert interleaved.novel == tuple(4 * k + fold + 1 for k in range(20))
        contiguous = fold_classes("coco20i", fold, convention="contiguous")
        assert contiguous.novel == tuple(range(20 * fold + 1, 20 * fold + 21))
        for split in (interleaved, contiguous):
            assert len(split.base) == 60 and sorted(split.novel + split.base) == list(range(1, 81))
    assert fold_classes("coco20i", 0).novel[:3] == (1, 5, 9)  # PFENet use_split_coco: range(1, 78, 4)


def test_synthetic_folds_and_errors():
    assert fold_classes("synthetic", 3) == FoldSplit(novel=(16, 17, 18, 19, 20), base=tuple(range(1, 16)))
    assert fold_classes("synthetic", np.int64(1)) == fold_classes("pascal5i", 1)
    with pytest.raises(ValueError, match="imagenet"):
        fold_classes("imagenet", 0)
    with pytest.raises(ValueError, match="fold"):
        fold_classes("pascal5i", 4)
    with pytest.raises(ValueError, match="diagonal"):
        fold_classes("coco20i", 0, convention="diagonal")
    with pytest.raises(ValueError, match="coco20i only"):
        fold_classes("pascal5i", 0, convention="contiguous")
    with pytest.raises(ValueError, match="DatasetDict"):
        fold_classes("fss1000")


CANET = fold_classes("coco20i", 0, "canet_40_20_20")


def test_coco_canet_40_20_20_split():
    from hf_fss.data.folds import num_folds
    from hf_fss.data.schema import COCO_CLASSES

    assert (len(CANET.base), len(CANET.validation), len(CANET.novel)) == (40, 20, 20)
    assert sorted(CANET.base + CANET.validation + CANET.novel) == list(range(1, 81))  # disjoint, covering 1..80
    # The documented rule: COCO category order in blocks 1-40 / 41-60 / 61-80.
    assert (CANET.base[0], CANET.base[-1], CANET.validation[0], CANET.novel[0]) == (1, 40, 41, 61)
    assert [COCO_CLASSES[c] for c in (CANET.validation[0], CANET.novel[0], CANET.novel[-1])] == [
        "wine glass",
        "dining table",
        "toothbrush",
    ]
    assert CANET.unseen == CANET.validation + CANET.novel
    assert fold_classes("coco20i", np.int64(0), "canet_40_20_20") == CANET
    assert num_folds("coco20i", "canet_40_20_20") == 1 and num_folds("coco20i") == 4
    for fold in (1, 3, -1, True):
        with pytest.raises(ValueError, match="canet_40_20_20.*fold must be 0"):
            fold_classes("coco20i", fold, "canet_40_20_20")
    with pytest.raises(ValueError, match="coco20i only"):
        fold_classes("pascal5i", 0, "canet_40_20_20")
    with pytest.raises(ValueError, match="base and validation classes overlap: \\[6\\]"):
        FoldSplit(novel=(1,), base=(5, 6), validation=(6, 7))
    assert FOLD0.validation == () and FOLD0.unseen == FOLD0.novel  # the folds without validation classes


def test_protocol_takes_canet_convention_for_coco_only():
    from hf_fss.evaluation.protocols import EvaluationProtocol, get_protocol

    protocol = get_protocol("pfenet", benchmark="coco20i", fold_convention="canet_40_20_20")
    assert protocol.fold_convention == "canet_40_20_20" and protocol.fold_split(0) == CANET
    assert EvaluationProtocol.from_dict(protocol.to_dict()) == protocol
    with pytest.raises(ValueError, match="fold_convention 'canet_40_20_20' does not apply to pascal5i"):
        get_protocol("pfenet", benchmark="pascal5i", fold_convention="canet_40_20_20")
    with pytest.raises(ValueError, match="fold must be 0"):
        protocol.fold_split(2)


def test_validation_classes_are_kept_out_of_training(pascal):
    """A split with validation classes: training treats them as it treats the novel classes (every policy)."""
    fold = FoldSplit(novel=(1, 2, 3), base=tuple(range(9, 21)), validation=tuple(range(4, 9)))
    train = pascal["train"]
    validation = set(fold.validation)
    has_validation = [bool(validation.intersection(ids)) for ids in train["class_ids"]]
    for policy, expected in (("background", 0), ("ignore", 255), ("exclude", None)):
        ds = EpisodicTrainDataset(
            train, fold, shot=1, size=SIDE, seed=0, novel_class_policy=policy, augmentation=_identity_augmentation
        )
        checked = 0
        for index in range(len(ds)):
            query, class_id, supports = ds.sample_episode(index)
            assert class_id in fold.base
            if policy == "exclude":
                assert not has_validation[query] and not any(has_validation[s] for s in supports)
            elif has_validation[query] and checked < 3:
                checked += 1
                on_validation = torch.from_numpy(np.isin(_stored_label(train, query), fold.validation))
                item = ds[index]
                assert (item["labels"][on_validation] == expected).all()
                assert (item["semantic_labels"][on_validation] == expected).all()
        assert policy == "exclude" or checked > 0


def _coco_like(num, seed, class_pool, prefix):
    from hf_fss.data.schema import COCO_CLASSES

    rng = np.random.default_rng(seed)
    rows = [_random_row(rng, rng.choice(class_pool, size=2, replace=False).tolist()) for _ in range(num)]
    return _rows_to_dataset(rows, names=COCO_CLASSES, prefix=prefix)


def test_training_validates_on_the_validation_classes(monkeypatch):
    """build_data under canet_40_20_20: no held-out images; validation episodes of the 20 validation classes
    (validation split), test episodes of the 20 test classes, training items of the 40 base classes only."""
    import hf_fss.data
    from hf_fss.training.arguments import EpisodicArguments
    from hf_fss.training.episodic import build_data

    pool = [1, 2, 3, 41, 42, 61, 62]  # base, validation and test classes in both splits
    coco = DatasetDict({"train": _coco_like(40, 0, pool, "trn"), "validation": _coco_like(40, 1, pool, "val")})
    monkeypatch.setattr(hf_fss.data, "load_benchmark", lambda *args, **kwargs: coco)
    args = EpisodicArguments(
        dataset="coco-like",
        benchmark="coco20i",
        fold_convention="canet_40_20_20",
        image_size=64,
        num_validation_episodes=30,
        num_eval_episodes=30,
    )
    data = build_data(args, seed=0)
    assert data.fold == CANET and len(data.train_dataset.holdout_indices) == 0
    assert data.validation.class_ids == CANET.validation and "validation classes" in data.validation.description
    assert {e.class_id for e in data.validation.episodes} == {41, 42}
    assert {e.class_id for e in data.test.episodes} == {61, 62}
    val_ids = set(coco["validation"]["image_id"])
    assert all({e.query, *e.supports} <= val_ids for e in data.validation.episodes)
    assert {data.train_dataset.sample_episode(i)[1] for i in range(data.train_dataset.num_items)} <= {1, 2, 3}
    with pytest.raises(ValueError, match="fold must be 0"):
        EpisodicArguments(dataset="coco-like", benchmark="coco20i", fold_convention="canet_40_20_20", fold=1)


# ------------------------------------------------------------------------------------------------- training


def test_training_uses_base_classes_and_valid_supports(pascal):
    train = pascal["train"]
    ds = EpisodicTrainDataset(train, FOLD0, shot=2, size=64, seed=3)
    eligible = {c: set(rows.tolist()) for c, rows in ds.class_to_rows.items()}
    # Items = images with an eligible base class (PFENet's 2 * 32 * 32 rule on class_areas).
    expected = {
        row
        for row, (ids, areas) in enumerate(zip(train["class_ids"], train["class_areas"]))
        if any(c in FOLD0.base and a >= PFENET_MIN_AREA for c, a in zip(ids, areas))
    }
    assert set(ds.item_rows.tolist()) == expected and len(ds) == ds.num_items == len(expected)
    for index in range(len(ds)):
        query, c, supports = ds.sample_episode(index)
        assert 6 <= c <= 20 and c in ds.item_classes(index)
        assert query not in supports and len(set(supports)) == 2
        assert all(s in eligible[c] for s in supports) and query in eligible[c]
    for index in range(0, len(ds), 7):
        item = ds[index]
        assert 6 <= int(item["class_ids"]) <= 20
        assert item["pixel_values"].shape == (3, 64, 64) and item["support_pixel_values"].shape == (2, 3, 64, 64)
        assert item["support_masks"].shape == (2, 64, 64) and item["labels"].dtype == torch.long
        assert set(item["labels"].unique().tolist()) <= {0, 1, 255}
        for mask in item["support_masks"]:  # after augmentation too
            assert (mask == 1).any() and set(mask.unique().tolist()) <= {0, 1, 255}
        # The query target is the episode class of the semantic map (base rank = class id - 5 for fold 0).
        rank = int(item["class_ids"]) - 5
        assert torch.equal(item["labels"] == 1, item["semantic_labels"] == rank)


def test_training_support_never_empty_after_crop():
    # Objects at the far corners of a big image and a small crop: most random crops miss them.
    rows = []
    for i in range(4):
        image = np.full((200, 200, 3), 90, np.uint8)
        label = np.zeros((200, 200), np.uint8)
        corner = (slice(0, 46), slice(0, 46)) if i % 2 else (slice(154, 200), slice(154, 200))
        label[corner] = 7
        rows.append((image, label))
    ds = EpisodicTrainDataset(_rows_to_dataset(rows), FOLD0, shot=3, size=32, seed=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            assert all((m == 1).any() for m in ds[index]["support_masks"])


def test_novel_class_policies(pascal):
    train = pascal["train"]
    novel = set(FOLD0.novel)
    has_novel = [bool(novel.intersection(ids)) for ids in train["class_ids"]]
    sizes = {}
    for policy in ("background", "ignore", "exclude"):
        ds = EpisodicTrainDataset(
            train, FOLD0, shot=1, size=SIDE, seed=0, novel_class_policy=policy, augmentation=_identity_augmentation
        )
        sizes[policy] = len(ds)
        checked = 0
        for index in range(len(ds)):
            query, c, supports = ds.sample_episode(index)
            if policy == "exclude":
                assert not has_novel[query] and not any(has_novel[s] for s in supports)
                continue
            if not has_novel[query] or checked >= 5:
                continue
            checked += 1
            stored = _stored_label(train, query)
            item = ds[index]
            on_novel = torch.from_numpy(np.isin(stored, list(novel)))
            expected = 0 if policy == "background" else 255
            assert (item["labels"][on_novel] == expected).all()
            assert (item["semantic_labels"][on_novel] == expected).all()
            on_base = torch.from_numpy(np.isin(stored, FOLD0.base))
            assert (item["semantic_labels"][on_base] >= 1).all() and (item["semantic_labels"][on_base] <= 15).all()
        if policy != "exclude":
            assert checked > 0
    assert sizes["background"] == sizes["ignore"] > sizes["exclude"]


def test_holdout_validation_images_never_in_training(pascal):
    train = pascal["train"]
    train_part, val_part = split_base_validation(train, fraction=0.1, seed=5, min_images=30)
    assert len(val_part) == 30 and len(train_part) + len(val_part) == len(train)
    held_ids = set(val_part["image_id"])
    assert not held_ids & set(train_part["image_id"])
    ds = EpisodicTrainDataset(train_part, FOLD0, shot=1, size=64)
    for index in range(len(ds)):
        query, _, supports = ds.sample_episode(index)
        assert all(train_part[r]["image_id"] not in held_ids for r in (query, *supports))
    # Validation episodes on base classes are drawn from the held-out images only.
    episodes = make_test_episodes(val_part, FOLD0.base, 100, shot=1, seed=0)
    assert all(e.query in held_ids and set(e.supports) <= held_ids and e.class_id in FOLD0.base for e in episodes)

    # The same through the dataset argument.
    ds = EpisodicTrainDataset(
        train, FOLD0, shot=1, size=64, holdout_fraction=0.1, holdout_seed=5, holdout_min_images=30
    )
    held_rows = set(ds.holdout_indices.tolist())
    assert len(held_rows) == 30 and set(ds.validation_split()["image_id"]) == held_ids
    for index in range(len(ds)):
        query, _, supports = ds.sample_episode(index)
        assert query not in held_rows and not held_rows.intersection(supports)


def test_training_determinism_and_dataloader_workers(pascal):
    ds = EpisodicTrainDataset(pascal["train"], FOLD0, shot=2, size=48, seed=11)
    again = EpisodicTrainDataset(pascal["train"], FOLD0, shot=2, size=48, seed=11)
    for index in (0, 5):
        a, b = ds[index], again[index]
        assert all(torch.equal(a[k], b[k]) for k in a)
    first = ds[3]["pixel_values"]
    ds.set_epoch(1)
    assert not torch.equal(first, ds[3]["pixel_values"])
    ds.set_epoch(0)

    restored = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(restored[2][k], ds[2][k]) for k in ds[2])
    subset = torch.utils.data.Subset(ds, range(16))
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(subset, batch_size=4, num_workers=workers)
        batches[workers] = list(loader)
    assert len(batches[0]) == 4
    for b0, b2 in zip(batches[0], batches[2]):
        assert set(b0) == {
            "pixel_values",
            "labels",
            "support_pixel_values",
            "support_masks",
            "class_ids",
            "semantic_labels",
        }
        assert b0["support_masks"].shape == (4, 2, 48, 48)
        assert all(torch.equal(b0[k], b2[k]) for k in b0)


# ----------------------------------------------------------------------------------------------------- testing


def test_test_episodes_novel_classes_and_supports(pascal):
    val = pascal["validation"]
    ids = val["image_id"]
    eligible = {}
    for image_id, cids, areas in zip(ids, val["class_ids"], val["class_areas"]):
        for c, a in zip(cids, areas):
            if a >= PFENET_MIN_AREA:
                eligible.setdefault(c, set()).add(image_id)
    for shot in (1, 3):
        episodes = make_test_episodes(val, FOLD0.novel, 1000, shot=shot, seed=321)
        assert len(episodes) == 1000
        for e in episodes:
            assert 1 <= e.class_id <= 5
            assert len(e.supports) == shot and len(set(e.supports)) == shot and e.query not in e.supports
            assert e.query in eligible[e.class_id] and set(e.supports) <= eligible[e.class_id]
    # Every eligible (image, class) pair once.
    everything = make_test_episodes(val, FOLD0.novel, None, shot=1, seed=0)
    pairs = {(e.query, e.class_id) for e in everything}
    assert len(pairs) == len(everything) == sum(len(eligible.get(c, ())) for c in FOLD0.novel)
    by_class = make_test_episodes(val, FOLD0.novel, 50, shot=1, seed=0, sampling="class")
    assert all(1 <= e.class_id <= 5 for e in by_class)
    # Too few sizeable targets: the error says what eligible means, not only that nothing is.
    with pytest.raises(
        ValueError, match=r"eligible for a class that covers at least 2048000 of its label pixels; use"
    ):
        make_test_episodes(val, FOLD0.novel, 10, shot=1, min_area=1000 * PFENET_MIN_AREA)


def test_episode_jsonl_is_reproducible_and_shards_join(pascal, tmp_path):
    val = pascal["validation"]
    a = make_test_episodes(val, FOLD0.novel, 200, shot=2, seed=7)
    b = make_test_episodes(val, FOLD0.novel, 200, shot=2, seed=7)
    save_episodes_jsonl(a, tmp_path / "a.jsonl")
    save_episodes_jsonl(b, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert load_episodes_jsonl(tmp_path / "a.jsonl") == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]  # no temp file left behind
    first = (tmp_path / "a.jsonl").read_text().splitlines()[0]
    assert first.startswith('{"query": ') and '"supports": [' in first and '"class_id": ' in first
    assert make_test_episodes(val, FOLD0.novel, 200, shot=2, seed=8) != a
    for n in (2, 3, 7):
        shards = [shard_episodes(a, n, i) for i in range(n)]
        assert sum(shards, []) == a and max(map(len, shards)) - min(map(len, shards)) <= 1
        assert shard_bounds(len(a), n, 0)[0] == 0 and shard_bounds(len(a), n, n - 1)[1] == len(a)


def test_test_dataset_items(pascal, processor):
    val = pascal["validation"]
    episodes = make_test_episodes(val, FOLD0.novel, 12, shot=2, seed=0)
    row_of = {image_id: i for i, image_id in enumerate(val["image_id"])}
    for annotation in ("mask", "bbox", "scribble"):
        ds = EpisodicTestDataset(val, episodes, processor, annotation=annotation, seed=1)
        items = [ds[i] for i in range(4)]
        batch = collate_test_batch(items)
        assert batch["pixel_values"].shape == (4, 3, 64, 64)
        assert batch["support_pixel_values"].shape == (4, 2, 3, 64, 64)
        assert batch["support_masks"].shape == (4, 2, 64, 64) and batch["support_masks"].dtype == torch.long
        assert isinstance(batch["target"], list) and batch["original_size"].tolist() == [[SIDE, SIDE]] * 4
        assert batch["episode_index"].tolist() == [0, 1, 2, 3]
        for item, episode in zip(items, episodes):
            stored = _stored_label(val, row_of[episode.query])
            assert torch.equal(
                item["target"], torch.from_numpy(target_mask(stored, episode.class_id).astype(np.int64))
            )
            assert int(item["class_ids"]) == episode.class_id
            assert all((m == 1).any() for m in item["support_masks"])
    # A shard with its offset reproduces the unsharded items (annotations are seeded by the global index).
    full = EpisodicTestDataset(val, episodes, processor, annotation="scribble", seed=1)
    start, stop = shard_bounds(len(episodes), 3, 1)
    shard = EpisodicTestDataset(
        val, shard_episodes(episodes, 3, 1), processor, annotation="scribble", seed=1, episode_offset=start
    )
    assert torch.equal(shard[0]["support_masks"], full[start]["support_masks"])
    assert int(shard[0]["episode_index"]) == start
    restored = pickle.loads(pickle.dumps(full))  # what a spawn-started DataLoader worker receives
    assert all(torch.equal(restored[5][k], full[5][k]) for k in full[5])
    loader = torch.utils.data.DataLoader(full, batch_size=4, num_workers=2, collate_fn=collate_test_batch)
    assert sum(len(b["target"]) for b in loader) == len(episodes)
    with pytest.raises(ValueError, match="not in the split"):
        EpisodicTestDataset(val, [Episode("nope", ("val_0000",), 1)], processor)


def test_fss1000_binary_rows(processor):
    names = ["background"] + [f"class_{i}" for i in range(1, 1001)]
    rng = np.random.default_rng(0)

    def split(classes, prefix):
        data = {"image_id": [], "image": [], "label": [], "class_ids": [], "class_areas": []}
        for c in classes:
            for j in range(4):
                label = np.zeros((40, 40), np.uint8)
                label[5 : 15 + 2 * j, 8:30] = 1
                data["image_id"].append(f"{prefix}_{c}_{j}")
                data["image"].append(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
                data["label"].append(Image.fromarray(label))
                data["class_ids"].append([c])
                data["class_areas"].append([int(label.sum())])
        return Dataset.from_dict(data, features=benchmark_features(names))

    dd = DatasetDict({"train": split([3, 10, 500], "trn"), "test": split([761, 999], "tst")})
    fold = fold_classes("fss1000", dataset=dd)
    assert fold == FoldSplit(novel=(761, 999), base=(3, 10, 500))
    episodes = make_test_episodes(dd["test"], fold.novel, None, shot=1, seed=0)
    assert sorted(e.query for e in episodes) == sorted(dd["test"]["image_id"])  # every test image once
    assert all(e.supports[0].split("_")[1] == str(e.class_id) for e in episodes)
    item = EpisodicTestDataset(dd["test"], episodes, processor)[0]
    assert (item["target"] == 1).any() and int(item["class_ids"]) == episodes[0].class_id
    train = EpisodicTrainDataset(dd["train"], fold, shot=2, size=32)
    assert len(train) == 12
    sample = train[0]
    assert int(sample["class_ids"]) in fold.base and all((m == 1).any() for m in sample["support_masks"])
    rank = fold.base.index(int(sample["class_ids"])) + 1
    assert torch.equal(sample["labels"] == 1, sample["semantic_labels"] == rank)


# ----------------------------------------------------------------------------------------------- annotations


def _box(mask):
    ys, xs = np.nonzero(mask == 1)
    return ys.min(), ys.max(), xs.min(), xs.max()


def _dense_masks():
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(6):
        mask = np.zeros((120, 150), np.uint8)
        yy, xx = np.mgrid[:120, :150]
        cy, cx, r = rng.integers(30, 90), rng.integers(30, 120), rng.integers(12, 30)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 1
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 == r**2] = 255
        masks.append(mask)
    two = np.zeros((120, 150), np.uint8)
    two[10:50, 10:60] = 1
    two[80:90, 100:110] = 1
    masks.append(two)
    thin = np.zeros((120, 150), np.uint8)
    thin[60, 20:23] = 1
    masks.append(thin)
    return masks


def test_bbox_annotation():
    for mask in _dense_masks():
        y0, y1, x0, x1 = _box(mask)
        union = support_annotation(mask, "bbox", np.random.default_rng(0), bbox_mode="union")
        expected = np.zeros_like(mask)
        expected[y0 : y1 + 1, x0 : x1 + 1] = 1
        assert np.array_equal(union, expected)  # the filled box of the target
        inst = support_annotation(mask, "bbox", np.random.default_rng(0))
        assert set(np.unique(inst).tolist()) <= {0, 1, 255}
        labelled = inst != 0
        assert not labelled[:y0].any() and not labelled[y1 + 1 :].any()
        assert not labelled[:, :x0].any() and not labelled[:, x1 + 1 :].any()
    two = _dense_masks()[6]
    inst = support_annotation(two, "bbox")
    assert (inst[10:50, 10:60] == 1).all() and (inst[80:90, 100:110] == 255).all() and (inst == 1).sum() == 2000
    single = _dense_masks()[0]
    assert np.array_equal(support_annotation(single, "bbox"), support_annotation(single, "bbox", bbox_mode="union"))


def test_scribble_annotation():
    for i, mask in enumerate(_dense_masks()):
        scribble = support_annotation(mask, "scribble", np.random.default_rng([0, i, 0]))
        assert scribble.shape == mask.shape and set(np.unique(scribble).tolist()) <= {0, 1, 255}
        fg, bg = scribble == 1, scribble == 0
        assert fg.any() and (mask[fg] == 1).all() and (mask[bg] == 0).all()
        y0, y1, x0, x1 = _box(mask)
        assert not fg[:y0].any() and not fg[y1 + 1 :].any() and not fg[:, :x0].any() and not fg[:, x1 + 1 :].any()
        assert (scribble == 255).mean() > 0.5  # thin curves: most pixels stay unlabelled
        again = support_annotation(mask, "scribble", np.random.default_rng([0, i, 0]))
        assert np.array_equal(scribble, again)
    assert np.array_equal(support_annotation(mask, "mask"), mask)
    with pytest.raises(ValueError, match="target pixel"):
        support_annotation(np.zeros((5, 5), np.uint8), "scribble")
    with pytest.raises(ValueError, match="lasso"):
        support_annotation(mask, "lasso")


# ---------------------------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_image_and_mask_aligned():
    target, other = np.array([250, 20, 20], np.uint8), np.array([20, 20, 250], np.uint8)
    mask = np.zeros((40, 52), np.uint8)
    mask[8:30, 10:40] = 1
    image = np.where(mask[..., None] == 1, target, other).astype(np.uint8)
    target_n = normalize_image(target[None, None].astype(np.float32))[:, 0, 0]
    other_n = normalize_image(other[None, None].astype(np.float32))[:, 0, 0]
    # Blur off: it mixes colours across the edge, which is not a misalignment.
    augmentation = TrainAugmentation(size=64, blur_p=0.0, rotate_p=1.0)
    seen_padding = 0
    for seed in range(12):
        pixels, out = augmentation(image, mask, np.random.default_rng(seed), require_target=True)
        assert pixels.shape == (3, 64, 64) and out.shape == (64, 64) and out.dtype == torch.long
        # Interior pixels of each mask value (2 px from any other value: scaling then rotating the image
        # bilinearly blends colours up to about 2 px across an edge) carry the matching colour.
        padded = torch.nn.functional.pad(out[None, None].float(), (2, 2, 2, 2), mode="replicate")[0, 0]
        for value, colour in ((1, target_n), (0, other_n), (255, torch.zeros(3))):
            same = (padded.unfold(0, 5, 1).unfold(1, 5, 1) == value).flatten(2).all(-1)
            assert value == 0 or same.any()
            if same.any():
                assert torch.allclose(pixels[:, same], colour[:, None], atol=0.05), (seed, value)
        seen_padding += int((out == 255).sum())
        assert (out == 1).any()
    assert seen_padding > 0  # a 40 x 52 image in a 64 x 64 crop is always padded
    # Padding colour is the ImageNet mean (0 after normalisation), padding label 255.
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)


def test_augmentation_is_reproducible_from_rng():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    mask = (rng.random((70, 90)) > 0.5).astype(np.uint8)
    augmentation = TrainAugmentation(size=48)
    a = augmentation(image, mask, np.random.default_rng([1, 2, 3]))
    b = TrainAugmentation(size=48)(image, mask, np.random.default_rng([1, 2, 3]))
    c = augmentation(image, mask, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("shape", [(1, 300), (300, 1), (2, 2)])
def test_augmentation_survives_images_a_few_pixels_thin(shape):
    # 21 of 40 draws used to crash inside the random scale for a 1x300 image (a side of 1 scaled by < 1 became 0).
    augmentation = TrainAugmentation(size=32)
    image = np.full((*shape, 3), 100, dtype=np.uint8)
    mask = np.ones(shape, dtype=np.uint8)
    for seed in range(40):
        pixels, out = augmentation(image, mask, np.random.default_rng(seed), require_target=True)
        assert pixels.shape == (3, 32, 32) and out.shape == (32, 32)
        assert (out == 1).any(), f"draw {seed}: the target vanished"
        assert set(torch.unique(out).tolist()) <= {0, 1, 255}


def test_augmentation_scale_is_albumentations_for_normal_sizes():
    # The guard against 0-pixel sides changes nothing for ordinary images (same draw, same pixels).
    import albumentations as A

    from hf_fss.data.augmentation import _RandomScaleAtLeastOne

    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = (image[..., 0] > 128).astype(np.uint8)
    ours = A.Compose([_RandomScaleAtLeastOne(scale_limit=(-0.1, 0.1), p=1.0)], seed=3)
    theirs = A.Compose([A.RandomScale(scale_limit=(-0.1, 0.1), p=1.0)], seed=3)
    for _ in range(5):
        a, b = ours(image=image, mask=mask), theirs(image=image, mask=mask)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
