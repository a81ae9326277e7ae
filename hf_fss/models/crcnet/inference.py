"""
CRCNet's inference (paper sections 4.6 and 5.3): the query predicted from every support at every scale of
`inference_scales`, the target probabilities averaged over shots and scales, and each support predicted back from
the query. A support set finetuned in `encode_support` (`finetuning.py`) is predicted with its own adapted head.
Functions of a `CRCNetModel` (`model`, not imported here: the model imports this module) that are not modules; the
model calls `infer` from `_segment` at inference, with its `CRCNetSupportEncoding`.
"""

from __future__ import annotations

import torch

from ...modeling_fss import FewShotSegmentationOutput
from ...modules import resize

__all__ = ["infer", "repeat_shots", "scale_images"]


def scale_images(pixel_values: torch.Tensor, scale: float) -> torch.Tensor:
    """`(N, 3, H, W)` images resized by `scale` (sides rounded, at least 8); scale 1 returns them unchanged."""
    if scale == 1.0:
        return pixel_values
    size = [max(8, round(side * scale)) for side in pixel_values.shape[-2:]]
    return resize(pixel_values, size)


def repeat_shots(x: torch.Tensor | None, shot: int) -> torch.Tensor | None:
    """`(N, ...)` -> `(N * shot, ...)`: each item repeated for the shots of its support set (None stays None)."""
    return None if x is None else x.unsqueeze(1).expand(-1, shot, *x.shape[1:]).flatten(0, 1)


def _shot_mean(x: torch.Tensor, shot: int) -> torch.Tensor:
    """`(N * shot, ...)` -> `(N, ...)`: the mean over the shots of each support set."""
    return x.unflatten(0, (-1, shot)).mean(dim=1)


def _probability(logits: torch.Tensor) -> torch.Tensor:
    """`(N, 2, h, w)` logits -> `(N, 1, h, w)` float32 target probability (softmax in float32 for any dtype)."""
    return logits.float().softmax(dim=1)[:, 1:]


def _support_sets(model, encoding, batch_size: int):
    """
    The groups the head runs on: the whole batch with the model's head, or, once finetuned, each support set alone
    with its adapted head. Yields (batch slice, head parameters or None).
    """
    if encoding.adapted_parameters is None:
        yield slice(None), None
        return
    for index in range(batch_size):
        yield slice(index, index + 1), model._head_parameters(encoding, index)


def _predict_query(model, query, encoding, scale_index, params) -> tuple:
    """
    The query (`query`: encoder features `(N, C, h, w)` and layer4 features or None) predicted from every
    support of the N support sets: one batch of N * K pairs. Returns the `PairPrediction` and K (1 when only the
    first support conditions the prediction).
    """
    support = encoding.features[scale_index]
    shot = support.shape[1]
    if params is not None and model.config.shot_fusion == "finetune":
        shot = 1  # finetune only: the first support conditions the prediction
    query_features, query_high = (repeat_shots(x, shot) for x in query)
    masks = encoding.feature_masks[scale_index][:, :shot].flatten(0, 1)
    support_high = None if query_high is None else encoding.high_features[scale_index][:, :shot].flatten(0, 1)
    prior = model._prior(query_high, support_high, masks, query_features.shape[-2:])
    steps = model.config.refinement_steps
    support = support[:, :shot].flatten(0, 1)
    return model._run_head(params, query_features, support, masks, steps, prior=prior), shot


def _infer_scale(model, pixel_values, encoding, scale_index, scale):
    """
    Fused target probability `(B, 1, H, W)` at one scale, plus the per-step maps and the query features. The
    probabilities (softmax, shot and scale averages) are float32 whatever the model's dtype.
    """
    query = model._encode(scale_images(pixel_values, scale))
    probabilities, steps, co_occurrence = [], [], []
    for selected, params in _support_sets(model, encoding, pixel_values.shape[0]):
        sub_encoding = encoding if params is None else encoding.select(selected)
        selected_query = tuple(None if x is None else x[selected] for x in query)
        prediction, shot = _predict_query(model, selected_query, sub_encoding, scale_index, params)
        target = resize(_probability(prediction.logits[-1]), pixel_values.shape[-2:])
        probabilities.append(_shot_mean(target, shot))
        steps.append([_shot_mean(_probability(logits), shot) for logits in prediction.logits])
        if prediction.target_co_occurrence is not None:
            co_occurrence.append(_shot_mean(_probability(prediction.target_co_occurrence), shot))
    maps = {f"refinement_step_{t + 1}": torch.cat(step) for t, step in enumerate(zip(*steps))}
    if co_occurrence:
        maps["co_occurrence"] = torch.cat(co_occurrence)
    return torch.cat(probabilities), maps, query


def _predict_supports(model, query, query_probability, encoding, scale_index) -> torch.Tensor:
    """
    Each support predicted from the query (`query`: encoder features `(B, C, h, w)` and layer4 features or None)
    and its predicted probability `(B, 1, H, W)`: `(B, K, 2, H_s, W_s)` logits.
    """
    query_features, query_high = query
    support = encoding.features[scale_index]
    batch_size, shot = support.shape[:2]
    mask = resize(query_probability.to(query_features.dtype), query_features.shape[-2:])
    logits = []
    for selected, params in _support_sets(model, encoding, batch_size):
        count = support[selected].shape[0]
        target = support[selected].flatten(0, 1)
        reference = repeat_shots(query_features[selected], shot)
        reference_mask = repeat_shots(mask[selected], shot)
        prior = None
        if query_high is not None:
            target_high = encoding.high_features[scale_index][selected].flatten(0, 1)
            reference_high = repeat_shots(query_high[selected], shot)
            prior = model._prior(target_high, reference_high, reference_mask, target.shape[-2:])
        prediction = model._run_head(
            params, target, reference, reference_mask, model.config.refinement_steps,
            target_is_query=False, co_occurrence=False, prior=prior,
        )  # fmt: skip
        logits.append(prediction.logits[-1].unflatten(0, (count, shot)))
    logits = torch.cat(logits)
    return resize(logits.flatten(0, 1), encoding.labels.shape[-2:]).unflatten(0, (batch_size, shot))


def infer(model, pixel_values: torch.Tensor, encoding) -> FewShotSegmentationOutput:
    """
    The inference output of `CRCNetModel._segment`: logits `log` of the fused (background, target) probabilities,
    the maps and support logits of the scale nearest 1.
    """
    scales = [float(s) for s in encoding.scales[0].tolist()]
    main = min(range(len(scales)), key=lambda i: abs(scales[i] - 1.0))  # maps and supports at scale ~1
    total, maps, main_features, main_probability = 0.0, None, None, None
    for index, scale in enumerate(scales):
        probability, scale_maps, query_features = _infer_scale(model, pixel_values, encoding, index, scale)
        total = total + probability
        if index == main:
            maps, main_features, main_probability = scale_maps, query_features, probability
    # Clamped and logged in float32: 1 - 1e-6 rounds to 1 in float16 / bfloat16 and its log1p(-p) to -inf.
    probability = (total / len(scales)).clamp(1e-6, 1 - 1e-6)
    logits = torch.cat([torch.log1p(-probability), torch.log(probability)], dim=1).to(pixel_values.dtype)
    support_logits = None
    if model.config.predict_support:
        support_logits = _predict_supports(model, main_features, main_probability, encoding, main)
    return FewShotSegmentationOutput(logits=logits, support_logits=support_logits, maps=maps)
