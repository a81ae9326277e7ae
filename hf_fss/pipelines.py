"""
The `"few-shot-segmentation"` pipeline: segment in query images the class shown by annotated support images.

`import hf_fss` registers it, so that

```python
from transformers import pipeline

segmenter = pipeline("few-shot-segmentation", model="org/ntrenet-r50-fold0")  # or a folder, or a model instance
result = segmenter(query, support_image=[s1, s2], support_mask=[m1, m2])   # K = 2 supports
result = segmenter(query, support_image=s1, support_box=(10, 20, 200, 180))  # a box instead of a mask
results = segmenter([q1, q2, q3], support_image=s1, support_mask=m1)       # the supports are encoded once
result = segmenter(query, supports={"cat": ([c1, c2], [cm1, cm2]), "dog": (d1, dm1)})  # several classes
```

Each result is a dict: `mask` (PIL "L" image, or with `output_type="numpy"` a `(h, w)` uint8 array, at the query's
size: values 0 / 1, 1 = target; with several classes 0 = background and i = the i-th class), `scores` (`(h, w)`
float32 probability of the target, `(C, h, w)` with C classes) and `labels` (`labels[v]` names the mask value v).
With `return_maps=True` it also holds `maps`: the method's intermediate maps (`outputs.maps`, e.g. `prior`), each
brought to the query's size like the logits and with values in [0, 1], `(h, w)` float32, `(C, h, w)` with C classes.
With `return_support_predictions=True` it also holds `support_predictions`: for a model that segments the supports
back from the query (`outputs.support_logits`, e.g. CRCNet's symmetric prediction), one dict per support image (a list
per class with several classes) with `mask`, `scores` at that support's size and `iou` with its given annotation;
`None` for a model that does not.

Several classes are independent binary episodes, one per support set, combined per pixel: the class with the highest
target probability wins where that probability exceeds `threshold` (default 0.5), background elsewhere. With one class
the mask is `scores > threshold`, the model's own argmax at 0.5.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .annotations import IGNORE_INDEX, describe, is_box, is_class_id
from .image_processing_fss import FewShotSegmentationImageProcessor, load_image_processor
from .loading import check_fss_model
from .modeling_fss import SupportEncoding
from .utils.precision import check_precision, inference_precision

__all__ = ["DEFAULT_THRESHOLD", "PIPELINE_TASK", "FewShotSegmentationPipeline", "SupportSets", "register_pipeline"]

PIPELINE_TASK = "few-shot-segmentation"
DEFAULT_THRESHOLD = 0.5
"""Background threshold on the softmax target probability."""


@dataclass
class SupportSets:
    """Encoded support sets, one per class, reusable across pipeline calls (`support_encoding=`)."""

    labels: list[str]
    encodings: list[SupportEncoding]
    masks: list[list[np.ndarray]] = field(default_factory=list)
    """Per class, per support image: the given annotation at the image's size, `(h, w)` uint8 in {0, 1, 255}."""

    def __len__(self) -> int:
        return len(self.encodings)


def _as_list(value: Any, *, boxes: bool = False) -> list[Any]:
    """One item or a list / tuple of items (a box is one item)."""
    if boxes and is_box(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _check_dtype(model: torch.nn.Module, dtype: Any) -> None:
    """
    `pipeline(..., dtype=...)` must hold for the model that runs: transformers applies it only when it loads the
    model (a folder or Hub id), ignores it for a model instance, and falls back to float32 when loading in it fails.

    A misspelt name (`dtype="bf16"`) reaches this check too: transformers 5 falls back to float32 when loading in
    it fails (logging a line), so the model loads and this check names the argument.

    Raises:
        `ValueError`: `dtype` is not a floating-point dtype or its torch name, or differs from the model's.
    """
    if dtype is None or dtype == "auto":
        return
    wanted = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(wanted, torch.dtype) or not wanted.is_floating_point:
        raise ValueError(
            f"`dtype` must be 'auto' or a floating-point dtype such as torch.bfloat16 or its name ('bfloat16', "
            f"'float16', 'float32'), got {dtype!r}"
        )
    if wanted != model.dtype:
        raise ValueError(
            f"`dtype` is {wanted} but the model runs in {model.dtype}: convert a model instance first with "
            f"model.to({wanted}), or give its folder or Hub id to load it in {wanted}"
        )


class FewShotSegmentationPipeline(Pipeline):
    """
    Few-shot segmentation of query images given annotated supports; see the module docstring for the call forms.

    `pipeline(..., dtype=torch.bfloat16)` (or `torch.float16`) loads a folder or Hub id in that dtype; a model instance
    must already have it (else a `ValueError`). Images are fed in the model's dtype; scores, masks and maps are computed
    in float32. `pipeline(..., precision="bfloat16")` (or `"float16"`; default `"float32"`) keeps the weights as
    loaded and runs the support encoding and the forward under `torch.autocast` of that dtype
    (`hf_fss.utils.inference_precision`, as `evaluate.py --dtype`); a dtype autocast cannot run on the pipeline's
    device is a `ValueError`.

    Call arguments:
        images: a query image (PIL image, array, tensor, path or URL) or a list of them. Images and masks are
            decoded by the image processor's one set of rules, whatever their form: EXIF orientation applied to
            paths and PIL images alike, 16-bit images scaled by 65535, small support targets kept under the resize.
        support_image: a support image or a list of K of them.
        support_mask: one annotation per support image (binary mask, or label map with `support_class_id`).
        support_box: `(x0, y0, x1, y1)` per support image, instead of `support_mask`.
        support_class_id: class id(s) of label-map annotations.
        supports: several classes at once: `{name: (images, masks)}` or a list of `(images, masks)` pairs (names
            `"class_1"`, ...); a pair may be a dict with the keys `support_image`, `support_mask` / `support_box`,
            `support_class_id`.
        support_encoding: a `SupportSets` from `pipeline.encode_supports(...)`, instead of the support arguments.
        threshold (`float`, defaults to 0.5): background threshold on the target probability.
        output_type (`"pil"` or `"numpy"`, defaults to `"pil"`): type of `mask` (values 0 / 1, or class indices).
        return_maps (`bool`, defaults to `False`): also return `maps`, the method's intermediate maps
            (`outputs.maps`) by name, each resized to the original query size (bilinear, the PFENet geometry of
            the logits) with values in [0, 1] (a map outside [0, 1] is min-max scaled): `(h, w)` float32 arrays,
            `(C, h, w)` with C classes.
        return_support_predictions (`bool`, defaults to `False`): also return `support_predictions`, the supports
            segmented back from the query when the model fills `outputs.support_logits`, else `None`: per support
            image a dict with `mask` (0 / 1 at the support's size, PIL or numpy as `output_type`), `scores` (`(h, w)`
            float32 target probability, resized like the query's) and `iou` (`float`, intersection over union of
            `mask` with the given annotation, its ignored pixels left out: how consistent the query prediction is);
            a list of K dicts, a list of C such lists with C classes.
    """

    _load_processor = False
    _load_image_processor = False  # `__init__` loads it: a broken preprocessor_config.json must not become defaults
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, model, *args, image_processor=None, **kwargs):
        """
        `image_processor` defaults to the one saved with the model (`preprocessor_config.json`), else one built from
        `model.config.image_size` when the model has no such file.

        Raises:
            `ValueError`: `model` is no hf_fss few-shot model (a plain SegGPT or DINOv2: the fix is named, see
                `hf_fss.loading.not_fss_model_message`), or `image_processor` is not a
                `FewShotSegmentationImageProcessor` or makes images smaller
                than the model takes (`model.min_input_size()`), or the model's `preprocessor_config.json` is broken,
                names another processor type or has such an image_size (the file is named).
        """
        check_fss_model(model)  # a plain transformers model (SegGPT, DINOv2) is named with the fix
        _check_dtype(model, kwargs.get("dtype", kwargs.get("torch_dtype")))
        precision = kwargs.pop("precision", "float32")
        min_side = max(model.min_input_size())
        if image_processor is None:
            processor_class = getattr(model, "fss_image_processor_class", FewShotSegmentationImageProcessor)
            image_processor = load_image_processor(
                model.name_or_path, model.config.image_size, min_side, processor_class
            )
        if not isinstance(image_processor, FewShotSegmentationImageProcessor):
            raise ValueError(
                f"image_processor must be a FewShotSegmentationImageProcessor, got {type(image_processor).__name__}"
            )
        if image_processor.image_size < min_side:
            raise ValueError(
                f"image_processor has image_size {image_processor.image_size} but {type(model).__name__} takes images "
                f"of at least {min_side}x{min_side}; give it image_size >= {min_side}"
            )
        super().__init__(model, *args, image_processor=image_processor, **kwargs)
        check_precision(precision, self.device, name="`precision`")
        self.precision = str(precision).removeprefix("torch.")
        self.model.eval()

    # -------------------------------------------------------------------------------------------- parameters

    def _sanitize_parameters(
        self, support_sets=None, threshold=None, output_type=None, return_maps=None, return_support_predictions=None,
        **kwargs,
    ):  # fmt: skip
        if kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(kwargs)} for the {PIPELINE_TASK} pipeline")
        forward_params, postprocess_params = {}, {}
        if return_maps is not None:
            forward_params["return_maps"] = postprocess_params["return_maps"] = bool(return_maps)
        if return_support_predictions:
            forward_params["return_support_predictions"] = True
            postprocess_params["support_masks"] = support_sets.masks if support_sets is not None else []
        if support_sets is not None:
            forward_params["support_sets"] = support_sets
            postprocess_params["labels"] = support_sets.labels
        if threshold is not None:
            if not isinstance(threshold, numbers.Real) or not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}")
            postprocess_params["threshold"] = float(threshold)
        if output_type is not None:
            if output_type not in ("pil", "numpy"):
                raise ValueError(f"`output_type` must be 'pil' or 'numpy', got {output_type!r}")
            postprocess_params["output_type"] = output_type
        return {}, forward_params, postprocess_params

    # --------------------------------------------------------------------------------------------- supports

    def _support_set(
        self, images: Any, masks: Any, boxes: Any, class_ids: Any, names: tuple[str, str, str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        """
        Preprocess one support set, shot by shot, with errors naming the pipeline's argument: `(1, K, 3, S, S)`
        pixels, `(1, K, S, S)` masks, and each given annotation at its image's size (`(h, w)` uint8 {0, 1, 255}).
        """
        image_name, mask_name, box_name = names
        if images is None:
            raise ValueError(f"`{image_name}` is required: the support image(s) showing the class")
        if masks is None and boxes is None:
            raise ValueError(
                f"`{mask_name}` (or `{box_name}`) is required with `{image_name}`: one mask or box per support image"
            )
        if masks is not None and boxes is not None:
            raise ValueError(f"give either `{mask_name}` or `{box_name}` for `{image_name}`, not both")
        image_list = _as_list(images)
        if boxes is not None:
            flat_numbers = isinstance(boxes, (list, tuple)) and all(isinstance(v, numbers.Real) for v in boxes)
            if flat_numbers and not is_box(boxes):
                raise ValueError(f"`{box_name}` must be a box (x0, y0, x1, y1) or a list of boxes, got {boxes!r}")
            annotations, annotation_name = _as_list(boxes, boxes=True), box_name
            for index, box in enumerate(annotations):
                if not is_box(box):
                    label = annotation_name if len(annotations) == 1 else f"{annotation_name}[{index}]"
                    raise ValueError(f"`{label}` must be a box (x0, y0, x1, y1), got {box!r}")
        else:
            annotations, annotation_name = _as_list(masks), mask_name
        if len(image_list) == 0:
            raise ValueError(f"`{image_name}` is empty")
        if len(annotations) != len(image_list):
            raise ValueError(
                f"`{annotation_name}` has {len(annotations)} annotation(s) but `{image_name}` has {len(image_list)} "
                "image(s); give one per support image"
            )
        if class_ids is None or isinstance(class_ids, numbers.Integral):
            id_list = [class_ids] * len(image_list)
        else:
            id_list = list(class_ids)
            if len(id_list) != len(image_list):
                raise ValueError(f"support_class_id has {len(id_list)} ids for {len(image_list)} support images")
        if boxes is not None and any(c is not None for c in id_list):
            raise ValueError(f"support_class_id does not apply to `{box_name}`")
        for class_id in id_list:
            if not is_class_id(class_id):
                raise ValueError(
                    f"`support_class_id` must be an int (or None) per support image, got {describe(class_id)}"
                )
        single = len(image_list) == 1 and not isinstance(images, (list, tuple))
        processor = self.image_processor
        pixels, labels, originals = [], [], []
        for k, (image, annotation, class_id) in enumerate(zip(image_list, annotations, id_list)):
            # The decoders name the pipeline's own arguments (`support_mask[1]`, `supports['cat'] image`).
            rgb = processor.to_rgb_array(image, image_name if single else f"{image_name}[{k}]")
            mask = processor.annotation_to_mask(
                annotation,
                rgb.shape[:2],
                class_id,
                name=annotation_name if single else f"{annotation_name}[{k}]",
                class_ids_name="support_class_id",
            )
            pixels.append(torch.from_numpy(processor.resize_and_pad_rgb(rgb)))
            labels.append(torch.from_numpy(processor.resize_and_pad_mask(mask)))
            originals.append(mask)  # at the image's size: scores the support predictions
        return torch.stack(pixels)[None], torch.stack(labels)[None], originals

    def _parse_support_sets(self, supports, support_image, support_mask, support_box, support_class_id):
        single = any(v is not None for v in (support_image, support_mask, support_box, support_class_id))
        if supports is not None and single:
            raise ValueError("give either `supports` (several classes) or `support_image` / `support_mask`, not both")
        if supports is None:
            if support_image is None and support_mask is None and support_box is None:
                raise ValueError(
                    "`support_image` and `support_mask` (or `support_box`) are required: the support image(s) "
                    "showing the class to segment, with one annotation each (or `supports` for several classes)"
                )
            names = ("support_image", "support_mask", "support_box")
            return [("target", (support_image, support_mask, support_box, support_class_id, names))]
        if isinstance(supports, Mapping):
            items = [(str(name), value) for name, value in supports.items()]
        elif isinstance(supports, Sequence) and not isinstance(supports, (str, bytes)):
            items = [(f"class_{i + 1}", value) for i, value in enumerate(supports)]
        else:
            raise ValueError(f"`supports` must be a dict {{name: (images, masks)}} or a list, got {type(supports)}")
        if not items:
            raise ValueError("`supports` is empty")
        sets = []
        for name, value in items:
            arg = f"supports[{name!r}]"
            if isinstance(value, Mapping):
                unknown = set(value) - {"support_image", "support_mask", "support_box", "support_class_id"}
                if unknown:
                    raise ValueError(f"`{arg}` has unknown keys {sorted(unknown)}")
                images, masks = value.get("support_image"), value.get("support_mask")
                boxes, class_ids = value.get("support_box"), value.get("support_class_id")
            elif isinstance(value, (list, tuple)) and len(value) in (2, 3):
                images, annotations = value[0], value[1]
                class_ids = value[2] if len(value) == 3 else None
                listed = _as_list(annotations, boxes=True)
                as_boxes = bool(listed) and all(is_box(a) for a in listed)  # no annotation at all is not a box
                masks, boxes = (None, annotations) if as_boxes else (annotations, None)
            else:
                raise ValueError(
                    f"`{arg}` must be an (images, masks) pair, an (images, masks, class_ids) triple or a dict, got "
                    f"{type(value).__name__}"
                )
            names = (f"{arg} image", f"{arg} mask", f"{arg} box")
            sets.append((name, (images, masks, boxes, class_ids, names)))
        return sets

    def encode_supports(
        self,
        support_image: Any = None,
        support_mask: Any = None,
        support_box: Any = None,
        support_class_id: Any = None,
        supports: Any = None,
    ) -> SupportSets:
        """
        Preprocess and encode support sets once (`model.encode_support`), to segment many queries:
        `pipe(queries, support_encoding=pipe.encode_supports(...))`. Arguments as in the call.
        """
        sets = self._parse_support_sets(supports, support_image, support_mask, support_box, support_class_id)
        labels, encodings, originals = [], [], []
        for name, (images, masks, boxes, class_ids, names) in sets:
            pixel_values, mask_values, given = self._support_set(images, masks, boxes, class_ids, names)
            with self.device_placement(), torch.no_grad(), inference_precision(self.model, self.precision):
                encoding = self.model.encode_support(
                    pixel_values.to(self.device, dtype=self.model.dtype), mask_values.to(self.device)
                )
            labels.append(name)
            encodings.append(encoding)
            originals.append(given)
        return SupportSets(labels=labels, encodings=encodings, masks=originals)

    # ---------------------------------------------------------------------------------------------- calling

    def __call__(
        self,
        images: Any,
        support_image: Any = None,
        support_mask: Any = None,
        support_box: Any = None,
        support_class_id: Any = None,
        supports: Any = None,
        support_encoding: SupportSets | None = None,
        **kwargs,
    ):
        """Segment `images`; see the class docstring. Returns a dict, or a list of dicts for a list of images."""
        if images is None:
            raise ValueError("`images` is required: the query image (or a list of them) to segment")
        if support_encoding is not None:
            if not isinstance(support_encoding, SupportSets):
                raise ValueError(
                    "`support_encoding` must come from pipeline.encode_supports(...), got "
                    f"{type(support_encoding).__name__}"
                )
            if any(v is not None for v in (support_image, support_mask, support_box, support_class_id, supports)):
                raise ValueError("give either `support_encoding` or the support images and annotations, not both")
            support_sets = support_encoding
        else:
            support_sets = self.encode_supports(support_image, support_mask, support_box, support_class_id, supports)
        if isinstance(images, tuple):
            images = list(images)
        if isinstance(images, list) and not images:
            raise ValueError("`images` is an empty list")
        if isinstance(images, list):
            images = [(f"images[{i}]", image) for i, image in enumerate(images)]
        else:
            images = ("images", images)
        return super().__call__(images, support_sets=support_sets, **kwargs)

    def preprocess(self, inputs) -> dict[str, Any]:
        name, image = inputs if isinstance(inputs, tuple) and len(inputs) == 2 else ("images", inputs)
        processor = self.image_processor
        rgb = processor.to_rgb_array(image, name)  # raises a ValueError naming the argument
        pixel_values = torch.from_numpy(processor.resize_and_pad_rgb(rgb))[None]
        return {"pixel_values": pixel_values.to(self.model.dtype), "original_size": tuple(rgb.shape[:2])}

    def _forward(
        self, model_inputs, support_sets: SupportSets | None = None, return_maps=False, return_support_predictions=False
    ):  # fmt: skip
        if support_sets is None:
            raise ValueError("no support set: call the pipeline with `support_image` and `support_mask`")
        pixel_values = model_inputs["pixel_values"]
        with inference_precision(self.model, self.precision):  # logits come back in the model's dtype
            outputs = [self.model(pixel_values=pixel_values, support_encoding=enc) for enc in support_sets.encodings]
        result = {"logits": torch.cat([o.logits for o in outputs]), "original_size": model_inputs["original_size"]}
        if return_maps:  # name -> (C, 1, h, w), the names every class's output has
            names = [name for name in (outputs[0].maps or {}) if all(name in (o.maps or {}) for o in outputs)]
            result["maps"] = {name: torch.cat([o.maps[name][:1, :1] for o in outputs]) for name in names}
        if return_support_predictions:  # per class (K, 2, s, s); None when the model gives none
            given = all(o.support_logits is not None for o in outputs)
            result["support_logits"] = [o.support_logits[0] for o in outputs] if given else None
        return result

    def _resize_maps(self, maps: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, np.ndarray]:
        """(C, 1, h, w) maps -> (C, height, width) float32 in [0, 1] (min-max scaled when outside [0, 1])."""
        resized = {}
        for name, value in maps.items():
            value = self.image_processor.resize_logits(value.float(), size)[:, 0]
            low, high = float(value.min()), float(value.max())
            if low < 0 or high > 1:
                value = (value - low) / (high - low) if high > low else torch.zeros_like(value)
            resized[name] = value.clamp(0, 1).numpy().astype(np.float32)
        return resized

    def _support_predictions(self, logits: list[torch.Tensor], masks: list[list[np.ndarray]], threshold, output_type):
        """Per class, per support: logits `(K, 2, s, s)` -> `mask`, `scores` at the given annotation's size, `iou`."""
        classes = []
        for class_logits, class_masks in zip(logits, masks):
            shots = []
            for shot_logits, given in zip(class_logits, class_masks):
                scores = self.image_processor.resize_logits(shot_logits.float(), given.shape).softmax(dim=0)[1]
                mask = (scores > threshold).numpy().astype(np.uint8)
                predicted, target = (mask == 1) & (given != IGNORE_INDEX), given == 1  # ignored pixels left out
                iou = float((predicted & target).sum() / max((predicted | target).sum(), 1))
                image = Image.fromarray(mask) if output_type == "pil" else mask
                shots.append({"mask": image, "scores": scores.numpy().astype(np.float32), "iou": iou})
            classes.append(shots)
        return classes

    def postprocess(
        self, model_outputs, labels=None, threshold=DEFAULT_THRESHOLD, output_type="pil", return_maps=False,
        support_masks=None,
    ):  # fmt: skip
        logits = self.image_processor.resize_logits(model_outputs["logits"].float(), model_outputs["original_size"])
        scores = logits.softmax(dim=1)[:, 1]  # (C, h, w) target probabilities
        if scores.shape[0] == 1:
            mask = (scores[0] > threshold).to(torch.uint8)
            scores_out = scores[0]
        else:
            best, index = scores.max(dim=0)
            mask = torch.where(best > threshold, index + 1, torch.zeros_like(index)).to(torch.uint8)
            scores_out = scores
        mask = mask.numpy()
        names = list(labels) if labels is not None else [f"class_{i + 1}" for i in range(scores.shape[0])]
        result = {
            "mask": Image.fromarray(mask) if output_type == "pil" else mask,  # uint8 (h, w): mode "L"
            "scores": scores_out.numpy().astype(np.float32),
            "labels": ["background", *names],
        }
        if return_maps:
            maps = self._resize_maps(model_outputs.get("maps", {}), model_outputs["original_size"])
            result["maps"] = {name: value[0] if scores.shape[0] == 1 else value for name, value in maps.items()}
        if support_masks is not None:  # asked for
            predicted = model_outputs.get("support_logits")
            predicted = predicted and self._support_predictions(predicted, support_masks, threshold, output_type)
            result["support_predictions"] = predicted[0] if predicted and len(predicted) == 1 else predicted
        return result


def register_pipeline() -> None:
    """Register the `"few-shot-segmentation"` task with transformers' `pipeline()` (done by `import hf_fss`)."""
    if PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK, {}).get("impl") is FewShotSegmentationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=FewShotSegmentationPipeline, pt_model=AutoModel, type="image"
    )


# Importing this module imports transformers.pipelines, whose after-import hook (hf_fss/__init__.py) finds this
# module half-initialised and leaves the registration to this line.
register_pipeline()
