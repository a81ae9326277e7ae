"""
Few-shot segmentation evaluation: mIoU / FB-IoU / precision counted in torch (`FewShotSegmentationMetric`), the
protocol presets behind the published numbers (`PROTOCOLS`, `get_protocol`), and a local `evaluate` module over the
same code (`evaluate.load(FEW_SHOT_IOU_PATH)`, works offline).

The submodules are imported when one of their names is first read (docs/development.md, "Import time").
"""

from pathlib import Path

from hf_fss.utils.lazy import lazy_exports

# The folder of the `evaluate` metric script (few_shot_iou/few_shot_iou.py): `evaluate.load(FEW_SHOT_IOU_PATH)`.
FEW_SHOT_IOU_PATH = str(Path(__file__).resolve().parent / "few_shot_iou")

_LAZY = {
    **dict.fromkeys(["evaluate_model"], ".loop"),
    **dict.fromkeys(
        ["IGNORE_INDEX", "FewShotSegmentationMetric", "aggregate_seeds", "intersection_and_union", "resize_label"],
        ".metrics",
    ),
    **dict.fromkeys(
        ["FOLD_CONVENTIONS", "IOU_AGGREGATIONS", "PROTOCOLS", "EvaluationProtocol", "get_protocol"], ".protocols"
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["FEW_SHOT_IOU_PATH", *sorted(_LAZY)]
