"""
CRCNet's training forward (paper sections 4.5 and 5.1): every (query, support) pair of the batch as a 1-shot pair, the
query predicted from the support and the support from the query label, the refinement unrolled as
`refinement_training` says, and the loss of Eq. 5 (`CRCNetLoss`). K-shot finetuning (`finetuning.py`) trains a copy
of the head with the same `pair_losses`. Functions of a `CRCNetModel` (`model`, not imported here: the model imports
this module) that are not modules; the model calls `train_forward` from `_segment` in training.
"""

from __future__ import annotations

import torch

from ...modeling_fss import FewShotSegmentationOutput
from ...modules import resize
from .inference import repeat_shots

__all__ = ["pair_losses", "target_mask", "train_forward", "training_steps"]


def target_mask(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(..., H, W)` labels {0, 1, 255} -> `(..., 1, H, W)` target mask of `dtype`, the features' (ignored pixels are
    background)."""
    return (labels == 1).unsqueeze(-3).to(dtype)


def training_steps(model) -> tuple[int, int]:
    """(steps, steps with gradient) of one training prediction, by `refinement_training`."""
    config = model.config
    if config.refinement_training == "random_history":
        # CANet-like: sometimes start from the model's own (detached) prediction instead of the zero cache.
        steps = 2 if bool(torch.rand(()) < config.refinement_history_probability) else 1
    else:
        steps = config.training_refinement_steps
    return steps, steps if config.intermediate_loss else 1


def pair_losses(model, params, query, support, query_labels, support_labels, high=(None, None)):
    """
    Eq. 5 for N (query, support) pairs: the query from the support (QM, QM_sub, SM_sub) and the support from the
    query label (SM), with the model's head (`params` None) or a finetuned copy (a name -> tensor dict). Features
    `(N, C, h, w)`, labels `(N, H, W)` in {0, 1, 255}, `high` the (query, support) layer4 features `(N, C4, h, w)`
    for the prior masks (None without `prior_mask`). Returns the total loss, the named terms, and the two predictions.
    """
    steps, grad_steps = training_steps(model)
    query_high, support_high = high
    support_mask = resize(target_mask(support_labels, support.dtype), support.shape[-2:])
    query_mask = resize(target_mask(query_labels, query.dtype), query.shape[-2:])
    query_prior = model._prior(query_high, support_high, support_mask, query.shape[-2:])
    support_prior = model._prior(support_high, query_high, query_mask, support.shape[-2:])
    forward = model._run_head(params, query, support, support_mask, steps, grad_steps, prior=query_prior)
    backward = model._run_head(
        params, support, query, query_mask, steps, grad_steps,
        target_is_query=False, co_occurrence=False, prior=support_prior,
    )  # fmt: skip
    total, losses = model.criterion(forward, backward, query_labels, support_labels, grad_steps)
    return total, (losses, forward, backward)


def train_forward(
    model, pixel_values: torch.Tensor, encoding, labels: torch.Tensor | None
) -> FewShotSegmentationOutput:
    """The training output of `CRCNetModel._segment`; logits (and support logits) averaged over the K pairs."""
    support = encoding.features[0]
    batch_size, shot = support.shape[:2]
    query, query_high = model._encode(pixel_values)
    query_pairs, query_high = repeat_shots(query, shot), repeat_shots(query_high, shot)
    support_high = None if query_high is None else encoding.high_features[0].flatten(0, 1)
    size = pixel_values.shape[-2:]
    if labels is None:  # no query label: predict the query only
        steps, _ = training_steps(model)
        masks = encoding.feature_masks[0].flatten(0, 1)
        prior = model._prior(query_high, support_high, masks, query.shape[-2:])
        forward = model.head(query_pairs, support.flatten(0, 1), masks, steps, prior=prior)
        logits = resize(forward.logits[-1], size).unflatten(0, (batch_size, shot)).mean(dim=1)
        return FewShotSegmentationOutput(logits=logits, maps=_training_maps(forward, shot))
    query_labels = labels.long().unsqueeze(1).expand(-1, shot, -1, -1).flatten(0, 1)
    support_labels = encoding.labels.flatten(0, 1)
    total, (losses, forward, backward) = pair_losses(
        model, None, query_pairs, support.flatten(0, 1), query_labels, support_labels, (query_high, support_high)
    )
    logits = resize(forward.logits[-1], size).unflatten(0, (batch_size, shot)).mean(dim=1)
    support_logits = resize(backward.logits[-1], encoding.labels.shape[-2:]).unflatten(0, (batch_size, shot))
    maps = _training_maps(forward, shot)
    return FewShotSegmentationOutput(
        loss=total, logits=logits, losses=losses, support_logits=support_logits, maps=maps
    )


def _training_maps(prediction, shot: int) -> dict[str, torch.Tensor]:
    """Per-step and co-occurrence target probabilities, detached, in the model's dtype, averaged over the K pairs."""

    def shot_mean(logits):
        return logits.detach().softmax(dim=1)[:, 1:].unflatten(0, (-1, shot)).mean(dim=1)

    maps = {f"refinement_step_{t + 1}": shot_mean(x) for t, x in enumerate(prediction.logits)}
    if prediction.target_co_occurrence is not None:
        maps["co_occurrence"] = shot_mean(prediction.target_co_occurrence)
    return maps
