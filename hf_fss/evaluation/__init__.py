"""
Few-shot segmentation evaluation: mIoU / FB-IoU / precision counted in torch (`FewShotSegmentationMetric`), the
protocol presets behind the published numbers (`PROTOCOLS`, `get_protocol`), and a local `evaluate` module over the
same code (`evaluate.load(FEW_SHOT_IOU_PATH)`, works offline).
"""

from pathlib import Path

from hf_fss.evaluation.loop import evaluate_model
from hf_fss.evaluation.metrics import (
    IGNORE_INDEX,
    FewShotSegmentationMetric,
    aggregate_seeds,
    intersection_and_union,
    resize_label,
)
from hf_fss.evaluation.protocols import (
    FOLD_CONVENTIONS,
    IOU_AGGREGATIONS,
    PROTOCOLS,
    EvaluationProtocol,
    get_protocol,
)

# The folder of the `evaluate` metric script (few_shot_iou/few_shot_iou.py): `evaluate.load(FEW_SHOT_IOU_PATH)`.
FEW_SHOT_IOU_PATH = str(Path(__file__).resolve().parent / "few_shot_iou")

__all__ = [
    "FEW_SHOT_IOU_PATH",
    "FOLD_CONVENTIONS",
    "IGNORE_INDEX",
    "IOU_AGGREGATIONS",
    "PROTOCOLS",
    "EvaluationProtocol",
    "FewShotSegmentationMetric",
    "aggregate_seeds",
    "evaluate_model",
    "get_protocol",
    "intersection_and_union",
    "resize_label",
]
