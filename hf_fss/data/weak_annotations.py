"""
Support annotations weaker than masks, derived from a dense target mask as PANet / SMCP evaluate them: boxes
(`"bbox"`) and scribbles (`"scribble"`); `"mask"` is the dense mask itself. See `support_annotation`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from hf_fss.data.schema import IGNORE_INDEX

__all__ = ["ANNOTATION_KINDS", "BBOX_MODES", "support_annotation"]

ANNOTATION_KINDS = ("mask", "bbox", "scribble")
BBOX_MODES = ("instance", "union")


def _longest_paths(skeleton: np.ndarray, rng: np.random.Generator, min_nodes: int) -> list[np.ndarray]:
    """Per connected piece of a skeleton (>= min_nodes pixels): its longest path as an (N, 2) (y, x) array."""
    if not skeleton.any():
        return []
    # 8-neighbour graph over the skeleton pixels, edges weighted by distance (1 or sqrt 2); nodes in raster order.
    from scipy.sparse.csgraph import connected_components, dijkstra  # scipy / scikit-image: imported when used
    from skimage.graph import pixel_graph

    graph, nodes = pixel_graph(skeleton, connectivity=2)
    coords = np.stack(np.unravel_index(nodes, skeleton.shape), axis=1)
    count, labels = connected_components(graph, directed=False)
    paths = []
    for component in range(count):
        nodes = np.flatnonzero(labels == component)
        if len(nodes) < min_nodes:
            continue
        # Double sweep: the farthest node from any node is an end of a longest path (exact on trees).
        start = int(nodes[rng.integers(len(nodes))])
        distance = dijkstra(graph, directed=False, indices=start)
        end_a = int(nodes[np.argmax(distance[nodes])])
        distance, predecessors = dijkstra(graph, directed=False, indices=end_a, return_predecessors=True)
        node = int(nodes[np.argmax(distance[nodes])])
        path = [node]
        while node != end_a:
            node = int(predecessors[node])
            path.append(node)
        paths.append(coords[np.asarray(path)])
    return paths


def _region_scribble(
    region: np.ndarray,
    rng: np.random.Generator,
    kernel_range: tuple[float, float],
    max_radius: float,
    width: int,
    work_size: int = 128,
) -> np.ndarray:
    """
    Scribbles inside a boolean region, in the spirit of the DAVIS scribble robot that PANet's automatic scribbles
    come from (SMCP `util/scribbles.py`): open the region with a disk proportional to the square root of its area
    (drops thin parts and specks), skeletonise it, follow the longest path of every skeleton piece, trim and
    smooth it a little at random, draw it, and keep only pixels inside the region. The skeleton is computed on
    the region's bounding box scaled to at most `work_size` px (the curves are smoothed anyway; this keeps it
    fast); drawing is at full resolution. Never empty for a non-empty region (falls back to a dot at the
    innermost pixel).
    """
    from scipy import ndimage  # scipy / scikit-image: imported when a scribble is drawn
    from skimage.draw import line as draw_line
    from skimage.morphology import skeletonize

    height, width_px = region.shape
    out = np.zeros(region.shape, dtype=bool)
    if not region.any():
        return out
    ys, xs = np.nonzero(region)
    top, left = int(ys.min()), int(xs.min())
    crop = region[top : int(ys.max()) + 1, left : int(xs.max()) + 1].astype(np.uint8)
    scale = min(1.0, work_size / max(crop.shape))
    if scale < 1.0:
        small_size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, small_size, interpolation=cv2.INTER_NEAREST)
    area = int(crop.sum())
    radius = min(rng.uniform(*kernel_range) * math.sqrt(area) * 0.5, max_radius * scale)
    opened = crop
    while radius > 1.0:
        size = 2 * int(round(radius)) + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        candidate = cv2.morphologyEx(crop, cv2.MORPH_OPEN, kernel)
        if candidate.any():
            opened = candidate
            break
        radius *= 0.9
    skeleton = skeletonize(np.pad(opened.astype(bool), 1))[1:-1, 1:-1]
    for path in _longest_paths(skeleton, rng, min_nodes=4):
        length = len(path)
        # Random trim of each end (human scribbles rarely reach the extremities), then a moving-average smoothing.
        cut_a, cut_b = (int(rng.uniform(0.0, 0.15) * length) for _ in range(2))
        path = path[cut_a : max(length - cut_b, cut_a + 2)].astype(np.float64)
        window = max(1, len(path) // 8)
        if window > 1:
            padded = np.pad(path, ((window // 2, window - 1 - window // 2), (0, 0)), mode="edge")
            kernel_1d = np.ones(window) / window
            path = np.stack([np.convolve(padded[:, i], kernel_1d, mode="valid") for i in range(2)], axis=1)
        # Back to full-resolution image coordinates (pixel centres).
        path = (path + 0.5) / scale - 0.5 + np.array([top, left])
        points = np.rint(path).astype(np.int64)
        points[:, 0] = np.clip(points[:, 0], 0, height - 1)
        points[:, 1] = np.clip(points[:, 1], 0, width_px - 1)
        for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
            yy, xx = draw_line(int(y0), int(x0), int(y1), int(x1))
            out[yy, xx] = True
        out[points[-1, 0], points[-1, 1]] = True
    if width > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
        out = cv2.dilate(out.astype(np.uint8), kernel).astype(bool)
    out &= region
    if not out.any():
        # Object too small or thin for a skeleton path: a dot of the line width at its innermost pixel.
        distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(distance)), region.shape)
        out[y, x] = True
        if width > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
            out = cv2.dilate(out.astype(np.uint8), kernel).astype(bool) & region
    return out


def support_annotation(
    mask: np.ndarray,
    kind: str = "mask",
    rng: np.random.Generator | None = None,
    *,
    bbox_mode: str = "instance",
    scribble_width: int | None = None,
    background_scribbles: bool = True,
    kernel_range: tuple[float, float] = (0.1, 0.2),
    max_radius: float = 16.0,
) -> np.ndarray:
    """
    Turn a dense `(H, W)` target mask (1 target, 0 background, 255 ignore) into a support annotation of the same
    size and values (uint8), as PANet / SMCP evaluate weak supports.

    Args:
        mask: dense target mask; it must have at least one target pixel unless `kind="mask"`.
        kind:
            - `"mask"`: the mask itself (a copy).
            - `"bbox"`: boxes. PANet (SMCP `util/utils.py::get_bbox`) marks the box of the *largest instance* of
              the class as target, leaves the boxes of the class's other instances unlabelled, and makes the rest
              background. Without instance maps we take 8-connected components of the target as instances:
              `bbox_mode="instance"` (default) -> 1 in the largest component's box, 255 in the other components'
              boxes, 0 elsewhere; `bbox_mode="union"` -> 1 in the one box enclosing all target pixels, 0 elsewhere.
              The dense mask's 255 pixels play no role (a box annotation has no void).
            - `"scribble"`: PANet's scribble supports (`customized.py::getMask`): target = scribble pixels on the
              object, background = scribble pixels labelled background, every other pixel unlabelled. So the
              result is 1 on foreground scribbles, 0 on background scribbles (`background_scribbles=True`) and
              255 elsewhere. PANet's scribbles are pre-computed by the DAVIS scribble robot; ours are generated
              here in the same spirit (see `_region_scribble`), inside the target (`mask == 1`) and inside the
              background (`mask == 0`), one curve per piece of the opened region (PANet keeps the foreground
              scribbles of one randomly chosen scribble label). At least one foreground pixel is always marked.
        rng: randomness of the scribbles (bbox and mask are deterministic); default `np.random.default_rng(0)`.
        bbox_mode: `"instance"` or `"union"` (see above).
        scribble_width: line width in pixels; default `max(1, round(max(H, W) / 160))` (3 px for a 500 px image)
            so scribbles survive a resize to the model resolution.
        background_scribbles: draw background scribbles (otherwise only foreground scribbles, rest 255).
        kernel_range / max_radius: the opening radius is `uniform(*kernel_range) * sqrt(area) / 2`, capped at
            `max_radius` (the robot's `kernel_size=0.15`, `max_kernel_radius=16`).

    Returns:
        `np.ndarray` `(H, W)` uint8 with values in {0, 1, 255}.
    """
    from scipy import ndimage  # imported when used: scipy.ndimage costs ~0.6 s at import

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if kind not in ANNOTATION_KINDS:
        raise ValueError(f"unknown support annotation kind {kind!r}; expected one of {ANNOTATION_KINDS}")
    if kind == "mask":
        return mask.astype(np.uint8, copy=True)
    target = mask == 1
    if not target.any():
        raise ValueError(f"a {kind!r} annotation needs a mask with at least one target pixel")
    rng = np.random.default_rng(0) if rng is None else rng

    if kind == "bbox":
        if bbox_mode not in BBOX_MODES:
            raise ValueError(f"bbox_mode must be one of {BBOX_MODES}, got {bbox_mode!r}")
        out = np.zeros(mask.shape, dtype=np.uint8)
        if bbox_mode == "union":
            ys, xs = np.nonzero(target)
            out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
            return out
        components, count = ndimage.label(target, structure=np.ones((3, 3), dtype=bool))
        areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
        largest = int(np.argmax(areas))
        boxes = ndimage.find_objects(components)
        for i, box in enumerate(boxes):
            if i != largest:
                out[box] = IGNORE_INDEX
        out[boxes[largest]] = 1
        return out

    height, width = mask.shape
    line_width = max(1, round(max(height, width) / 160)) if scribble_width is None else int(scribble_width)
    out = np.full(mask.shape, IGNORE_INDEX, dtype=np.uint8)
    if background_scribbles:
        background = mask == 0
        if background.any():
            out[_region_scribble(background, rng, kernel_range, max_radius, line_width)] = 0
    out[_region_scribble(target, rng, kernel_range, max_radius, line_width)] = 1
    return out
