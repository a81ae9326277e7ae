"""
Did the pretraining learn anything? Two label-light probes of a prior extractor against a randomly initialised one
of the same architecture, both loaded as QGNet loads its prior extractor (dilated, `output_stride=8`, eval mode):

- **region-map recall** (the form of the paper's Table VII, Eq. 16): for base-class (query, support) pairs of the
  validation split, the cosine region map of Eq. 9-12 between the query's and the masked support's last-stage
  features (`hf_fss.modules.cosine_prior_mask`: max cosine over foreground support positions, min-max normalised)
  is thresholded at 0.1 ... 0.9; recall = |R and GT| / |GT| over all pairs (precision = |R and GT| / |R| beside it,
  since a map that is high everywhere has recall 1). QGNet's own prior map compares the prior features with a
  trained "bridge" projection of a second backbone, which a label-free probe does not have; this is the guided-map
  form of the same Eq. 9-12 computed with the prior extractor alone.
- **k-NN** on base classes: globally pooled last-stage features of the training split's images, each labelled
  with its largest base class, classify the validation split's images by a similarity-weighted vote of the k
  nearest (cosine, weights `exp(s / 0.1)`, the kNN monitor of MoCo's colab demo). No novel-class label is used.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from hf_fss.backbones import DilatedResNet
from hf_fss.data.augmentation import normalize_image
from hf_fss.modules.prototypes import cosine_prior_mask

__all__ = ["THRESHOLDS", "knn_accuracy", "labelled_images", "probe_extractor", "region_map_recall", "run_probe"]

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def labelled_images(split: datasets.Dataset, classes: set[int], limit: int | None = None) -> list[dict[str, Any]]:
    """`{"image", "label", "class"}` for images whose largest class (by `class_areas`) is in `classes`."""
    out = []
    for row in split:
        if not row["class_ids"]:
            continue
        largest = int(row["class_ids"][int(np.argmax(row["class_areas"]))])
        if largest in classes:
            image = np.asarray(row["image"].convert("RGB"))
            out.append({"image": image, "label": np.asarray(row["label"]), "class": largest})
            if limit is not None and len(out) >= limit:
                break
    return out


@torch.no_grad()
def _features(extractor: DilatedResNet, items: list[dict[str, Any]], batch_size: int = 16) -> list[torch.Tensor]:
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        sizes = {item["image"].shape for item in chunk}
        if len(sizes) == 1:
            pixels = torch.stack([normalize_image(item["image"]) for item in chunk])
            out.extend(extractor(pixels)[-1].unbind(0))
        else:  # images of different sizes run one by one
            out.extend(extractor(normalize_image(item["image"])[None])[-1][0] for item in chunk)
    return out


def knn_accuracy(train: list[torch.Tensor], train_labels, test: list[torch.Tensor], test_labels, k: int = 20) -> float:
    """Top-1 accuracy of the weighted k-NN vote (cosine similarity of globally pooled features)."""
    bank = F.normalize(torch.stack([f.mean(dim=(1, 2)) for f in train]), dim=1)
    queries = F.normalize(torch.stack([f.mean(dim=(1, 2)) for f in test]), dim=1)
    labels = torch.as_tensor(train_labels)
    classes = torch.unique(labels)
    similarity, index = (queries @ bank.t()).topk(min(k, bank.shape[0]), dim=1)
    weights = (similarity / 0.1).exp()
    votes = torch.stack([(weights * (labels[index] == c)).sum(1) for c in classes], dim=1)
    predicted = classes[votes.argmax(1)]
    return float((predicted == torch.as_tensor(test_labels)).float().mean())


def region_map_recall(features: list[torch.Tensor], items: list[dict[str, Any]]) -> dict[str, list[float]]:
    """
    Recall and precision at `THRESHOLDS` of the cosine region maps of (query i, support j) pairs: each item is a
    query once, its support the next item of the same class (pairs need two images of a class).
    """
    by_class: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_class.setdefault(item["class"], []).append(index)
    hits = np.zeros(len(THRESHOLDS))
    predicted = np.zeros(len(THRESHOLDS))
    total = 0
    for members in by_class.values():
        for position, query in enumerate(members if len(members) > 1 else []):
            support = members[(position + 1) % len(members)]
            target = items[query]["class"]
            support_mask = torch.from_numpy((items[support]["label"] == target).astype(np.float32))[None, None]
            label = items[query]["label"]
            region = cosine_prior_mask(
                features[query][None], features[support][None], support_mask, output_size=label.shape
            )[0, 0].numpy()
            valid = label != 255
            truth = (label == target) & valid
            total += int(truth.sum())
            for t, threshold in enumerate(THRESHOLDS):
                selected = (region > threshold) & valid
                hits[t] += int((selected & truth).sum())
                predicted[t] += int(selected.sum())
    return {
        "recall": [float(h / max(total, 1)) for h in hits],
        "precision": [float(h / max(p, 1)) for h, p in zip(hits, predicted)],
    }


def probe_extractor(
    extractor: DilatedResNet, train_items: list[dict[str, Any]], test_items: list[dict[str, Any]], k: int = 20
) -> dict[str, Any]:
    """Both probes for one extractor (put in eval mode here)."""
    extractor.eval()
    train_features = _features(extractor, train_items)
    test_features = _features(extractor, test_items)
    result = region_map_recall(test_features, test_items)
    result["knn_accuracy"] = knn_accuracy(
        train_features, [i["class"] for i in train_items], test_features, [i["class"] for i in test_items], k=k
    )
    result["thresholds"] = list(THRESHOLDS)
    return result


def run_probe(folder, args, seed: int = 0) -> dict[str, Any]:
    """
    Probe the prior extractor exported in `folder` (loaded as QGNet does: `output_stride=8`, `load_weights`) and a
    random one of the same architecture (`torch.manual_seed(seed)`) on `args.dataset`'s base classes of
    `args.probe_fold`: k-NN bank from the `train` split, test images from the other split.

    Raises:
        `ValueError`: a dataset without labels (a plain image folder) or without a second split.
    """
    import json
    from pathlib import Path

    from hf_fss.data.folds import fold_classes
    from hf_fss.data.loading import infer_benchmark, load_benchmark

    benchmark = infer_benchmark(args.dataset)
    if benchmark is None:
        raise ValueError(
            f"--probe needs a benchmark with labels (synthetic or a prepare_dataset.py folder), not {args.dataset!r}"
        )
    splits = load_benchmark(args.dataset, **args.synthetic_kwargs())
    test_split = next((name for name in splits if name != "train"), None)
    if test_split is None:
        raise ValueError(f"--probe: {args.dataset!r} has no split besides 'train' to test on")
    base = set(fold_classes(benchmark, args.probe_fold).base)
    train_items = labelled_images(splits["train"], base, args.probe_train_images)
    test_items = labelled_images(splits[test_split], base, args.probe_test_images)
    config = json.loads((Path(folder) / "config.json").read_text())
    kwargs = dict(config["backbone_kwargs"])
    depth = int(config["backbone"].removeprefix("resnet"))
    pretrained = DilatedResNet(depth=depth, **kwargs, output_stride=8)
    pretrained.load_weights(str(folder))
    torch.manual_seed(seed)
    random = DilatedResNet(depth=depth, **kwargs, output_stride=8)
    return {
        "description": (
            f"{benchmark} fold {args.probe_fold} base classes: k-NN bank {len(train_items)} train images, "
            f"{len(test_items)} {test_split} images (region maps: pairs of them)"
        ),
        "num_classes": len({item["class"] for item in train_items}),
        "thresholds": list(THRESHOLDS),
        "pretrained": probe_extractor(pretrained, train_items, test_items),
        "random": probe_extractor(random, train_items, test_items),
    }
