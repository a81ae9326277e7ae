"""
Gradio Space of hf_fss: few-shot semantic segmentation in the browser and over an API.

Give one or more support images with the target marked (brush strokes, or a box), one or more query images, and
the model segments the same class in the queries. The method's own intermediate maps (`outputs.maps`: the prior,
NTRENet's background and distractor maps, ...) are shown as heat maps next to the masks.

Run it with `python spaces_app/app.py` (http://127.0.0.1:7860). Models come from `FSS_MODELS` (comma-separated
Hub repo ids or folders written by `save_pretrained`); without it the quickstart's `outputs/quickstart` is used
when it exists. Programs call the `/segment` endpoint (support_image, support_mask, query_image -> mask PNG).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import html
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parent

try:  # installed (pip install -e .), or copied next to app.py in a Space
    import hf_fss  # noqa: F401
except ImportError:  # a checkout of the repository that is not installed
    sys.path.insert(0, str(REPO_ROOT))
    import hf_fss  # noqa: F401

from transformers import AutoImageProcessor, AutoModel  # noqa: E402

from hf_fss import FewShotSegmentationImageProcessor, FewShotSegmentationPreTrainedModel  # noqa: E402

DEFAULT_MODEL_DIR = REPO_ROOT / "outputs" / "quickstart"
EXAMPLES_DIR = APP_DIR / "examples"
MAX_SIDE = 1024
"""Images whose longer side exceeds this are scaled down to it (with a warning) before anything else."""
MAX_SUPPORTS = 5
MAX_QUERIES = 8
ENCODING_CACHE_SIZE = 8
# Brush colours = classes: paint each class in its own colour to segment several classes at once.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (30, 90, 255),
    "magenta": (235, 40, 220),
    "yellow": (255, 215, 0),
    "cyan": (0, 215, 215),
}
BRUSH_OPACITY = 0.6
BACKGROUND_THRESHOLD = 0.5
"""With several classes a pixel takes the class of highest target probability when it exceeds this."""

NO_MODEL_MESSAGE = (
    "No model is configured. Start the app with `FSS_MODELS=<Hub repo id or folder>[,...] python spaces_app/app.py` "
    "(a folder written by `model.save_pretrained(...)` and `processor.save_pretrained(...)`), or run the quickstart "
    "`accelerate launch scripts/train.py`, which saves `outputs/quickstart`, used by default."
)


# ------------------------------------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A model, its image processor and the name it was loaded from."""

    model_id: str
    model: FewShotSegmentationPreTrainedModel
    processor: FewShotSegmentationImageProcessor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_model_specs(value: str | None = None) -> list[str]:
    """
    Models offered by the app: `value` (or the `FSS_MODELS` environment variable), comma-separated Hub repo ids or
    folders; without either, the quickstart's `outputs/quickstart` when it exists, else none.
    """
    raw = value if value is not None else os.environ.get("FSS_MODELS", "")
    specs = [item.strip() for item in raw.split(",") if item.strip()]
    if specs:
        return specs
    if _model_folder(DEFAULT_MODEL_DIR) is not None:
        return [str(DEFAULT_MODEL_DIR.relative_to(REPO_ROOT))]
    return []


def _model_folder(path: Path) -> Path | None:
    """`path` if it holds a saved model, else its `best/` or `final/` model (a training run folder), else None."""
    for candidate in (path, path / "best", path / "final"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _local_path(spec: str) -> Path | None:
    """
    The model folder `spec` names (relative to the working directory, else to the repository; a training run folder
    gives its `best/`, else `final/` model), or None for a Hub repo id.
    """
    path = Path(spec).expanduser()
    for folder in (path, None if path.is_absolute() else REPO_ROOT / path):
        if folder is not None and folder.is_dir():
            return _model_folder(folder) or folder
    return None


class ModelRegistry:
    """Loads each model once, on first use, and keeps it."""

    def __init__(self, specs: list[str]):
        self.specs = list(specs)
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @property
    def default(self) -> str | None:
        return self.specs[0] if self.specs else None

    def get(self, spec: str | None) -> LoadedModel:
        if not self.specs:
            raise gr.Error(html.escape(NO_MODEL_MESSAGE.replace("`", "")), title="No model")
        spec = spec or self.default
        if spec not in self.specs:
            raise gr.Error(f"Unknown model {html.escape(str(spec))!r}; choose one of {self.specs}", title="Model")
        with self._lock:
            if spec not in self._models:
                self._models[spec] = load_model(spec)
            return self._models[spec]


def load_model(spec: str) -> LoadedModel:
    """Load an hf_fss model and its image processor from a folder or a Hub repo id (errors become `gr.Error`)."""
    source = str(_local_path(spec) or spec)
    try:
        model = AutoModel.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - every loading failure is reported the same way
        raise gr.Error(
            f"Could not load model {html.escape(spec)!r}: {html.escape(f'{type(err).__name__}: {err}')}",
            title="Model",
        ) from err
    if not isinstance(model, FewShotSegmentationPreTrainedModel):
        raise gr.Error(
            f"{html.escape(spec)!r} is a {type(model).__name__}, not an hf_fss few-shot model", title="Model"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception:  # noqa: BLE001 - no preprocessor_config.json: the default protocol at the model's size
        processor = None
    if not isinstance(processor, FewShotSegmentationImageProcessor):
        processor = FewShotSegmentationImageProcessor(image_size=model.config.image_size)
    model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedModel(model_id=spec, model=model, processor=processor)


# ------------------------------------------------------------------------------------------------------- inputs


def _name_of(value: Any) -> str:
    return Path(value).name if isinstance(value, str | os.PathLike) else ""


def load_image(value: Any, what: str, notes: list[str] | None = None, max_side: int = MAX_SIDE) -> Image.Image:
    """
    Any image input (file path, PIL image, uint8 / float array) as an RGB PIL image whose longer side is at most
    `max_side` (a larger image is scaled down and a note says so). Raises `gr.Error` naming `what`.
    """
    if value is None:
        raise gr.Error(f"{what} is missing: upload an image.", title="Missing image")
    if isinstance(value, str | os.PathLike):
        try:
            with Image.open(value) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except Image.DecompressionBombError as err:
            raise gr.Error(
                f"{what} ({html.escape(_name_of(value))}) is too large to open safely ({html.escape(str(err))}).",
                title="Image too large",
            ) from err
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise gr.Error(
                f"{what}: could not read {html.escape(_name_of(value))!r} as an image "
                f"({type(err).__name__}). Use a PNG, JPEG, WebP, BMP or TIFF file.",
                title="Unreadable file",
            ) from err
    elif isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        array = value
        if array.dtype != np.uint8:
            array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
            raise gr.Error(f"{what} has an unsupported array shape {array.shape}", title="Unreadable image")
        image = Image.fromarray(array)
    else:
        raise gr.Error(f"{what} must be an image file, got {type(value).__name__}", title="Unreadable image")
    if image.mode != "RGB":
        if "A" in image.getbands() or "transparency" in image.info:  # transparent areas become white
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        image = image.convert("RGB")
    return _limit_size(image, what, notes, max_side, Image.Resampling.BILINEAR)


def _limit_size(image: Image.Image, what: str, notes: list[str] | None, max_side: int, resample) -> Image.Image:
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if notes is not None:
        notes.append(f"{what} is {width}x{height}; resized to {size[0]}x{size[1]} (longest side limit {max_side}).")
    return image.resize(size, resample)


def load_mask(value: Any, what: str, size: tuple[int, int]) -> np.ndarray | tuple[float, float, float, float]:
    """
    A support annotation as a `(height, width)` uint8 mask (1 = target) at `size` = (width, height) of its
    (possibly scaled down) image, or a box `(x0, y0, x1, y1)` in the image's pixels. Mask files and arrays: white /
    non-zero = target (grayscale thresholded at 128; for an image with transparency, non-transparent = target).
    Raises `gr.Error` for a missing, unreadable, mis-sized or empty mask.
    """
    if value is None:
        raise gr.Error(
            f"{what} is missing: mark the target (paint it with the brush, give a box, or upload a mask).",
            title="Missing mask",
        )
    if isinstance(value, list | tuple) and len(value) == 4 and all(isinstance(v, int | float) for v in value):
        return tuple(float(v) for v in value)
    if isinstance(value, str | os.PathLike):
        try:
            with Image.open(value) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise gr.Error(
                f"{what}: could not read {html.escape(_name_of(value))!r} as an image ({type(err).__name__}). "
                "Use a PNG mask, white = target, black = background.",
                title="Unreadable file",
            ) from err
        array = _mask_image_to_array(image)
    elif isinstance(value, Image.Image):
        array = _mask_image_to_array(value)
    elif isinstance(value, np.ndarray | torch.Tensor):
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if array.ndim == 3 and array.shape[-1] in (2, 4) and array[..., -1].min() != array[..., -1].max():
            array = array[..., -1] > 0
        elif array.ndim == 3:
            array = (array[..., :3] if array.shape[-1] >= 3 else array[..., :1]).max(axis=-1)
        if array.ndim != 2:
            raise gr.Error(f"{what} must be a 2-D mask, got shape {array.shape}", title="Bad mask")
        array = array > 0 if array.dtype == np.bool_ or array.max() <= 1 else array >= 128
    else:
        raise gr.Error(f"{what} must be a mask image or a box (x0, y0, x1, y1), got {type(value).__name__}")
    mask = array.astype(np.uint8)
    width, height = size
    if mask.shape != (height, width):
        ratio_h, ratio_w = mask.shape[0] / height, mask.shape[1] / width
        if abs(ratio_h - ratio_w) > 0.02 * max(ratio_h, ratio_w):
            raise gr.Error(
                f"{what} is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height} (before any "
                "resizing); the mask must have the image's size.",
                title="Mask size",
            )
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    if not mask.any():
        raise gr.Error(
            f"{what} is empty: it marks no target pixel. Mark the object (white = target).", title="Empty mask"
        )
    return mask


def _mask_image_to_array(image: Image.Image) -> np.ndarray:
    """Boolean target of a mask image: alpha > 0 when it has varying transparency, else luminance >= 128."""
    if "A" in image.getbands():
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha > 0
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("1",):
        return np.asarray(image, dtype=bool)
    gray = np.asarray(image.convert("L"))
    if gray.max() == 1:  # a {0, 1} mask saved as 8-bit
        return gray == 1
    return gray >= 128


def parse_box(text: str | None, what: str) -> tuple[float, float, float, float] | None:
    """`"x0, y0, x1, y1"` (commas or spaces) -> a box, `None` when empty; `gr.Error` for anything else."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).replace(",", " ").replace(";", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise gr.Error(f"{what}: a box is four numbers x0, y0, x1, y1 (pixels), got {html.escape(str(text))!r}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise gr.Error(f"{what}: the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) needs x0 < x1 and y0 < y1", title="Box")
    return x0, y0, x1, y1


# -------------------------------------------------------------------------------------------------- core segment


@dataclass
class QueryResult:
    """One segmented query: the (possibly scaled down) image, its mask, target probability and intermediate maps."""

    image: Image.Image
    mask: np.ndarray  # (h, w) uint8 in {0, 1}
    score: np.ndarray  # (h, w) float32 target probability
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (h, w) float32


@dataclass
class SegmentationResult:
    queries: list[QueryResult]
    cache_hit: bool
    notes: list[str]
    seconds: float


class SupportEncodingCache:
    """Support encodings keyed by a hash of the model id and the support images and masks (LRU)."""

    def __init__(self, size: int = ENCODING_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(model_id: str, images: list[Image.Image], masks: list[Any]) -> str:
        digest = hashlib.sha256(model_id.encode())
        for image, mask in zip(images, masks):
            array = np.asarray(image)
            digest.update(repr(array.shape).encode())
            digest.update(array.tobytes())
            if isinstance(mask, tuple):
                digest.update(repr(mask).encode())
            else:
                digest.update(repr(mask.shape).encode())
                digest.update(np.packbits(mask.astype(bool)).tobytes())
        return digest.hexdigest()

    def get(self, key: str):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: str, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


ENCODINGS = SupportEncodingCache()


def segment(
    model: LoadedModel,
    supports: list[Any],
    masks: list[Any],
    queries: list[Any],
    cache: SupportEncodingCache | None = ENCODINGS,
) -> SegmentationResult:
    """
    Segment, in every query, the class the supports show: the core of both the UI and the `/segment` API.

    Args:
        model: from `load_model` / `ModelRegistry.get`.
        supports: K support images (file paths, PIL images or arrays).
        masks: one annotation per support: a mask (file, PIL image or array; white / non-zero = target) or a box
            `(x0, y0, x1, y1)` in the support image's pixels.
        queries: query images (file paths, PIL images or arrays).
        cache: support encodings are computed once per (model, support set) and reused from here.

    Raises `gr.Error` with a message naming the input for a missing, unreadable or empty image or mask.
    Images larger than `MAX_SIDE` are scaled down (see `notes`); results are at that size.
    """
    start = time.perf_counter()
    notes: list[str] = []
    if not supports:
        raise gr.Error("No support image: give at least one support image with the target marked.", title="Support")
    if len(masks) != len(supports):
        raise gr.Error(f"{len(supports)} support images but {len(masks)} masks: give one mask per support image.")
    if not queries:
        raise gr.Error("No query image: upload at least one image to segment.", title="Query")
    support_images, support_masks = [], []
    for k, (image, mask) in enumerate(zip(supports, masks)):
        suffix = f" {k + 1}" if len(supports) > 1 else ""
        original = load_image(image, f"Support image{suffix}", max_side=sys.maxsize)
        image = _limit_size(original, f"Support image{suffix}", notes, MAX_SIDE, Image.Resampling.BILINEAR)
        mask = load_mask(mask, f"Support mask{suffix}", image.size)
        if isinstance(mask, tuple) and image.size != original.size:  # a box in the original image's pixels
            mask = tuple(v * image.width / original.width for v in mask)
        support_images.append(image)
        support_masks.append(mask)
    query_images = [
        load_image(image, f"Query {i + 1}" if len(queries) > 1 else "Query image", notes)
        for i, image in enumerate(queries)
    ]
    processor, net = model.processor, model.model

    key = SupportEncodingCache.key(model.model_id, support_images, support_masks)
    encoding = cache.get(key) if cache is not None else None
    cache_hit = encoding is not None
    if encoding is None:
        try:
            inputs = processor(support_images=[support_images], support_masks=[support_masks], return_tensors="pt")
        except ValueError as err:
            raise gr.Error(_support_error(str(err), len(supports)), title="Support") from err
        with torch.inference_mode():
            encoding = net.encode_support(
                inputs["support_pixel_values"].to(model.device), inputs["support_masks"].to(model.device)
            )
        if cache is not None:
            cache.put(key, encoding)

    results = []
    for image in query_images:
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"].to(model.device)
        with torch.inference_mode():
            outputs = net(pixel_values, support_encoding=encoding)
        mask = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        # Maps come back to the query's size with the processor's own geometry (PFENet protocol).
        original_size = (image.height, image.width)
        score = processor.resize_logits(outputs.logits[0].float().softmax(dim=0)[1:2], original_size)[0]
        maps = {}
        for name, value in (outputs.maps or {}).items():
            if not isinstance(value, torch.Tensor) or value.dim() not in (3, 4):
                continue
            value = value[0] if value.dim() == 4 else value[:1]
            if value.shape[0] != 1:
                continue
            maps[name] = processor.resize_logits(value.float(), original_size)[0].cpu().numpy()
        results.append(
            QueryResult(
                image=image,
                mask=mask.cpu().numpy().astype(np.uint8),
                score=score.cpu().numpy().astype(np.float32),
                maps=maps,
            )
        )
    return SegmentationResult(queries=results, cache_hit=cache_hit, notes=notes, seconds=time.perf_counter() - start)


def _support_error(message: str, shot: int) -> str:
    """The processor's ValueError (naming `support_masks[0][k]`) in the app's words."""
    message = html.escape(message)
    for k in range(shot):
        message = message.replace(
            f"`support_masks[0][{k}] (query 0, shot {k})`", f"Support mask {k + 1}" if shot > 1 else "Support mask"
        )
    return message


# ------------------------------------------------------------------------------------------------------- drawing


def overlay(image: Image.Image, label: np.ndarray, colors: list[tuple[int, int, int]]) -> Image.Image:
    """Tint each class `c` (label == c + 1) of the image in `colors[c]` and outline it."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base.copy()
    for index, color in enumerate(colors):
        region = label == index + 1
        if not region.any():
            continue
        out[region] = 0.45 * base[region] + 0.55 * np.asarray(color, dtype=np.float32)
    out = out.astype(np.uint8)
    thickness = max(1, round(max(label.shape) / 300))
    for index, color in enumerate(colors):
        region = (label == index + 1).astype(np.uint8)
        if region.any():
            contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    return Image.fromarray(out)


def heat_map(image: Image.Image, values: np.ndarray) -> tuple[Image.Image, str]:
    """A map as a turbo-coloured heat map over a dimmed grey query; values in [0, 1] are shown as they are."""
    values = np.nan_to_num(values.astype(np.float32))
    low, high = float(values.min()), float(values.max())
    note = ""
    if low < -1e-4 or high > 1 + 1e-4:
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        note = f" (scaled from [{low:.2g}, {high:.2g}])"
    colored = cv2.applyColorMap(np.clip(values * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
    gray = np.asarray(image.convert("L"), dtype=np.float32)[..., None]
    blended = 0.7 * colored.astype(np.float32) + 0.3 * gray
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8)), note


def _save_png(image: Image.Image, name: str) -> str:
    folder = Path(tempfile.gettempdir()) / "hf_fss_space" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    image.save(path, format="PNG")
    return str(path)


def _notify(notes: list[str]) -> None:
    for note in dict.fromkeys(notes):
        gr.Warning(html.escape(note))


# ------------------------------------------------------------------------------------------------------ UI logic


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def strokes_by_class(editor: dict | None, what: str) -> tuple[Any, dict[int, np.ndarray]]:
    """
    An ImageEditor value -> (background image, {class index: stroke mask}). Each painted pixel (alpha > 0 in any
    layer) belongs to the brush colour nearest to its colour; an empty dict when nothing was painted.
    """
    if not editor or editor.get("background") is None:
        return None, {}
    background = editor["background"]
    height, width = np.asarray(background).shape[:2]
    palette = np.asarray(list(CLASS_COLORS.values()), dtype=np.float32)
    classes: dict[int, np.ndarray] = {}
    for layer in editor.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[-1] != 4:
            continue
        if layer.shape[:2] != (height, width):
            layer = cv2.resize(layer, (width, height), interpolation=cv2.INTER_NEAREST)
        painted = layer[..., 3] > 0
        if not painted.any():
            continue
        rgb = layer[..., :3][painted].astype(np.float32)
        nearest = ((rgb[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
        for index in np.unique(nearest):
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[painted] = nearest == index
            classes[int(index)] = classes.get(int(index), np.zeros_like(mask)) | mask
    return background, classes


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def collect_episodes(mode: str, editors: list[dict | None], boxes: list[str | None]) -> dict[int, tuple[list, list]]:
    """
    Class index -> (support images, annotations) from the support editors. Brush mode: painted pixels are the mask.
    Box mode: the typed box (class of the first colour) or else the box around each colour's strokes.
    """
    episodes: dict[int, tuple[list, list]] = {}
    used = 0
    for k, (editor, box_text) in enumerate(zip(editors, boxes)):
        what = f"Support {k + 1}"
        background, classes = strokes_by_class(editor, what)
        box = parse_box(box_text, f"{what} box") if mode == "box" else None
        if background is None:
            if classes or box is not None:
                raise gr.Error(f"{what} has a mark but no image: upload the support image first.", title="Support")
            continue
        used += 1
        if box is not None:
            annotations = {0: box}
        elif classes:
            annotations = {c: (_box_of(m) if mode == "box" else m) for c, m in classes.items()}
        else:
            hint = "paint over the object with the brush" + (
                ", or type its box as x0, y0, x1, y1" if mode == "box" else " (or switch to box mode)"
            )
            raise gr.Error(f"{what} has an image but no target marked: {hint}.", title="Missing mask")
        for c, annotation in annotations.items():
            images, masks = episodes.setdefault(c, ([], []))
            images.append(background)
            masks.append(annotation)
    if used == 0:
        raise gr.Error("No support image: upload a support image and paint the target on it.", title="Support")
    return dict(sorted(episodes.items()))


def run_ui(registry: ModelRegistry, model_id, mode, queries, *editors_and_boxes, progress=None):
    """The UI's Run button: supports drawn in the editors, queries from the gallery -> overlays, maps, masks."""
    editors = list(editors_and_boxes[:MAX_SUPPORTS])
    boxes = list(editors_and_boxes[MAX_SUPPORTS:])
    loaded = registry.get(model_id)
    episodes = collect_episodes(mode, editors, boxes)
    query_paths = [item[0] if isinstance(item, list | tuple) else item for item in (queries or [])]
    if not query_paths:
        raise gr.Error("No query image: upload one or more images to segment.", title="Query")
    notes = []
    if len(query_paths) > MAX_QUERIES:
        notes.append(f"{len(query_paths)} queries given; only the first {MAX_QUERIES} are segmented.")
        query_paths = query_paths[:MAX_QUERIES]
    names = list(CLASS_COLORS)
    colors = list(CLASS_COLORS.values())
    multi = len(episodes) > 1

    per_class: dict[int, SegmentationResult] = {}
    for step, (c, (images, masks)) in enumerate(episodes.items()):
        if progress is not None:
            progress((step, len(episodes)), desc=f"segmenting the {names[c]} class" if multi else "segmenting")
        per_class[c] = segment(loaded, images, masks, query_paths)
        notes.extend(per_class[c].notes)
    _notify(notes)

    gallery, maps_gallery, files = [], [], []
    first = next(iter(per_class.values()))
    for i in range(len(query_paths)):
        image = first.queries[i].image
        qname = Path(str(query_paths[i])).stem or f"query {i + 1}"
        if multi:
            scores = np.stack([per_class[c].queries[i].score for c in per_class])
            best = scores.argmax(0)
            keep = scores.max(0) > BACKGROUND_THRESHOLD
            label = np.where(keep, np.asarray(list(per_class))[best] + 1, 0).astype(np.uint8)
        else:
            (c,) = per_class
            label = (per_class[c].queries[i].mask * (c + 1)).astype(np.uint8)
        parts = []
        for c in per_class:
            fraction = float((label == c + 1).mean())
            parts.append(f"{names[c]} {fraction:.1%}" if multi else f"target {fraction:.1%}")
            mask_image = Image.fromarray(((label == c + 1) * 255).astype(np.uint8), mode="L")
            files.append(_save_png(mask_image, f"{qname}_mask{'_' + names[c] if multi else ''}.png"))
        gallery.append((overlay(image, label, colors), f"{i + 1}. {qname}: {', '.join(parts)}"))
        for c in per_class:
            for map_name, values in per_class[c].queries[i].maps.items():
                picture, note = heat_map(image, values)
                suffix = f" [{names[c]}]" if multi else ""
                maps_gallery.append((picture, f"{i + 1}. {map_name}{suffix}{note}"))

    shots = ", ".join(f"{names[c]}: {len(episodes[c][0])}-shot" for c in episodes) if multi else None
    seconds = sum(r.seconds for r in per_class.values())
    cached = all(r.cache_hit for r in per_class.values())
    details = (
        f"**Model** `{html.escape(loaded.model_id)}` ({loaded.model.config.model_type}, "
        f"{loaded.processor.image_size}px) · "
        f"{shots or f'{len(episodes[next(iter(episodes))][0])}-shot'} · {len(query_paths)} "
        f"quer{'y' if len(query_paths) == 1 else 'ies'} in {seconds:.2f} s · support encoding "
        f"{'reused from cache' if cached else 'computed'}"
    )
    if not maps_gallery:
        details += " · this model returns no intermediate maps"
    return gallery, maps_gallery, files, details


def segment_api(registry: ModelRegistry, support_image, support_mask, query_image, model=None):
    """
    The `/segment` endpoint: one support image, its mask (white = target) and a query image -> the query mask as a
    PNG of the query's size (0 / 255), an overlay of it on the query, and a JSON summary.
    """
    loaded = registry.get(model or None)
    notes: list[str] = []
    if support_image is None:
        raise gr.Error("support_image is missing: upload the support image.", title="Missing image")
    if support_mask is None:
        raise gr.Error(
            "support_mask is missing: upload a mask of the support image (white = target, black = background).",
            title="Missing mask",
        )
    if query_image is None:
        raise gr.Error("query_image is missing: upload the image to segment.", title="Missing image")
    full_query = load_image(query_image, "query_image", max_side=sys.maxsize)
    support = load_image(support_image, "support_image", max_side=sys.maxsize)
    mask = load_mask(support_mask, "support_mask", support.size)
    result = segment(loaded, [support], [mask], [full_query])
    notes += result.notes
    _notify(notes)
    query = result.queries[0]
    mask_array = query.mask
    if query.image.size != full_query.size:  # a huge query was segmented at MAX_SIDE: back to its size
        mask_array = cv2.resize(mask_array, full_query.size, interpolation=cv2.INTER_NEAREST)
    mask_image = Image.fromarray((mask_array * 255).astype(np.uint8), mode="L")
    info = {
        "model": loaded.model_id,
        "model_type": loaded.model.config.model_type,
        "query_size": list(full_query.size),
        "target_fraction": round(float(mask_array.mean()), 6),
        "support_encoding_cached": result.cache_hit,
        "maps": sorted(query.maps),
        "seconds": round(result.seconds, 3),
        "notes": notes,
    }
    return (
        _save_png(mask_image, "mask.png"),
        overlay(query.image, query.mask, [CLASS_COLORS["blue"]]),
        info,
    )


# -------------------------------------------------------------------------------------------------------- examples


def _png(array: np.ndarray, path: Path) -> str:
    Image.fromarray(array).save(path, format="PNG")
    return str(path)


def make_examples(folder: Path = EXAMPLES_DIR, image_size: int = 240, seed: int = 0) -> tuple[list[list], list[str]]:
    """
    Example rows for `gr.Examples` and their labels, rendered from the synthetic benchmark (validation split) into
    `folder` (or a temporary folder when it is not writable) at start-up, so no image is committed. A row is
    [annotation mode, support 1 editor value, support 2 editor value, query files]; the target of each support is
    painted in a brush layer, one colour per class.
    """
    from hf_fss.data.synthetic import NUM_SYNTHETIC_CLASSES, SYNTHETIC_CLASSES, render_synthetic_example

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError:
        folder = Path(tempfile.gettempdir()) / "hf_fss_space_examples"
        folder.mkdir(parents=True, exist_ok=True)

    @functools.cache
    def render(index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_synthetic_example(seed, 1, index, image_size=image_size, ignore_boundary=0)

    @functools.cache
    def image_file(index: int) -> str:
        return _png(render(index)[0], folder / f"synthetic_{index}.png")

    def editor_value(index: int, classes: list[int]) -> dict:
        """The image as background and one layer painting class `classes[j]` in the j-th brush colour."""
        image, label = render(index)
        layer = np.zeros((*label.shape, 4), dtype=np.uint8)
        composite = image.astype(np.float32)
        for color, class_id in zip(CLASS_COLORS.values(), classes):
            region = label == class_id
            layer[region] = (*color, round(255 * BRUSH_OPACITY))
            composite[region] = (1 - BRUSH_OPACITY) * composite[region] + BRUSH_OPACITY * np.asarray(color)
        name = f"synthetic_{index}_" + "_".join(str(c) for c in classes)
        return {
            "background": image_file(index),
            "layers": [_png(layer, folder / f"{name}_layer.png")],
            "composite": _png(composite.astype(np.uint8), folder / f"{name}_composite.png"),
        }

    def label_of(classes: list[int], shot: int, queries: int) -> str:
        names = " + ".join(f"{SYNTHETIC_CLASSES[c]} ({color})" for c, color in zip(classes, CLASS_COLORS))
        return f"{shot}-shot: {names}, {queries} quer{'y' if queries == 1 else 'ies'}"

    n = NUM_SYNTHETIC_CLASSES
    rows, labels = [], []
    # Validation image i has primary class i % 20 + 1, so images i, i + 20, i + 40 show the same class.
    for class_id in (1, 3):
        i = class_id - 1
        rows.append(["brush", editor_value(i, [class_id]), None, [image_file(i + n), image_file(i + 2 * n)]])
        labels.append(label_of([class_id], 1, 2))
    class_id = 2
    i = class_id - 1
    rows.append(["brush", editor_value(i, [class_id]), editor_value(i + n, [class_id]), [image_file(i + 2 * n)]])
    labels.append(label_of([class_id], 2, 1))
    # Two classes at once: a support image with its primary class and a large object of another class.
    for i in range(2 * n):
        image, label = render(i)
        primary = i % n + 1
        ids, counts = np.unique(label, return_counts=True)
        others = [(int(cnt), int(c)) for c, cnt in zip(ids, counts) if c not in (0, 255, primary)]
        if others and max(others)[0] >= 0.03 * label.size:
            other = max(others)[1]
            queries = [image_file(primary - 1 + 2 * n), image_file(other - 1 + 2 * n)]
            rows.append(["brush", editor_value(i, [primary, other]), None, queries])
            labels.append(label_of([primary, other], 1, 2))
            break
    return rows, labels


# -------------------------------------------------------------------------------------------------------- the app


INTRO = """
# Few-shot segmentation with hf_fss

Show the model **what** to segment with one or more *support* images where the object is marked, and it finds the
same class in your *query* images — for classes it never saw in training.

1. **Supports** — upload an image and paint over the object with the brush (the painted pixels are the target).
   Use the tabs for more support images (K-shot). To segment *several classes at once*, paint each class in its
   own colour (blue, magenta, yellow, cyan). Or switch to **box** mode and type the box (x0, y0, x1, y1 in pixels) or
   let the box around your strokes be used.
2. **Queries** — upload one or more images.
3. **Run.** You get the masks over the queries and the method's own intermediate maps (e.g. the prior; NTRENet's
   background and distractor maps) as heat maps. Or start from one of the examples under the Run button.
"""


def model_status(registry: ModelRegistry) -> str:
    if not registry.specs:
        return f"⚠️ **{NO_MODEL_MESSAGE}**"
    return (
        f"Models (`FSS_MODELS`): {', '.join(f'`{html.escape(s)}`' for s in registry.specs)}. Images are limited to "
        f"{MAX_SIDE}px on the longer side; the support encoding is computed once per support set and reused."
    )


def build_demo(specs: list[str] | None = None, examples_dir: Path = EXAMPLES_DIR) -> gr.Blocks:
    """The Gradio app for the models `specs` (default: `resolve_model_specs()`)."""
    registry = ModelRegistry(resolve_model_specs() if specs is None else specs)
    brush = gr.Brush(
        colors=[(_hex(c), BRUSH_OPACITY) for c in CLASS_COLORS.values()],
        default_color=(_hex(CLASS_COLORS["blue"]), BRUSH_OPACITY),
        color_mode="fixed",
    )

    def ui_fn(model_id, mode, queries, *editors_and_boxes, progress=gr.Progress()):  # noqa: B008
        return run_ui(registry, model_id, mode, queries, *editors_and_boxes, progress=progress)

    def segment_fn(support_image, support_mask, query_image, model):
        return segment_api(registry, support_image, support_mask, query_image, model)

    with gr.Blocks(title="hf_fss few-shot segmentation") as demo:
        gr.Markdown(INTRO)
        gr.Markdown(model_status(registry), elem_id="model-status")
        with gr.Row():
            model_box = gr.Dropdown(
                choices=registry.specs,
                value=registry.default,
                label="Model",
                allow_custom_value=False,
                interactive=bool(registry.specs),
                scale=2,
            )
            mode = gr.Radio(
                ["brush", "box"],
                value="brush",
                label="Target marked by",
                info="brush: the painted pixels; box: the typed box, else the box around the strokes",
                scale=1,
            )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                editors, boxes = [], []
                with gr.Tabs():
                    for k in range(MAX_SUPPORTS):
                        with gr.Tab(f"Support {k + 1}"):
                            editors.append(
                                gr.ImageEditor(
                                    label=f"Support {k + 1}: upload, then paint the target",
                                    type="numpy",
                                    image_mode="RGBA",
                                    sources=["upload", "clipboard"],
                                    brush=brush,
                                    eraser=gr.Eraser(),
                                    layers=False,
                                    transforms=(),
                                    format="png",
                                    height=440,
                                    elem_id=f"support-{k + 1}",
                                )
                            )
                            boxes.append(
                                gr.Textbox(
                                    label="Box (box mode)",
                                    placeholder="x0, y0, x1, y1 (pixels; empty = box around the strokes)",
                                    max_lines=1,
                                    elem_id=f"box-{k + 1}",
                                )
                            )
            with gr.Column(scale=2):
                queries = gr.Gallery(
                    label=f"Queries (up to {MAX_QUERIES})",
                    type="filepath",
                    file_types=["image"],
                    interactive=True,
                    columns=3,
                    height=360,
                    elem_id="queries",
                )
                run = gr.Button("Run", variant="primary", elem_id="run")
                rows, labels = make_examples(examples_dir)
                gr.Examples(
                    examples=rows,
                    inputs=[mode, editors[0], editors[1], queries],
                    example_labels=labels,
                    label="Examples from the synthetic benchmark: click one, then Run",
                    cache_examples=False,
                    elem_id="examples",
                )
        details = gr.Markdown(elem_id="details")
        with gr.Row(equal_height=False):
            result = gr.Gallery(
                label="Segmentation (mask over each query)",
                columns=2,
                height=400,
                object_fit="contain",
                format="png",
                elem_id="result",
            )
            maps = gr.Gallery(
                label="Intermediate maps (outputs.maps) as heat maps: blue low, red high",
                columns=4,
                height=400,
                object_fit="contain",
                format="png",
                elem_id="maps",
            )
        with gr.Accordion("Download the masks (PNG of each query's size, 255 = target)", open=False):
            mask_files = gr.File(show_label=False, file_count="multiple", elem_id="masks")

        run.click(
            ui_fn,
            inputs=[model_box, mode, queries, *editors, *boxes],
            outputs=[result, maps, mask_files, details],
            api_visibility="private",
            concurrency_limit=1,
        )

        with gr.Accordion("Mask files / API: one support image, its mask file and a query", open=False):
            gr.Markdown(
                "The same as the `/segment` API endpoint: the mask is an image of the support's size, white = "
                "target, black = background. The result is the query mask (PNG, 0/255, the query's size)."
            )
            with gr.Row():
                # Files rather than gr.Image inputs, so that an unreadable upload gets this app's message.
                api_support = gr.File(label="support_image", file_types=["image"], type="filepath", height=120)
                api_mask = gr.File(
                    label="support_mask (white = target)", file_types=["image"], type="filepath", height=120
                )
                api_query = gr.File(label="query_image", file_types=["image"], type="filepath", height=120)
            api_run = gr.Button("Segment")
            with gr.Row():
                api_mask_out = gr.Image(label="mask", type="filepath", format="png")
                api_overlay = gr.Image(label="overlay", format="png")
                api_info = gr.JSON(label="info")
        api_run.click(
            segment_fn,
            inputs=[api_support, api_mask, api_query, model_box],
            outputs=[api_mask_out, api_overlay, api_info],
            api_name="segment",
            concurrency_limit=1,
        )
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.registry = registry  # for tests and warm-up
    demo.examples_dir = examples_dir
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated Hub repo ids or folders (else FSS_MODELS)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--no-preload", action="store_true", help="load the first model on first use, not now")
    args = parser.parse_args(argv)

    demo = build_demo(resolve_model_specs(args.models))
    registry: ModelRegistry = demo.registry
    if registry.specs and not args.no_preload:
        try:
            registry.get(registry.default)
        except gr.Error as err:  # the app still starts; the error is shown when the model is used
            print(f"warning: {err}", file=sys.stderr)
    elif not registry.specs:
        print(f"warning: {NO_MODEL_MESSAGE}", file=sys.stderr)
    launch(demo, server_name=args.host, server_port=args.port)


def _patient_url_ok(url: str) -> bool:
    """gradio's start-up check that the page is reachable, with a longer timeout than its 3 s for busy machines."""
    import httpx

    for _ in range(10):
        try:
            if httpx.head(url, timeout=30, verify=False).status_code < 400:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch(**kwargs)` serving the example files, tolerant of a slow first page load."""
    try:
        from gradio import networking

        networking.url_ok = _patient_url_ok
    except (ImportError, AttributeError):
        pass
    examples = [getattr(demo, "examples_dir", EXAMPLES_DIR), Path(tempfile.gettempdir()) / "hf_fss_space_examples"]
    kwargs.setdefault("allowed_paths", [str(path) for path in examples])
    kwargs.setdefault("show_error", True)
    return demo.launch(**kwargs)


if __name__ == "__main__":
    main()
