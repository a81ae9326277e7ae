"""
The prior extractor's global + local contrastive learning (QGNet, paper 000 §IV-A, Eq. 1, 6, 7) on MoCo v2
(facebookresearch/moco `moco/builder.py`): a query encoder (ResNet backbone + 2-layer MLP head) trained by SGD, a
key encoder updated as a momentum average of its parameters after every optimizer step (`momentum_update`, called
by the loop's `on_optimizer_step` hook), a queue of image keys and a separate queue of patch keys, InfoNCE with the
positive at index 0.

`L = local_weight * L_local + global_weight * L_global` (Eq. 7 is the plain sum, weights 1:1); a weight of 0
switches that loss (and its queue) off, which gives Table VI's "local only" / "global only".
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from hf_fss.backbones import DilatedResNet

from .queues import KeyQueue
from .shuffle_bn import convert_to_split_batchnorm, shuffled_forward
from .views import LOCAL_FORMS

__all__ = ["ContrastiveEncoder", "ContrastiveOutput", "GlobalLocalContrastiveModel", "PretrainingConfig", "info_nce"]


@dataclass
class PretrainingConfig:
    """
    The model of the pretraining run (written into the exported `config.json`).

    Args:
        backbone_kwargs: `DilatedResNet` arguments (depth 50 and the 7x7 stem by default); the encoders are built
            undilated (`output_stride=32`, as MoCo) whatever is given, the dilation is QGNet's when it loads them.
        head_hidden_dim: hidden width of the MLP head (None: the backbone's last channel count, 2048 for ResNet-50).
        embedding_dim: output width of the head and of the queued keys (MoCo: 128).
        queue_size / patch_queue_size: K of Eq. 1 and M of Eq. 6 (both 65536 in the paper).
        temperature: tau of both losses (MoCo v2: 0.2; the paper gives no value).
        momentum: key encoder momentum m (0.999).
        global_weight / local_weight: loss weights of Eq. 7 (1, 1); 0 switches a loss off.
        local_form: `"patch"` (Fig. 3, default) or `"pooled"` (mask pooling; option).
        symmetric: both directions of each loss (MoCo colab's `--symmetric`); MoCo v2 is one direction.
        bn_splits: `SplitBatchNorm` splits in both encoders (1: plain BN; MoCo's colab uses 8 on one GPU).
        seed: seed of the queues' initial random keys.
    """

    backbone_kwargs: dict = field(default_factory=lambda: {"depth": 50, "stem": "7x7"})
    head_hidden_dim: int | None = None
    embedding_dim: int = 128
    queue_size: int = 65536
    patch_queue_size: int = 65536
    temperature: float = 0.2
    momentum: float = 0.999
    global_weight: float = 1.0
    local_weight: float = 1.0
    local_form: str = "patch"
    symmetric: bool = False
    bn_splits: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.local_form not in LOCAL_FORMS:
            raise ValueError(f"local_form must be one of {list(LOCAL_FORMS)}, got {self.local_form!r}")
        if self.global_weight < 0 or self.local_weight < 0 or self.global_weight + self.local_weight == 0:
            raise ValueError(
                f"global_weight and local_weight must be >= 0 and not both 0, got {self.global_weight}, "
                f"{self.local_weight}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if min(self.queue_size, self.patch_queue_size, self.embedding_dim, self.bn_splits) < 1:
            raise ValueError("queue_size, patch_queue_size, embedding_dim and bn_splits must be >= 1")
        self.backbone_kwargs = dict(self.backbone_kwargs)
        self.backbone_kwargs.pop("output_stride", None)

    @property
    def uses_global(self) -> bool:
        return self.global_weight > 0

    @property
    def uses_local(self) -> bool:
        return self.local_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float):
    """
    InfoNCE with the positive at index 0 (paper Eq. 1 / Eq. 6, MoCo's `logits = cat([l_pos, l_neg]) / T`).

    Args:
        query: `(n, d)` L2-normalised query embeddings.
        key: `(n, d)` L2-normalised positive keys (no gradient).
        queue: `(K, d)` L2-normalised negative keys.
        temperature: tau > 0.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: the mean cross-entropy loss (scalar) and the share of queries whose
        positive has the largest logit (top-1 accuracy, in [0, 1]).
    """
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue.t()
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    accuracy = (logits.argmax(dim=1) == 0).float().mean()
    return F.cross_entropy(logits, labels), accuracy.detach()


class ContrastiveEncoder(nn.Module):
    """
    A `DilatedResNet` (undilated, `output_stride=32`) and MoCo v2's MLP head `Linear(C, H) -> ReLU -> Linear(H, D)`
    (no BN), named `backbone` and `head` (`head.0`, `head.2`: MoCo's `fc.0`, `fc.2`).
    """

    def __init__(self, config: PretrainingConfig):
        super().__init__()
        self.backbone = DilatedResNet(**config.backbone_kwargs, output_stride=32)
        channels = self.backbone.channels[-1]
        hidden = config.head_hidden_dim or channels
        self.head = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, config.embedding_dim)
        )

    def dense(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(n, 3, H, W)` -> the last stage's `(n, C, H / 32, W / 32)` feature map."""
        return self.backbone.forward_stages(pixel_values, 0, self.backbone.num_stages)[-1]

    def embed(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        L2-normalised embedding `(n, D)` of a feature map `(n, C, h, w)`: global average pooling (MoCo), or the
        average over `mask` `(n, H, W)` (form `"pooled"`), resized to `(h, w)` by area averaging.
        """
        if mask is None:
            pooled = features.mean(dim=(2, 3))
        else:
            weights = F.adaptive_avg_pool2d(mask.unsqueeze(1).to(features.dtype), features.shape[-2:])
            pooled = (features * weights).sum(dim=(2, 3)) / (weights.sum(dim=(2, 3)) + 1e-6)
        return F.normalize(self.head(pooled), dim=1)


@dataclass
class ContrastiveOutput(ModelOutput):
    """`loss` (scalar), `losses` (`global`, `local`: the unweighted terms in use) and `metrics` (positives' accuracy)."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    metrics: dict[str, torch.Tensor] | None = None


class GlobalLocalContrastiveModel(nn.Module):
    """
    Query and key encoders, the image-key queue (`queue`, K rows) and the patch-key queue (`patch_queue`, M rows).

    The queues are training state (`training_state_objects()`), not weights: the training loop checkpoints them with
    the run, and the exported prior extractor holds the key encoder's backbone only.

    Forward inputs (batch `n`): `pixel_values_q`, `pixel_values_k` `(n, 3, S, S)` (two views of each image); for
    form `"patch"` `patch_pixel_values_q`, `patch_pixel_values_k` `(n, 3, P, P)` (two views of one superpixel
    patch); for `"pooled"` `patch_mask_q`, `patch_mask_k` `(n, S, S)` (that superpixel in each image view).
    """

    def __init__(self, config: PretrainingConfig):
        super().__init__()
        self.config = config
        self.encoder_q = ContrastiveEncoder(config)
        if config.bn_splits > 1:
            convert_to_split_batchnorm(self.encoder_q, config.bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.queue = KeyQueue(config.queue_size, config.embedding_dim, seed=config.seed)
        self.patch_queue = KeyQueue(config.patch_queue_size, config.embedding_dim, seed=config.seed + 1)
        self.last_metrics: dict[str, torch.Tensor] = {}

    def training_state_objects(self) -> dict[str, KeyQueue]:
        objects = {}
        if self.config.uses_global:
            objects["queue"] = self.queue
        if self.config.uses_local:
            objects["patch_queue"] = self.patch_queue
        return objects

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Key encoder parameters <- m * key + (1 - m) * query (parameters only; BN statistics are the key's own)."""
        m = self.config.momentum
        for key, query in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            key.mul_(m).add_(query.detach(), alpha=1.0 - m)

    def _keys(self, pixel_values: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Key embeddings with Shuffle-BN; with `masks`, also pooled over them (form `"pooled"`)."""
        features = shuffled_forward(self.encoder_k.dense, pixel_values)
        return self.encoder_k.embed(features, masks)

    def _contrast(self, inputs_q, inputs_k, queue: KeyQueue, masks=(None, None)):
        """One loss of Eq. 1 / Eq. 6 (both directions when `symmetric`), then enqueue the keys of every process."""
        encoder_q, temperature = self.encoder_q, self.config.temperature
        query = encoder_q.embed(encoder_q.dense(inputs_q), masks[0])
        with torch.no_grad():
            key = self._keys(inputs_k, masks[1])
        # A copy: the queue is written in place below, after these logits are built (MoCo: `queue.clone()`).
        negatives = queue.keys.to(query.device).clone()
        loss, accuracy = info_nce(query, key, negatives, temperature)
        keys = key
        if self.config.symmetric:
            query_2 = encoder_q.embed(encoder_q.dense(inputs_k), masks[1])
            with torch.no_grad():
                key_2 = self._keys(inputs_q, masks[0])
            loss_2, accuracy_2 = info_nce(query_2, key_2, negatives, temperature)
            loss, accuracy = loss + loss_2, (accuracy + accuracy_2) / 2
            keys = torch.cat([key, key_2])
        queue.to(query.device).push_gathered(torch.zeros(keys.shape[0], device=keys.device), keys)
        return loss, accuracy

    def forward(
        self,
        pixel_values_q: torch.Tensor,
        pixel_values_k: torch.Tensor,
        patch_pixel_values_q: torch.Tensor | None = None,
        patch_pixel_values_k: torch.Tensor | None = None,
        patch_mask_q: torch.Tensor | None = None,
        patch_mask_k: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        config = self.config
        losses, metrics = {}, {}
        total = pixel_values_q.new_zeros(())
        if config.uses_global:
            losses["global"], metrics["accuracy_global"] = self._contrast(pixel_values_q, pixel_values_k, self.queue)
            total = total + config.global_weight * losses["global"]
        if config.uses_local:
            if config.local_form == "patch":
                if patch_pixel_values_q is None or patch_pixel_values_k is None:
                    raise ValueError("local_form='patch' needs patch_pixel_values_q and patch_pixel_values_k")
                local = self._contrast(patch_pixel_values_q, patch_pixel_values_k, self.patch_queue)
            else:
                if patch_mask_q is None or patch_mask_k is None:
                    raise ValueError("local_form='pooled' needs patch_mask_q and patch_mask_k")
                local = self._contrast(
                    pixel_values_q, pixel_values_k, self.patch_queue, masks=(patch_mask_q, patch_mask_k)
                )
            losses["local"], metrics["accuracy_local"] = local
            total = total + config.local_weight * losses["local"]
        self.last_metrics = metrics
        return ContrastiveOutput(loss=total, losses=losses, metrics=metrics)
