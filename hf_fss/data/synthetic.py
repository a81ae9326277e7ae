"""
An embedded, procedurally generated few-shot segmentation benchmark.

Twenty object classes, each one shape family crossed with one texture, drawn at a random pose and size over a
smooth random background, with 0-2 distracting objects of other classes per image. It has the structure of
PASCAL-5i (a target, background clutter, distractors, thin void outlines, 4 folds of 5 test classes) but builds
in seconds on a CPU, so models and training loops can be checked end to end without downloading anything.

Every image is generated from its own `np.random.default_rng([seed, split_index, index])`, so the output is
byte-identical for a seed whatever the number of processes, and image i of a split does not depend on the others.
"""

from __future__ import annotations

import colorsys
import math
from concurrent.futures import ProcessPoolExecutor

import cv2
import datasets
import numpy as np

from hf_fss.data.schema import IGNORE_INDEX, benchmark_features

SHAPES = ("disc", "square", "triangle", "star", "ring")
TEXTURES = ("striped", "checkered", "dotted", "shaded")
NUM_FOLDS = 4
CLASSES_PER_FOLD = 5


def _class_appearance(class_id: int) -> tuple[str, str, float]:
    """(shape, texture, base hue in turns) of a class id in 1..20."""
    fold, j = divmod(class_id - 1, CLASSES_PER_FOLD)
    # A Latin-square layout: every fold tests each shape once and all four textures, so the test classes of a
    # fold are new combinations of shapes and textures that its training classes all show.
    return SHAPES[j], TEXTURES[(j + fold) % len(TEXTURES)], (class_id - 1) / 20.0


NUM_SYNTHETIC_CLASSES = NUM_FOLDS * CLASSES_PER_FOLD
SYNTHETIC_CLASSES = ("background",) + tuple(
    f"{_class_appearance(c)[1]}_{_class_appearance(c)[0]}" for c in range(1, NUM_SYNTHETIC_CLASSES + 1)
)

DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 500
DEFAULT_IMAGE_SIZE = 160
DEFAULT_IGNORE_BOUNDARY = 1

_SPLITS = (("train", 0), ("validation", 1))

# Object "radius" s as a fraction of the image side; per-shape extents are scaled so every shape of radius s has
# about the area of a disc of radius s (pi * s^2), which keeps classes comparable in size.
_PRIMARY_SCALE = (0.19, 0.31)
_DISTRACTOR_SCALE = (0.10, 0.20)
_SHAPE_EXTENT = {"disc": 1.0, "square": 0.89, "triangle": 1.55, "star": 1.54, "ring": 1.2}
# Radius of each shape's bounding circle, in the same units (a square's corner is at sqrt(2) * half-side).
_SHAPE_REACH = {**_SHAPE_EXTENT, "square": 0.89 * math.sqrt(2.0)}
_STAR_INNER = 0.45
_RING_INNER = 0.55


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _smooth_field(rng: np.random.Generator, cells: int, size: int, channels: int) -> np.ndarray:
    """A random `cells` x `cells` grid upsampled bicubically: a low-frequency field of shape (size, size, C)."""
    grid = rng.standard_normal((cells, cells, channels), dtype=np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field, mostly desaturated so that (textured, saturated) objects stand out from it."""
    base = _hsv(rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.35, 0.85))
    # Octaves are summed on a coarse grid and upsampled once: the field has no detail finer than ~1/12 anyway.
    coarse = 32
    low = _smooth_field(rng, int(rng.integers(2, 5)), coarse, 3) * rng.uniform(0.06, 0.16)
    mid = _smooth_field(rng, int(rng.integers(6, 12)), coarse, 3) * rng.uniform(0.0, 0.05)
    # A shared brightness component as well as the independent per-channel variations (hue drift).
    shade = _smooth_field(rng, int(rng.integers(2, 6)), coarse, 1) * rng.uniform(0.03, 0.12)
    field = cv2.resize(base + low + mid + shade, (size, size), interpolation=cv2.INTER_LINEAR)
    return field.reshape(size, size, 3)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in its own frame, where (u, v) are coordinates in units of the object's radius."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        a, r = _SHAPE_EXTENT["square"], 0.15  # half-side and corner radius
        du, dv = np.maximum(np.abs(u) - (a - r), 0.0), np.maximum(np.abs(v) - (a - r), 0.0)
        return (np.abs(u) <= a) & (np.abs(v) <= a) & (du * du + dv * dv <= r * r)
    if shape == "triangle":
        radius = _SHAPE_EXTENT["triangle"]  # circumradius; the inradius is half of it
        inside = np.ones(u.shape, bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * math.cos(a) + v * math.sin(a) >= -radius / 2
        return inside
    if shape == "star":
        outer = _SHAPE_EXTENT["star"]
        inner = _STAR_INNER * outer
        sector = 2 * math.pi / 5
        # Fold the plane onto one half-spike: polar angle in [0, pi/5] from a tip.
        phi = np.abs(np.mod(np.arctan2(v, u) - math.pi / 2, sector) - sector / 2)
        phi = sector / 2 - phi
        r = np.sqrt(u * u + v * v)
        px, py = r * np.cos(phi), r * np.sin(phi)
        # Inside if on the origin's side of the edge from the tip (outer, 0) to the valley at angle pi/5.
        vx, vy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
        return (vx - outer) * py - vy * (px - outer) >= 0.0
    if shape == "ring":
        outer = _SHAPE_EXTENT["ring"]
        rr = u * u + v * v
        return (rr <= outer * outer) & (rr >= (_RING_INNER * outer) ** 2)
    raise ValueError(shape)


def _soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """0/1 step at x = 0 with a linear ramp `width` wide, to avoid aliased texture edges."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


def _texture(texture: str, hue: float, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, radius: float):
    """
    RGB texture of shape (H, W, 3). (x, y) are pixel offsets from the object centre in the object's (rotated)
    frame; periods scale with the object's radius so a pattern looks alike at every object size.
    """
    primary = _hsv(hue, rng.uniform(0.7, 0.95), rng.uniform(0.75, 1.0))
    dark = _hsv(hue + rng.uniform(-0.01, 0.01), rng.uniform(0.6, 0.9), rng.uniform(0.18, 0.32))
    angle = rng.uniform(0, math.pi)  # texture orientation, independent of the shape's
    c, s = math.cos(angle), math.sin(angle)
    tx, ty = c * x + s * y, -s * x + c * y
    if texture == "striped":
        period = radius * rng.uniform(0.45, 0.65)
        w = _soft_step(np.sin(2 * math.pi * tx / period + rng.uniform(0, 2 * math.pi)), 0.5)
    elif texture == "checkered":
        cell = radius * rng.uniform(0.28, 0.38)
        ox, oy = (float(o) for o in rng.uniform(0, 2 * cell, 2))
        w = _soft_step(np.sin(math.pi * (tx + ox) / cell) * np.sin(math.pi * (ty + oy) / cell), 0.3)
    elif texture == "dotted":
        pitch = radius * rng.uniform(0.42, 0.55)
        dot = pitch * rng.uniform(0.24, 0.32)
        ox, oy = (float(o) for o in rng.uniform(0, pitch, 2))
        fx = (tx + ox) / pitch
        fy = (ty + oy) / pitch
        fx -= np.round(fx)
        fy -= np.round(fy)
        w = _soft_step(np.sqrt(fx * fx + fy * fy) * pitch - dot, 1.0)  # 0 inside the dots
    elif texture == "shaded":
        # A smooth ramp across the object from a deep shade to the bright colour: saturated all over, unlike the
        # background, but with no pattern.
        deep = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.8, 1.0), rng.uniform(0.3, 0.45))
        w = np.clip(0.5 + tx / (2.0 * radius * rng.uniform(0.8, 1.1)), 0.0, 1.0)
        return deep + w[..., None] * (primary - deep)
    else:
        raise ValueError(texture)
    return dark + w[..., None] * (primary - dark)


def _place(
    rng: np.random.Generator, size: int, radius: float, placed: list[tuple[float, float, float]], margin: float
):
    """A centre for a new object, the best of a few random candidates at keeping clear of the objects placed."""
    lo, hi = margin * radius, size - margin * radius
    if lo >= hi:
        lo, hi = 0.0, float(size)
    candidates = rng.uniform(lo, hi, (8, 2))
    if not placed:
        return candidates[0]
    centres = np.array([p[:2] for p in placed])
    radii = np.array([p[2] for p in placed])
    gaps = np.linalg.norm(candidates[:, None, :] - centres[None], axis=-1) / (radii[None] + radius)
    return candidates[int(np.argmax(gaps.min(axis=1)))]


def _ignore_boundary(label: np.ndarray, width: int) -> np.ndarray:
    """Marks with IGNORE_INDEX every pixel within `width` px (chessboard) of an edge between two labels."""
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    # BORDER_REPLICATE: the image border itself is not an edge between labels.
    high = cv2.dilate(label, kernel, borderType=cv2.BORDER_REPLICATE)
    low = cv2.erode(label, kernel, borderType=cv2.BORDER_REPLICATE)
    out = label.copy()
    out[high != low] = IGNORE_INDEX
    return out


def render_synthetic_example(
    seed: int,
    split_index: int,
    index: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    ignore_boundary: int = DEFAULT_IGNORE_BOUNDARY,
) -> tuple[np.ndarray, np.ndarray]:
    """
    Image `index` of split `split_index` (0 train, 1 validation): an (S, S, 3) uint8 RGB image and an (S, S)
    uint8 label map of class ids (0 background, 255 ignore). The primary class is `index % 20 + 1`, so every
    class is the primary of every 20th image; 0-2 distractors of other classes are added.
    """
    rng = np.random.default_rng([seed, split_index, index])
    size = image_size
    primary = index % NUM_SYNTHETIC_CLASSES + 1
    # Few, mostly single instances of the target class, like PASCAL; a second instance now and then.
    n_primary = 2 if rng.random() < 0.15 else 1
    n_distractors = int(rng.choice(3, p=[0.25, 0.4, 0.35]))
    others = [c for c in range(1, NUM_SYNTHETIC_CLASSES + 1) if c != primary]
    distractors = rng.choice(others, size=n_distractors, replace=False).tolist()

    objects = []  # (class id, radius, centre x, centre y)
    placed: list[tuple[float, float, float]] = []
    for k, class_id in enumerate([primary] * n_primary + distractors):
        lo, hi = _PRIMARY_SCALE if k < n_primary else _DISTRACTOR_SCALE
        if k < n_primary and n_primary > 1:
            lo, hi = lo * 0.85, hi * 0.8  # two instances of the target share the room
        radius = rng.uniform(lo, hi) * size
        # Centres keep at least half a radius inside, so at most a part of an object leaves the frame.
        cx, cy = _place(rng, size, radius, placed, margin=0.5 if k < n_primary else 0.3)
        placed.append((cx, cy, radius))
        objects.append((class_id, radius, cx, cy))

    canvas = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    for i in rng.permutation(len(objects)):  # random depth order: later objects are drawn on top
        class_id, radius, cx, cy = objects[i]
        shape, texture, hue = _class_appearance(class_id)
        hue += rng.uniform(-0.015, 0.015)
        theta = rng.uniform(0, 2 * math.pi)
        aspect = math.exp(rng.uniform(-0.2, 0.2))  # area-preserving stretch
        # Work in the object's bounding box only.
        reach = radius * _SHAPE_REACH[shape] * max(aspect, 1 / aspect) + 1.0
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
        dx, dy = grid[None, x0:x1] - float(cx), grid[y0:y1, None] - float(cy)
        c, s = math.cos(theta), math.sin(theta)
        x, y = c * dx + s * dy, -s * dx + c * dy
        mask = _shape_mask(shape, x / (radius * aspect), y * aspect / radius)
        tex = _texture(texture, hue, rng, x, y, radius)
        tex *= rng.uniform(0.85, 1.1)  # brightness jitter
        np.copyto(canvas[y0:y1, x0:x1], tex, where=mask[..., None])
        label[y0:y1, x0:x1][mask] = class_id

    # No pixel noise: it would double the PNG size and encoding time, and the appearance jitter already keeps
    # two instances of a class from ever looking the same.
    canvas *= 255.0
    canvas += 0.5
    image = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    if ignore_boundary > 0:
        label = _ignore_boundary(label, ignore_boundary)
    return image, label


# Fast PNG settings (zlib level 1, one fixed row filter): encoding is about half the build time, and this is ~2x
# faster than Pillow's adaptive filtering for the same size.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or single-channel (H, W) uint8 array."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buffer = cv2.imencode(".png", array, _PNG_PARAMS)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def _build_rows(args: tuple[int, int, range, int, int]) -> list[tuple[bytes, bytes, list[int], list[int]]]:
    """Encoded rows for a range of indices (a module-level function so worker processes can run it)."""
    seed, split_index, indices, image_size, ignore_boundary = args
    rows = []
    for index in indices:
        image, label = render_synthetic_example(seed, split_index, index, image_size, ignore_boundary)
        counts = np.bincount(label.ravel(), minlength=256)
        ids = [c for c in range(1, NUM_SYNTHETIC_CLASSES + 1) if counts[c] > 0]
        rows.append((_png(image), _png(label), ids, [int(counts[c]) for c in ids]))
    return rows


def _build_split(
    name: str,
    split_index: int,
    num: int,
    seed: int,
    image_size: int,
    ignore_boundary: int,
    num_proc: int | None,
    features: datasets.Features,
) -> datasets.Dataset:
    chunk = 100
    jobs = [
        (seed, split_index, range(a, min(a + chunk, num)), image_size, ignore_boundary) for a in range(0, num, chunk)
    ]
    if num_proc and num_proc > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(num_proc, len(jobs))) as pool:
            chunks = list(pool.map(_build_rows, jobs))  # map keeps the order: output independent of num_proc
    else:
        chunks = [_build_rows(job) for job in jobs]
    rows = [row for rows in chunks for row in rows]
    data = {
        "image_id": [f"synthetic_{name}_{i:06d}" for i in range(num)],
        "image": [{"bytes": r[0], "path": None} for r in rows],
        "label": [{"bytes": r[1], "path": None} for r in rows],
        "class_ids": [r[2] for r in rows],
        "class_areas": [r[3] for r in rows],
    }
    info = datasets.DatasetInfo(
        description=(
            f"hf_fss synthetic few-shot segmentation benchmark (seed={seed}, image_size={image_size}, "
            f"ignore_boundary={ignore_boundary}): 20 shape x texture classes, 4 folds of 5 novel classes."
        ),
        features=features,
    )
    return datasets.Dataset.from_dict(data, features=features, info=info, split=datasets.NamedSplit(name))


def build_synthetic(
    seed: int = 0,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_proc: int | None = None,
    ignore_boundary: int = DEFAULT_IGNORE_BOUNDARY,
) -> datasets.DatasetDict:
    """
    Builds the synthetic benchmark as a `DatasetDict` with splits `train` and `validation` in the schema of
    `hf_fss.data.schema.benchmark_features(SYNTHETIC_CLASSES)`.

    Args:
        seed: the same seed gives byte-identical PNGs, whatever `num_proc`.
        num_train, num_val: images per split. Image i has primary class `i % 20 + 1`, so each class is the
            primary of at least `num // 20` images, and appears in more as a distractor.
        image_size: side of the square images. The default, 160, leaves room for the 100-200 px training crops
            and keeps the primary class above PFENet's 2 * 32 * 32 px eligibility area in most images.
        num_proc: worker processes for rendering (None or 1: in this process).
        ignore_boundary: half-width in px of the 255 (ignore) band drawn along every edge between two labels,
            like the void outlines of PASCAL VOC; the band is about 2 * ignore_boundary px wide. 0: no band.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    features = benchmark_features(SYNTHETIC_CLASSES)
    counts = {"train": num_train, "validation": num_val}
    return datasets.DatasetDict(
        {
            name: _build_split(name, split_index, counts[name], seed, image_size, ignore_boundary, num_proc, features)
            for name, split_index in _SPLITS
        }
    )
