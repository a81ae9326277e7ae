"""Few-shot segmentation IoU: an `evaluate` module over `hf_fss.evaluation.FewShotSegmentationMetric`."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np
import torch

from hf_fss.evaluation.metrics import FewShotSegmentationMetric
from hf_fss.evaluation.protocols import EvaluationProtocol, get_protocol

_CITATION = """\
@article{tian2020pfenet,
  title={Prior Guided Feature Enrichment Network for Few-Shot Segmentation},
  author={Tian, Zhuotao and Zhao, Hengshuang and Shu, Michelle and Yang, Zhicheng and Li, Ruiyu and Jia, Jiaya},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2020}
}
"""

_DESCRIPTION = """\
Few-shot semantic segmentation scores over test episodes (one query, one class each): class IoU summed over the
episodes of each class and averaged over the fold's classes (mIoU), FB-IoU (mean of background and foreground IoU
over all episodes) and foreground precision. 255 pixels of the references are ignored. Every setting that changes a
number (label size, boundary handling, IoU aggregation, episodes, seeds, fold convention, ...) comes from an
evaluation protocol preset ("pfenet", "hsnet", "panet") and is returned under "protocol".
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (h, w) predicted maps with values in {0, 1} (numpy arrays, torch tensors or PIL images),
        already at the reference's resolution.
    references: list of (h, w) target maps with values in {0, 1, 255}, same sizes.
    class_ids: list of ints, the class of each episode.
    fold_classes: the fold's class ids (mIoU is their mean); default: the distinct `class_ids`.
    protocol: preset name ("pfenet", default; "hsnet"; "panet") or an `EvaluationProtocol`.
    protocol_overrides: dict of protocol fields to change, e.g. {"iou_aggregation": "mean-per-episode"}.
    class_names: {class_id: name} or a sequence indexed by class id, for `per_class_iou`.
    seed: the seed of this run, recorded in the result.
Returns:
    miou, fbiou, precision, background_iou, foreground_iou: floats in [0, 1] (NaN where undefined);
    per_class_iou, per_class_episodes: dicts keyed by class name; num_episodes: int; protocol: dict.
Examples:
    >>> import evaluate, numpy as np
    >>> from hf_fss.evaluation import FEW_SHOT_IOU_PATH
    >>> metric = evaluate.load(FEW_SHOT_IOU_PATH)
    >>> pred = np.array([[1, 1], [0, 0]]); ref = np.array([[1, 0], [0, 255]])
    >>> metric.compute(predictions=[pred], references=[ref], class_ids=[1])["miou"]
    0.5
"""


def _as_label_image(x: Any, name: str) -> Any:
    """A label map in a form `datasets.Image` stores losslessly: PIL images as they are, the rest as uint8 arrays."""
    if hasattr(x, "getbands"):  # PIL image
        return x
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"each of {name} must be an (h, w) map, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array))):
        raise ValueError(f"{name} must hold integer labels in [0, 255] (0/1 and 255 = ignore)")
    return array.astype(np.uint8)


def _as_class_ids(class_ids: Any) -> list[int] | None:
    if class_ids is None:
        return None
    if isinstance(class_ids, torch.Tensor):
        return [int(c) for c in class_ids.reshape(-1).tolist()]
    return [int(c) for c in np.asarray(class_ids).reshape(-1)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FewShotIou(evaluate.Metric):
    """Few-shot segmentation mIoU / FB-IoU / precision (see `hf_fss.evaluation.FewShotSegmentationMetric`)."""

    def _info(self) -> evaluate.MetricInfo:
        # datasets.Image stores each map as a PNG: variable sizes, lossless for 0/1/255, and far cheaper to write and
        # read back than nested integer lists (evaluate hands nested lists back as Python lists of lists).
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Image(),
                    "references": datasets.Image(),
                    "class_ids": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://github.com/dvlab-research/PFENet",
                "https://github.com/juhongm999/hsnet",
                "https://github.com/kaixin96/PANet",
            ],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """As `evaluate.Metric.add_batch`, accepting tensors, arrays or PIL images of any integer dtype."""
        if predictions is not None:
            predictions = [_as_label_image(p, "predictions") for p in predictions]
        if references is not None:
            references = [_as_label_image(r, "references") for r in references]
        if kwargs.get("class_ids") is not None:
            kwargs["class_ids"] = _as_class_ids(kwargs["class_ids"])
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """As `evaluate.Metric.add`, accepting a tensor, an array or a PIL image of any integer dtype."""
        if prediction is not None:
            prediction = _as_label_image(prediction, "prediction")
        if reference is not None:
            reference = _as_label_image(reference, "reference")
        if kwargs.get("class_ids") is not None:
            kwargs["class_ids"] = int(_as_class_ids(kwargs["class_ids"])[0])
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(
        self,
        predictions,
        references,
        class_ids,
        fold_classes=None,
        protocol: str | EvaluationProtocol = "pfenet",
        protocol_overrides: dict[str, Any] | None = None,
        class_names=None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        resolved = get_protocol(protocol, **(protocol_overrides or {}))
        ids = [int(c) for c in class_ids]
        fold = sorted(set(ids)) if fold_classes is None else _as_class_ids(fold_classes)
        metric = FewShotSegmentationMetric(fold, class_names=class_names, protocol=resolved, seed=seed)
        # Episodes have different sizes: one update each (the decoded PNGs are read as arrays by the metric).
        for pred, ref, class_id in zip(predictions, references, ids):
            metric.update([pred], [ref], [class_id])
        return metric.compute()
