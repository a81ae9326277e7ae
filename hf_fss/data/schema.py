"""The columns every benchmark DatasetDict has, and the class names of the releases."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Features

IGNORE_INDEX = 255

# Index = class id in the label maps; 0 is background.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# COCO 2014 category names in ascending category-id order; class id = position (1..80).
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


# COCO's category id of each class id 1..80 (the ids have gaps: 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def benchmark_features(class_names) -> Features:
    """
    Columns of a benchmark split. `label` is a single-channel PNG whose pixel values are class ids (0 background,
    255 ignore); it is stored and decoded without any palette or grayscale conversion, so ids survive exactly.
    `class_ids` lists the ids present (background excluded) and `class_areas` their pixel counts.
    """
    from datasets import ClassLabel, Features, Image, Sequence, Value  # here: `datasets` costs ~1 s at import

    return Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "label": Image(),
            "class_ids": Sequence(ClassLabel(names=list(class_names))),
            "class_areas": Sequence(Value("int64")),
        }
    )
