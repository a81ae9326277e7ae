"""
CRCNet: Cross-Reference and Region-Global Conditional Network (Liu, Zhang, Lin, Liu, "CRCNet: Few-shot Segmentation
with Cross-Reference and Region-Global Conditional Networks", IJCV 2022; arXiv 2208.10761).

No official code exists. This is a reconstruction from the paper (section 4, Eq. 1-5, Tables 1-7) with every detail
the paper leaves open made a config switch (`CRCNetConfig`); `DIFFERENCES_FROM_PAPER` lists each choice.

Layout: `backbone` + `encoder_projection` form the Siamese encoder (shared by support and query); `head`
(`CRCNetHead`) holds everything after it (cross-reference, co-occurrence heads, conditional modules, mask
refinement), the part K-shot finetuning adapts (section 4.6: "we fix the Siamese encoder and finetune the rest").
This file holds the modules, the loss and the model; how the model runs them lives beside it: `training.py` (the
training forward over (query, support) pairs), `inference.py` (multi-scale, K-shot fused inference) and
`finetuning.py` (K-shot support-set finetuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from transformers.utils import logging

from ...differences import read_differences
from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import MaskedCrossEntropy, autocast_off, conv_relu, cosine_prior_mask, masked_average_pooling, resize
from .configuration_crcnet import CRCNetConfig
from .finetuning import finetune_support_sets
from .inference import infer, scale_images
from .training import target_mask, train_forward

__all__ = [
    "DIFFERENCES_FROM_PAPER",
    "CRCNetHead",
    "CRCNetLoss",
    "CRCNetModel",
    "CRCNetSupportEncoding",
    "PairPrediction",
]

logger = logging.get_logger(__name__)

# Every point the paper (no official code) leaves open, and the choice made here: package data
# (hf_fss/model_cards/differences/crcnet.md), which the model card renders. The numbers refer to the ambiguity
# checklist of the project's method notes (section D.3).
DIFFERENCES_FROM_PAPER = read_differences("crcnet")


class ResidualPair(nn.Module):
    """Two 3x3 conv + ReLU with an identity skip: `x + f(x)`, `(B, C, h, w)` -> `(B, C, h, w)`."""

    def __init__(self, channels: int):
        super().__init__()
        self.layers = nn.Sequential(conv_relu(channels, channels), conv_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class CANetASPP(nn.Module):
    """
    CANet's ASPP (one_shot_network.py): image pooling + 1x1, a 1x1, and 3x3 convs at dilation 6 / 12 / 18, each with
    ReLU, concatenated (5C) and fused by a 1x1 conv + ReLU. `(B, C, h, w)` -> `(B, C, h, w)`.
    """

    def __init__(self, channels: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.pooled = conv_relu(channels, channels, kernel_size=1)
        self.point = conv_relu(channels, channels, kernel_size=1)
        self.atrous = nn.ModuleList(conv_relu(channels, channels, dilation=rate) for rate in rates)
        self.fuse = conv_relu(channels * (2 + len(rates)), channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(x.mean(dim=(-2, -1), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return self.fuse(torch.cat([pooled, self.point(x), *(conv(x) for conv in self.atrous)], dim=1))


class CrossReference(nn.Module):
    """
    Cross-reference module (section 4.3, Fig. 3): per branch GAP -> FC -> ReLU -> FC -> activation gives channel
    weights; the two are multiplied element-wise and reweight both feature maps, keeping the channels that respond
    in both images (the co-occurring object).

    Args:
        channels (`int`), reduction (`int`): hidden size `channels // reduction`.
        activation (`str`): `"sigmoid"`, `"relu"` or `"softmax"` (over channels), Table 6.
        shared (`bool`): one FC pair for both branches, else one for the query and one for the support branch.
    """

    def __init__(self, channels: int, reduction: int, activation: str, shared: bool):
        super().__init__()
        hidden = channels // reduction

        def mlp():
            # The FC layers as 1x1 convs on the pooled vector: the same maps, and (unlike nn.Linear's GEMM on CPU)
            # results that do not depend on the memory alignment of the weights, so a loaded checkpoint is
            # bit-identical to the saved model.
            return nn.Sequential(
                nn.Conv2d(channels, hidden, kernel_size=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
            )

        self.activation = activation
        self.fc = mlp()  # the query branch's, and the support branch's too when shared
        self.support_fc = None if shared else mlp()

    def _weights(self, fc: nn.Module, features: torch.Tensor) -> torch.Tensor:
        scores = fc(features.mean(dim=(-2, -1), keepdim=True))
        if self.activation == "sigmoid":
            return torch.sigmoid(scores)
        if self.activation == "softmax":
            return torch.softmax(scores, dim=1)
        return torch.relu(scores)

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, C, h, w)` query and `(B, C, h', w')` support -> the reweighted `(G_q, G_s)`."""
        support_fc = self.fc if self.support_fc is None else self.support_fc
        weights = self._weights(self.fc, query) * self._weights(support_fc, support)
        return query * weights, support * weights


class CoOccurrenceHead(nn.Module):
    """Co-occurrence decoder (section 4.3): `depth` x (3x3 conv + ReLU), optional ASPP, 1x1 conv to 2 classes."""

    def __init__(self, channels: int, depth: int, aspp: bool):
        super().__init__()
        self.layers = nn.Sequential(*(conv_relu(channels, channels) for _ in range(depth)))
        self.aspp = CANetASPP(channels) if aspp else nn.Identity()
        self.classifier = nn.Conv2d(channels, 2, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aspp(self.layers(features)))


class GlobalConditional(nn.Module):
    """
    Global conditional module (section 4.4, Fig. 5): the support's masked average feature (the category vector) is
    tiled over the target map, concatenated with it, then a 3x3 conv and a residual block.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.merge = conv_relu(2 * channels, channels)
        self.residual = ResidualPair(channels)

    def forward(self, target: torch.Tensor, reference: torch.Tensor, reference_mask: torch.Tensor) -> torch.Tensor:
        vector = masked_average_pooling(reference, reference_mask).expand(-1, -1, *target.shape[-2:])
        return self.residual(self.merge(torch.cat([target, vector], dim=1)))


class LocalConditional(nn.Module):
    """
    Local conditional module (section 4.4, Fig. 6, Eq. 1-3): `M_sim = theta(F_t)^T delta(F_r)` (`HW_t x HW_r`),
    `M' = softmax_rows(M_sim * mask_r)` (Eq. 2; `mask_mode` chooses the literal product, a `-inf` fill or no mask),
    `F'_t = F_r M'^T`: every target position aggregates reference features. The similarities and their softmax are
    computed in float32 whatever the model's dtype: a sum over `key_dim` products overflows float16 and bfloat16
    rounds the attention weights too coarsely.
    """

    def __init__(self, channels: int, key_dim: int, mask_mode: str, scaled: bool):
        super().__init__()
        self.theta = conv_relu(channels, key_dim, kernel_size=1)
        self.delta = conv_relu(channels, key_dim, kernel_size=1)
        self.mask_mode = mask_mode
        self.scale = 1.0 / math.sqrt(key_dim) if scaled else 1.0

    def forward(self, target: torch.Tensor, reference: torch.Tensor, reference_mask: torch.Tensor) -> torch.Tensor:
        """`target` `(B, C, h, w)`, `reference` `(B, C, h', w')`, `reference_mask` `(B, 1, h', w')` in [0, 1]."""
        batch_size, channels, height, width = target.shape
        query = self.theta(target).flatten(2).float()  # (B, d, HW_t)
        key = self.delta(reference).flatten(2).float()  # (B, d, HW_r)
        with autocast_off(query):  # float32 under a caller's autocast too
            similarity = torch.bmm(query.transpose(1, 2), key) * self.scale  # (B, HW_t, HW_r), float32
            mask = reference_mask.flatten(2).float()  # (B, 1, HW_r), broadcast over rows
            if self.mask_mode == "multiply":
                similarity = similarity * mask
            elif self.mask_mode == "neg_inf":
                # finfo.min rather than -inf: a mask empty at feature size gives uniform weights, not NaN.
                similarity = similarity.masked_fill(mask <= 0, torch.finfo(similarity.dtype).min)
            attention = similarity.softmax(dim=-1)
        attention = attention.to(reference.dtype)
        attended = torch.bmm(reference.flatten(2), attention.transpose(1, 2))  # (B, C, HW_t)
        return attended.reshape(batch_size, channels, height, width)


class GlobalConvolutionBlock(nn.Module):
    """Global convolution block (Peng et al. 2017): `(k x 1 -> 1 x k) + (1 x k -> k x 1)`, summed, ReLU."""

    def __init__(self, channels: int, kernel_size: int = 7):
        super().__init__()
        pad = kernel_size // 2
        self.left = nn.Sequential(
            nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0)),
            nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad)),
        )
        self.right = nn.Sequential(
            nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad)),
            nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.left(x) + self.right(x))


class MaskRefinement(nn.Module):
    """
    Mask refinement module (section 4.5, Fig. 7). `features` (once per pair): the input conv over
    `concat(conditional, G)` and the global convolution block. `step` (every iteration): the combined block fuses
    the features with the cache (the previous step's probabilities, zeros at first), then ASPP and a 1x1 classifier
    give 2-class logits at feature size.
    """

    def __init__(self, channels: int, in_channels: int, cache_channels: int, combined_block: str):
        super().__init__()
        self.cache_channels = cache_channels
        self.combined_block = combined_block
        self.input = conv_relu(in_channels, channels)
        self.global_conv = GlobalConvolutionBlock(channels)
        self.combine_in = conv_relu(channels + cache_channels, channels)
        if combined_block == "encoder_decoder":
            self.down = conv_relu(channels, channels, stride=2)
            self.combine_low = conv_relu(channels + cache_channels, channels)
            self.combine_out = conv_relu(2 * channels, channels)
        else:
            self.residual = ResidualPair(channels)
        self.aspp = CANetASPP(channels)
        self.classifier = nn.Conv2d(channels, 2, kernel_size=1)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.global_conv(self.input(inputs))

    def step(self, features: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
        """`features` `(B, C, h, w)`, `cache` `(B, cache_channels, h, w)` or None without cache -> `(B, 2, h, w)`."""
        with_cache = [features] if cache is None else [features, cache]
        hidden = self.combine_in(torch.cat(with_cache, dim=1))
        if self.combined_block == "encoder_decoder":
            low = self.down(hidden)
            low_in = [low] if cache is None else [low, resize(cache, low.shape[-2:])]
            low = self.combine_low(torch.cat(low_in, dim=1))
            hidden = self.combine_out(torch.cat([resize(low, hidden.shape[-2:]), hidden], dim=1))
        else:
            hidden = self.residual(hidden)
        return self.classifier(self.aspp(hidden))


@dataclass
class PairPrediction:
    """
    What `CRCNetHead` predicts for a (target, reference) pair.

    Args:
        logits (`list[torch.FloatTensor]`): `(B, 2, h, w)` target logits after each refinement step.
        caches (`list[torch.FloatTensor | None]`): the cache fed into each step (`caches[0]` zeros; None without
            cache); `caches[t + 1]` is derived from `logits[t]`.
        target_co_occurrence, reference_co_occurrence (`torch.FloatTensor` of shape `(B, 2, h, w)` or None):
            co-occurrence logits (QM_sub / SM_sub), None without the cross-reference module.
    """

    logits: list[torch.Tensor]
    caches: list[torch.Tensor | None]
    target_co_occurrence: torch.Tensor | None = None
    reference_co_occurrence: torch.Tensor | None = None


class CRCNetHead(nn.Module):
    """
    Everything after the Siamese encoder: cross-reference, co-occurrence heads, global / local conditional modules
    and the recurrent mask refinement. One call predicts the mask of a target image from a reference image and the
    reference's mask (the query from a support, or symmetrically a support from the query); K-shot finetuning adapts
    a copy of its parameters through `torch.func.functional_call`.
    """

    def __init__(self, config: CRCNetConfig):
        super().__init__()
        dim = config.reduce_dim
        self.config = config
        if config.use_cross_reference:
            self.cross_reference = CrossReference(
                dim, config.cross_reference_reduction, config.cross_reference_activation, config.cross_reference_shared
            )
            self.co_occurrence = CoOccurrenceHead(dim, config.co_occurrence_decoder_depth, config.co_occurrence_aspp)
        conditionals = 0
        if "global" in config.conditioning:
            self.global_conditional = GlobalConditional(dim)
            conditionals += 1
        if "local" in config.conditioning:
            self.local_conditional = LocalConditional(
                dim, config.local_key_dim or dim, config.local_attention_mask, config.local_scaled
            )
            conditionals += 1
        if conditionals:
            self.conditional_fuse = conv_relu(conditionals * dim, dim)
        cache_channels = 0
        if config.use_refinement_cache:
            cache_channels = 2 if config.refinement_cache_format == "probabilities" else 1
        # The prior mask (`prior_mask`) joins the refinement input as one more channel, as PFENet's FEM input.
        in_channels = dim * (1 + bool(conditionals)) + int(config.prior_mask)
        self.refinement = MaskRefinement(dim, in_channels, cache_channels, config.refinement_combined_block)

    def initial_cache(self, features: torch.Tensor) -> torch.Tensor | None:
        """The zero cache of the first step (section 4.5), or None without cache."""
        channels = self.refinement.cache_channels
        return features.new_zeros(features.shape[0], channels, *features.shape[-2:]) if channels else None

    def cache_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The cache of the next step: the softmax (2 channels) or its target channel, detached."""
        probabilities = logits.detach().softmax(dim=1)
        return probabilities if self.refinement.cache_channels == 2 else probabilities[:, 1:]

    def _conditional(self, target, reference, reference_mask) -> torch.Tensor | None:
        outputs = []
        if hasattr(self, "global_conditional"):
            outputs.append(self.global_conditional(target, reference, reference_mask))
        if hasattr(self, "local_conditional"):
            outputs.append(self.local_conditional(target, reference, reference_mask))
        return self.conditional_fuse(torch.cat(outputs, dim=1)) if outputs else None

    def forward(
        self,
        target: torch.Tensor,
        reference: torch.Tensor,
        reference_mask: torch.Tensor,
        steps: int,
        grad_steps: int = 1,
        target_is_query: bool = True,
        co_occurrence: bool = True,
        prior: torch.Tensor | None = None,
    ) -> PairPrediction:
        """
        Args:
            target (`torch.FloatTensor` of shape `(B, C, h, w)`): encoder features of the image to segment.
            reference (`torch.FloatTensor` of shape `(B, C, h', w')`): encoder features of the annotated image.
            reference_mask (`torch.FloatTensor` of shape `(B, 1, h', w')`): its target mask in [0, 1].
            steps (`int`): refinement steps (the cache starts at zeros; without cache one step is run).
            grad_steps (`int`): the last `grad_steps` steps keep autograd (the cache is detached between steps).
            target_is_query (`bool`): which FC pair of an unshared cross-reference module sees which image.
            co_occurrence (`bool`): also run the co-occurrence heads.
            prior (`torch.FloatTensor` of shape `(B, 1, h, w)`, *optional*): the target's prior mask in [0, 1]
                (`cosine_prior_mask`); required with `prior_mask=True`, refused without.

        Raises:
            `ValueError`: `prior` given without `config.prior_mask`, or missing with it.
        """
        if (prior is not None) != self.config.prior_mask:
            raise ValueError(
                f"CRCNetHead got prior={'a tensor' if prior is not None else None} with "
                f"prior_mask={self.config.prior_mask}: pass the prior mask exactly when prior_mask=True"
            )
        features_target, features_reference = target, reference
        target_co = reference_co = None
        if hasattr(self, "cross_reference"):
            if target_is_query:
                target, reference = self.cross_reference(target, reference)
            else:
                reference, target = self.cross_reference(reference, target)
            if co_occurrence:
                target_co, reference_co = self.co_occurrence(target), self.co_occurrence(reference)
        if self.config.conditional_input == "encoder":
            conditional = self._conditional(features_target, features_reference, reference_mask)
        else:
            conditional = self._conditional(target, reference, reference_mask)
        inputs = target if conditional is None else torch.cat([conditional, target], dim=1)
        if prior is not None:
            inputs = torch.cat([inputs, prior], dim=1)
        features = self.refinement.features(inputs)
        cache = self.initial_cache(features)
        steps = steps if cache is not None else 1
        logits, caches = [], []
        for step in range(steps):
            caches.append(cache)
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= steps - grad_steps):
                logits.append(self.refinement.step(features, cache))
            if cache is not None:
                cache = self.cache_from_logits(logits[-1])
        return PairPrediction(logits, caches, target_co, reference_co)


class CRCNetLoss(nn.Module):
    """
    CRCNet's training loss (Eq. 5) for N (target = query, reference = support) pairs: `L_QM + support_loss_weight
    L_SM + co_occurrence_loss_weight (L_QMsub + L_SMsub)`, each a 2-class cross-entropy (ignore 255) at the labels'
    size in float32 whatever the model's dtype; the refinement terms on the final step, or averaged over the steps
    that kept autograd (`intermediate_loss`).

    Args:
        config (`CRCNetConfig`): the weights and `ignore_index`.
    """

    def __init__(self, config: CRCNetConfig):
        super().__init__()
        self.config = config  # read at each call: the weights may change after construction
        self.cross_entropy = MaskedCrossEntropy(config.ignore_index, float32=True)

    def _step_loss(self, step_logits: list[torch.Tensor], labels: torch.Tensor, grad_steps: int) -> torch.Tensor:
        return torch.stack([self.cross_entropy(x, labels) for x in step_logits[-grad_steps:]]).mean()

    def forward(
        self,
        forward: PairPrediction,
        backward: PairPrediction,
        query_labels: torch.Tensor,
        support_labels: torch.Tensor,
        grad_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            forward (`PairPrediction`): the queries predicted from the supports (with the co-occurrence logits).
            backward (`PairPrediction`): the supports predicted from the query labels.
            query_labels, support_labels (`torch.LongTensor` of shape `(N, H, W)`): {0, 1, 255}.
            grad_steps (`int`): the refinement steps that kept autograd.

        Returns:
            `tuple(torch.FloatTensor, dict[str, torch.FloatTensor])`: the total and the detached named terms
            (`query`, `support`, and with the cross-reference module `query_co_occurrence`, `support_co_occurrence`).
        """
        losses = {
            "query": self._step_loss(forward.logits, query_labels, grad_steps),
            "support": self._step_loss(backward.logits, support_labels, grad_steps),
        }
        total = losses["query"] + self.config.support_loss_weight * losses["support"]
        if forward.target_co_occurrence is not None:
            losses["query_co_occurrence"] = self.cross_entropy(forward.target_co_occurrence, query_labels)
            losses["support_co_occurrence"] = self.cross_entropy(forward.reference_co_occurrence, support_labels)
            co_occurrence = losses["query_co_occurrence"] + losses["support_co_occurrence"]
            total = total + self.config.co_occurrence_loss_weight * co_occurrence
        return total, {name: value.detach() for name, value in losses.items()}


@dataclass
class CRCNetSupportEncoding(SupportEncoding):
    """
    What CRCNet keeps of a support set.

    Args (besides `shot`):
        scales (`torch.FloatTensor` of shape `(batch_size, num_scales)`): the image scales the features are at.
        features (`tuple` of `torch.FloatTensor` of shape `(batch_size, shot, reduce_dim, h_s, w_s)`):
            Siamese encoder features of the supports, one per scale.
        feature_masks (`tuple` of `torch.FloatTensor` of shape `(batch_size, shot, 1, h_s, w_s)`):
            target masks in [0, 1] at each scale's feature size (ignored pixels count as background).
        labels (`torch.LongTensor` of shape `(batch_size, shot, height, width)`): the support masks {0, 1, 255}.
        adapted_parameters (`tuple` of `torch.FloatTensor`, each `(batch_size, *parameter_shape)`, *optional*):
            the head's parameters finetuned on each support set (K-shot finetuning), in `head.named_parameters()`
            order; None when not finetuned.
        high_features (`tuple` of `torch.FloatTensor` of shape `(batch_size, shot, C4, h_s, w_s)`, *optional*):
            the frozen backbone's layer4 features of the supports, one per scale (no autograd), for the prior mask;
            None unless `prior_mask`.
        finetune_diverged (`torch.BoolTensor` of shape `(batch_size,)`, *optional*): True for each support set
            whose finetuning diverged (`finetune_max_loss_ratio`) and that keeps the unadapted head in
            `adapted_parameters`; None when not finetuned. Evaluation counts them.
    """

    scales: torch.FloatTensor | None = None
    features: tuple[torch.FloatTensor, ...] | None = None
    feature_masks: tuple[torch.FloatTensor, ...] | None = None
    labels: torch.LongTensor | None = None
    adapted_parameters: tuple[torch.FloatTensor, ...] | None = None
    high_features: tuple[torch.FloatTensor, ...] | None = None
    finetune_diverged: torch.BoolTensor | None = None


_LEVELS = {"layer3+layer4": (3, 4), "layer2+layer3": (2, 3), "layer4": (4,)}


class CRCNetModel(FewShotSegmentationPreTrainedModel):
    r"""
    CRCNet few-shot segmenter (paper section 4): the Siamese encoder (`backbone`, a dilated ResNet of output stride 8,
    its configured stages concatenated and projected to `reduce_dim` by `encoder_projection`), then `head`
    (`CRCNetHead`) on each (target, reference) pair: the query from each support and each support from the query
    (`support_logits`; conditioned on the query label in training, on the predicted query probability at
    inference). K shots and scales are fused as `shot_fusion` and `inference_scales` say (`CRCNetConfig`); the
    training loss is `CRCNetLoss` (Eq. 5).

    Logits at inference are `log` of the fused probabilities (background, target), so their softmax is the fused
    probability; in training they are the raw logits of the last refinement step (averaged over the K pairs).
    """

    config_class = CRCNetConfig
    support_encoding_class = CRCNetSupportEncoding

    def __init__(self, config: CRCNetConfig):
        super().__init__(config)
        self.backbone = self.build_backbone()
        levels = _LEVELS[config.feature_levels]
        if 4 not in levels:  # layer4 unused: keep it out of the optimiser (and of DDP's unused-parameter check)
            for module in self.backbone.stage_modules(4):
                module.requires_grad_(False)
        in_channels = sum(self.backbone.channels[level] for level in levels)
        self.encoder_projection = nn.Sequential(
            nn.Conv2d(in_channels, config.reduce_dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(config.encoder_dropout),
        )
        self.head = CRCNetHead(config)
        self.criterion = CRCNetLoss(config)
        self.post_init()

    @property
    def output_maps(self) -> dict[str, str]:
        """Every map `outputs.maps` may hold: one per refinement step (as many as the config runs) and the
        co-occurrence map."""
        most = max(self.config.refinement_steps, self.config.training_refinement_steps)
        maps = {f"refinement_step_{t}": f"target probability after refinement step {t}" for t in range(1, most + 1)}
        maps["co_occurrence"] = "probability of the object co-occurring in query and support (cross-reference head)"
        return maps

    def _init_weights(self, module):
        # (15) He init for the modules' convs: no normalisation layer keeps their activations' scale otherwise.
        if self.config.module_init == "kaiming_normal" and isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    # --- encoder -------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Siamese encoder: `(N, 3, H, W)` -> `(N, reduce_dim, H / 8, W / 8)` (the configured stages, projected)."""
        return self._encode(pixel_values, high_level=False)[0]

    def _encode(self, pixel_values: torch.Tensor, high_level: bool | None = None):
        """
        `(N, 3, H, W)` -> (encoder features `(N, reduce_dim, h, w)`, layer4 features `(N, C4, h, w)` or None). The
        layer4 features (for the prior mask; `high_level` defaults to `config.prior_mask`) never carry autograd:
        detached when layer4 is one of the encoder's levels, else computed once more from layer3 under no_grad.
        """
        high_level = self.config.prior_mask if high_level is None else high_level
        levels = _LEVELS[self.config.feature_levels]
        stages = self.backbone.forward_stages(pixel_values, 0, max(levels) + 1)
        size = stages[levels[-1]].shape[-2:]
        features = self.encoder_projection(torch.cat([resize(stages[level], size) for level in levels], dim=1))
        if not high_level:
            return features, None
        if len(stages) > 4:
            return features, stages[4].detach()
        with torch.no_grad():
            return features, self.backbone.forward_stages(stages[3], 4, 5)[0]

    def _prior(self, target_high, reference_high, reference_mask, size) -> torch.Tensor | None:
        """PFENet's prior mask of the targets `(N, 1, *size)` from the layer4 features `(N, C4, h, w)` of targets and
        references and the references' masks `(N, 1, h', w')`; None when `prior_mask` is off."""
        if target_high is None:
            return None
        return cosine_prior_mask(target_high, reference_high, reference_mask.detach(), output_size=tuple(size))

    def _scales(self) -> tuple[float, ...]:
        return (1.0,) if self.training else tuple(self.config.inference_scales)

    def _encode_support(self, support_pixel_values, support_masks) -> CRCNetSupportEncoding:
        batch_size, shot = support_pixel_values.shape[:2]
        images = support_pixel_values.flatten(0, 1)
        targets = target_mask(support_masks.flatten(0, 1), images.dtype)
        scales = self._scales()
        features, feature_masks, high_features = [], [], []
        for scale in scales:
            scaled, high = self._encode(scale_images(images, scale))
            features.append(scaled.unflatten(0, (batch_size, shot)))
            feature_masks.append(resize(targets, scaled.shape[-2:]).unflatten(0, (batch_size, shot)))
            if high is not None:
                high_features.append(high.unflatten(0, (batch_size, shot)))
        adapted = diverged = None
        if not self.training and shot > 1 and self.config.shot_fusion != "average":
            adapted, diverged = finetune_support_sets(self, support_pixel_values, support_masks)
        return CRCNetSupportEncoding(
            shot=shot,
            scales=torch.tensor(scales, device=images.device).expand(batch_size, -1),
            features=tuple(features),
            feature_masks=tuple(feature_masks),
            labels=support_masks.long(),
            adapted_parameters=adapted,
            high_features=tuple(high_features) if high_features else None,
            finetune_diverged=diverged,
        )

    # --- predictions ---------------------------------------------------------------------------------------------
    def _run_head(self, params, *args, **kwargs) -> PairPrediction:
        """The head with its own parameters (`params` None) or with finetuned ones (a name -> tensor dict)."""
        if params is None:
            return self.head(*args, **kwargs)
        return functional_call(self.head, params, args, kwargs)

    def _head_parameters(self, encoding: CRCNetSupportEncoding, index: int) -> dict[str, torch.Tensor] | None:
        if encoding.adapted_parameters is None:
            return None
        names = [name for name, _ in self.head.named_parameters()]
        return {name: value[index] for name, value in zip(names, encoding.adapted_parameters)}

    # --- forward -------------------------------------------------------------------------------------------------
    def _segment(self, pixel_values, support_encoding, labels=None) -> FewShotSegmentationOutput:
        r"""
        The arguments of `FewShotSegmentationPreTrainedModel._segment` (with a `CRCNetSupportEncoding`); with labels in
        training, the loss is Eq. 5 (query and support predictions, co-occurrence terms).

        Returns:
            `FewShotSegmentationOutput` with `logits` `(batch_size, 2, height, width)`, `support_logits`
            `(batch_size, shot, 2, height_s, width_s)` (unless `predict_support=False` at inference), `maps`
            (`refinement_step_t`, `co_occurrence`, each `(batch_size, 1, h, w)`) and, with labels in training,
            `loss` and `losses` (`query`, `support`, `query_co_occurrence`, `support_co_occurrence`).
        """
        if self.training:
            return train_forward(self, pixel_values, support_encoding, labels)
        outputs = infer(self, pixel_values, support_encoding)
        if labels is not None:  # evaluation loss: the query term on the fused prediction
            outputs.loss = self.criterion.cross_entropy(outputs.logits, labels.long())
            outputs.losses = {"query": outputs.loss.detach()}
        return outputs
