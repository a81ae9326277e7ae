"""
Gradio Space of hf_fss: few-shot segmentation in the browser and over an API, built on the
`"few-shot-segmentation"` pipeline (which does all loading, preprocessing, support encoding and the class merge);
this file holds only the page layout, the brush-stroke parsing and the rendering. See README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import gradio as gr
import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
try:  # installed (pip install -e .), or copied next to app.py in a Space
    import hf_fss  # noqa: F401
except ImportError:  # a checkout of the repository that is not installed
    sys.path.insert(0, str(REPO_ROOT))
from transformers import pipeline  # noqa: E402

from hf_fss import FewShotSegmentationPipeline  # noqa: E402

DEFAULT_MODEL_DIR = REPO_ROOT / "outputs" / "quickstart"
MAX_SUPPORTS, MAX_QUERIES, CACHE_SIZE = 5, 8, 8
CLASS_COLORS = {"blue": (30, 90, 255), "magenta": (235, 40, 220), "yellow": (255, 215, 0), "cyan": (0, 215, 215)}
"""Brush colours = classes: paint each class in its own colour to segment several classes at once."""
BRUSH_OPACITY = 0.6
NO_MODEL_MESSAGE = (
    "No model is configured. Start the app with FSS_MODELS=<Hub repo id or folder>[,...] python spaces_app/app.py "
    "(a folder written by save_pretrained), or run the quickstart (accelerate launch scripts/train.py), which saves "
    "outputs/quickstart, used by default."
)


def examples_dir() -> Path:
    """Where the example images are rendered: `$FSS_EXAMPLES_DIR`, else `$XDG_CACHE_HOME/hf_fss/space_examples`."""
    if os.environ.get("FSS_EXAMPLES_DIR"):
        return Path(os.environ["FSS_EXAMPLES_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "hf_fss" / "space_examples"


# ---------------------------------------------------------------------------------------------- models and cache


def resolve_model_specs(value: str | None = None) -> list[str]:
    """`value` or `$FSS_MODELS` (comma-separated Hub ids or folders), else the quickstart's model, else none."""
    specs = [s.strip() for s in (value if value is not None else os.environ.get("FSS_MODELS", "")).split(",")]
    specs = [s for s in specs if s]
    if not specs and _model_folder(DEFAULT_MODEL_DIR) is not None:
        specs = [str(DEFAULT_MODEL_DIR.relative_to(REPO_ROOT))]
    return specs


def _model_folder(path: Path) -> Path | None:
    """`path` if it holds a saved model, else its `best/` or `final/` model (a training run folder), else None."""
    return next((c for c in (path, path / "best", path / "final") if (c / "config.json").is_file()), None)


def _local_path(spec: str) -> Path | None:
    """The folder `spec` names (from the working directory, else the repository), or None for a Hub id."""
    path = Path(spec).expanduser()
    for folder in (path, None if path.is_absolute() else REPO_ROOT / path):
        if folder is not None and folder.is_dir():
            return _model_folder(folder) or folder
    return None


class ModelRegistry:
    """The pipelines of the models `specs`, each loaded on first use, and one cache of encoded support sets."""

    def __init__(self, specs: list[str]):
        self.specs, self._pipes, self._lock = list(specs), {}, threading.Lock()
        self._encodings: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def default(self) -> str | None:
        return self.specs[0] if self.specs else None

    def get(self, spec: str | None) -> FewShotSegmentationPipeline:
        if not self.specs:
            raise gr.Error(NO_MODEL_MESSAGE, title="No model")
        spec = spec or self.default
        if spec not in self.specs:
            raise gr.Error(f"Unknown model {html.escape(str(spec))!r}; choose one of {self.specs}", title="Model")
        with self._lock:
            if spec not in self._pipes:
                self._pipes[spec] = load_pipeline(spec)
            return self._pipes[spec]

    def encode(self, spec: str, **supports: Any) -> tuple[Any, bool]:
        """`pipe.encode_supports(**supports)`, reused for the same model and support files / arrays (LRU)."""
        digest = hashlib.sha256(repr(spec).encode())
        _digest(supports, digest)
        key = digest.hexdigest()
        with self._lock:
            if key in self._encodings:
                self.hits += 1
                self._encodings.move_to_end(key)
                return self._encodings[key], True
        encoding = self.get(spec).encode_supports(**supports)
        with self._lock:
            self.misses += 1
            self._encodings[key] = encoding
            while len(self._encodings) > CACHE_SIZE:
                self._encodings.popitem(last=False)
        return encoding, False


def _digest(value: Any, digest) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            digest.update(repr(key).encode())
            _digest(value[key], digest)
    elif isinstance(value, list | tuple) and not all(isinstance(v, int | float) for v in value):
        for item in value:
            _digest(item, digest)
    elif isinstance(value, str | os.PathLike) and os.path.isfile(value):
        digest.update(Path(value).read_bytes())
    elif isinstance(value, np.ndarray):
        digest.update(repr((value.shape, value.dtype.str)).encode() + np.ascontiguousarray(value).tobytes())
    else:
        digest.update(repr(value).encode())


def load_pipeline(spec: str) -> FewShotSegmentationPipeline:
    """The pipeline of an hf_fss model folder or Hub repo id (any failure becomes a `gr.Error`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pipe = pipeline("few-shot-segmentation", model=str(_local_path(spec) or spec), device=device)
    except Exception as err:  # noqa: BLE001 - every loading failure is reported the same way
        message = html.escape(f"Could not load model {spec!r}: {type(err).__name__}: {err}")
        raise gr.Error(message, title="Model") from err
    return pipe


def _input_error(err: ValueError, renames: dict[str, str] | None = None) -> gr.Error:
    """The pipeline's ValueError, with its argument names replaced by the app's (`images` -> `query_image`)."""
    message = str(err)
    for old, new in (renames or {}).items():
        message = message.replace(f"`{old}", f"`{new}")
    return gr.Error(html.escape(message, quote=False), title="Input")


# ---------------------------------------------------------------------------------------------- brush strokes


def strokes_by_class(editor: dict | None) -> tuple[Any, dict[int, np.ndarray]]:
    """An ImageEditor value -> (background, {class index: 0/1 mask}): painted pixels by nearest brush colour."""
    if not editor or editor.get("background") is None:
        return None, {}
    background = editor["background"]
    height, width = np.asarray(background).shape[:2]
    palette = np.asarray(list(CLASS_COLORS.values()), dtype=np.float32)
    classes: dict[int, np.ndarray] = {}
    for layer in editor.get("layers") or []:
        layer = np.asarray(layer) if layer is not None else np.zeros((0,))
        if layer.ndim != 3 or layer.shape[-1] != 4 or not (layer[..., 3] > 0).any():
            continue
        if layer.shape[:2] != (height, width):
            layer = cv2.resize(layer, (width, height), interpolation=cv2.INTER_NEAREST)
        painted = layer[..., 3] > 0
        nearest = ((layer[..., :3][painted].astype(np.float32)[:, None] - palette) ** 2).sum(-1).argmin(1)
        for index in np.unique(nearest):
            mask = classes.setdefault(int(index), np.zeros((height, width), dtype=np.uint8))
            mask[painted] |= (nearest == index).astype(np.uint8)
    return background, classes


def parse_box(text: str | None, what: str) -> tuple[float, float, float, float] | None:
    """`"x0, y0, x1, y1"` (commas or spaces) -> a box, `None` when empty; `gr.Error` for anything else."""
    if text is None or not str(text).strip():
        return None
    try:
        values = [float(p) for p in str(text).replace(",", " ").replace(";", " ").split()]
    except ValueError:
        values = []
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise gr.Error(f"{what}: a box is four numbers x0, y0, x1, y1 with x0 < x1 and y0 < y1, got {text!r}")
    return tuple(values)


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def collect_episodes(mode: str, editors: list, boxes: list) -> dict[int, tuple[list, list]]:
    """Class index -> (support images, annotations): brush strokes, or in box mode the typed box / strokes' box."""
    episodes: dict[int, tuple[list, list]] = {}
    for k, (editor, box_text) in enumerate(zip(editors, boxes)):
        what = f"Support {k + 1}"
        background, classes = strokes_by_class(editor)
        box = parse_box(box_text, f"{what} box") if mode == "box" else None
        if background is None:
            if classes or box is not None:
                raise gr.Error(f"{what} has a mark but no image: upload the support image first.", title="Support")
            continue
        if not classes and box is None:
            hint = ", or type its box as x0, y0, x1, y1" if mode == "box" else " (or switch to box mode)"
            raise gr.Error(f"{what} has an image but no target marked: paint over the object{hint}.", title="Mask")
        annotations = {0: box} if box is not None else classes
        for c, annotation in annotations.items():
            images, masks = episodes.setdefault(c, ([], []))
            images.append(background)
            masks.append(_box_of(annotation) if mode == "box" and box is None else annotation)
    if not episodes:
        raise gr.Error("No support image: upload a support image and paint the target on it.", title="Support")
    return dict(sorted(episodes.items()))


# --------------------------------------------------------------------------------------------------- rendering


def overlay(image: np.ndarray, label: np.ndarray, colors: list[tuple[int, int, int]]) -> Image.Image:
    """Tint and outline each class `c` (label == c + 1) of an RGB image in `colors[c]`."""
    out = image.astype(np.float32)
    for index, color in enumerate(colors):
        out[label == index + 1] = 0.45 * out[label == index + 1] + 0.55 * np.asarray(color, dtype=np.float32)
    out = out.astype(np.uint8)
    for index, color in enumerate(colors):
        contours, _ = cv2.findContours(
            (label == index + 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), max(1, round(max(label.shape) / 300)))
    return Image.fromarray(out)


def heat_map(image: np.ndarray, values: np.ndarray) -> Image.Image:
    """A map in [0, 1] as a turbo-coloured heat map over the dimmed grey query."""
    colored = cv2.applyColorMap((np.clip(values, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
    gray = image.astype(np.float32).mean(axis=-1, keepdims=True)
    return Image.fromarray((0.7 * colored + 0.3 * gray).clip(0, 255).astype(np.uint8))


def _save_png(array: np.ndarray, name: str) -> str:
    folder = Path(tempfile.gettempdir()) / "hf_fss_space" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name, format="PNG")
    return str(folder / name)


def _rgb(pipe: FewShotSegmentationPipeline, image: Any, name: str) -> np.ndarray:
    """The image as the pipeline sees it (transparency composited onto white), uint8, for drawing."""
    return pipe.image_processor.to_rgb_array(image, name).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------- endpoints


def run_ui(registry: ModelRegistry, model_id, mode, queries, *editors_and_boxes):
    """The Run button: supports from the editors, queries from the gallery -> overlays, heat maps, mask files."""
    pipe = registry.get(model_id)
    episodes = collect_episodes(mode, list(editors_and_boxes[:MAX_SUPPORTS]), list(editors_and_boxes[MAX_SUPPORTS:]))
    paths = [item[0] if isinstance(item, list | tuple) else item for item in (queries or [])][:MAX_QUERIES]
    if not paths:
        raise gr.Error("No query image: upload one or more images to segment.", title="Query")
    names = [list(CLASS_COLORS)[c] for c in episodes]
    colors = [CLASS_COLORS[name] for name in names]
    start = time.perf_counter()
    try:
        encoding, cached = registry.encode(model_id or registry.default, supports=dict(zip(names, episodes.values())))
        results = pipe(list(paths), support_encoding=encoding, return_maps=True, output_type="numpy")
    except ValueError as err:
        raise _input_error(err, {"images": "queries"}) from err
    gallery, maps, files = [], [], []
    for i, (path, result) in enumerate(zip(paths, results)):
        image, qname = _rgb(pipe, path, f"Query {i + 1}"), Path(str(path)).stem
        parts = [f"{n} {(result['mask'] == c + 1).mean():.1%}" for c, n in enumerate(names)]
        gallery.append((overlay(image, result["mask"], colors), f"{i + 1}. {qname}: {', '.join(parts)}"))
        for c, name in enumerate(names):
            files.append(_save_png((result["mask"] == c + 1).astype(np.uint8) * 255, f"{qname}_mask_{name}.png"))
            for map_name, values in result["maps"].items():
                values = values[c] if values.ndim == 3 else values
                maps.append(
                    (heat_map(image, values), f"{i + 1}. {map_name}" + (f" [{name}]" if len(names) > 1 else ""))
                )
    shots = ", ".join(f"{n}: {len(episodes[c][0])}-shot" for n, c in zip(names, episodes))
    details = (
        f"**Model** `{html.escape(str(model_id or registry.default))}` ({pipe.model.config.model_type}, "
        f"{pipe.image_processor.image_size}px) · {shots} · {len(paths)} quer{'y' if len(paths) == 1 else 'ies'} in "
        f"{time.perf_counter() - start:.2f} s · support encoding {'reused from cache' if cached else 'computed'}"
    )
    return gallery, maps, files, details + ("" if maps else " · this model returns no intermediate maps")


def segment_api(registry: ModelRegistry, support_image, support_mask, query_image, model=None):
    """
    `/segment`: a support image, its mask (white = target) and a query -> the pipeline's query mask as a PNG of the
    query's size (0 / 255), the mask drawn over the query, and a JSON summary.
    """
    model = model or registry.default
    pipe, start = registry.get(model), time.perf_counter()
    names = {"images": "query_image"}
    try:
        encoding, cached = registry.encode(model, support_image=support_image, support_mask=support_mask)
        if query_image is None:
            raise ValueError("`images` is missing: upload the image to segment")
        result = pipe(query_image, support_encoding=encoding, return_maps=True, output_type="numpy")
    except ValueError as err:
        raise _input_error(err, names) from err
    mask = result["mask"]
    info = {
        "model": model,
        "model_type": pipe.model.config.model_type,
        "query_size": [mask.shape[1], mask.shape[0]],
        "target_fraction": round(float(mask.mean()), 6),
        "support_encoding_cached": cached,
        "maps": sorted(result["maps"]),
        "seconds": round(time.perf_counter() - start, 3),
    }
    image = _rgb(pipe, query_image, "query_image")
    return _save_png(mask * 255, "mask.png"), overlay(image, mask, [CLASS_COLORS["blue"]]), info


# ---------------------------------------------------------------------------------------------------- examples


def make_examples(folder: Path, size: int = 240) -> tuple[list[list], list[str]]:
    """
    `gr.Examples` rows [mode, support 1 editor, support 2 editor, queries] and labels, rendered from the synthetic
    benchmark's validation split into `folder` (a cache, never the source tree); targets painted by brush colour.
    """
    from hf_fss.data.synthetic import NUM_SYNTHETIC_CLASSES as N
    from hf_fss.data.synthetic import SYNTHETIC_CLASSES, render_synthetic_example

    folder.mkdir(parents=True, exist_ok=True)
    colors = list(CLASS_COLORS.values())

    def png(array: np.ndarray, name: str) -> str:
        if not (folder / name).is_file():
            Image.fromarray(array).save(folder / name, format="PNG")
        return str(folder / name)

    def render(index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_synthetic_example(0, 1, index, image_size=size, ignore_boundary=0)

    def image_file(index: int) -> str:
        return png(render(index)[0], f"synthetic_{index}.png")

    def editor(index: int, classes: list[int]) -> dict:
        image, label = render(index)
        layer, composite = np.zeros((*label.shape, 4), np.uint8), image.astype(np.float32)
        for color, class_id in zip(colors, classes):
            layer[label == class_id] = (*color, round(255 * BRUSH_OPACITY))
            composite[label == class_id] = (1 - BRUSH_OPACITY) * composite[
                label == class_id
            ] + BRUSH_OPACITY * np.asarray(color)
        name = f"synthetic_{index}_{'_'.join(map(str, classes))}"
        return {
            "background": image_file(index),
            "layers": [png(layer, f"{name}_layer.png")],
            "composite": png(composite.astype(np.uint8), f"{name}_composite.png"),
        }

    def label(classes: list[int], shot: int, queries: int) -> str:
        names = " + ".join(f"{SYNTHETIC_CLASSES[c]} ({color})" for c, color in zip(classes, CLASS_COLORS))
        return f"{shot}-shot: {names}, {queries} quer{'y' if queries == 1 else 'ies'}"

    # Validation image i has primary class i % N + 1, so images i, i + N, i + 2N show the same class.
    rows = [["brush", editor(c - 1, [c]), None, [image_file(c - 1 + N), image_file(c - 1 + 2 * N)]] for c in (1, 3)]
    rows.append(["brush", editor(1, [2]), editor(1 + N, [2]), [image_file(1 + 2 * N)]])
    labels = [label([1], 1, 2), label([3], 1, 2), label([2], 2, 1)]
    for i in range(2 * N):  # two classes at once: a support with its primary class and a large other object
        ids, counts = np.unique(render(i)[1], return_counts=True)
        others = [(n, int(c)) for c, n in zip(ids, counts) if c not in (0, 255, i % N + 1) and n >= 0.03 * size**2]
        if others:
            classes = [i % N + 1, max(others)[1]]
            rows.append(["brush", editor(i, classes), None, [image_file(c - 1 + 2 * N) for c in classes]])
            labels.append(label(classes, 1, 2))
            break
    return rows, labels


# ------------------------------------------------------------------------------------------------------ the app

INTRO = """
# Few-shot segmentation with hf_fss

Show the model **what** to segment with one or more *support* images where the object is marked, and it finds the
same class in your *query* images, for classes it never saw in training.

1. **Supports**: upload an image and paint over the object (the painted pixels are the target). More tabs = more
   support images (K-shot). Paint each class in its own colour (blue, magenta, yellow, cyan) to segment several
   classes at once. In **box** mode, type the box (x0, y0, x1, y1 in pixels) or the box around the strokes is used.
2. **Queries**: upload one or more images. 3. **Run**: masks over the queries and the method's intermediate maps
   (e.g. the prior; NTRENet's background and distractor maps) as heat maps. Or start from an example.
"""


def build_demo(specs: list[str] | None = None, examples: Path | None = None) -> gr.Blocks:
    """The Gradio app for the models `specs` (default: `resolve_model_specs()`), examples rendered in `examples`."""
    registry = ModelRegistry(resolve_model_specs() if specs is None else specs)
    examples = examples or examples_dir()
    palette = [("#{:02x}{:02x}{:02x}".format(*c), BRUSH_OPACITY) for c in CLASS_COLORS.values()]
    brush = gr.Brush(colors=palette, default_color=palette[0], color_mode="fixed")
    status = f"Models (`FSS_MODELS`): {', '.join(f'`{s}`' for s in registry.specs)}" if registry.specs else None
    with gr.Blocks(title="hf_fss few-shot segmentation") as demo:
        gr.Markdown(INTRO)
        gr.Markdown(status or f"⚠️ **{NO_MODEL_MESSAGE}**", elem_id="model-status")
        with gr.Row():
            model_box = gr.Dropdown(registry.specs, value=registry.default, label="Model", scale=2)
            mode = gr.Radio(["brush", "box"], value="brush", label="Target marked by", scale=1)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3), gr.Tabs():
                editors, boxes = [], []
                for k in range(MAX_SUPPORTS):
                    with gr.Tab(f"Support {k + 1}"):
                        editors.append(gr.ImageEditor(
                            label=f"Support {k + 1}: upload, then paint the target", type="numpy", image_mode="RGBA",
                            sources=["upload", "clipboard"], brush=brush, eraser=gr.Eraser(), layers=False,
                            transforms=(), format="png", height=440, elem_id=f"support-{k + 1}",
                        ))  # fmt: skip
                        boxes.append(gr.Textbox(label="Box (box mode)", placeholder="x0, y0, x1, y1", max_lines=1))
            with gr.Column(scale=2):
                queries = gr.Gallery(label=f"Queries (up to {MAX_QUERIES})", type="filepath", file_types=["image"],
                                     interactive=True, columns=3, height=360, elem_id="queries")  # fmt: skip
                run = gr.Button("Run", variant="primary", elem_id="run")
                rows, labels = make_examples(examples)
                gr.Examples(rows, [mode, editors[0], editors[1], queries], example_labels=labels, elem_id="examples",
                            label="Examples from the synthetic benchmark: click one, then Run")  # fmt: skip
        details = gr.Markdown(elem_id="details")
        with gr.Row(equal_height=False):
            result = gr.Gallery(label="Masks over the queries", columns=2, height=400, format="png", elem_id="result")
            maps = gr.Gallery(label="Intermediate maps (blue 0, red 1)", columns=4, height=400, format="png",
                              elem_id="maps")  # fmt: skip
        with gr.Accordion("Download the masks (PNG of each query's size, 255 = target)", open=False):
            mask_files = gr.File(show_label=False, file_count="multiple", elem_id="masks")
        run.click(lambda *args: run_ui(registry, *args), [model_box, mode, queries, *editors, *boxes],
                  [result, maps, mask_files, details], api_visibility="private", concurrency_limit=1)  # fmt: skip
        with gr.Accordion("Mask files / API: one support image, its mask and a query", open=False):
            with gr.Row():
                api_inputs = [gr.File(label=n, file_types=["image"], type="filepath", height=120)
                              for n in ("support_image", "support_mask (white = target)", "query_image")]  # fmt: skip
            api_run = gr.Button("Segment")
            with gr.Row():
                api_outputs = [gr.Image(label="mask", type="filepath", format="png"),
                               gr.Image(label="overlay", format="png"), gr.JSON(label="info")]  # fmt: skip

        def segment(support_image, support_mask, query_image, model):
            return segment_api(registry, support_image, support_mask, query_image, model)

        api_run.click(segment, [*api_inputs, model_box], api_outputs, api_name="segment", concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.registry, demo.examples_dir = registry, examples  # for main(), tests and launch()
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch(**kwargs)`, allowed to serve the rendered example files."""
    kwargs.setdefault("allowed_paths", [str(demo.examples_dir)])
    return demo.launch(show_error=True, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hf_fss few-shot segmentation demo")
    parser.add_argument("--models", default=None, help="comma-separated Hub repo ids or folders (else FSS_MODELS)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--no-preload", action="store_true", help="load the first model on first use, not now")
    args = parser.parse_args(argv)
    demo = build_demo(resolve_model_specs(args.models))
    try:
        if not args.no_preload:
            demo.registry.get(None)
    except gr.Error as err:  # the app still starts; the page says what is missing
        print(f"warning: {err.message}", file=sys.stderr)
    launch(demo, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
