"""
The PFENet test geometry on arrays (`find_new_hw` and `util/transform.py::test_Resize`, `ori_resize` in `test.py` of
dvlab-research/PFENet), used by the image processor's `resized_size`, `resize_and_pad_mask` and `resize_logits`:
the size an image takes on the `image_size x image_size` canvas, masks resized so that small targets survive, and
canvas logits brought back to an original size with memory bounded by the output.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SQUARE_TO_OUTPUT_LIMIT", "logits_to_original_size", "resize_mask", "resized_size"]

SQUARE_TO_OUTPUT_LIMIT = 4
"""Post-processing builds PFENet's `L x L` logits square only while it is at most this many times the output."""


def resized_size(
    height: int, width: int, image_size: int, size_divisor: int, upscale_small_images: bool
) -> tuple[int, int]:
    """
    Size `(new_height, new_width)` an image of size `(height, width)` takes on the canvas.

    PFENet's `find_new_hw`: when `max(height, width) > image_size` (or it is smaller and
    `upscale_small_images=True`) the longer side becomes `image_size` and the shorter one
    `int(short * image_size / long)`; both are then floored to multiples of `size_divisor` (a side that would
    floor to 0, possible only for extreme aspect ratios, keeps its unfloored length, at least 1). Otherwise the
    size is returned unchanged.

    Example: with `image_size=473, size_divisor=8`, `(375, 500) -> (352, 472)` and `(100, 120) -> (100, 120)`.

    Raises:
        `ValueError`: a side below 1.
    """
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (h x w)")
    size = image_size
    longer = max(height, width)
    if longer == size or (longer < size and not upscale_small_images):
        return height, width
    if height >= width:
        ratio = size * 1.0 / height
        new_height, new_width = size, int(width * ratio)
    else:
        ratio = size * 1.0 / width
        new_height, new_width = int(height * ratio), size
    new_height = (new_height // size_divisor) * size_divisor or max(new_height, 1)
    new_width = (new_width // size_divisor) * size_divisor or max(new_width, 1)
    return new_height, new_width


def resize_mask(mask: np.ndarray, new_height: int, new_width: int) -> np.ndarray:
    """
    A `{0, 1, 255}` `(height, width)` mask resized with nearest neighbour as PFENet does, except that small targets
    never vanish: a piece of the target (8-connected) that nearest neighbour would drop entirely when downscaling (a
    3x3 object, a 2-px stroke, a thin strip between sampled rows) is drawn at the output pixels that cover it (max
    pooling of that piece). Pieces nearest neighbour keeps are resized exactly as PFENet does, so a target present
    at full size is present after, and ordinary masks are unchanged. Returns a float32 `(new_height, new_width)`.
    """
    resized = cv2.resize(mask.astype(np.float32), dsize=(new_width, new_height), interpolation=cv2.INTER_NEAREST)
    return _keep_target_pieces(mask, resized)


def logits_to_original_size(logits: torch.Tensor, height: int, width: int, resized: bool) -> torch.Tensor:
    """
    `(N, C, S, S)` canvas logits -> `(N, C, height, width)` as PFENet's `ori_resize` evaluation: for an image that
    was `resized`, scaled to `L x L` (`L = max(height, width)`, bilinear, `align_corners=True`) and cropped to
    `height x width`; else cropped from the canvas.

    Memory grows with the output, never with `L x L` alone: the `L x L` square is built (PFENet's own
    `F.interpolate`, bit-exact) only while it holds at most `SQUARE_TO_OUTPUT_LIMIT` (4) times the output's
    pixels, i.e. for aspect ratios up to 4:1, every ordinary photo. A longer strip (a 40000 x 100 query would
    need a 1.6-billion-pixel square) gets only the `h x w` corner, computed from the source rows and columns
    it reads with the same bilinear indices and weights: equal to the square's corner up to float32 rounding
    (a few 1e-6 on logits of magnitude 10, as PyTorch's kernel fuses multiply-adds). No size limit is needed
    beyond the image's own.
    """
    if resized:
        longer = max(height, width)
        if longer * longer > SQUARE_TO_OUTPUT_LIMIT * height * width:  # only the h x w corner of L x L
            return _resize_then_crop(logits, height, width)
        logits = F.interpolate(logits, size=(longer, longer), mode="bilinear", align_corners=True)
    return logits[..., :height, :width]


def _align_corners_axis(count: int, size: int, longer: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Indices and weights of the first `count` samples of a `size -> longer` bilinear `align_corners=True` resize,
    computed as `F.interpolate` does on the CPU (float32 scale `(size - 1) / (longer - 1)`, source `scale * i`)."""
    scale = np.float32(size - 1) / np.float32(longer - 1) if longer > 1 else np.float32(0)
    source = torch.arange(count, dtype=torch.float32, device=device) * torch.tensor(scale, device=device)
    index0 = source.floor().long().clamp(max=size - 1)
    weight1 = (source - index0).clamp(0, 1)
    index1 = torch.clamp(index0 + 1, max=size - 1)
    return index0, index1, 1 - weight1, weight1


def _resize_then_crop(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """
    `F.interpolate(logits, (L, L), mode="bilinear", align_corners=True)[..., :height, :width]` with `L =
    max(height, width)`, without the `L x L` square: only the `height x width` corner is computed, from the source
    rows and columns it reads (columns first, then rows, the order of PyTorch's own kernel), so memory grows with
    the output, not with `L ** 2`.
    """
    size = logits.shape[-1]
    longer = max(height, width)
    row0, row1, row_w0, row_w1 = _align_corners_axis(height, size, longer, logits.device)
    col0, col1, col_w0, col_w1 = _align_corners_axis(width, size, longer, logits.device)
    source = logits[..., : int(row1.max()) + 1, :]
    columns = source[..., col0] * col_w0 + source[..., col1] * col_w1  # (N, C, rows read, width)
    return columns[..., row0, :] * row_w0[:, None] + columns[..., row1, :] * row_w1[:, None]


def _keep_target_pieces(mask: np.ndarray, resized: np.ndarray) -> np.ndarray:
    """
    `resized`, the nearest-neighbour downscaled `mask`, with every 8-connected piece of the target (`mask == 1`)
    that nearest neighbour dropped drawn back where it lies: each of its pixels marks the output pixel whose
    footprint holds it (max pooling of that piece). Pieces nearest neighbour kept are left as they are, so ordinary
    masks are resized exactly as PFENet does, and a target present at full size is always present after.
    """
    target = (mask == 1).astype(np.uint8)
    if not target.any():
        return resized
    count, pieces = cv2.connectedComponents(target, connectivity=8, ltype=cv2.CV_32S)
    height, width = mask.shape
    new_height, new_width = resized.shape
    sampled = cv2.resize(pieces, dsize=(new_width, new_height), interpolation=cv2.INTER_NEAREST)
    lost = np.setdiff1d(np.arange(1, count), sampled)
    if lost.size == 0:
        return resized
    ys, xs = np.nonzero(np.isin(pieces, lost))
    resized = resized.copy()
    resized[ys * new_height // height, xs * new_width // width] = 1
    return resized
