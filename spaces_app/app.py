"""Gradio Space of hf_fss (see README.md): layout, brush strokes and rendering around the few-shot pipeline."""

import contextlib
import functools
import hashlib
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import huggingface_hub
import numpy as np
import torch
from PIL import Image

try:  # hf_fss installed (pip install -e ".[space]"), or copied next to app.py in a Space; no sys.path edit
    import gradio as gr

    from hf_fss import FewShotSegmentationPipeline, utils
    from hf_fss.loading import check_fss_model_folder
except ModuleNotFoundError as err:
    extra = "[space]" if err.name == "gradio" else ""
    sys.exit(f'app.py: error: {err.name} is not installed; run `pip install -e ".{extra}"` in the repository first')
from transformers import pipeline  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODEL_DIR, DEVICE = REPO_ROOT / "outputs" / "quickstart", "cuda" if torch.cuda.is_available() else "cpu"
MAX_SUPPORTS, MAX_QUERIES, CACHE_SIZE, BRUSH_OPACITY, CONCURRENCY, QUEUE_SIZE = 5, 8, 8, 0.6, 1, 64
OUTPUT_DIR, OUTPUT_MAX_AGE_S, HUB_TIMEOUT_S = Path(tempfile.gettempdir()) / "hf_fss_space", 3600, 5.0
PIPE_OPTIONS = {"return_maps": True, "return_support_predictions": True, "output_type": "numpy"}
SCALE, ORANGE = "colour bar 0 (blue) to 1 (red)", (255, 140, 0)
CLASS_COLORS = {"blue": (30, 90, 255), "magenta": (235, 40, 220), "yellow": (255, 215, 0), "cyan": (0, 215, 215)}
# Without FSS_MODELS, the Space's default when the Hub is reachable: the training-free cosine prior on DINOv2 features
# (hf_fss's zero-training baseline for real photos; its first start downloads the backbone's weights).
TRAINING_FREE_BACKBONE = "facebook/dinov2-small"
TRAINING_FREE_SPEC = f"training-free cosine prior on {TRAINING_FREE_BACKBONE}"
NO_MODEL_MESSAGE = (
    "No model is configured. Start the app with FSS_MODELS=<Hub repo id or saved folder>[,...], with Hub access "
    "(the training-free DINOv2 cosine prior is offered then), or after the quickstart (accelerate launch "
    "scripts/train.py), whose outputs/quickstart is offered by default."
)


def examples_dir() -> Path:
    """Where the example images are rendered: `$FSS_EXAMPLES_DIR`, else `$XDG_CACHE_HOME/hf_fss/space_examples`."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_fss" / "space_examples"
    return Path(os.environ.get("FSS_EXAMPLES_DIR") or cache).expanduser()


def resolve_precision(value: str | None = None) -> str:
    """`value` or `$FSS_PRECISION`: `float32` (the default) or `bfloat16` / `float16`, the autocast dtype every model
    runs in (the pipeline's `precision`); anything else is a one-line `ValueError` naming the variable."""
    precision = (value if value is not None else os.environ.get("FSS_PRECISION", "")).strip() or "float32"
    utils.check_precision(precision, DEVICE, name="FSS_PRECISION")
    return precision


def resolve_model_specs(value: str | None = None) -> list[str]:
    """`value` or `$FSS_MODELS` (comma-separated Hub ids or folders), else the quickstart's model, else none."""
    specs = [s.strip() for s in (value if value is not None else os.environ.get("FSS_MODELS", "")).split(",")]
    # A run folder's marker config.json is no model: the quickstart is offered once it saved best/ or final/.
    if not any(specs) and utils.is_model_folder(_local_path(str(DEFAULT_MODEL_DIR)) or DEFAULT_MODEL_DIR):
        return [str(DEFAULT_MODEL_DIR.relative_to(REPO_ROOT))]
    return [s for s in specs if s]


def hub_reachable(repo_id: str = TRAINING_FREE_BACKBONE) -> bool:
    """Whether `repo_id` can be loaded: in the local Hub cache, else the Hub answers within `HUB_TIMEOUT_S`."""
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    try:
        huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - offline, DNS, timeout, HTTP error: all mean "not reachable"
        return False
    return True


def training_free_model():
    """The cosine prior on `TRAINING_FREE_BACKBONE` with its pretrained weights (downloaded on first use)."""
    from hf_fss import CosinePriorConfig, CosinePriorModel

    model = CosinePriorModel(CosinePriorConfig(backbone=TRAINING_FREE_BACKBONE, use_pretrained_backbone=True))
    model.load_pretrained_extractors()
    return model.eval()


def default_models() -> tuple[list[str], dict, str | None]:
    """
    The Space's models, their preloaded pipelines and a line saying why the default is not offered (else None).
    `FSS_MODELS` when set; else the training-free cosine prior on DINOv2 (`TRAINING_FREE_SPEC`) when the Hub is
    reachable, then the quickstart model if there is one; else (Hub unreachable, or loading it failed) the quickstart
    model as before.
    """
    specs = resolve_model_specs()
    if any(s.strip() for s in os.environ.get("FSS_MODELS", "").split(",")):
        return specs, {}, None
    fallback = "the quickstart model is offered instead" if specs else "no model is offered"
    if not hub_reachable():
        why = f"the Hub is not reachable for {TRAINING_FREE_BACKBONE}"
        return specs, {}, f"The training-free cosine prior is not offered: {why}; {fallback}."
    try:
        model = training_free_model()
        pipe = pipeline("few-shot-segmentation", model=model, device=DEVICE, precision=resolve_precision())
    except Exception as err:  # noqa: BLE001 - any loading failure falls back the same way, and says why
        why = f"loading {TRAINING_FREE_BACKBONE} failed ({type(err).__name__}: {' '.join(str(err).split())})"
        return specs, {}, f"The training-free cosine prior is not offered: {why}; {fallback}."
    return [TRAINING_FREE_SPEC, *specs], {TRAINING_FREE_SPEC: pipe}, None


def _local_path(spec: str) -> Path | None:
    """The folder `spec` names (from the working dir, else the repo; a run folder: its best/, else final/, the rule
    of `hf_fss.utils.run_folder_model` that evaluate.py and compare.py follow too), or None."""
    path = Path(spec).expanduser()
    for f in [path] if path.is_absolute() else [path, REPO_ROOT / path]:
        if f.is_dir():
            return Path(utils.resolve_model_path(f)) if utils.run_folder_model(f) else f  # the choice is logged


class ModelRegistry:
    """The pipelines of the models `specs`, each loaded on first use, and an LRU cache of encoded support sets."""

    def __init__(self, specs: list[str], pipes: dict | None = None):
        self.specs, self.default = list(specs), (specs[0] if specs else None)
        self._pipes, self._encodings, self._lock, self.hits = dict(pipes or {}), {}, threading.Lock(), 0

    def get(self, spec: str | None) -> FewShotSegmentationPipeline:
        spec = spec or self.default
        if spec not in self.specs:
            raise user_error(f"Unknown model {spec!r}; choose one of {self.specs}" if self.specs else NO_MODEL_MESSAGE)
        with self._lock:  # loaded once
            return self._pipes[spec] if spec in self._pipes else self._pipes.setdefault(spec, load_pipeline(spec))

    def encode(self, spec: str, **supports) -> tuple[object, bool]:
        """`pipe.encode_supports(**supports)`, reused for the same model and support files / arrays."""
        key = hashlib.sha256(pickle.dumps([spec, _content(supports)])).hexdigest()
        with self._lock:
            if (hit := self._encodings.pop(key, None)) is not None:  # put back as the most recently used
                self.hits, self._encodings[key] = self.hits + 1, hit
                return hit, True
        encoding = self.get(spec).encode_supports(**supports)
        with self._lock:
            self._encodings[key] = encoding
            if len(self._encodings) > CACHE_SIZE:
                self._encodings.pop(next(iter(self._encodings)))  # the least recently used
        return encoding, False


def _content(value: object) -> object:
    """Support inputs with files replaced by their bytes, for the cache key."""
    if isinstance(value, str | os.PathLike) and os.path.isfile(value):
        return Path(value).read_bytes()
    if isinstance(value, dict | list | tuple):
        return {k: _content(v) for k, v in value.items()} if isinstance(value, dict) else [_content(v) for v in value]
    return value


def user_error(message: str, title: str = "Model") -> gr.Error:
    """A `gr.Error` in plain text, shown until closed, logged as one line (the input is wrong, not the server)."""
    print(f"hf_fss space: {title} error: {message}", file=sys.stderr, flush=True)
    return gr.Error(message, title=title, duration=None, print_exception=False)


def load_pipeline(spec: str) -> FewShotSegmentationPipeline:
    """The pipeline of a model folder or Hub repo id; a missing folder or unreachable repo fails within seconds."""
    local = _local_path(spec)
    if local is None and utils.looks_local(spec):
        raise user_error(f"Model folder {spec!r} not found (from {os.getcwd()} or {REPO_ROOT}); check FSS_MODELS.")
    try:
        if local is None and not isinstance(huggingface_hub.try_to_load_from_cache(spec, "config.json"), str):
            huggingface_hub.model_info(spec, timeout=HUB_TIMEOUT_S)  # reachable? (else no 20 s of retries)
        # A local folder holding no model is named as such, not reported as a config.json without "model_type".
        model = utils.resolve_model_path(local) if local else spec
        check_fss_model_folder(model)  # a plain transformers folder or a config.json without model_type, in one line
        return pipeline("few-shot-segmentation", model=model, device=DEVICE, precision=resolve_precision())
    except Exception as err:  # noqa: BLE001 - every loading failure is reported the same way
        hint = "" if local else " (check the Hub repo id, the network, and HF_TOKEN for a private repo)"
        raise user_error(f"Could not load model {spec!r}{hint}: {type(err).__name__}: {err}") from err


def strokes_by_class(editor: dict | None, what: str = "Support") -> tuple[object, dict[int, np.ndarray]]:
    """An ImageEditor value -> (background, {class index: 0/1 mask}) by nearest brush colour (layers never resized)."""
    if not editor or editor.get("background") is None:
        return None, {}
    height, width = np.asarray(editor["background"]).shape[:2]
    palette, classes = np.asarray(list(CLASS_COLORS.values()), dtype=np.float32), {}
    layers = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
    for layer in [layer for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]:
        if layer.shape[:2] != (height, width):
            sizes = f"{layer.shape[0]}x{layer.shape[1]} but its image {height}x{width} (h x w)"
            raise user_error(f"{what}: the painted layer has size {sizes}: paint on the image itself.", "Mask")
        painted = layer[..., 3] > 0
        nearest = ((layer[..., :3][painted].astype(np.float32)[:, None] - palette) ** 2).sum(-1).argmin(1)
        for index in np.unique(nearest):
            mask = classes.setdefault(int(index), np.zeros((height, width), dtype=np.uint8))
            mask[painted] |= (nearest == index).astype(np.uint8)
    return editor["background"], classes


def parse_box(text: str | None, what: str | None) -> tuple[float, float, float, float] | None:
    """`"x0, y0, x1, y1"` -> a box, `None` when empty; else a `gr.Error` naming `what` (`None` without `what`)."""
    parts = str(text or "").replace(",", " ").replace(";", " ").split()
    values = [float(p) for p in parts if p.lstrip("-").replace(".", "", 1).isdigit()]
    bad = parts and (len(parts) != 4 or len(values) != 4 or values[2] <= values[0] or values[3] <= values[1])
    if bad and what is not None:  # (without `what`, a preview while typing: nothing yet)
        raise user_error(f"{what}: a box is four numbers x0, y0, x1, y1 with x0 < x1 and y0 < y1, got {text!r}", "Box")
    return tuple(values) if parts and not bad else None


def collect_episodes(mode: str, editors: list, boxes: list) -> dict[int, tuple[list, list]]:
    """Class index -> (support images, annotations): brush strokes, or in box mode the typed box / strokes' box."""
    episodes: dict[int, tuple[list, list]] = {}
    for k, (editor, box_text) in enumerate(zip(editors, boxes)):
        background, classes = strokes_by_class(editor, what := f"Support {k + 1}")
        box = parse_box(box_text, f"{what} box") if mode == "box" else None
        if background is None and (classes or box is not None):
            raise user_error(f"{what} has a mark but no image: upload the support image first.", "Support")
        if background is not None and not classes and box is None:
            hint = ", or type its box as x0, y0, x1, y1" if mode == "box" else " (or switch to box mode)"
            raise user_error(f"{what} has an image but no target marked: paint over the object{hint}.", "Mask")
        for c, annotation in ({0: box} if box is not None else classes).items():  # none without an image
            episodes.setdefault(c, ([], []))[0].append(background)
            if mode == "box" and box is None:  # the box around the strokes
                ys, xs = np.nonzero(annotation)
                annotation = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            episodes[c][1].append(annotation)
    if not episodes:
        raise user_error("No support image: upload a support image and paint the target on it.", "Support")
    return dict(sorted(episodes.items()))


def overlay(image: np.ndarray, label: np.ndarray, colors: list[tuple[int, int, int]]) -> Image.Image:
    """Tint and outline each class `c` (label == c + 1) of an RGB image in `colors[c]`."""
    out, width = image.astype(np.float32), max(1, round(max(label.shape) / 300))
    for index, color in enumerate(colors):
        out[label == index + 1] = 0.45 * out[label == index + 1] + 0.55 * np.asarray(color, dtype=np.float32)
    out, method = out.astype(np.uint8), (cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    for index, color in enumerate(colors):
        cv2.drawContours(out, cv2.findContours((label == index + 1).astype(np.uint8), *method)[0], -1, color, width)
    return Image.fromarray(out)


def map_caption(model, key: str) -> str:
    """The model's own meaning of a map (`output_maps`), and how it is drawn: a binary mask or a colour scale."""
    meaning = model.output_maps.get(key, key)
    return f"{meaning}: binary mask (orange)" if key in model.binary_maps else f"{meaning}, {SCALE}"


def heat_map(image: np.ndarray, values: np.ndarray, binary: bool = False) -> Image.Image:
    """A map over the grey query: a 0/1 mask in orange if `binary`, else values in [0, 1] with a colour bar below."""
    gray, strip = image.astype(np.float32).mean(axis=-1, keepdims=True), max(14, values.shape[0] // 12)
    if binary:  # a 0/1 mask; its caption is the legend
        return Image.fromarray(np.where(values[..., None] >= 0.5, ORANGE, 0.6 * gray + 40).astype(np.uint8))
    ramp = np.concatenate([np.clip(values, 0, 1), np.linspace(0, 1, values.shape[1])[None].repeat(strip, 0)])
    out = cv2.applyColorMap((ramp * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1].astype(np.float32)
    out[: len(values)] = 0.7 * out[: len(values)] + 0.3 * gray
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))  # the caption names the colour bar's ends


def _output_folder() -> Path:
    """A new folder for one response's files (never overwritten while served); old responses' folders are removed."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUTPUT_DIR.iterdir():
        with contextlib.suppress(OSError):  # another request may be removing it too
            if time.time() - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(old)
    return Path(tempfile.mkdtemp(dir=OUTPUT_DIR))


def _save_png(folder: Path, name: str, image: np.ndarray | Image.Image) -> str:
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(folder / name, format="PNG")
    return str(folder / name)


def box_preview(editor: dict | None, text: str | None):
    """The support with its typed box drawn on it, once the box is four valid numbers (else hidden)."""
    if (background := (editor or {}).get("background")) is None or (box := parse_box(text, None)) is None:
        return gr.update(value=None, visible=False)
    image, (x0, y0, x1, y1) = np.ascontiguousarray(np.asarray(background)[..., :3]), (round(v) for v in box)
    cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), CLASS_COLORS["blue"], max(2, round(max(image.shape) / 200)))
    return gr.update(value=_save_png(_output_folder(), "box.png", image), visible=True)  # a file of its own


def _episode_inputs(mode, queries, editors_and_boxes) -> tuple[dict, list, tuple, tuple]:
    """The editors' episodes by class, the query paths, and the class names and colours in use."""
    episodes = collect_episodes(mode, list(editors_and_boxes[:MAX_SUPPORTS]), list(editors_and_boxes[MAX_SUPPORTS:]))
    paths = [item[0] if isinstance(item, list | tuple) else item for item in (queries or [])][:MAX_QUERIES]
    if not paths:
        raise user_error("No query image: upload one or more images to segment.", "Query")
    names, colors = zip(*[list(CLASS_COLORS.items())[c] for c in episodes])
    return episodes, paths, names, colors


def _segment(registry: ModelRegistry, spec: str | None, episodes: dict, names: tuple, paths: list):
    """Every query through one model with the editors' supports (encoded once, cached) -> (results, cached)."""
    pipe = registry.get(spec)
    try:
        encoding, cached = registry.encode(spec or registry.default, supports=dict(zip(names, episodes.values())))
        return pipe(list(paths), support_encoding=encoding, **PIPE_OPTIONS), cached
    except ValueError as err:
        raise user_error(str(err).replace("`images", "`queries"), "Input") from err  # named as in the app


def _support_pictures(pipe, supports: list, result: dict, names, colors, png, prefix: str) -> list[tuple]:
    """Each support with its mask predicted back from the query, when the model gives one (else nothing)."""
    if not (predicted := result.get("support_predictions")):
        return []
    method, pictures = type(pipe.model).__name__.removesuffix("Model"), []
    for c, (name, images, shots) in enumerate(zip(names, supports, predicted if len(names) > 1 else [predicted])):
        for k, (image, shot) in enumerate(zip(images, shots)):
            label, rgb = f"support {k + 1}{f' [{name}]' if len(names) > 1 else ''}", pipe.image_processor.to_rgb_array
            drawn = png(f"{prefix}_support_{k + 1}_{name}.png", overlay(rgb(image, label), shot["mask"], [colors[c]]))
            caption = f"predicted back from the query ({method}'s symmetric prediction); IoU {shot['iou']:.2f}"
            pictures.append((drawn, f"{label}: {caption} with the marked target"))
    return pictures


def _pictures(pipe, path, result, names, colors, png, prefix: str, supports: list) -> tuple[tuple, list, list]:
    """One query's overlay (with the share of each class), its mask files, its maps captioned by the model, and the
    supports predicted back from it (`supports`: each class's support images)."""
    image, qname = pipe.image_processor.to_rgb_array(path, "query").astype(np.uint8), Path(str(path)).stem
    parts = [f"{n} {(result['mask'] == c + 1).mean():.1%}" for c, n in enumerate(names)]
    picture = (png(f"{prefix}_{qname}.png", overlay(image, result["mask"], colors)), f"{qname}: {', '.join(parts)}")
    files, maps = [], []
    for c, name in enumerate(names):
        files.append(png(f"{prefix}_{qname}_mask_{name}.png", (result["mask"] == c + 1).astype(np.uint8) * 255))
        for key, values in result["maps"].items():  # (h, w) for one class, (C, h, w) for several
            drawn = heat_map(image, values[c] if values.ndim == 3 else values, key in pipe.model.binary_maps)
            caption = f"{key}{f' [{name}]' if len(names) > 1 else ''}. {map_caption(pipe.model, key)}"
            maps.append((png(f"{prefix}_{key}_{name}.png", drawn), caption))
    return picture, files, maps + _support_pictures(pipe, supports, result, names, colors, png, prefix)


def run_ui(registry: ModelRegistry, model_id, mode, queries, *editors_and_boxes):
    """The Run button: supports from the editors, queries from the gallery -> overlays, heat maps, mask files."""
    pipe = registry.get(model_id)
    episodes, paths, names, colors = _episode_inputs(mode, queries, editors_and_boxes)
    start = time.perf_counter()
    results, cached = _segment(registry, model_id, episodes, names, paths)
    gallery, maps, files, png = [], [], [], functools.partial(_save_png, _output_folder())
    supports = [images for images, _ in episodes.values()]
    for i, (path, result) in enumerate(zip(paths, results)):
        (picture, caption), masks, pictures = _pictures(pipe, path, result, names, colors, png, str(i + 1), supports)
        gallery.append((picture, f"{i + 1}. {caption}"))
        files += masks
        maps += [(picture, f"{i + 1}. {caption}") for picture, caption in pictures]
    model = f"`{model_id or registry.default}` ({pipe.model.config.model_type}, {pipe.image_processor.image_size}px)"
    shots = ", ".join(f"{n}: {len(episodes[c][0])}-shot" for n, c in zip(names, episodes))
    count = f"{len(paths)} quer{'y' if len(paths) == 1 else 'ies'} in {time.perf_counter() - start:.2f} s"
    details = [f"**Model** {model}", shots, count, f"support encoding {'reused from cache' if cached else 'computed'}"]
    return gallery, maps, files, " · ".join(details + ([] if maps else ["this model returns no intermediate maps"]))


def compare_ui(registry: ModelRegistry, mode, queries, *editors_and_boxes):
    """The Compare button: the first query through every model -> each one's mask and own maps in a row, timed."""
    if not registry.specs:
        raise user_error(NO_MODEL_MESSAGE)
    episodes, paths, names, colors = _episode_inputs(mode, queries, editors_and_boxes)
    gallery, png, supports = [], functools.partial(_save_png, _output_folder()), [s for s, _ in episodes.values()]
    table = ["| model | method | seconds (support + query) | maps |", "|---|---|---|---|"]
    for index, spec in enumerate(registry.specs):
        pipe, start = registry.get(spec), time.perf_counter()
        (result,), cached = _segment(registry, spec, episodes, names, paths[:1])
        seconds = time.perf_counter() - start
        (picture, caption), _, maps = _pictures(pipe, paths[0], result, names, colors, png, f"m{index + 1}", supports)
        method = pipe.model.config.model_type
        gallery += [(picture, f"{spec} ({method}, {seconds:.2f} s): {caption}")]
        gallery += [(picture, f"{spec}: {caption}") for picture, caption in maps]
        reuse = " (support encoding cached)" if cached else ""
        table.append(f"| `{spec}` | {method} | {seconds:.3f}{reuse} | {', '.join(result['maps']) or 'none'} |")
    return gallery, "\n".join(table)


def segment_api(registry: ModelRegistry, support_image, support_mask, query_image, model=None):
    """`/segment`: support image, mask (white = target), query -> the pipeline's mask as 0/255 PNG, overlay, info."""
    model = model or registry.default
    pipe, start = registry.get(model), time.perf_counter()
    try:
        encoding, cached = registry.encode(model, support_image=support_image, support_mask=support_mask)
        result = pipe(query_image, support_encoding=encoding, **PIPE_OPTIONS)
    except ValueError as err:
        raise user_error(str(err).replace("`images", "`query_image"), "Input") from err
    mask, image = result["mask"], pipe.image_processor.to_rgb_array(query_image, "query_image").astype(np.uint8)
    info = {"model": model, "model_type": pipe.model.config.model_type, "query_size": [mask.shape[1], mask.shape[0]]}
    info.update(target_fraction=round(float(mask.mean()), 6), support_encoding_cached=cached)
    info.update(maps=sorted(result["maps"]), seconds=round(time.perf_counter() - start, 3))
    if result["support_predictions"]:  # a model that segments the support back from the query
        info["support_iou"] = round(result["support_predictions"][0]["iou"], 6)
    png = functools.partial(_save_png, _output_folder())
    return png("mask.png", mask * 255), png("overlay.png", overlay(image, mask, [CLASS_COLORS["blue"]])), info


def make_examples(folder: Path, size: int = 240) -> tuple[list[list], list[str]]:
    """`gr.Examples` rows (mode, supports 1-2, queries), labels; synthetic image i shows class i % N + 1."""
    from hf_fss.data.synthetic import NUM_SYNTHETIC_CLASSES as N
    from hf_fss.data.synthetic import SYNTHETIC_CLASSES, render_synthetic_example

    folder.mkdir(parents=True, exist_ok=True)
    render = functools.cache(lambda i: render_synthetic_example(0, 1, i, image_size=size, ignore_boundary=0))
    png = functools.partial(_save_png, folder)

    def editor(i: int, classes: list[int]) -> dict:  # class classes[j] painted in the j-th brush colour
        image, label = render(i)
        layer, composite = np.zeros((*label.shape, 4), np.uint8), image.astype(np.float32)
        for color, region in zip(CLASS_COLORS.values(), (label == c for c in classes)):
            layer[region] = (*color, round(255 * BRUSH_OPACITY))
            composite[region] += BRUSH_OPACITY * (np.asarray(color) - composite[region])
        name = f"synthetic_{i}_{'_'.join(map(str, classes))}"
        layer, composite = png(f"{name}_layer.png", layer), png(f"{name}_painted.png", composite.astype(np.uint8))
        return {"background": png(f"synthetic_{i}.png", image), "layers": [layer], "composite": composite}

    def example(supports: list[int], classes: list[int], queries: list[int]) -> tuple[list, str]:
        names = " + ".join(f"{SYNTHETIC_CLASSES[c]} ({color})" for c, color in zip(classes, CLASS_COLORS))
        editors = [editor(i, classes) for i in supports] + [None] * (2 - len(supports))
        row = ["brush", *editors, [png(f"synthetic_{i}.png", render(i)[0]) for i in queries]]
        return row, f"{len(supports)}-shot: {names}, {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}"

    rows = [example([c - 1], [c], [c - 1 + N, c - 1 + 2 * N]) for c in (1, 3)]  # 1-shot, 2 queries; then 2-shot
    rows += [example([1, 1 + N], [2], [1 + 2 * N]), example([0], [1, 7], [2 * N, 6 + 2 * N])]  # image 0: class 7 too
    return [row for row, _ in rows], [label for _, label in rows]


INTRO = """# Few-shot segmentation with hf_fss
Paint an object on *support* images (one tab each, a brush colour per class) or type its box in **box** mode, add
*query* images or click an example, and **Run**: its class is segmented in the queries, even one unseen in training."""


FIT = {"height": "auto", "object_fit": "contain", "elem_classes": "fit"}  # whole pictures, captions; no inner scroll
SCROLL_TO_RESULT = "() => document.querySelector('#result')?.scrollIntoView({block: 'start'})"
CSS = """.fit .thumbnail-item, .fit .thumbnail-lg > img {aspect-ratio: auto; height: auto} .fit .grid-wrap {overflow-y:
visible; max-height: none} .fit .caption-label {white-space: normal; max-width: 100%; position: static}"""


def build_demo(specs: list[str] | None = None, examples: Path | None = None) -> gr.Blocks:
    """The Gradio app for the models `specs` (default: `resolve_model_specs()`), examples rendered in `examples`."""
    specs, pipes, notice = default_models() if specs is None else (specs, {}, None)
    if notice:  # the console says it too: a Space's log, or a terminal without the page open
        print(f"hf_fss space: {notice}", file=sys.stderr, flush=True)
    registry, examples = ModelRegistry(specs, pipes), examples or examples_dir()
    palette = [("#{:02x}{:02x}{:02x}".format(*c), BRUSH_OPACITY) for c in CLASS_COLORS.values()]
    brush = gr.Brush(colors=palette, default_color=palette[0], color_mode="fixed")
    status = f"Models: `{'`, `'.join(registry.specs)}`" if registry.specs else f"⚠️ {NO_MODEL_MESSAGE}"
    status += f"\n\n⚠️ {notice}" if notice else ""  # why the training-free default is not offered
    with gr.Blocks(title="hf_fss few-shot segmentation", delete_cache=(OUTPUT_MAX_AGE_S,) * 2) as demo:
        gr.Markdown(INTRO + "\n\n" + status)
        with gr.Row():
            # a custom value lets an unknown API `model` reach registry.get, which says so in one line
            model_box = gr.Dropdown(registry.specs, value=registry.default, label="Model", allow_custom_value=True)
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
                        preview = gr.Image(label="The box on the support", visible=False, interactive=False)
                        boxes[-1].change(box_preview, [editors[-1], boxes[-1]], preview, api_visibility="private")
            with gr.Column(scale=2):
                queries = gr.Gallery(label=f"Queries (up to {MAX_QUERIES})", type="filepath", file_types=["image"],
                                     interactive=True, columns=3, height=360, elem_id="queries")  # fmt: skip
                run = gr.Button("Run", variant="primary", elem_id="run")
                rows, labels = make_examples(examples)
                gr.Examples(rows, [mode, editors[0], editors[1], queries], example_labels=labels, elem_id="examples",
                            label="Examples from the synthetic benchmark: click one, then Run")  # fmt: skip
        details = gr.Markdown(elem_id="details")
        with gr.Row(equal_height=False):
            result = gr.Gallery(label="Masks over the queries", columns=2, elem_id="result", **FIT)
            maps = gr.Gallery(label="Maps (scale below each), support predictions", columns=3, elem_id="maps", **FIT)
        with gr.Accordion("Download the masks (PNG of each query's size, 255 = target)", open=False):
            mask_files = gr.File(show_label=False, file_count="multiple", elem_id="masks")
        run.click(functools.partial(run_ui, registry), [model_box, mode, queries, *editors, *boxes],
                  [result, maps, mask_files, details], api_visibility="private").then(js=SCROLL_TO_RESULT)  # fmt: skip
        with gr.Tab("Compare the models", elem_id="compare-tab"):
            compare = gr.Button(
                "Compare: the first query through every model, with the same supports", elem_id="compare"
            )
            compare_table = gr.Markdown(elem_id="compare-details")
            compared = gr.Gallery(
                label="Each model: its mask, its maps, its support predictions", columns=4, elem_id="compared", **FIT
            )
        compare.click(functools.partial(compare_ui, registry), [mode, queries, *editors, *boxes],
                      [compared, compare_table], api_visibility="private")  # fmt: skip
        with gr.Accordion("Mask files / API: one support image, its mask and a query", open=False):
            with gr.Row():
                api_inputs = [gr.File(label=n, file_types=["image"], type="filepath", height=120)
                              for n in ("support_image", "support_mask (white = target)", "query_image")]  # fmt: skip
            api_run = gr.Button("Segment")
            with gr.Row():
                api_outputs = [gr.Image(label=n, type="filepath", format="png") for n in ("mask", "overlay")]
                api_outputs.append(gr.JSON(label="info"))
        segment = functools.partial(segment_api, registry)  # API parameters: segment_api's argument names
        api_run.click(segment, [*api_inputs, model_box], api_outputs, api_name="segment")
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)  # more requests wait, then "queue full"
    demo.registry, demo.examples_dir, demo.status = registry, examples, status  # for main(), tests and launch()
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch(**kwargs)`, allowed to serve the rendered example files, with the page's CSS."""
    return demo.launch(**{"allowed_paths": [str(demo.examples_dir)], "css": CSS, "show_error": True, **kwargs})


def main() -> None:
    """`python spaces_app/app.py`: models from `FSS_MODELS`, precision from `FSS_PRECISION`, address from
    `GRADIO_SERVER_NAME` / `_PORT`."""
    try:
        resolve_precision()  # before anything starts: a bad value is one line, exit status 2
    except ValueError as err:
        print(f"app.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    demo = build_demo()
    with contextlib.suppress(gr.Error):  # load the first model now; a failure is logged, and the app still starts
        demo.registry.get(None)
    launch(demo)


if __name__ == "__main__":
    main()
