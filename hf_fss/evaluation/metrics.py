"""
Few-shot segmentation metrics: class IoU / mIoU, FB-IoU and foreground precision, from per-class pixel counts kept
as torch tensors.

Definitions (one episode = one query image, one class `c`, a binary prediction and a `{0, 1, 255}` target):

- Pixels where the target is 255 are excluded from every count (`protocol.ignore_boundary=True`, all presets), or
  count as background (`ignore_boundary=False`).
- `"sum-over-episodes"` (PFENet, HSNet, PANet): `IoU_c = sum_e I_e / sum_e U_e` over the episodes of class `c`, with
  `I_e` / `U_e` the foreground intersection / union of episode `e`. `"mean-per-episode"`: `IoU_c = mean_e I_e / U_e`.
- mIoU = mean of `IoU_c` over the fold's classes.
- FB-IoU = mean of the background IoU and the foreground IoU, each summed over all episodes (any class).
- precision = `sum_e TP_e / sum_e (predicted foreground)_e` over all episodes.

Undefined values are NaN and left out of means: the IoU of a class without episodes (or whose episodes have neither
target nor predicted foreground), an episode IoU with an empty union (left out of `"mean-per-episode"`; such an
episode adds nothing to the sums either), the precision when nothing is predicted as foreground. PFENet and HSNet
would count a class without episodes as IoU 0 in their mIoU; with their episode counts every class has episodes.
A class with episodes but no foreground prediction has IoU 0.

Counts are int64 (exact, so summing them over processes gives exactly the single-process result); only the sum of
per-episode IoUs (`"mean-per-episode"`) is floating point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hf_fss.evaluation.protocols import EvaluationProtocol, get_protocol

__all__ = [
    "IGNORE_INDEX",
    "FewShotSegmentationMetric",
    "aggregate_seeds",
    "intersection_and_union",
    "resize_label",
]

IGNORE_INDEX = 255  # the label value of ignored (boundary) pixels, as in hf_fss.data.schema

_STATE_NAMES = (
    "fg_intersection",
    "fg_union",
    "fg_predicted",
    "episode_iou_sum",
    "episode_iou_count",
    "episode_count",
    "fb_intersection",
    "fb_union",
)


def _to_label_tensor(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Tensor / ndarray / PIL image / nested list of integer labels -> int64 tensor (tensors keep their device)."""
    if not isinstance(x, torch.Tensor):
        if hasattr(x, "getbands"):  # PIL image: its pixel values are the labels
            x = np.array(x)
        x = np.asarray(x)
        if not x.flags.writeable:
            x = x.copy()
        if x.dtype == object:
            raise ValueError(f"{name} must be an array of integer labels, got an object array")
        x = torch.from_numpy(x)
    if x.dtype == torch.bool:
        x = x.long()
    elif x.is_floating_point():
        if not torch.equal(x, torch.round(x)):
            raise ValueError(f"{name} must hold integer labels, got non-integer values (take the argmax of logits)")
        x = x.long()
    elif x.is_complex():
        raise ValueError(f"{name} must hold integer labels, got {x.dtype}")
    else:
        x = x.long()
    return x if device is None else x.to(device)


def intersection_and_union(
    pred: Any, target: Any, num_classes: int = 2, ignore_index: int | None = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Per-class pixel intersection, union and target area of one label map pair (PFENet's `intersectionAndUnionGPU`
    as int64 tensors).

    Args:
        pred: predicted labels in `[0, num_classes)`, any shape (values at ignored pixels are not read).
        target: labels in `[0, num_classes)` or `ignore_index`, same shape as `pred`.
        num_classes: number of classes (2 for an episode: background, foreground).
        ignore_index: target value whose pixels are left out of every count; None keeps all pixels.

    Returns:
        `(intersection, union, target_area)`, each an int64 tensor of shape `(num_classes,)` on `pred`'s device.

    Raises:
        ValueError: shape mismatch, or a label outside `[0, num_classes)` at a counted pixel.
    """
    pred = _to_label_tensor(pred, "pred")
    target = _to_label_tensor(target, "target", device=pred.device)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    pred, target = pred.reshape(-1), target.reshape(-1)
    k = int(num_classes)
    # Ignored pixels go to an extra last bin instead of being gathered out (boolean indexing of a 417 x 417 map costs
    # ~10 ms on one CPU thread, these elementwise ops well under 1 ms); the counts are the same.
    cell = target * k + pred
    out_of_range = (pred < 0) | (pred >= k) | (target < 0) | (target >= k)
    if ignore_index is not None:
        ignored = target == ignore_index
        cell, out_of_range = cell.masked_fill(ignored, k * k), out_of_range & ~ignored
    # One host sync to reject out-of-range labels instead of silently dropping them (torch.histc would).
    if bool(out_of_range.any()):
        counted = ~ignored if ignore_index is not None else slice(None)
        raise ValueError(
            f"labels must lie in [0, {k}) (or be {ignore_index} in the target); got pred values "
            f"{torch.unique(pred[counted]).tolist()[:8]} and target values {torch.unique(target[counted]).tolist()[:8]}"
        )
    # Confusion matrix, rows = target, columns = prediction.
    confusion = torch.bincount(cell, minlength=k * k + 1)[: k * k].reshape(k, k)
    intersection = confusion.diagonal().clone()
    area_pred, area_target = confusion.sum(0), confusion.sum(1)
    return intersection, area_pred + area_target - intersection, area_target


def resize_label(label: Any, label_size: str | int) -> torch.Tensor:
    """
    A label map at a protocol's `label_size`: unchanged for `"original"`, nearest-neighbour resized to
    `label_size x label_size` otherwise (as HSNet resizes its query masks, `F.interpolate(mode="nearest")`).

    Args:
        label: `(h, w)` integer labels (tensor, ndarray or PIL image).
        label_size: `"original"` or an int.

    Returns:
        `(h, w)` or `(label_size, label_size)` int64 tensor.
    """
    label = _to_label_tensor(label, "label")
    if label.ndim != 2:
        raise ValueError(f"label must be (h, w), got shape {tuple(label.shape)}")
    if label_size == "original":
        return label
    if isinstance(label_size, bool) or not isinstance(label_size, int) or label_size <= 0:
        raise ValueError(f"label_size must be 'original' or a positive int, got {label_size!r}")
    resized = F.interpolate(label[None, None].float(), size=(label_size, label_size), mode="nearest")
    return resized[0, 0].long()


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _as_batch(x: Any, name: str) -> list[Any]:
    """A batch of maps as a list: a `(B, h, w)` tensor / array, a list of `(h, w)` maps, or one `(h, w)` map."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if x.ndim == 3:
            return list(x)
        if x.ndim == 2:
            return [x]
        raise ValueError(f"{name} must be (B, h, w), (h, w) or a list of (h, w) maps, got shape {tuple(x.shape)}")
    if hasattr(x, "getbands"):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise ValueError(f"{name} must be a tensor, an array or a list of (h, w) maps, got {type(x).__name__}")


def _nan_mean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


class FewShotSegmentationMetric:
    """
    Accumulates few-shot segmentation counts over episodes and computes mIoU, FB-IoU and foreground precision.

    Args:
        class_ids: the fold's (novel) class ids; mIoU is their mean.
        class_names: names for `per_class_iou`: a dict `{class_id: name}`, a sequence indexed by class id (such as
            `hf_fss.data.schema.VOC_CLASSES`, whose entry 0 is background), or None (`str(class_id)`).
        protocol: an `EvaluationProtocol` or a preset name; default `"pfenet"`. Its `ignore_boundary`,
            `iou_aggregation` and (int) `label_size` are applied; all its fields are written into `compute()`.
        device: device of the count tensors (default CPU). Counts from inputs on other devices are moved there.
        seed: the seed of this run, written into `compute()` when given.
        record_episodes: also keep each episode's foreground and background intersection / union pixel counts in
            `episode_records` (dicts, in update order), for paired comparisons between models.

    Distributed evaluation: every process updates its own metric with its share of the episodes, then
    `metric.reduce(accelerator.reduce)` (or `metric.reduce()` under `torch.distributed`) sums the counts, after which
    every process's `compute()` equals that of one process that saw all episodes. Counts are int64 (exact).
    """

    def __init__(
        self,
        class_ids: Sequence[int],
        class_names: Mapping[int, str] | Sequence[str] | None = None,
        protocol: EvaluationProtocol | str | None = None,
        *,
        device: torch.device | str | None = None,
        seed: int | None = None,
        record_episodes: bool = False,
    ):
        self.record_episodes = bool(record_episodes)
        ids = [int(c) for c in class_ids]
        if not ids:
            raise ValueError("class_ids must not be empty")
        if len(set(ids)) != len(ids):
            raise ValueError(f"class_ids must be distinct, got {ids}")
        self.class_ids: list[int] = ids
        self._position = {c: i for i, c in enumerate(ids)}
        self.class_names: dict[int, str] = self._resolve_names(ids, class_names)
        if protocol is None:
            protocol = get_protocol("pfenet")
        elif isinstance(protocol, str):
            protocol = get_protocol(protocol)
        elif not isinstance(protocol, EvaluationProtocol):
            raise ValueError(f"protocol must be an EvaluationProtocol or a preset name, got {type(protocol).__name__}")
        self.protocol: EvaluationProtocol = protocol
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    @staticmethod
    def _resolve_names(ids: list[int], class_names: Any) -> dict[int, str]:
        if class_names is None:
            names = {c: str(c) for c in ids}
        elif isinstance(class_names, Mapping):
            missing = [c for c in ids if c not in class_names]
            if missing:
                raise ValueError(f"class_names has no name for class id(s) {missing}")
            names = {c: str(class_names[c]) for c in ids}
        else:
            class_names = list(class_names)
            missing = [c for c in ids if not 0 <= c < len(class_names)]
            if missing:
                raise ValueError(
                    f"class_names is a sequence indexed by class id (entry 0 = background) of length "
                    f"{len(class_names)}; it has no entry for class id(s) {missing}"
                )
            names = {c: str(class_names[c]) for c in ids}
        if len(set(names.values())) != len(names):
            raise ValueError(f"class names must be distinct, got {list(names.values())}")
        return names

    # ----------------------------------------------------------------------------------------------------------------
    # state

    def reset(self) -> None:
        """Zero every count."""
        n, dev = len(self.class_ids), self.device
        self.fg_intersection = torch.zeros(n, dtype=torch.long, device=dev)
        self.fg_union = torch.zeros(n, dtype=torch.long, device=dev)
        self.fg_predicted = torch.zeros(n, dtype=torch.long, device=dev)
        self.episode_iou_sum = torch.zeros(n, dtype=_float_dtype(dev), device=dev)
        self.episode_iou_count = torch.zeros(n, dtype=torch.long, device=dev)  # episodes with a non-empty union
        self.episode_count = torch.zeros(n, dtype=torch.long, device=dev)
        self.fb_intersection = torch.zeros(2, dtype=torch.long, device=dev)  # (background, foreground)
        self.fb_union = torch.zeros(2, dtype=torch.long, device=dev)
        # With `record_episodes`: one dict of pixel counts per episode, in update order (for paired comparisons).
        self.episode_records = [] if self.record_episodes else None
        self._reduced = False

    def to(self, device: torch.device | str) -> FewShotSegmentationMetric:
        """Move the counts to `device` (in place); returns self."""
        self.device = torch.device(device)
        for name in _STATE_NAMES:
            value = getattr(self, name).to(self.device)
            if name == "episode_iou_sum":
                value = value.to(_float_dtype(self.device))
            setattr(self, name, value)
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The count tensors by name (the live tensors, in a fixed order). Every one of them is summed across processes."""
        return {name: getattr(self, name) for name in _STATE_NAMES}

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the counts with `state` (as returned by `state_tensors`, e.g. after summing over processes)."""
        if set(state) != set(_STATE_NAMES):
            raise ValueError(f"state must have exactly the keys {list(_STATE_NAMES)}, got {sorted(state)}")
        for name in _STATE_NAMES:
            current = getattr(self, name)
            value = torch.as_tensor(state[name])
            if value.shape != current.shape:
                raise ValueError(f"state {name!r} has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
            setattr(self, name, value.to(device=current.device, dtype=current.dtype).clone())

    def reduce(
        self, fn: Callable[[torch.Tensor], Any] | None = None, *, device: torch.device | str | None = None
    ) -> FewShotSegmentationMetric:
        """
        Sum the counts over processes, in place; returns self.

        Args:
            fn: called once per count tensor, in the same order on every process, and must return (or leave in
                place) the sum over processes, e.g. `accelerator.reduce` (its default reduction is `"sum"`).
                None: `torch.distributed.all_reduce(SUM)` when a process group is initialised, else nothing.
            device: device the tensors are moved to for `fn` (e.g. `accelerator.device` for NCCL); with `fn=None`
                and the NCCL backend the current CUDA device is used. The counts stay on the metric's device.

        After `reduce` the counts are global: a second `reduce`, or an `update` before `reset`, raises (either would
        count other processes' episodes twice).
        """
        if self._reduced:
            raise RuntimeError("the counts are already summed over processes; reducing again would double-count them")
        if fn is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                self._reduced = True
                return self
            if device is None and dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())

            def fn(tensor: torch.Tensor) -> torch.Tensor:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                return tensor

        reduced = {}
        for name, tensor in self.state_tensors().items():
            local = tensor.to(device) if device is not None else tensor
            local = local.clone()  # in-place reductions must not touch the state until every tensor is done
            out = fn(local)
            reduced[name] = out if isinstance(out, torch.Tensor) else local
        self.load_state_tensors(reduced)
        self._reduced = True
        return self

    def merge(self, other: FewShotSegmentationMetric) -> FewShotSegmentationMetric:
        """Add `other`'s counts to this metric (same classes and protocol); returns self."""
        if not isinstance(other, FewShotSegmentationMetric):
            raise ValueError(f"can only merge a FewShotSegmentationMetric, got {type(other).__name__}")
        if other.class_ids != self.class_ids:
            raise ValueError(f"cannot merge metrics over different classes: {self.class_ids} vs {other.class_ids}")
        if other.protocol != self.protocol:
            raise ValueError(f"cannot merge metrics with different protocols: {self.protocol} vs {other.protocol}")
        for name in _STATE_NAMES:
            mine = getattr(self, name)
            setattr(self, name, mine + getattr(other, name).to(device=mine.device, dtype=mine.dtype))
        return self

    # ----------------------------------------------------------------------------------------------------------------
    # update / compute

    def update(self, predictions: Any, targets: Any, class_ids: Any) -> None:
        """
        Add a batch of episodes.

        Args:
            predictions: `(B, h, w)` tensor / array or a list of `(h, w)` maps with values in {0, 1}, already at the
                label resolution (e.g. the image processor's post-processing at the label size).
            targets: the matching `{0, 1, 255}` target maps, same sizes. With `protocol.ignore_boundary=False` the
                255 pixels count as background.
            class_ids: the episodes' class ids (an int for a single episode), each one of the metric's classes.
        """
        if self._reduced:
            raise RuntimeError("update after reduce: the counts are already global; call reset() first")
        preds, targs = _as_batch(predictions, "predictions"), _as_batch(targets, "targets")
        if isinstance(class_ids, torch.Tensor):
            ids = [int(c) for c in class_ids.reshape(-1).tolist()]
        elif isinstance(class_ids, (int, np.integer)) or (isinstance(class_ids, np.ndarray) and class_ids.ndim == 0):
            ids = [int(class_ids)]
        else:
            ids = [int(c) for c in np.asarray(class_ids).reshape(-1)]
        if not len(preds) == len(targs) == len(ids):
            raise ValueError(
                f"got {len(preds)} predictions, {len(targs)} targets and {len(ids)} class ids; they must match"
            )
        unknown = sorted({c for c in ids if c not in self._position})
        if unknown:
            raise ValueError(f"class id(s) {unknown} are not among this metric's classes {self.class_ids}")
        if not ids:
            return
        label_size = self.protocol.label_size
        stats = []
        for i, (pred, target) in enumerate(zip(preds, targs)):
            pred = _to_label_tensor(pred, f"predictions[{i}]")
            target = _to_label_tensor(target, f"targets[{i}]", device=pred.device)
            if pred.ndim != 2 or pred.shape != target.shape:
                raise ValueError(
                    f"episode {i}: prediction and target must be (h, w) maps of the same size, got "
                    f"{tuple(pred.shape)} and {tuple(target.shape)} (resize the prediction to the label first)"
                )
            if isinstance(label_size, int) and tuple(target.shape) != (label_size, label_size):
                raise ValueError(
                    f"episode {i}: protocol {self.protocol.name!r} scores {label_size}x{label_size} labels, got "
                    f"{tuple(target.shape)}; resize them with hf_fss.evaluation.resize_label(label, {label_size})"
                )
            if not self.protocol.ignore_boundary:
                target = torch.where(target == IGNORE_INDEX, torch.zeros_like(target), target)
            inter, union, area_target = intersection_and_union(pred, target, 2, IGNORE_INDEX)
            stats.append(torch.stack([inter, union, area_target]).to(self.device))
        counts = torch.stack(stats)  # (B, 3, 2): [intersection, union, target area] x [background, foreground]
        inter, union, area_target = counts[:, 0], counts[:, 1], counts[:, 2]
        predicted_fg = union[:, 1] + inter[:, 1] - area_target[:, 1]
        defined = union[:, 1] > 0
        episode_iou = torch.where(
            defined, inter[:, 1].to(self.episode_iou_sum.dtype) / union[:, 1].clamp_min(1), 0.0
        ).to(self.episode_iou_sum.dtype)
        # Per-class sums through a one-hot matrix: a deterministic reduction on every device (index_add_ is not).
        positions = torch.tensor([self._position[c] for c in ids], device=self.device)
        onehot = F.one_hot(positions, len(self.class_ids))  # (B, C) int64

        def per_class(values: torch.Tensor) -> torch.Tensor:
            return (onehot.to(values.dtype) * values[:, None]).sum(0)

        self.fg_intersection += per_class(inter[:, 1])
        self.fg_union += per_class(union[:, 1])
        self.fg_predicted += per_class(predicted_fg)
        self.episode_iou_sum += per_class(episode_iou)
        self.episode_iou_count += per_class(defined.long())
        self.episode_count += onehot.sum(0)
        self.fb_intersection += inter.sum(0)
        self.fb_union += union.sum(0)
        if self.episode_records is not None:
            rows = torch.cat([inter, union], dim=1).cpu().tolist()  # (B, 4): I_bg, I_fg, U_bg, U_fg
            self.episode_records.extend(
                {"class_id": c, "intersection": row[1], "union": row[3], "bg_intersection": row[0], "bg_union": row[2]}
                for c, row in zip(ids, rows)
            )

    @property
    def num_episodes(self) -> int:
        """Episodes added so far (summed over processes after `reduce`)."""
        return int(self.episode_count.sum())

    def compute(self) -> dict[str, Any]:
        """
        The scores, as plain Python values (fractions in [0, 1], NaN where undefined):

        - `miou`: mean class IoU over the classes whose IoU is defined, aggregated per `protocol.iou_aggregation`;
        - `fbiou`: mean of `background_iou` and `foreground_iou`, summed over all episodes;
        - `precision`: summed true-positive / summed predicted-foreground pixels;
        - `per_class_iou` `{name: iou}`, `per_class_episodes` `{name: number of episodes}`;
        - `num_episodes`: episodes counted (compare with `protocol["num_episodes"]`, the protocol's nominal count);
        - `seed` (when given), `protocol`: `EvaluationProtocol.to_dict()`.
        """
        state = {name: getattr(self, name).detach().cpu() for name in _STATE_NAMES}
        fg_i, fg_u = state["fg_intersection"].tolist(), state["fg_union"].tolist()
        if self.protocol.iou_aggregation == "sum-over-episodes":
            class_iou = [_ratio(i, u) for i, u in zip(fg_i, fg_u)]
        else:
            sums, counts = state["episode_iou_sum"].tolist(), state["episode_iou_count"].tolist()
            class_iou = [_ratio(s, n) for s, n in zip(sums, counts)]
        fb_i, fb_u = state["fb_intersection"].tolist(), state["fb_union"].tolist()
        background_iou, foreground_iou = _ratio(fb_i[0], fb_u[0]), _ratio(fb_i[1], fb_u[1])
        episodes = state["episode_count"].tolist()
        result: dict[str, Any] = {
            "miou": _nan_mean(class_iou),
            "fbiou": _nan_mean([background_iou, foreground_iou]),
            "precision": _ratio(sum(fg_i), sum(state["fg_predicted"].tolist())),
            "background_iou": background_iou,
            "foreground_iou": foreground_iou,
            "per_class_iou": {self.class_names[c]: float(v) for c, v in zip(self.class_ids, class_iou)},
            "per_class_episodes": {self.class_names[c]: int(n) for c, n in zip(self.class_ids, episodes)},
            "num_episodes": int(sum(episodes)),
        }
        if self.seed is not None:
            result["seed"] = int(self.seed)
        result["protocol"] = self.protocol.to_dict()
        return result


_AGGREGATED_SCALARS = ("miou", "fbiou", "precision", "background_iou", "foreground_iou")


def aggregate_seeds(results: Sequence[Mapping[str, Any]], ddof: int = 0) -> dict[str, Any]:
    """
    Mean and standard deviation over runs with different seeds (PANet's 5 runs).

    Args:
        results: `compute()` outputs of the runs; their protocols must be equal.
        ddof: delta degrees of freedom of the standard deviation; 0 (population std, `np.std`) as PANet / SMCP
            (`util/metric.py`).

    Returns:
        `{key: mean, key + "_std": std}` for miou, fbiou, precision, background_iou and foreground_iou,
        `per_class_iou` / `per_class_iou_std` `{name: value}`, `num_runs`, `num_episodes` (list, per run),
        `seeds` (list, per run; None where a run has no seed) and `protocol`. NaNs propagate.
    """
    results = list(results)
    if not results:
        raise ValueError("aggregate_seeds needs at least one result")
    protocol = results[0].get("protocol")
    for i, r in enumerate(results[1:], start=1):
        if r.get("protocol") != protocol:
            diff = sorted(
                k
                for k in set(protocol or {}) | set(r.get("protocol") or {})
                if (protocol or {}).get(k) != (r.get("protocol") or {}).get(k)
            )
            raise ValueError(f"result {i} was computed under a different protocol (fields {diff} differ)")
    names = list(results[0]["per_class_iou"])
    for i, r in enumerate(results[1:], start=1):
        if list(r["per_class_iou"]) != names:
            raise ValueError(f"result {i} has classes {list(r['per_class_iou'])}, expected {names}")

    def stats(values: list[float]) -> tuple[float, float]:
        array = np.asarray(values, dtype=np.float64)
        std = float(np.std(array, ddof=ddof)) if len(array) > ddof else math.nan
        return float(np.mean(array)), std

    out: dict[str, Any] = {}
    for key in _AGGREGATED_SCALARS:
        if all(key in r for r in results):
            out[key], out[f"{key}_std"] = stats([float(r[key]) for r in results])
    per_class = {name: stats([float(r["per_class_iou"][name]) for r in results]) for name in names}
    out["per_class_iou"] = {name: mean for name, (mean, _) in per_class.items()}
    out["per_class_iou_std"] = {name: std for name, (_, std) in per_class.items()}
    out["num_runs"] = len(results)
    out["num_episodes"] = [int(r["num_episodes"]) for r in results]
    out["seeds"] = [r.get("seed") for r in results]
    out["std_ddof"] = ddof
    out["protocol"] = protocol
    return out
