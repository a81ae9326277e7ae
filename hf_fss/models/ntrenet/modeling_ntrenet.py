"""
NTRENet: Non-Target Region Eliminating network (Liu et al., "Learning Non-target Knowledge for Few-shot Semantic
Segmentation", CVPR 2022).

A PFENet-style few-shot segmenter that, before and after matching the support prototype, removes what is *not* the
target from the query features: the background (BG), found with a learned BG prototype, and distracting objects (DO),
the regions that are neither BG nor the initially predicted target. Training adds a BG mining loss and a prototypical
contrastive loss against a bank of DO prototypes.

Module and parameter names follow the official code (`down_query`, `down_supp`, `down_bg`, `bg_prototype`,
`bg_res1`, `bg_cls`, `init_merge1/2/3`), with `inital_*` spelt `initial_*` and PFENet's decoder layers (`alpha_conv`,
`beta_conv`, `inner_cls`, `res1`, `res2`, `cls`) under `feature_enrichment.`; `convert_ntrenet.py` maps the keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import logging

from ...differences import read_differences
from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import (
    FeatureEnrichmentModule,
    MaskedCrossEntropy,
    MemoryBank,
    classifier,
    conv_block,
    conv_relu,
    double_conv3x3,
    masked_average_pooling,
    memory_bank,
    multi_shot_prior_mask,
    pfenet_mid_level,
    pfenet_support_encoding,
    resize,
)
from .configuration_ntrenet import NTRENetConfig

logger = logging.get_logger(__name__)

__all__ = [
    "DIFFERENCES_FROM_OFFICIAL_CODE",
    "NTRENetContrastiveBank",
    "NTRENetLoss",
    "NTRENetModel",
    "NTRENetSupportEncoding",
    "background_mining_loss",
    "prototype_contrastive_loss",
]

# Every place where the paper, the official code (github.com/LIUYUANWEI98/NERTNet, commit 1fe13ad) and this
# implementation part ways, with the choice made here: package data (hf_fss/model_cards/differences/ntrenet.md), which
# the model card renders.
DIFFERENCES_FROM_OFFICIAL_CODE = read_differences("ntrenet")


@dataclass
class NTRENetSupportEncoding(SupportEncoding):
    """
    NTRENet's support encoding: PFENet's fields (`pfenet_support_encoding` with `down_supp`), the reduced features
    kept for the training losses.

    Args (besides `shot`):
        prototype (`torch.FloatTensor` of shape `(batch_size, reduce_dim, 1, 1)`):
            Support target prototype (masked average pooling of the reduced features), averaged over shots.
        features (`torch.FloatTensor` of shape `(batch_size, shot, reduce_dim, h, w)`):
            Reduced mid-level support features (`down_supp` output); the training losses use them.
        high_level_features (`torch.FloatTensor` of shape `(batch_size, shot, channels, h4, w4)`):
            Stage-4 features computed on the mask-weighted stage-3 features (PFENet), for the prior mask.
        masks (`torch.FloatTensor` of shape `(batch_size, shot, 1, height, width)`):
            1 on the target, else 0 (ignored pixels are 0), at the support image resolution.
    """

    shot_mean_fields = ("prototype",)  # the mean of the per-shot prototypes, as `pfenet_support_encoding` computes it

    prototype: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None
    high_level_features: torch.FloatTensor | None = None
    masks: torch.FloatTensor | None = None


def background_mining_loss(background_logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """
    The background mining loss (Eq. 3), as the official code computes it.

    Args:
        background_logits (`torch.FloatTensor` of shape `(batch_size, 2, height, width)`):
            Scores of "not background" / "background"; `p_BG` is the softmax of channel 1.
        target (`torch.Tensor` of shape `(batch_size, height, width)`):
            1 (or True) on target-object pixels, else 0 (ignored pixels must be 0).
        alpha (`float`, *optional*, defaults to 0.5): weight of the all-pixels background term.

    Returns:
        `torch.FloatTensor` of shape `()`: mean over images of `sum_target(-log(1 - p_BG)) / (N + 1e-5)` plus
        `alpha * mean_all(-log p_BG)`.
    """
    log_probs = F.log_softmax(background_logits, dim=1)
    target = target.to(log_probs.dtype)
    not_background = -(log_probs[:, 0] * target).flatten(1).sum(1) / (target.flatten(1).sum(1) + 1e-5)
    return not_background.mean() + alpha * (-log_probs[:, 1].mean())


def prototype_contrastive_loss(
    query_prototypes: torch.Tensor,
    positive_prototypes: torch.Tensor,
    negatives: list[torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    The prototypical contrastive loss (Eq. 10), as the official code computes it.

    Args:
        query_prototypes (`torch.FloatTensor` of shape `(batch_size, channels)`): query target prototypes.
        positive_prototypes (`torch.FloatTensor` of shape `(batch_size, channels)`): support target prototypes.
        negatives (list of `batch_size` `torch.FloatTensor` of shape `(num_negatives, channels)`):
            DO prototypes drawn from the bank for each query's class.
        temperature (`float`, *optional*, defaults to 1.0).

    Returns:
        `torch.FloatTensor` of shape `()`: mean over the batch of `-log(exp(cos(q, p) / t) / sum exp(cos(q, n) / t)
        + 1e-8)`; the positive is not part of the denominator.
    """
    losses = []
    for query, positive, negative in zip(query_prototypes, positive_prototypes, negatives):
        positive_logit = torch.exp(F.cosine_similarity(query, positive, dim=0) / temperature)
        negative = negative.to(query.dtype)
        negative_sum = torch.exp(F.cosine_similarity(query.unsqueeze(0), negative, dim=1) / temperature).sum()
        losses.append(-torch.log(positive_logit / negative_sum + 1e-8))
    return torch.stack(losses).mean()


class NTRENetContrastiveBank(MemoryBank):
    """
    Bank of distracting-object (DO) prototypes per class, the negatives of the prototypical contrastive loss: a
    `hf_fss.modules.MemoryBank` keyed by class id, with the official code's insertion order and negative draws.

    Training state, not model weights (see `MemoryBank`); the model declares it in `training_state_objects()` so the
    trainer checkpoints it. Under `torch.distributed`, `update` gathers the new prototypes of every process (in rank
    order) before inserting them, and negatives are drawn for every process's queries in the same order, so all
    processes keep identical banks and generators; without an initialised process group it is purely local.

    Args:
        size (`int`, *optional*, defaults to 2000): prototypes kept per class (newest first, FIFO).
        num_negatives (`int`, *optional*, defaults to 1000): at most this many negatives drawn per query.
        seed (`int`, *optional*, defaults to 0): seed of the CPU generator drawing the negatives.
    """

    def __init__(self, size: int = 2000, num_negatives: int = 1000, seed: int = 0):
        super().__init__(size=size, seed=seed)
        self.num_negatives = int(num_negatives)

    @property
    def prototypes(self) -> dict[int, torch.Tensor]:
        """The stored DO prototypes, `{class_id: (n, channels)}`, newest first."""
        return self.rows

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, num_negatives={self.num_negatives})"

    def num_entries(self, class_id: int) -> int:
        """Number of prototypes stored for `class_id`."""
        entries = self.entries(class_id)
        return 0 if entries is None else entries.shape[0]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_negatives": self.num_negatives}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.num_negatives = int(state_dict["num_negatives"])

    @torch.no_grad()
    def update(
        self, class_ids: torch.Tensor, query_prototypes: torch.Tensor, support_prototypes: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """
        Insert the DO prototypes of a batch (of every process) at the front of their class's queue.

        For each class, as in the official code: the queries' prototypes (batch order), then the supports', then the
        old entries, truncated to `size`.

        Args:
            class_ids (`torch.LongTensor` of shape `(batch_size,)`): the episode class of each query.
            query_prototypes (`torch.FloatTensor` of shape `(batch_size, channels)`).
            support_prototypes (`torch.FloatTensor` of shape `(batch_size, shot, channels)`).

        Returns:
            `tuple(torch.LongTensor, int)`: the class ids of the whole (gathered) batch and the offset of this
            process's queries in it.
        """
        batch_size, shot, channels = support_prototypes.shape
        rows = torch.cat(
            [
                class_ids.to(query_prototypes.device, torch.float32).unsqueeze(1),
                query_prototypes.float(),
                support_prototypes.float().flatten(1),
            ],
            dim=1,
        )
        rows, offset = memory_bank.gather_rows(rows)
        all_class_ids = rows[:, 0].round().long()
        all_queries = rows[:, 1 : 1 + channels]
        all_supports = rows[:, 1 + channels :].reshape(-1, shot, channels)
        for class_id in torch.unique(all_class_ids).tolist():
            selected = all_class_ids == class_id
            self.push(class_id, torch.cat([all_queries[selected], all_supports[selected].flatten(0, 1)]))
        return all_class_ids, offset

    def draw_negatives(self, all_class_ids: torch.Tensor, offset: int, batch_size: int) -> list[torch.Tensor]:
        """
        Draw up to `num_negatives` bank entries for every query of the gathered batch (keeping the generator in step
        on all processes) and return those of this process's `batch_size` queries starting at `offset`.
        """
        negatives = [self.sample(class_id, self.num_negatives) for class_id in all_class_ids.tolist()]
        return negatives[offset : offset + batch_size]

    def step(
        self, class_ids: torch.Tensor, query_prototypes: torch.Tensor, support_prototypes: torch.Tensor
    ) -> list[torch.Tensor]:
        """`update` with a batch's DO prototypes, then `draw_negatives` for its queries (the official order)."""
        all_class_ids, offset = self.update(class_ids, query_prototypes, support_prototypes)
        return self.draw_negatives(all_class_ids, offset, class_ids.shape[0])


@dataclass
class _DecoderOutput:
    logits: torch.Tensor
    aux_final: list[torch.Tensor]
    aux_initial: list[torch.Tensor]
    distractor: torch.Tensor
    initial_target: torch.Tensor


class NTRENetLoss(nn.Module):
    """
    NTRENet's training loss (official code; paper Eq. 3, 10, 12): cross-entropy of the final logits, plus
    `final_aux_loss_weight` / `initial_aux_loss_weight` times the mean cross-entropy of the final / initial pyramids'
    classifiers, `background_loss_weight` times the BG mining loss of the query and every support, and in training
    (with `class_ids`) `contrastive_loss_weight` times the prototypical contrastive loss against `contrastive_bank`,
    which it updates with the batch's DO prototypes. See `DIFFERENCES_FROM_OFFICIAL_CODE`.

    Args:
        config (`NTRENetConfig`): the weights, `ignore_index` and the bank's size, negatives and seed.
    """

    def __init__(self, config: NTRENetConfig):
        super().__init__()
        self.config = config
        self.cross_entropy = MaskedCrossEntropy(config.ignore_index)
        # Training state, deliberately not an nn.Module: it must stay out of state_dict() and the released weights.
        self.contrastive_bank = NTRENetContrastiveBank(
            size=config.contrastive_bank_size,
            num_negatives=config.contrastive_num_negatives,
            seed=config.contrastive_seed,
        )

    def forward(
        self,
        labels: torch.Tensor,
        logits: torch.Tensor,
        decoded: _DecoderOutput,
        query_features: torch.Tensor,
        background_logits: torch.Tensor,
        encoding: NTRENetSupportEncoding,
        support_background_logits: torch.Tensor,
        class_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`): {0, 1, 255}.
            logits (`torch.FloatTensor` of shape `(batch_size, 2, height, width)`): the final logits.
            decoded (`_DecoderOutput`): the decoder's feature-size logits and auxiliary predictions.
            query_features (`torch.FloatTensor` of shape `(batch_size, reduce_dim, h, w)`): `down_query` output.
            background_logits (`torch.FloatTensor` of shape `(batch_size, 2, h, w)`): the query's BG logits.
            encoding (`NTRENetSupportEncoding`): the supports' reduced features and masks.
            support_background_logits (`torch.FloatTensor` of shape `(batch_size * shot, 2, h, w)`): their BG logits.
            class_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*): without it (in training) the
                contrastive term is skipped, with a warning.

        Returns:
            `tuple(torch.FloatTensor, dict[str, torch.FloatTensor])`: the total and the detached named terms (`main`,
            `aux_final`, `aux_initial`, `background`, and in training with `class_ids` `contrastive`).
        """
        config = self.config
        labels = labels.long()
        main = self.cross_entropy(logits, labels)
        aux_final = torch.stack([self.cross_entropy(x, labels) for x in decoded.aux_final]).mean()
        aux_initial = torch.stack([self.cross_entropy(x, labels) for x in decoded.aux_initial]).mean()

        # BG mining loss on the query and on every support (each with its own features), averaged over the K + 1.
        shot = encoding.features.shape[1]
        support_features = encoding.features.flatten(0, 1)
        support_masks = encoding.masks.flatten(0, 1)  # (batch * shot, 1, H, W)
        query_bg_loss = background_mining_loss(
            resize(background_logits, labels.shape[-2:]), labels == 1, config.background_loss_alpha
        )
        support_bg_loss = background_mining_loss(
            resize(support_background_logits, support_masks.shape[-2:]),
            support_masks[:, 0] > 0.5,
            config.background_loss_alpha,
        )
        background = (query_bg_loss + shot * support_bg_loss) / (shot + 1)

        total = (
            main
            + config.background_loss_weight * background
            + config.final_aux_loss_weight * aux_final
            + config.initial_aux_loss_weight * aux_initial
        )
        losses = {"main": main, "aux_final": aux_final, "aux_initial": aux_initial, "background": background}

        if self.training and config.contrastive_loss_weight > 0:
            if class_ids is None:
                logger.warning_once(
                    "NTRENet: no `class_ids` given in training, so the prototypical contrastive loss is skipped; pass "
                    "the episode class of each query as `class_ids=` to train with it."
                )
            else:
                query = (query_features, background_logits)
                support = (support_features, support_masks, support_background_logits)
                contrastive = self._contrastive_loss(labels, decoded.logits, query, support, class_ids)
                total = total + config.contrastive_loss_weight * contrastive
                losses["contrastive"] = contrastive
        return total, {name: value.detach() for name, value in losses.items()}

    def _contrastive_loss(self, labels, feature_logits, query, support, class_ids) -> torch.Tensor:
        """
        Eq. 10 as in the official code; updates `contrastive_bank` with the batch's DO prototypes. `query`: the query
        features and BG logits; `support`: the supports' features, masks and BG logits, batch and shot flattened.
        """
        query_features, background_logits = query
        support_features, support_masks, support_background_logits = support
        batch_size = query_features.shape[0]
        shot = support_features.shape[0] // batch_size
        feature_size = query_features.shape[-2:]
        dtype = query_features.dtype
        query_target = F.interpolate((labels == 1).unsqueeze(1).to(dtype), size=feature_size, mode="nearest")
        support_target = F.interpolate(support_masks.to(dtype), size=support_features.shape[-2:], mode="nearest")

        # DO regions from the ground truth: neither background (BG branch argmax) nor target.
        query_distractor = F.relu(1 - background_logits.argmax(dim=1, keepdim=True).to(dtype) - query_target)
        support_distractor = F.relu(
            1 - support_background_logits.argmax(dim=1, keepdim=True).to(dtype) - support_target
        )
        query_do = masked_average_pooling(query_features, query_distractor).flatten(1)
        support_do = masked_average_pooling(support_features, support_distractor).flatten(1)

        prediction = feature_logits.argmax(dim=1, keepdim=True).to(dtype)
        query_prototypes = masked_average_pooling(query_features, prediction).flatten(1)
        positive_prototypes = masked_average_pooling(support_features, support_target).flatten(1)
        positive_prototypes = positive_prototypes.unflatten(0, (batch_size, shot)).mean(dim=1)

        negatives = self.contrastive_bank.step(
            class_ids, query_do.detach(), support_do.detach().unflatten(0, (batch_size, shot))
        )
        return prototype_contrastive_loss(
            query_prototypes, positive_prototypes, negatives, self.config.contrastive_temperature
        )


class NTRENetModel(FewShotSegmentationPreTrainedModel):
    r"""
    NTRENet few-shot segmenter.

    Pipeline (`h x w` is the stage-3 feature size, 60 x 60 for a 473 x 473 ResNet input):

    1. Frozen backbone; query and support stage-3 and stage-2 features concatenated (VGG: stage 2 resized to stage
       3's size) and reduced to `reduce_dim` by `down_query` / `down_supp`. Support target prototype: masked average
       pooling. Prior mask: PFENet's cosine prior on stage 4 (the support's stage 4 is computed on mask-weighted
       stage-3 features).
    2. BG mining (`bg_prototype`, `down_bg`, `bg_res1`, `bg_cls`): the query features concatenated with the learned
       BG prototype give two-class BG logits.
    3. At every pyramid scale: BG elimination `init_merge1(query ⊕ BG prototype)`; feature matching
       `init_merge2(· ⊕ support prototype ⊕ prior)`, refined by `initial_beta_conv` and classified by
       `initial_inner_cls` (the initial target prediction); DO mask `relu(1 - argmax(BG) - argmax(initial))`; DO
       prototype pooled from the query features under it; DO elimination `init_merge3(· ⊕ DO prototype)`; then
       PFENet's inter-scale merge and refinement (`feature_enrichment.alpha_conv`, `.beta_conv`, `.inner_cls`).
    4. `feature_enrichment.res1`, `.res2`, `.cls` fuse the scales; the logits are upsampled (bilinear,
       `align_corners=True`) to the input size.

    Training (`labels`, optionally `class_ids`): cross-entropy on the final logits, auxiliary cross-entropies of the
    final and initial pyramids, the BG mining loss on the query and every support, and the prototypical contrastive
    loss against `contrastive_bank` (only when `class_ids` are given). See `DIFFERENCES_FROM_OFFICIAL_CODE` for where
    this follows the official code rather than the paper.
    """

    config_class = NTRENetConfig
    support_encoding_class = NTRENetSupportEncoding
    support_shots_separable = True
    query_inputs = ("class_ids",)
    output_maps = {
        "prior": "PFENet prior mask: similarity of the query to the support's target (stage 4)",
        "background": "probability of background from the learned background prototype",
        "distractor": "regions that are neither background nor the initial target (distracting objects)",
        "initial_target": "probability of the target before distracting objects are eliminated",
    }
    binary_maps = ("distractor",)

    def __init__(self, config: NTRENetConfig):
        super().__init__(config)
        self.backbone = self.build_backbone()
        channels = self.backbone.channels
        mid_level_dim = channels[3] + channels[2]
        reduce_dim = config.reduce_dim
        bg_dim = config.background_prototype_dim
        num_bins = len(config.pyramid_bins)

        self.down_query = conv_block(mid_level_dim, reduce_dim, config.feature_dropout)
        self.down_supp = conv_block(mid_level_dim, reduce_dim, config.feature_dropout)

        # Background mining module.
        self.bg_prototype = nn.Parameter(torch.zeros(1, bg_dim, 1, 1))
        self.down_bg = conv_block(reduce_dim + bg_dim, reduce_dim, config.feature_dropout)
        self.bg_res1 = double_conv3x3(reduce_dim)
        self.bg_cls = classifier(reduce_dim, 2, config.classifier_dropout)

        # Per pyramid scale: BG elimination, support matching + initial prediction, DO elimination.
        self.init_merge1 = nn.ModuleList(
            conv_relu(reduce_dim + bg_dim, reduce_dim, 1, bias=False) for _ in range(num_bins)
        )
        self.init_merge2 = nn.ModuleList(
            conv_relu(reduce_dim * 2 + 1, reduce_dim, 1, bias=False) for _ in range(num_bins)
        )
        self.init_merge3 = nn.ModuleList(conv_relu(reduce_dim * 2, reduce_dim, 1, bias=False) for _ in range(num_bins))
        self.initial_beta_conv = nn.ModuleList(double_conv3x3(reduce_dim) for _ in range(num_bins))
        self.initial_inner_cls = nn.ModuleList(
            classifier(reduce_dim, 2, config.classifier_dropout) for _ in range(num_bins)
        )

        # PFENet's inter-scale merge, per-scale refinement and fusion; the merges above replace its init_merge.
        self.feature_enrichment = FeatureEnrichmentModule(
            reduce_dim=reduce_dim,
            pyramid_bins=config.pyramid_bins,
            num_classes=2,
            dropout=config.classifier_dropout,
            use_init_merge=False,
        )

        self.criterion = NTRENetLoss(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        # The model owns the BG prototype directly, so it is initialised here (transformers skips modules without
        # direct parameters, and post_init re-initialises everything).
        if isinstance(module, NTRENetModel):
            std = module.config.background_prototype_init_std
            if std > 0:
                init.normal_(module.bg_prototype, mean=0.0, std=std)
            else:
                init.zeros_(module.bg_prototype)

    @property
    def contrastive_bank(self) -> NTRENetContrastiveBank:
        """The DO prototype bank of the contrastive loss (held by `criterion`)."""
        return self.criterion.contrastive_bank

    def training_state_objects(self) -> dict[str, object]:
        """The contrastive bank: training state the trainer checkpoints, never part of the weights."""
        return {"contrastive_bank": self.contrastive_bank}

    # --- features ------------------------------------------------------------------------------------------------
    def _background_logits(self, features: torch.Tensor) -> torch.Tensor:
        """
        BG mining: `(batch, reduce_dim, h, w)` reduced features to `(batch, 2, h, w)` logits (channel 1 = BG).
        """
        batch_size, _, height, width = features.shape
        background = self.bg_prototype.expand(batch_size, -1, height, width)
        hidden = self.down_bg(torch.cat([features, background], dim=1))
        hidden = self.bg_res1(hidden) + hidden
        return self.bg_cls(hidden)

    def _encode_query(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The query's `layer4`, reduced mid-level `features` and `background_logits` (support-free)."""
        _, _, layer2, layer3, layer4 = self.backbone_features(pixel_values)
        features = self.down_query(pfenet_mid_level(layer2, layer3))
        return {"layer4": layer4, "features": features, "background_logits": self._background_logits(features)}

    def _encode_support(self, support_pixel_values, support_masks) -> NTRENetSupportEncoding:
        fields = pfenet_support_encoding(self.backbone, support_pixel_values, support_masks, self.down_supp)
        return NTRENetSupportEncoding(**fields)

    # --- decoder -------------------------------------------------------------------------------------------------
    def _distractor_prototype(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.distractor_pooling == "masked_average":
            return masked_average_pooling(features, mask)
        return (features * mask).mean(dim=(-2, -1), keepdim=True)

    def _decode(
        self,
        query_features: torch.Tensor,
        support_prototype: torch.Tensor,
        prior: torch.Tensor,
        background_logits: torch.Tensor,
    ) -> _DecoderOutput:
        """
        BG elimination, feature matching, DO elimination and PFENet's enrichment at every pyramid scale.

        Args:
            query_features (`torch.FloatTensor` of shape `(batch_size, reduce_dim, h, w)`)
            support_prototype (`torch.FloatTensor` of shape `(batch_size, reduce_dim, 1, 1)`)
            prior (`torch.FloatTensor` of shape `(batch_size, 1, h, w)`)
            background_logits (`torch.FloatTensor` of shape `(batch_size, 2, h, w)`)
        """
        fem = self.feature_enrichment
        batch_size, _, height, width = query_features.shape
        pyramid, aux_final, aux_initial = [], [], []
        distractor = initial_target = None
        for index, size in enumerate(fem.pyramid_sizes(height, width)):
            query_bin = F.adaptive_avg_pool2d(query_features, size)
            background_bin = self.bg_prototype.expand(batch_size, -1, *size)
            # BG eliminating (Eq. 4), then support feature matching with the prior (Eq. 5) and the initial
            # prediction (Eq. 6).
            merged = self.init_merge1[index](torch.cat([query_bin, background_bin], dim=1))
            merged = self.init_merge2[index](
                torch.cat([merged, support_prototype.expand(-1, -1, *size), resize(prior, size)], dim=1)
            )
            merged = self.initial_beta_conv[index](merged) + merged
            initial_logits = self.initial_inner_cls[index](merged)
            aux_initial.append(initial_logits)

            # DO mask (Eq. 7): neither background nor initial target; DO prototype (Eq. 8) and elimination (Eq. 9).
            background_argmax = resize(background_logits, size).argmax(dim=1, keepdim=True)
            initial_argmax = initial_logits.argmax(dim=1, keepdim=True)
            distractor_mask = F.relu(1 - background_argmax - initial_argmax).to(query_bin.dtype)
            distractor_prototype = self._distractor_prototype(query_bin, distractor_mask)
            merged = self.init_merge3[index](torch.cat([merged, distractor_prototype.expand(-1, -1, *size)], dim=1))

            merged, aux = fem.refine_scale(index, merged, pyramid[-1] if index >= 1 else None)
            aux_final.append(aux)
            pyramid.append(resize(merged, (height, width)))
            if index == 0:
                distractor = resize(distractor_mask, (height, width))
                initial_target = resize(initial_logits.softmax(dim=1)[:, 1:], (height, width))
        return _DecoderOutput(
            logits=fem.fuse(pyramid),
            aux_final=aux_final,
            aux_initial=aux_initial,
            distractor=distractor,
            initial_target=initial_target,
        )

    # --- forward -------------------------------------------------------------------------------------------------
    def _segment(self, pixel_values, support_encoding, labels=None, class_ids=None) -> FewShotSegmentationOutput:
        r"""
        BG and DO elimination, matching and PFENet's decoder on the queries; `class_ids` (declared in `query_inputs`)
        joins the arguments of `FewShotSegmentationPreTrainedModel._segment`:

        Args:
            class_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Episode class of each query, needed in training for the contrastive loss (its bank is per class);
                without it that term is skipped. Ignored outside training.
        """
        encoding = support_encoding
        batch_size = pixel_values.shape[0]
        if class_ids is not None:
            class_ids = torch.as_tensor(class_ids, device=pixel_values.device).long().reshape(-1)
            if class_ids.shape[0] != batch_size:
                raise ValueError(
                    f"class_ids must hold one class id per query, shape ({batch_size},), got {tuple(class_ids.shape)}"
                )

        query = self.query_encoding(pixel_values)
        layer4, query_features, background_logits = query["layer4"], query["features"], query["background_logits"]
        feature_size = query_features.shape[-2:]
        prior = multi_shot_prior_mask(layer4, encoding.high_level_features, encoding.masks, output_size=feature_size)
        decoded = self._decode(query_features, encoding.prototype, prior, background_logits)
        logits = resize(decoded.logits, pixel_values.shape[-2:])

        maps = {
            "prior": prior,
            "background": background_logits.softmax(dim=1)[:, 1:],
            "distractor": decoded.distractor,
            "initial_target": decoded.initial_target,
        }
        loss = losses = None
        if labels is not None:
            support_background_logits = self._background_logits(encoding.features.flatten(0, 1))
            loss, losses = self.criterion(
                labels,
                logits,
                decoded,
                query_features,
                background_logits,
                encoding,
                support_background_logits,
                class_ids,
            )
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses=losses, maps=maps)
