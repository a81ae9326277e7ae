"""
CRCNet's K-shot support-set finetuning (paper section 4.6: "we fix the Siamese encoder and finetune the rest"): a copy
of the head is adapted on pairs of supports inside `encode_support`, and the encoding holds the adapted parameters; the
model's own weights never change. Point (11) and the divergence guard of `DIFFERENCES_FROM_PAPER` describe it.
"""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

from ...modules import autocast_off
from .training import pair_losses

__all__ = ["finetune", "finetune_support_sets"]

logger = logging.get_logger(__name__)


def _as_float32(features: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """The (encoder, layer4) features of `CRCNetModel._encode` in float32 (None stays None)."""
    return tuple(None if x is None else x.float() for x in features)


def finetune_support_sets(
    model, support_pixel_values: torch.Tensor, support_masks: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """
    Finetune a copy of `model.head` on each support set (batch item) and return the adapted parameters stacked over
    the batch, in `head.named_parameters()` order and the model's dtype, and a `(batch_size,)` bool tensor, True
    where the finetuning diverged and the unadapted head was kept. The model's own weights are never touched.
    The encoder is fixed, so the features of the supports and of their horizontal flips are computed once,
    without autograd, in the model's dtype; the finetuning itself runs in float32 (see `finetune`).

    Args:
        model (`CRCNetModel`).
        support_pixel_values (`torch.FloatTensor` of shape `(batch_size, shot, 3, height, width)`).
        support_masks (`torch.LongTensor` of shape `(batch_size, shot, height, width)`): {0, 1, 255}.
    """
    adapted, diverged = [], []
    unadapted = tuple(p.detach().float() for p in model.head.parameters())
    for index, (images, masks) in enumerate(zip(support_pixel_values, support_masks)):
        with torch.no_grad():
            features = _as_float32(model._encode(images))
            flipped = _as_float32(model._encode(images.flip(-1))) if model.config.finetune_flip else None
        # The optimisation in float32 under a caller's autocast too: bfloat16 convolutions in its forward and backward
        # steer the adapted head away from the float32 run (logits moved by ~1 where the encoder's moved by ~0.002).
        with autocast_off(images):
            params = finetune(model, features, flipped, masks.long(), index)
        diverged.append(params is None)
        adapted.append(unadapted if params is None else params)
    dtypes = [p.dtype for p in model.head.parameters()]
    stacked = tuple(torch.stack(values).to(dtype) for values, dtype in zip(zip(*adapted), dtypes))
    return stacked, torch.tensor(diverged, device=support_pixel_values.device)


def finetune(model, features, flipped, labels, index: int = 0) -> tuple[torch.Tensor, ...] | None:
    """
    `finetune_steps` optimiser steps on one random ordered pair of supports each (with a random horizontal
    flip), the training loss of Eq. 5 on both predictions; pairs and flips from a generator seeded with
    `finetune_seed`, so a support set always gives the same result. The head's copy, its gradients, the loss and
    the optimiser state are float32 whatever the model's dtype (float16 gradients overflow, and bfloat16 drops
    updates smaller than 1/256 of a weight).

    Finetuning stops when a step's loss is not finite or exceeds `finetune_max_loss_ratio` times the first
    step's, or when it leaves non-finite weights (see `_log_divergence`).

    Args:
        model (`CRCNetModel`): its head is copied, `pair_losses` gives the loss (Eq. 5).
        features, flipped (`tuple`): (encoder features `(K, reduce_dim, h, w)`, layer4 features `(K, C4, h, w)`
            or None without `prior_mask`) of the supports and of their flips (`flipped` None without flips),
            float32.
        labels (`torch.LongTensor` of shape `(K, H, W)`): support masks {0, 1, 255}.
        index (`int`): the support set's index in the batch, for the log.

    Returns:
        `tuple` of float32 tensors: the head's adapted parameters; None when the finetuning diverged.
    """
    config = model.config
    shot = features[0].shape[0]
    pairs = [(i, j) for i in range(shot) for j in range(shot) if i != j or config.finetune_pairs == "all"]
    params = {name: p.detach().float().clone().requires_grad_(True) for name, p in model.head.named_parameters()}
    if config.finetune_optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params.values(), lr=config.finetune_learning_rate, momentum=config.finetune_momentum
        )
    else:
        optimizer = torch.optim.Adam(params.values(), lr=config.finetune_learning_rate)
    generator = torch.Generator().manual_seed(config.finetune_seed)
    first_loss = None
    with torch.enable_grad():
        for step in range(config.finetune_steps):
            target, reference = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
            flip = flipped is not None and bool(torch.rand((), generator=generator) < 0.5)
            (source, high), pair_labels = (flipped, labels.flip(-1)) if flip else (features, labels)
            pair_labels = pair_labels[[target, reference]]
            pair_high = (None, None) if high is None else (high[target : target + 1], high[reference : reference + 1])
            loss, _ = pair_losses(
                model,
                params,
                source[target : target + 1],
                source[reference : reference + 1],
                pair_labels[:1],
                pair_labels[1:],
                pair_high,
            )
            value = float(loss.detach())
            first_loss = value if first_loss is None else first_loss
            if not math.isfinite(value) or value > config.finetune_max_loss_ratio * first_loss:
                return _log_divergence(config, index, f"at step {step + 1} the loss is {value:.4g}", first_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if not all(bool(torch.isfinite(p).all()) for p in params.values()):
        return _log_divergence(config, index, "the last step left non-finite weights", first_loss)
    return tuple(p.detach() for p in params.values())


def _log_divergence(config, index: int, reason: str, first_loss: float | None) -> None:
    """
    Log that the finetuning of support set `index` diverged: the cause and the fix once per process and
    setting (`warning_once`: an evaluation where every finetuning diverges would print one line per episode),
    the support set and its losses at INFO level each time. Returns None (no adapted parameters).
    """
    logger.warning_once(
        "CRCNet K-shot finetuning diverged (a step's loss was not finite or above finetune_max_loss_ratio="
        f"{config.finetune_max_loss_ratio:g} x the first step's, or it left non-finite weights): such a support "
        "set keeps the unadapted head; lower finetune_learning_rate "
        f"({config.finetune_learning_rate:g}) or use shot_fusion='average' (logged once; the support encoding's "
        "finetune_diverged marks each such support set and evaluate.py counts them)"
    )
    first = "none" if first_loss is None else f"{first_loss:.4g}"  # None: finetune_steps=0
    logger.info(f"CRCNet K-shot finetuning of support set {index} diverged: {reason} (first step's loss {first})")
    return None
